"""Job routing: `device` picks the CPU or the GPU queue; `auto` follows the live workers."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.core.celery_config import GPU_JOBS_QUEUE, JOBS_QUEUE
from app.db.models import WorkerNode, utcnow
from app.db.session import session_scope
from app.services.routing import choose_queue


@pytest.fixture
def clean_workers():
    with session_scope() as db:
        db.query(WorkerNode).delete()
    yield
    with session_scope() as db:
        db.query(WorkerNode).delete()


def _worker(name: str, queues: list[str], gpus: int, seen_ago_s: float) -> None:
    with session_scope() as db:
        db.add(WorkerNode(name=name, queues=queues, gpu_count=gpus, last_seen=utcnow() - timedelta(seconds=seen_ago_s)))


def _route(device: str) -> str:
    with session_scope() as db:
        return choose_queue(db, device=device, timeout_s=60)


def test_explicit_devices(clean_workers):
    assert _route("cuda") == GPU_JOBS_QUEUE
    assert _route("cpu") == JOBS_QUEUE


def test_auto_prefers_a_live_gpu_worker(clean_workers):
    _worker("cpu@a", [JOBS_QUEUE], 0, 1)
    assert _route("auto") == JOBS_QUEUE
    _worker("gpu@b", [GPU_JOBS_QUEUE], 1, 600)  # silent for 10 minutes: dead
    assert _route("auto") == JOBS_QUEUE
    _worker("gpu@c", [GPU_JOBS_QUEUE], 1, 2)
    assert _route("auto") == GPU_JOBS_QUEUE


def test_submitted_job_records_its_queue(client, queue, clean_workers):
    from tests import factories

    queue.run_jobs = False
    files = {"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))}
    model = client.post("/v1/models", files=files,
                        data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'}).json()
    body = {"model_id": model["id"], "input_shape": [3, 32, 32], "steps": [{"kind": "benchmark"}]}
    assert client.post("/v1/jobs", json=body | {"device": "cuda"}).json()["queue"] == GPU_JOBS_QUEUE
    assert client.post("/v1/jobs", json=body).json()["queue"] == JOBS_QUEUE
