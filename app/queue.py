"""Sends tasks to the workers by name; the API never imports worker code."""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from celery import Celery

from app.core.celery_config import DELIVER_WEBHOOK, INSPECT_DATASET, INSPECT_MODEL, RUN_JOB, celery_config
from app.core.config import get_settings


class QueueUnavailable(Exception):
    pass


class TaskQueue(Protocol):
    def enqueue_job(self, job_id: str, queue: str) -> None: ...
    def enqueue_model_inspection(self, model_id: str) -> None: ...
    def enqueue_dataset_inspection(self, dataset_id: str) -> None: ...
    def enqueue_webhook(self, job_id: str) -> None: ...
    def ping(self) -> bool: ...


class CeleryQueue:
    def __init__(self, client: Celery):
        self.client = client

    def _send(self, name: str, object_id: str, queue: str | None = None) -> None:
        try:
            self.client.send_task(name, args=[object_id], queue=queue, retry=True,
                                  retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as exc:  # kombu raises transport-specific errors
            raise QueueUnavailable(f"the task queue is unreachable: {exc}") from exc

    def enqueue_job(self, job_id: str, queue: str) -> None:
        self._send(RUN_JOB, job_id, queue)

    def enqueue_model_inspection(self, model_id: str) -> None:
        self._send(INSPECT_MODEL, model_id)

    def enqueue_dataset_inspection(self, dataset_id: str) -> None:
        self._send(INSPECT_DATASET, dataset_id)

    def enqueue_webhook(self, job_id: str) -> None:
        self._send(DELIVER_WEBHOOK, job_id)

    def ping(self) -> bool:
        try:
            with self.client.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False


@lru_cache
def get_queue() -> CeleryQueue:
    client = Celery("modelpress-api")
    client.conf.update(celery_config(get_settings()))
    return CeleryQueue(client)
