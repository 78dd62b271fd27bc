"""models.inputs: the forward's inputs declared at upload

Revision ID: a3c1e7d2b9f0
Revises: fbf8b5103cdf
Create Date: 2026-12-02 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a3c1e7d2b9f0"
down_revision = "fbf8b5103cdf"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("inputs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("inputs")
