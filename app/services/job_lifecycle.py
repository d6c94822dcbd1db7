"""The one place where a job changes status, with the event that records it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent, JobStatus, utcnow

PENDING_WEBHOOKS = "modelpress.pending_webhooks"

ALLOWED = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED},
    # RUNNING -> QUEUED: a job whose worker died is handed to another worker.
    JobStatus.RUNNING: {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED, JobStatus.RUNNING},
    JobStatus.SUCCEEDED: set(),
    JobStatus.FAILED: set(),
    JobStatus.CANCELED: set(),
}


class InvalidTransition(Exception):
    pass


def transition(
    db: Session,
    job: Job,
    to: str,
    *,
    message: str | None = None,
    error: dict[str, Any] | None = None,
) -> None:
    """Move `job` to status `to`, stamping times and appending a status event."""
    if to not in ALLOWED[job.status]:
        raise InvalidTransition(f"job {job.id} cannot go from {job.status} to {to}")
    now = utcnow()
    job.status = to
    job.message = message
    if to == JobStatus.RUNNING:
        job.started_at = job.started_at or now
        job.heartbeat_at = now
        job.attempts += 1
        job.error = None
    if to in JobStatus.TERMINAL:
        job.finished_at = now
        if job.callback_url:
            # Sent by the session's after-commit hook (app.services.webhooks), never for a rolled-back change.
            db.info.setdefault(PENDING_WEBHOOKS, set()).add(job.id)
        if to == JobStatus.SUCCEEDED:
            job.progress = 100.0
    if error is not None:
        job.error = error
    add_event(db, job, "status", status=to, message=message, data={"error": error} if error else None)


def add_event(
    db: Session,
    job: Job,
    type_: str,
    *,
    step: int | None = None,
    kind: str | None = None,
    status: str | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    db.add(JobEvent(job_id=job.id, type=type_, step=step, kind=kind, status=status, message=message, data=data))
