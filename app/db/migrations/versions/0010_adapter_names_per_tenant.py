"""adapter names per tenant: UNIQUE(name) becomes UNIQUE(tenant_id, name)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0001 made UNIQUE(name) without a name: PostgreSQL called it adapters_name_key, SQLite left it unnamed. The
# naming convention gives the unnamed one a name in batch mode (SQLite copies the table), so it can be dropped.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
NEW = 'uq_adapters_tenant_id_name'


def _unique_on_name() -> str:
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints('adapters'):
        if constraint['column_names'] == ['name'] and constraint['name']:
            return str(constraint['name'])
    return 'uq_adapters_name'


def upgrade() -> None:
    old = _unique_on_name()
    with op.batch_alter_table('adapters', naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint(old, type_='unique')
        batch_op.create_unique_constraint(NEW, ['tenant_id', 'name'])


def downgrade() -> None:
    # Fails while two tenants have an adapter of the same name: which one would keep it is not ours to pick.
    with op.batch_alter_table('adapters', naming_convention=NAMING) as batch_op:
        batch_op.drop_constraint(NEW, type_='unique')
        batch_op.create_unique_constraint('adapters_name_key', ['name'])
