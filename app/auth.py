"""API keys: 256 random bits with a recognisable prefix, stored only as a SHA-256 hash.

Verified keys are remembered in this process for MODELPRESS_API_KEY_CACHE_SECONDS (default 5 s), so a
client polling a job costs no key lookup per request. Revoking a key forgets it at once in the process that
revokes it; other API processes stop accepting it within that many seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

from sqlalchemy import event, select
from sqlalchemy.orm import Session, make_transient_to_detached

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


class VerifiedKeys:
    """key hash -> (expiry, tenant id, name, created_at) of keys found active in the database, bounded LRU."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self.lock = threading.Lock()
        self.items: OrderedDict[str, tuple[float, str, str, object]] = OrderedDict()

    def get(self, digest: str) -> Tenant | None:
        with self.lock:
            entry = self.items.get(digest)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self.items[digest]
                return None
            self.items.move_to_end(digest)
        # a fresh detached copy per request: no request can change or expire another's object
        tenant = Tenant(id=entry[1], name=entry[2], created_at=entry[3])
        make_transient_to_detached(tenant)
        return tenant

    def put(self, digest: str, tenant: Tenant, ttl_s: float) -> None:
        with self.lock:
            self.items[digest] = (time.monotonic() + ttl_s, tenant.id, tenant.name, tenant.created_at)
            self.items.move_to_end(digest)
            while len(self.items) > self.max_entries:
                self.items.popitem(last=False)

    def forget(self, digest: str) -> None:
        with self.lock:
            self.items.pop(digest, None)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


verified_keys = VerifiedKeys()


def cached_tenant_for_key(plain: str) -> Tenant | None:
    """The tenant of a key verified within the cache's lifetime, without touching the database; else None."""
    from app.config import get_settings

    if get_settings().api_key_cache_seconds <= 0:
        return None
    return verified_keys.get(hash_key(plain))


def tenant_for_key(session: Session, plain: str) -> Tenant | None:
    """The tenant of an active key: from the short in-process cache, else in one query."""
    from app.config import get_settings

    digest = hash_key(plain)
    ttl_s = get_settings().api_key_cache_seconds
    if ttl_s > 0 and (cached := verified_keys.get(digest)) is not None:
        return cached
    row = session.execute(
        select(Tenant, ApiKey.key_hash)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(row[1], digest):
        return None
    if ttl_s > 0:
        verified_keys.put(digest, row[0], ttl_s)
    return row[0]


def revoke_key(session: Session, key_id: str) -> bool:
    record = session.get(ApiKey, key_id)
    if record is None or record.revoked_at is not None:
        return False
    record.revoked_at = utcnow()
    digest = record.key_hash
    verified_keys.forget(digest)
    # and again once committed, in case a request re-verified the key before the revocation landed
    event.listen(session, "after_commit", lambda _session: verified_keys.forget(digest), once=True)
    return True
