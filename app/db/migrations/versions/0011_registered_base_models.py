"""registered base models

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('base_models',
    sa.Column('id', sa.String(length=255), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('family', sa.String(length=64), nullable=False),
    sa.Column('parameters', sa.BigInteger(), nullable=False),
    sa.Column('context_length', sa.Integer(), nullable=False),
    sa.Column('stored_dtype', sa.String(length=16), nullable=False),
    sa.Column('chat_template', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('base_models')
