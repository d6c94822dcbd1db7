"""API keys: only their sha256 is stored; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
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


class _KeyCache:
    """key hash -> (expiry, tenant id): most requests authenticate without a database round trip.

    A revoked key stops working at once in the process that revoked it and within `ttl_s` elsewhere.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, tenant_id: str, ttl_s: float) -> None:
        if ttl_s > 0:
            with self._lock:
                if len(self._entries) > 10_000:
                    self._entries.clear()
                self._entries[key_hash] = (time.monotonic() + ttl_s, tenant_id)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


KEY_CACHE = _KeyCache()
_local_tenant_ready = False


def authenticate_fast(*, settings: Settings, presented: str | None) -> Principal | None:
    """Resolve a key without the database when possible; None means "look it up" (raises 401 if absent)."""
    if not presented:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    admin = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    if admin and hmac.compare_digest(presented.encode(), admin.encode()):
        return Principal(tenant_id=None, is_admin=True)
    local = settings.local_key
    if local and hmac.compare_digest(presented.encode(), local.encode()) and _local_tenant_ready:
        return Principal(tenant_id=LOCAL_TENANT_ID)
    tenant_id = KEY_CACHE.get(hash_key(presented))
    return Principal(tenant_id=tenant_id) if tenant_id else None


def authenticate(*, db: Session, settings: Settings, presented: str | None) -> Principal:
    """Resolve a presented key to its principal, or raise 401."""
    principal = authenticate_fast(settings=settings, presented=presented)
    if principal is not None:
        return principal
    local = settings.local_key
    if local and hmac.compare_digest(presented.encode(), local.encode()):
        ensure_local_tenant(db)
        return Principal(tenant_id=LOCAL_TENANT_ID)
    key_hash = hash_key(presented)
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    if row is None:
        raise Unauthorized("invalid or revoked API key")
    KEY_CACHE.put(key_hash, row.tenant_id, settings.auth_cache_ttl_s)
    return Principal(tenant_id=row.tenant_id)


def ensure_local_tenant(db: Session) -> None:
    global _local_tenant_ready
    if db.get(Tenant, LOCAL_TENANT_ID) is None:
        db.add(Tenant(id=LOCAL_TENANT_ID, name="local"))
        try:
            db.commit()
        except IntegrityError:  # another request created it first
            db.rollback()
    _local_tenant_ready = True


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
    KEY_CACHE.clear()
    return key
