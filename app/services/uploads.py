"""Model and dataset uploads: store the bytes, create the row, let a worker validate, wait briefly."""

from __future__ import annotations

import time
from typing import Any, BinaryIO, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset, Model, UploadStatus
from app.errors import NotFound, PayloadTooLarge, ServiceUnavailable, Unprocessable
from app.queue import QueueUnavailable, TaskQueue
from app.services.idempotency import IdempotencyKey, forget, remember, replayed_resource
from app.storage import BlobStore, EmptyUpload, UploadTooLarge

UploadT = TypeVar("UploadT", Model, Dataset)


def store_upload(*, store: BlobStore, stream: BinaryIO, settings: Settings) -> tuple[str, int]:
    """Stream an upload into the blob store, mapping size problems to API errors."""
    try:
        return store.put_stream(stream, settings.max_upload_bytes)
    except UploadTooLarge as exc:
        raise PayloadTooLarge(str(exc), {"limit_bytes": exc.limit}) from exc
    except EmptyUpload as exc:
        raise Unprocessable("the uploaded file is empty", {"field": "file"}, code="empty_file") from exc


def create_and_validate(
    *,
    db: Session,
    store: BlobStore,
    queue: TaskQueue,
    settings: Settings,
    row: UploadT,
    idempotency_key: str | None = None,
) -> UploadT:
    """Persist `row`, ask a worker to validate its file and wait up to the configured time.

    An invalid upload is removed (row and file) and raised as a 422 with the worker's explanation.
    A retried request with the same Idempotency-Key returns the first upload's row.
    """
    entity = type(row)
    request = {"sha256": row.sha256, "fields": {"architecture": getattr(row, "architecture", None),
                                                 "arch_kwargs": getattr(row, "arch_kwargs", None)}}
    idem = IdempotencyKey.of(tenant_id=row.tenant_id, key=idempotency_key, scope=entity.__tablename__, request=request)
    if (earlier := replayed_resource(db, idem)) is not None:
        return get_or_404(db, entity, earlier, tenant_id=row.tenant_id)
    db.add(row)
    db.flush()
    remember(db, idem, row.id)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        return get_or_404(db, entity, replayed_resource(db, idem) or "", tenant_id=row.tenant_id)
    try:
        if isinstance(row, Model):
            queue.enqueue_model_inspection(row.id)
        else:
            queue.enqueue_dataset_inspection(row.id)
    except QueueUnavailable as exc:
        _discard(db=db, store=store, row=row)
        raise ServiceUnavailable(str(exc)) from exc
    row = wait_for_validation(db=db, row=row, timeout_s=settings.validation_wait_s)
    if row.status == UploadStatus.INVALID:
        error: dict[str, Any] = dict(row.error or {})
        _discard(db=db, store=store, row=row)
        raise Unprocessable(
            error.get("message", "the file was rejected"), error.get("details", {}), code=error.get("code", "invalid_upload")
        )
    return row


def wait_for_validation(*, db: Session, row: UploadT, timeout_s: float) -> UploadT:
    """Poll the row until a worker has validated it or the time is up."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while row.status == UploadStatus.VALIDATING and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
        db.refresh(row)
    return row


def _discard(*, db: Session, store: BlobStore, row: Model | Dataset) -> None:
    sha = row.sha256
    forget(db, row.id)
    db.delete(row)
    db.commit()
    still_used = db.scalar(select(func.count()).select_from(Model).where(Model.sha256 == sha)) or 0
    still_used += db.scalar(select(func.count()).select_from(Dataset).where(Dataset.sha256 == sha)) or 0
    if not still_used:
        store.delete(sha)


def get_or_404(db: Session, entity: type[UploadT], object_id: str, *, tenant_id: str) -> UploadT:
    """Fetch a tenant's model or dataset by id or raise 404 (another tenant's object is a 404 too)."""
    row = db.get(entity, object_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"{entity.__name__.lower()} {object_id} not found", {"id": object_id})
    return row
