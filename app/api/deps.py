"""Dependency aliases: session, settings, blob store, queue, and path objects validated once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.db.models import Dataset, Job, Model
from app.db.session import get_sessionmaker
from app.queue import TaskQueue, get_queue
from app.services import jobs as job_service
from app.services import uploads as upload_service
from app.storage import BlobStore


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def get_store(settings: Annotated[Settings, Depends(get_settings)]) -> BlobStore:
    return BlobStore(settings.blob_dir, settings.tmp_dir)


def get_task_queue() -> TaskQueue:
    return get_queue()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]
QueueDep = Annotated[TaskQueue, Depends(get_task_queue)]

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]


def valid_job(db: SessionDep, job_id: ObjectId) -> Job:
    return job_service.get_or_404(db=db, job_id=job_id)


def valid_model(db: SessionDep, model_id: ObjectId) -> Model:
    return upload_service.get_or_404(db, Model, model_id)


def valid_dataset(db: SessionDep, dataset_id: ObjectId) -> Dataset:
    return upload_service.get_or_404(db, Dataset, dataset_id)


JobDep = Annotated[Job, Depends(valid_job)]
ModelDep = Annotated[Model, Depends(valid_model)]
DatasetDep = Annotated[Dataset, Depends(valid_dataset)]
