"""Annotated dependencies: the request's session (committed at the edge) and tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.auth import cached_tenant_for_key, tenant_for_key
from app.db import session_scope
from app.errors import Unauthorized
from app.ratelimit import check_bad_key_budget, check_known_key_request, check_rate, record_bad_key
from app.tables import Tenant


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(read_only=request.method in ("GET", "HEAD")) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant(request: Request, session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    address = request.client.host if request.client else "unknown"
    if authorization and authorization.lower().startswith("bearer "):
        cached = cached_tenant_for_key(authorization[7:].strip())
        if cached is not None:  # verified a moment ago: the bad-key budget and the rate in one round trip
            check_known_key_request(address, cached.id)
            return cached
    check_bad_key_budget(address)  # key guessing: an address with too many bad keys is not even looked up
    if not authorization or not authorization.lower().startswith("bearer "):
        record_bad_key(address)
        raise Unauthorized("send 'Authorization: Bearer <api key>'")
    tenant = tenant_for_key(session, authorization[7:].strip())
    if tenant is None:
        record_bad_key(address)
        raise Unauthorized("the API key is unknown or revoked")
    check_rate(tenant.id)
    if session.get_bind().dialect.name == "sqlite":
        # End the authentication transaction now: on SQLite a transaction holds the write lock,
        # and an upload or a stream must not hold it while bytes flow.
        session.commit()
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
