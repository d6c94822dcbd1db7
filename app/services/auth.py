"""API keys: only their sha256 is stored; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import LOCAL_TENANT_ID, ApiKey, Tenant, utcnow
from app.errors import ApiError, Conflict, NotFound


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    tenant_id: str | None  # None for the admin key, which manages tenants but owns no data
    is_admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authenticate(*, db: Session, settings: Settings, presented: str | None) -> Principal:
    """Resolve a presented key to its principal, or raise 401."""
    if not presented:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    if admin and hmac.compare_digest(presented.encode(), admin.encode()):
        return Principal(tenant_id=None, is_admin=True)
    local = settings.local_key
    if local and hmac.compare_digest(presented.encode(), local.encode()):
        ensure_local_tenant(db)
        return Principal(tenant_id=LOCAL_TENANT_ID)
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(presented), ApiKey.revoked_at.is_(None)))
    if row is None:
        raise Unauthorized("invalid or revoked API key")
    return Principal(tenant_id=row.tenant_id)


def ensure_local_tenant(db: Session) -> None:
    if db.get(Tenant, LOCAL_TENANT_ID) is None:
        db.add(Tenant(id=LOCAL_TENANT_ID, name="local"))
        try:
            db.commit()
        except IntegrityError:  # another request created it first
            db.rollback()


def create_tenant(*, db: Session, name: str, max_concurrent_jobs: int | None) -> Tenant:
    """Create a tenant; 409 if the name is taken."""
    tenant = Tenant(name=name, max_concurrent_jobs=max_concurrent_jobs)
    db.add(tenant)
    try:
        db.commit()
    except IntegrityError as exc:
        db.rollback()
        raise Conflict(f"a tenant named {name!r} exists", {"field": "name"}) from exc
    return tenant


def create_key(*, db: Session, tenant_id: str, name: str) -> tuple[ApiKey, str]:
    """Issue a new key for a tenant; the plain key is returned once and never stored."""
    if db.get(Tenant, tenant_id) is None:
        raise NotFound(f"tenant {tenant_id} not found", {"id": tenant_id})
    plain = "mp_" + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, name=name, prefix=plain[:10], key_hash=hash_key(plain))
    db.add(key)
    db.commit()
    return key, plain


def revoke_key(*, db: Session, key_id: str) -> ApiKey:
    """Revoke a key at once; revoking twice is harmless."""
    key = db.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"API key {key_id} not found", {"id": key_id})
    key.revoked_at = key.revoked_at or utcnow()
    db.commit()
    return key
