"""Following a job without hammering the API: long-poll and Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db.models import Job, JobEvent, JobStatus
from app.db.session import get_sessionmaker
from app.schemas import JobEventRead

POLL_S = 0.25
KEEPALIVE_S = 15.0


def _state(job: Job) -> tuple[Any, ...]:
    return job.status, job.progress, job.current_step, job.cancel_requested, job.message


async def wait_for_change(*, db: Session, job: Job, timeout_s: float) -> Job:
    """Return as soon as the job's status, progress or step changes, or after `timeout_s`."""
    start, deadline = _state(job), time.monotonic() + timeout_s
    while job.status not in JobStatus.TERMINAL and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        await run_in_threadpool(db.refresh, job)
        if _state(job) != start:
            break
    return job


def _poll(job_id: str, after: int) -> tuple[list[JobEventRead], dict[str, Any]]:
    with get_sessionmaker()() as db:
        job = db.get(Job, job_id)
        events = db.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                            .order_by(JobEvent.id)).all()
        progress = {"status": job.status, "progress": job.progress, "current_step": job.current_step,
                    "current_step_kind": job.current_step_kind, "message": job.message}
        return [JobEventRead.model_validate(e) for e in events], progress


def _sse(data: str, *, event: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


async def event_stream(job_id: str, after: int) -> AsyncIterator[str]:
    """Stored events past `after`, then new ones as they happen, plus progress; ends after the final status."""
    last_progress: dict[str, Any] | None = None
    last_sent = time.monotonic()
    while True:
        events, progress = await run_in_threadpool(_poll, job_id, after)
        for event in events:
            after = event.id
            yield _sse(event.model_dump_json(), event=event.type, event_id=event.id)
            last_sent = time.monotonic()
        if progress != last_progress:
            last_progress = progress
            yield _sse(json.dumps(progress), event="progress")
            last_sent = time.monotonic()
        if progress["status"] in JobStatus.TERMINAL and not events:
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_S)
