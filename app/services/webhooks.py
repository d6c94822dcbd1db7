"""Webhooks: when a job with a callback_url reaches a final state, a delivery task is queued after commit."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from app.services.job_lifecycle import PENDING_WEBHOOKS

if TYPE_CHECKING:
    from app.queue import TaskQueue

log = logging.getLogger("modelpress.webhooks")
SIGNATURE_HEADER = "X-ModelPress-Signature"
TIMESTAMP_HEADER = "X-ModelPress-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex HMAC of "<timestamp>.<body>">`: receivers recompute it with their tenant's secret."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _default_queue() -> TaskQueue:
    from app.queue import get_queue  # built on first use only

    return get_queue()


# Where deliveries are queued; tests point it at an in-process queue.
queue_provider: Callable[[], TaskQueue] = _default_queue


def _dispatch_after_commit(session: Session) -> None:
    job_ids = session.info.pop(PENDING_WEBHOOKS, set())
    if not job_ids:
        return
    for job_id in job_ids:
        try:
            queue_provider().enqueue_webhook(job_id)
        except Exception:  # the job's state is committed; a lost notification is logged, not raised
            log.exception("could not queue the webhook of job %s", job_id)


def _discard_on_rollback(session: Session) -> None:
    session.info.pop(PENDING_WEBHOOKS, None)


def install(factory: sessionmaker[Session]) -> None:
    event.listen(factory, "after_commit", _dispatch_after_commit)
    event.listen(factory, "after_soft_rollback", lambda session, _tx: _discard_on_rollback(session))
