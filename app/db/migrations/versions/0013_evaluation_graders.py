"""graders of evaluations and of jobs' end reports

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations') as batch_op:
        batch_op.add_column(sa.Column('grading', sa.JSON(), nullable=True))
    with op.batch_alter_table('fine_tuning_jobs') as batch_op:
        batch_op.add_column(sa.Column('graders', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('fine_tuning_jobs') as batch_op:
        batch_op.drop_column('graders')
    with op.batch_alter_table('evaluations') as batch_op:
        batch_op.drop_column('grading')
