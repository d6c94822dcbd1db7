"""The workers' Celery app. Start with: celery -A worker.celery_app worker -Q modelpress.jobs,modelpress.inspect"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging, worker_ready

from app.core.celery_config import celery_config
from app.core.config import get_settings

celery = Celery("modelpress", include=["worker.tasks"])
celery.conf.update(celery_config(get_settings()))
app = celery


@worker_ready.connect
def _start_recovery(**_: object) -> None:
    from worker.recovery import start_recovery_loop

    start_recovery_loop(celery.send_task)


@setup_logging.connect
def _json_logs(**_: object) -> None:
    # Connecting this signal stops Celery from installing its own text handlers.
    from worker.logs import configure_json_logging

    configure_json_logging()
