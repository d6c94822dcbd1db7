"""Worker upkeep, in every worker process: its own heartbeat row (which the API uses to route jobs),
and orphaned jobs: a job left `running` by a worker that died is re-queued or, after too many
attempts, failed with the reason."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from app.core.config import get_settings
from app.db.models import Job, JobStatus, WorkerNode, utcnow
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


Enqueue = Callable[[str, str], None]  # (job_id, queue)


def requeue_orphaned_jobs(enqueue: Enqueue) -> list[str]:
    """Re-queue running jobs whose heartbeat went stale (on their own queue); return their ids."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    requeued: list[tuple[str, str]] = []
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
                requeued.append((job.id, job.queue))
    for job_id, queue in requeued:
        log.warning("re-queueing orphaned job %s", job_id)
        enqueue(job_id, queue)
    return [job_id for job_id, _ in requeued]


@dataclass(frozen=True)
class WorkerIdentity:
    name: str
    queues: list[str]
    gpu_count: int
    device_name: str | None


def report_alive(worker: WorkerIdentity) -> None:
    """Insert or refresh this worker's row; the API routes `device: auto` jobs by it."""
    with session_scope() as db:
        row = db.get(WorkerNode, worker.name)
        if row is None:
            row = WorkerNode(name=worker.name)
            db.add(row)
        row.queues, row.gpu_count, row.device_name = worker.queues, worker.gpu_count, worker.device_name
        row.last_seen = utcnow()


def start_maintenance_loop(enqueue: Enqueue, worker: WorkerIdentity) -> threading.Thread:
    """A daemon thread: this worker's heartbeat every interval, the orphaned-job check every half timeout."""
    settings = get_settings()
    orphan_every = settings.heartbeat_timeout_s / 2

    def loop() -> None:
        last_orphan_check = float("-inf")
        while True:
            try:
                report_alive(worker)
                if time.monotonic() - last_orphan_check >= orphan_every:
                    last_orphan_check = time.monotonic()
                    requeue_orphaned_jobs(enqueue)
            except Exception:  # a DB hiccup must not kill the loop
                log.exception("worker maintenance failed")
            time.sleep(settings.heartbeat_interval_s)

    thread = threading.Thread(target=loop, name="modelpress-maintenance", daemon=True)
    thread.start()
    return thread
