"""API keys: 256 random bits with a recognisable prefix, stored only as a SHA-256 hash."""
from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tables import ApiKey, Tenant, utcnow

KEY_PREFIX = "mpk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant_name: str) -> tuple[ApiKey, str]:
    """Make a key for the tenant (created on first use); the plain key is returned once, never stored."""
    tenant = get_or_create_tenant(session, tenant_name)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(tenant_id=tenant.id, prefix=plain[:12], key_hash=hash_key(plain))
    session.add(record)
    session.flush()
    return record, plain


def tenant_for_key(session: Session, plain: str) -> Tenant | None:
    """The tenant of an active key, in one query (it runs on every request)."""
    digest = hash_key(plain)
    row = session.execute(select(Tenant, ApiKey.key_hash).join(ApiKey, ApiKey.tenant_id == Tenant.id)
                          .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).first()
    if row is None or not hmac.compare_digest(row[1], digest):
        return None
    return row[0]


def revoke_key(session: Session, key_id: str) -> bool:
    record = session.get(ApiKey, key_id)
    if record is None or record.revoked_at is not None:
        return False
    record.revoked_at = utcnow()
    return True
