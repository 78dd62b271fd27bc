"""models.forward_kwargs: constant non-tensor arguments of forward declared at upload

Revision ID: b7d4e2a9c1f3
Revises: a3c1e7d2b9f0
Create Date: 2026-12-03 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "b7d4e2a9c1f3"
down_revision = "a3c1e7d2b9f0"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("forward_kwargs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("forward_kwargs")
