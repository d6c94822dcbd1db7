"""The workers' Celery app. Start with: celery -A worker.celery_app worker -Q modelpress.jobs,modelpress.inspect"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging, worker_ready

from app.core.celery_config import RUN_JOB, celery_config
from app.core.config import get_settings

celery = Celery("modelpress", include=["worker.tasks"])
celery.conf.update(celery_config(get_settings()))
app = celery


@worker_ready.connect
def _start_maintenance(sender: object = None, **_: object) -> None:
    from worker.hardware import gpu_inventory
    from worker.recovery import WorkerIdentity, start_maintenance_loop

    queues = sorted(q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", []))
    gpu_count, device_name = gpu_inventory()
    identity = WorkerIdentity(name=getattr(sender, "hostname", "worker"), queues=queues, gpu_count=gpu_count,
                              device_name=device_name)
    start_maintenance_loop(lambda job_id, queue: celery.send_task(RUN_JOB, args=[job_id], queue=queue), identity)


@setup_logging.connect
def _json_logs(**_: object) -> None:
    # Connecting this signal stops Celery from installing its own text handlers.
    from worker.logs import configure_json_logging

    configure_json_logging()
