"""Delivers a finished job to its callback URL, signed with the tenant's secret; retried with backoff."""

from __future__ import annotations

import json
import logging
import time

import httpx

from app.db.models import Job, Tenant
from app.db.session import session_scope
from app.schemas import JobRead
from app.services.job_lifecycle import add_event
from app.services.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

log = logging.getLogger("modelpress.webhooks")
MAX_ATTEMPTS = 8
TIMEOUT_S = 10.0


def retry_delay(attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: 1, 2, 4, ... capped at 5 minutes."""
    return float(min(2**attempt, 300))


def deliver(job_id: str, attempt: int) -> float | None:
    """POST the job once; return the delay before the next attempt, or None when done (or given up)."""
    with session_scope() as db:
        job = db.get(Job, job_id)
        if job is None or not job.callback_url:
            return None
        url, secret = job.callback_url, db.get(Tenant, job.tenant_id).webhook_secret
        body = json.dumps({"event": f"job.{job.status}", "job": JobRead.model_validate(job).model_dump(mode="json")},
                          separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "ModelPress-Webhook/1",
        "X-ModelPress-Event": "job.finished",
        "X-ModelPress-Delivery": f"{job_id}-{attempt}",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S, follow_redirects=False)
        delivered, outcome = response.is_success, f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        delivered, outcome = False, f"{type(exc).__name__}: {exc}"
    gave_up = not delivered and attempt + 1 >= MAX_ATTEMPTS
    with session_scope() as db:
        job = db.get(Job, job_id)
        message = f"webhook attempt {attempt + 1} to {url}: {outcome}"
        if gave_up:
            message += f"; giving up after {MAX_ATTEMPTS} attempts"
        add_event(db, job, "webhook", message=message,
                  data={"attempt": attempt + 1, "delivered": delivered, "outcome": outcome})
    if delivered or gave_up:
        return None
    log.warning("webhook of job %s failed (%s); retrying", job_id, outcome)
    return retry_delay(attempt)
