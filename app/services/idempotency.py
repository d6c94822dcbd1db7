"""Idempotency-Key support: a retried request returns what the first one created, never a duplicate."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import IdempotencyRecord
from app.errors import Unprocessable


@dataclass(frozen=True)
class IdempotencyKey:
    tenant_id: str
    key: str
    scope: str  # models | datasets | jobs
    request_hash: str

    @classmethod
    def of(cls, *, tenant_id: str, key: str | None, scope: str, request: Any) -> IdempotencyKey | None:
        if not key:
            return None
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
        return cls(tenant_id=tenant_id, key=key, scope=scope, request_hash=digest)


def replayed_resource(db: Session, idem: IdempotencyKey | None) -> str | None:
    """The id created by an earlier request with this key, or None; 422 if the key served another request."""
    if idem is None:
        return None
    record = db.scalar(
        select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == idem.tenant_id, IdempotencyRecord.key == idem.key)
    )
    if record is None:
        return None
    if record.scope != idem.scope or record.request_hash != idem.request_hash:
        raise Unprocessable(
            "this Idempotency-Key was already used for a different request",
            {"field": "Idempotency-Key", "original_scope": record.scope},
            code="idempotency_key_reused",
        )
    return record.resource_id


def remember(db: Session, idem: IdempotencyKey | None, resource_id: str) -> None:
    """Record the key in the caller's transaction, so the object and the record commit together."""
    if idem is not None:
        db.add(IdempotencyRecord(tenant_id=idem.tenant_id, key=idem.key, scope=idem.scope,
                                 request_hash=idem.request_hash, resource_id=resource_id))


def forget(db: Session, resource_id: str) -> None:
    db.execute(delete(IdempotencyRecord).where(IdempotencyRecord.resource_id == resource_id))
