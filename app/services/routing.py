"""Which queue a job goes to: CPU workers, or workers bound to one GPU each."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.celery_config import GPU_JOBS_QUEUE, JOBS_QUEUE
from app.db.models import WorkerNode, utcnow


def live_workers(db: Session, *, timeout_s: float) -> list[WorkerNode]:
    """Workers whose heartbeat is recent."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    return list(db.scalars(select(WorkerNode).where(WorkerNode.last_seen >= cutoff)))


def choose_queue(db: Session, *, device: str, timeout_s: float) -> str:
    """`cuda` -> the GPU queue; `cpu` -> the CPU queue; `auto` -> GPU when a live GPU worker serves it."""
    if device == "cuda":
        return GPU_JOBS_QUEUE
    if device == "cpu":
        return JOBS_QUEUE
    gpu_online = any(w.gpu_count > 0 and GPU_JOBS_QUEUE in w.queues for w in live_workers(db, timeout_s=timeout_s))
    return GPU_JOBS_QUEUE if gpu_online else JOBS_QUEUE
