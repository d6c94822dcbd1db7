"""Job submission, cancellation and queries."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Dataset, Job, JobStatus, Model, Tenant, UploadStatus
from app.errors import Conflict, NotFound, ServiceUnavailable, TooManyRequests, Unprocessable
from app.queue import QueueUnavailable, TaskQueue
from app.schemas import JobCreate
from app.services.idempotency import IdempotencyKey, forget, remember, replayed_resource
from app.services.job_lifecycle import add_event, transition
from app.services.routing import choose_queue
from app.services.pagination import paginate


def _ready_upload(
    db: Session, entity: type[Model] | type[Dataset], object_id: str, field: str, tenant_id: str
) -> Model | Dataset:
    row = db.get(entity, object_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"{field} {object_id} not found", {"field": field})
    if row.status != UploadStatus.READY:
        raise Conflict(f"{field} {object_id} is {row.status}, not ready", {"field": field, "status": row.status})
    return row


def create(
    *,
    db: Session,
    queue: TaskQueue,
    tenant: Tenant,
    settings: Settings,
    payload: JobCreate,
    idem: IdempotencyKey | None = None,
) -> Job:
    """Validate references and the tenant's limit, persist the job and enqueue it by id.

    With an idempotency key seen before, return the job that the first request created.
    """
    if (earlier := replayed_resource(db, idem)) is not None:
        return get_or_404(db=db, tenant_id=tenant.id, job_id=earlier)
    model = _ready_upload(db, Model, payload.model_id, "model_id", tenant.id)
    pipeline = payload.pipeline()
    if payload.dataset_id:
        _ready_upload(db, Dataset, payload.dataset_id, "dataset_id", tenant.id)
    else:
        needing = [f"steps.{i}" for i, s in enumerate(pipeline.steps) if s.needs_data]
        if needing:
            raise Unprocessable(
                f"{', '.join(needing)} need(s) a dataset: pass dataset_id",
                {"field": "dataset_id", "steps": needing},
                code="dataset_required",
            )
    if not (pipeline.input_shape or payload.dataset_id or model.input_shape):
        raise Unprocessable(
            "the input shape is unknown: set input_shape (one sample, e.g. [3, 224, 224]) or pass dataset_id",
            {"field": "input_shape"},
            code="input_shape_required",
        )
    _check_concurrency(db=db, tenant=tenant, default_limit=settings.max_concurrent_jobs_per_tenant)
    job = Job(tenant_id=tenant.id, model_id=payload.model_id, dataset_id=payload.dataset_id,
              spec=pipeline.model_dump(mode="json"),
              callback_url=str(payload.callback_url) if payload.callback_url else None,
              queue=choose_queue(db, device=pipeline.device, timeout_s=settings.heartbeat_timeout_s))
    db.add(job)
    db.flush()
    add_event(db, job, "status", status=JobStatus.QUEUED, message="job accepted")
    remember(db, idem, job.id)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()  # a concurrent request with the same key won: answer with its job
        return get_or_404(db=db, tenant_id=tenant.id, job_id=replayed_resource(db, idem) or "")
    try:
        queue.enqueue_job(job.id, job.queue)
    except QueueUnavailable as exc:
        forget(db, job.id)
        db.delete(job)
        db.commit()
        raise ServiceUnavailable(f"{exc}; the job was not created, retry later") from exc
    return job


def _check_concurrency(*, db: Session, tenant: Tenant, default_limit: int) -> None:
    limit = tenant.max_concurrent_jobs or default_limit
    active = db.scalar(
        select(func.count()).select_from(Job)
        .where(Job.tenant_id == tenant.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    ) or 0
    if active >= limit:
        raise TooManyRequests(
            f"tenant has {active} queued or running jobs; the limit is {limit}: wait for one to finish",
            {"active": active, "limit": limit},
            code="too_many_jobs",
        )


def get_or_404(*, db: Session, tenant_id: str, job_id: str) -> Job:
    """Fetch a tenant's job or raise 404."""
    job = db.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found", {"id": job_id})
    return job


def list_jobs(
    *, db: Session, tenant_id: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """A page of the tenant's jobs, newest first, optionally filtered by status."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(Job.status == status)
    return paginate(db, stmt, Job, limit=limit, cursor=cursor)


def cancel(*, db: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next check."""
    if job.status in JobStatus.TERMINAL:
        raise Conflict(f"job {job.id} already finished with status {job.status}", {"status": job.status},
                       code="job_finished")
    if job.status == JobStatus.QUEUED:
        transition(db, job, JobStatus.CANCELED, message="canceled before it started")
    elif not job.cancel_requested:
        job.cancel_requested = True
        add_event(db, job, "cancel_requested", message="cancel requested; the worker stops at its next check")
    db.commit()
    return job
