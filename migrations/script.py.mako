"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Use the resolved names from ``context.config.attributes`` (``fleetmem_schema``,
``fleetmem_table``), quoted with ``quote_ident``; never format other text into SQL.
Add the new revision to ``REVISIONS`` in ``fleetmem.backends.postgres.migrate``.
"""

from __future__ import annotations

from alembic import context, op

from fleetmem.backends.postgres.migrate import quote_ident

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
