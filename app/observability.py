"""Prometheus metrics: HTTP latency from a middleware; job, queue and worker figures read at scrape time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.celery_config import GPU_JOBS_QUEUE, INSPECT_QUEUE, JOBS_QUEUE
from app.core.config import get_settings
from app.db.models import Job, JobEvent, JobStatus, utcnow
from app.db.session import get_sessionmaker
from app.services.routing import live_workers

log = logging.getLogger("modelpress.metrics")
REGISTRY = CollectorRegistry()
HTTP_LATENCY = Histogram(
    "modelpress_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
STEP_WINDOW = timedelta(hours=24)


def _queue_depths() -> dict[str, int | None]:
    from app.queue import get_queue

    depths: dict[str, int | None] = {}
    try:
        with get_queue().client.connection_for_read() as conn:
            channel = conn.default_channel
            for queue in (JOBS_QUEUE, GPU_JOBS_QUEUE, INSPECT_QUEUE):
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except Exception:  # the queue does not exist yet: nobody ever sent to it
                    depths[queue] = 0
    except Exception:
        log.warning("broker unreachable while collecting metrics")
        return {JOBS_QUEUE: None, GPU_JOBS_QUEUE: None, INSPECT_QUEUE: None}
    return depths


class StateCollector:
    """Reads job states, step durations and heartbeats from the database on each scrape."""

    def collect(self) -> Iterator[GaugeMetricFamily | SummaryMetricFamily]:
        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs by status", labels=["status"])
        steps = SummaryMetricFamily("modelpress_step_duration_seconds", "Finished step durations (last 24 h)",
                                    labels=["kind"])
        heartbeat = GaugeMetricFamily("modelpress_running_job_heartbeat_age_seconds",
                                      "Seconds since each running job's worker last reported", labels=["job_id", "worker"])
        depth = GaugeMetricFamily("modelpress_queue_depth", "Messages waiting in each queue", labels=["queue"])
        workers = GaugeMetricFamily("modelpress_workers_alive", "Workers with a recent heartbeat, by queue",
                                    labels=["queue"])
        with get_sessionmaker()() as db:
            counts = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for status in JobStatus.ALL:
                jobs.add_metric([status], counts.get(status, 0))
            durations: dict[str, list[float]] = {}
            rows = db.execute(select(JobEvent.kind, JobEvent.data).where(
                JobEvent.type == "step_finished", JobEvent.at >= utcnow() - STEP_WINDOW))
            for kind, data in rows:
                if data and data.get("duration_s") is not None:
                    durations.setdefault(kind, []).append(float(data["duration_s"]))
            for kind, values in sorted(durations.items()):
                steps.add_metric([kind], len(values), sum(values))
            now = utcnow()
            for job_id, worker, beat in db.execute(
                select(Job.id, Job.worker, Job.heartbeat_at).where(Job.status == JobStatus.RUNNING)
            ):
                if beat is not None:
                    age = (now - (beat if beat.tzinfo else beat.replace(tzinfo=now.tzinfo))).total_seconds()
                    heartbeat.add_metric([job_id, worker or ""], max(age, 0.0))
            alive: dict[str, int] = {JOBS_QUEUE: 0, GPU_JOBS_QUEUE: 0, INSPECT_QUEUE: 0}
            for worker in live_workers(db, timeout_s=get_settings().heartbeat_timeout_s):
                for queue in worker.queues:
                    alive[queue] = alive.get(queue, 0) + 1
            for queue, count in sorted(alive.items()):
                workers.add_metric([queue], count)
        for queue, count in _queue_depths().items():
            if count is not None:
                depth.add_metric([queue], count)
        yield from (jobs, steps, heartbeat, depth, workers)


REGISTRY.register(StateCollector())


class MetricsMiddleware:
    """Times every HTTP request (plain ASGI: no per-request task or body wrapping)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route template keeps label cardinality bounded (no ids in labels).
            template = getattr(scope.get("route"), "path", "unmatched")
            HTTP_LATENCY.labels(scope["method"], template, str(status)).observe(time.perf_counter() - started)


def install_metrics(app: FastAPI) -> None:
    app.add_middleware(MetricsMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
