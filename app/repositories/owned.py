"""Rows a tenant owns: the lookup that makes another tenant's object as absent as a missing one."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.tables import Job, StoredDataset, StoredModel

Owned = TypeVar("Owned", StoredModel, StoredDataset, Job)
Upload = TypeVar("Upload", StoredModel, StoredDataset)


def get_owned(session: Session, table: type[Owned], *, tenant_id: str, object_id: str, label: str) -> Owned:
    record = session.get(table, object_id)
    if record is None or record.tenant_id != tenant_id:
        raise NotFound(f"no {label} {object_id!r}")
    return record


def newest(session: Session, table: type[Upload], *, tenant_id: str, limit: int) -> list[Upload]:
    """The tenant's newest uploads of one kind (models or datasets), newest first."""
    query = select(table).where(table.tenant_id == tenant_id).order_by(table.created_at.desc()).limit(limit)
    return list(session.scalars(query).all())


def stored_bytes(session: Session, *, tenant_id: str) -> int:
    """What the tenant's uploads take in storage, models and datasets together."""
    total = 0
    for table in (StoredModel, StoredDataset):
        total += int(
            session.scalar(select(func.coalesce(func.sum(table.size_bytes), 0)).where(table.tenant_id == tenant_id))
            or 0
        )
    return total
