"""job device class

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('fine_tuning_jobs', sa.Column('device_class', sa.String(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column('fine_tuning_jobs', 'device_class')
