"""Dependency aliases: session, settings, blob store, queue, and path objects validated once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Path
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.db.models import Dataset, Job, Model
from app.db.session import get_sessionmaker
from app.queue import TaskQueue, get_queue
from app.services import jobs as job_service
from app.services import uploads as upload_service
from app.services.auth import Forbidden, Principal, authenticate, authenticate_fast
from app.storage import BlobStore, get_blob_store


# Dependencies without I/O are `async def`: a sync one costs a hop to the thread pool per request.
# Dependencies that query release their connection before returning (`release`), so no request holds
# a pooled connection while it waits for a thread: under load that wait would deadlock the pool.


async def get_db() -> AsyncIterator[Session]:
    session = get_sessionmaker()()  # no connection until the first query
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


def release(db: Session) -> None:
    """End the read transaction so the connection goes back to the pool (loaded objects stay usable)."""
    db.commit()


async def current_settings() -> Settings:
    return get_settings()


async def get_store() -> BlobStore:
    return get_blob_store()


async def get_task_queue() -> TaskQueue:
    return get_queue()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(current_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_task_queue)]

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]


def _authenticate_with_db(settings: Settings, presented: str | None) -> Principal:
    with get_sessionmaker()() as db:
        return authenticate(db=db, settings=settings, presented=presented)


async def get_principal(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header(description="the API key, instead of Authorization")] = None,
) -> Principal:
    presented = x_api_key
    if authorization and authorization[:7].lower() == "bearer ":
        presented = authorization[7:].strip()
    principal = authenticate_fast(settings=settings, presented=presented)
    if principal is None:
        principal = await run_in_threadpool(_authenticate_with_db, settings, presented)
    return principal


async def tenant_principal(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if principal.tenant_id is None:
        raise Forbidden("the admin key manages tenants and keys; use a tenant's key for models, datasets and jobs")
    return principal


async def admin_principal(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs the admin key (MODELPRESS_ADMIN_KEY)")
    return principal


TenantDep = Annotated[Principal, Depends(tenant_principal)]
AdminDep = Annotated[Principal, Depends(admin_principal)]


def valid_job(db: SessionDep, principal: TenantDep, job_id: ObjectId) -> Job:
    job = job_service.get_or_404(db=db, tenant_id=principal.tenant_id, job_id=job_id)
    release(db)
    return job


def valid_model(db: SessionDep, principal: TenantDep, model_id: ObjectId) -> Model:
    model = upload_service.get_or_404(db, Model, model_id, tenant_id=principal.tenant_id)
    release(db)
    return model


def valid_dataset(db: SessionDep, principal: TenantDep, dataset_id: ObjectId) -> Dataset:
    dataset = upload_service.get_or_404(db, Dataset, dataset_id, tenant_id=principal.tenant_id)
    release(db)
    return dataset


JobDep = Annotated[Job, Depends(valid_job)]
ModelDep = Annotated[Model, Depends(valid_model)]
DatasetDep = Annotated[Dataset, Depends(valid_dataset)]
