"""Thin Celery tasks: they take ids and call plain functions in worker.jobs."""

from __future__ import annotations

from app.core.celery_config import DELIVER_WEBHOOK, INSPECT_DATASET, INSPECT_MODEL, RUN_JOB
from worker import jobs, webhooks
from worker.celery_app import celery


@celery.task(name=RUN_JOB, bind=True)
def run_job(self, job_id: str) -> None:
    jobs.execute_job(job_id, worker_name=self.request.hostname or "worker")


@celery.task(name=INSPECT_MODEL)
def inspect_model(model_id: str) -> None:
    jobs.inspect_model_upload(model_id)


@celery.task(name=INSPECT_DATASET)
def inspect_dataset(dataset_id: str) -> None:
    jobs.inspect_dataset_upload(dataset_id)


@celery.task(name=DELIVER_WEBHOOK)
def deliver_webhook(job_id: str, attempt: int = 0) -> None:
    delay = webhooks.deliver(job_id, attempt)
    if delay is not None:
        celery.send_task(DELIVER_WEBHOOK, args=[job_id, attempt + 1], countdown=delay)
