"""Orphaned jobs: a job left `running` by a worker that died is re-queued or, after too many
attempts, failed with the reason. Runs in every worker, on start and then periodically."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from app.core.celery_config import RUN_JOB
from app.core.config import get_settings
from app.db.models import Job, JobStatus, utcnow
from app.db.session import session_scope
from app.services.job_lifecycle import transition

log = logging.getLogger("modelpress.recovery")


def as_utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def heartbeat_is_fresh(job: Job) -> bool:
    if job.heartbeat_at is None:
        return False
    age = (utcnow() - as_utc(job.heartbeat_at)).total_seconds()
    return age < get_settings().heartbeat_timeout_s


def requeue_orphaned_jobs(send_task) -> list[str]:
    """Re-queue running jobs whose heartbeat went stale; return their ids."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    requeued: list[str] = []
    with session_scope() as db:
        stale = db.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff).with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            if job.attempts >= settings.max_attempts:
                transition(db, job, JobStatus.FAILED, message="worker lost",
                           error={"code": "worker_lost",
                                  "message": f"the job's worker stopped responding {job.attempts} times; giving up",
                                  "details": {"attempts": job.attempts}})
            else:
                transition(db, job, JobStatus.QUEUED, message=f"worker {job.worker} stopped responding; re-queued")
                requeued.append(job.id)
    for job_id in requeued:
        log.warning("re-queueing orphaned job %s", job_id)
        send_task(RUN_JOB, args=[job_id])
    return requeued


def start_recovery_loop(send_task) -> threading.Thread:
    """Check for orphaned jobs now and then every half heartbeat timeout, in a daemon thread."""
    interval = get_settings().heartbeat_timeout_s / 2

    def loop() -> None:
        while True:
            try:
                requeue_orphaned_jobs(send_task)
            except Exception:  # a DB hiccup must not kill the loop
                log.exception("orphaned-job check failed")
            threading.Event().wait(interval)

    thread = threading.Thread(target=loop, name="modelpress-recovery", daemon=True)
    thread.start()
    return thread
