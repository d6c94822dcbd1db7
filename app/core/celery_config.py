"""Celery configuration shared by the API (which only sends) and the workers (which consume).

Kept torch-free so the API process can build its sending client from it.
"""

from __future__ import annotations

from typing import Any

from app.core.config import Settings

JOBS_QUEUE = "modelpress.jobs"  # CPU workers
GPU_JOBS_QUEUE = "modelpress.jobs.gpu"  # workers bound to one GPU each
INSPECT_QUEUE = "modelpress.inspect"

RUN_JOB = "modelpress.run_job"
INSPECT_MODEL = "modelpress.inspect_model"
INSPECT_DATASET = "modelpress.inspect_dataset"
DELIVER_WEBHOOK = "modelpress.deliver_webhook"


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {
        # Redis redelivers an unacknowledged message after this long: it must outlast the longest job.
        "visibility_timeout": settings.job_time_limit_s + 600,
    }
    if settings.uses_filesystem_broker:
        broker = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (broker / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "processed_folder": str(broker / "processed"),
            "store_processed": False,
            "control_folder": str(broker / "control"),
            "polling_interval": 0.1,
        }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": JOBS_QUEUE,
        # RUN_JOB has no fixed route: the API picks the CPU or GPU queue per job (app.services.jobs).
        "task_routes": {
            INSPECT_MODEL: {"queue": INSPECT_QUEUE},
            INSPECT_DATASET: {"queue": INSPECT_QUEUE},
            # Webhooks share the light queue: quick I/O that must not wait behind a long job.
            DELIVER_WEBHOOK: {"queue": INSPECT_QUEUE},
        },
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.job_time_limit_s,
        "worker_hijack_root_logger": False,
    }
