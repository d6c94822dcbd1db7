"""Dependency aliases: session, settings, blob store, queue, and path objects validated once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Path
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.db.models import Dataset, Job, Model
from app.db.session import get_sessionmaker
from app.queue import TaskQueue, get_queue
from app.services import jobs as job_service
from app.services import uploads as upload_service
from app.services.auth import Forbidden, Principal, authenticate
from app.storage import BlobStore, get_blob_store


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def get_store() -> BlobStore:
    return get_blob_store()


def get_task_queue() -> TaskQueue:
    return get_queue()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_task_queue)]

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]


def get_principal(
    db: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header(description="the API key, instead of Authorization")] = None,
) -> Principal:
    presented = x_api_key
    if authorization and authorization[:7].lower() == "bearer ":
        presented = authorization[7:].strip()
    return authenticate(db=db, settings=settings, presented=presented)


def tenant_principal(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if principal.tenant_id is None:
        raise Forbidden("the admin key manages tenants and keys; use a tenant's key for models, datasets and jobs")
    return principal


def admin_principal(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs the admin key (MODELPRESS_ADMIN_KEY)")
    return principal


TenantDep = Annotated[Principal, Depends(tenant_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]


def valid_job(db: SessionDep, principal: TenantDep, job_id: ObjectId) -> Job:
    return job_service.get_or_404(db=db, tenant_id=principal.tenant_id, job_id=job_id)


def valid_model(db: SessionDep, principal: TenantDep, model_id: ObjectId) -> Model:
    return upload_service.get_or_404(db, Model, model_id, tenant_id=principal.tenant_id)


def valid_dataset(db: SessionDep, principal: TenantDep, dataset_id: ObjectId) -> Dataset:
    return upload_service.get_or_404(db, Dataset, dataset_id, tenant_id=principal.tenant_id)


JobDep = Annotated[Job, Depends(valid_job)]
ModelDep = Annotated[Model, Depends(valid_model)]
DatasetDep = Annotated[Dataset, Depends(valid_dataset)]
