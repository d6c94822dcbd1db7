"""Faults with real processes: a worker SIGKILLed mid-job, and cancellation of a running job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import factories
from tests.integration.conftest import ROOT, free_port, require_service
from tests.integration.test_service_flow import wait_for

pytestmark = pytest.mark.integration

FAST_HEARTBEAT = {"MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5", "MODELPRESS_HEARTBEAT_TIMEOUT_S": "3",
                  "MODELPRESS_VALIDATION_WAIT_S": "60"}


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill(process: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 15) -> None:
    """Signal the process group; a worker still in its warm shutdown after `grace_s` is killed outright."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=30)


class Processes:
    """API and workers as separate processes, so one can be killed on its own."""

    def __init__(self, tmp_path: Path, extra_env: dict[str, str]):
        self.env = os.environ | {"MODELPRESS_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)} | extra_env
        self.env.pop("MODELPRESS_ENV", None)
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.log = tmp_path / "processes.log"
        self.running: list[subprocess.Popen] = []
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = self._start(["uvicorn", "app.main:app", "--port", str(port)])
        self.inspector = self.start_worker("modelpress.inspect", "inspect")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(self.tail())

    def _start(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        process = _spawn(args, self.env | (env or {}), self.log)
        self.running.append(process)
        return process

    def start_worker(self, queue: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A worker process; `env` overrides variables for it alone (e.g. a data folder of its own)."""
        return self._start(["celery", "-A", "worker.celery_app", "worker", "-Q", queue, "-c", "1",
                            "-n", f"{name}-{len(self.running)}@%h", "--loglevel=INFO"], env)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        for process in self.running:
            _kill(process)


@pytest.fixture(params=["embedded", "postgres+redis"])
def processes(request, tmp_path):
    env = dict(FAST_HEARTBEAT)
    if request.param == "postgres+redis":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["CELERY_BROKER_URL"] = request.getfixturevalue("redis_url")
    procs = Processes(tmp_path, env)
    yield procs
    procs.stop()


def _submit_training_job(client: httpx.Client, epochs: int) -> str:
    model = client.post("/v1/models", files={"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))},
                        data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'})
    assert model.status_code == 201, model.text
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", factories.digits_npz(300))})
    assert dataset.status_code == 201, dataset.text
    job = client.post("/v1/jobs", json={
        "model_id": model.json()["id"], "dataset_id": dataset.json()["id"],
        "steps": [{"kind": "finetune", "epochs": epochs, "batch_size": 32, "lr": 0.01},
                  {"kind": "benchmark", "repetitions": 3, "warmup": 1}],
    })
    assert job.status_code == 202, job.text
    return job.json()["id"]


def _wait_running(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["current_step_kind"] == "finetune":
            return job
        assert job["status"] in {"queued", "running"}, job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start training")


def test_sigkilled_worker_job_completes_exactly_once(processes):
    worker = processes.start_worker("modelpress.jobs", "jobs")
    with httpx.Client(base_url=processes.url, timeout=120, headers=factories.LOCAL_AUTH) as client:
        job_id = _submit_training_job(client, epochs=8)
        _wait_running(client, job_id)
        time.sleep(1.0)
        _kill(worker, signal.SIGKILL)
        processes.start_worker("modelpress.jobs", "jobs")
        job = wait_for(client, job_id, {"succeeded", "failed", "canceled"}, timeout=300)
        assert job["status"] == "succeeded", f"{job}\n{processes.tail()}"
        assert job["attempts"] == 2
        statuses = [e["status"] for e in client.get(f"/v1/jobs/{job_id}/events").json() if e["type"] == "status"]
        assert statuses == ["queued", "running", "queued", "running", "succeeded"], statuses
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()
        assert len(artifacts) == len({a["name"] for a in artifacts})  # one result, not two
        for artifact in artifacts:
            assert len(client.get(artifact["download_url"]).content) == artifact["size_bytes"]


def test_cancel_stops_a_running_job_promptly_and_the_worker_takes_the_next(processes):
    processes.start_worker("modelpress.jobs", "jobs")
    with httpx.Client(base_url=processes.url, timeout=120, headers=factories.LOCAL_AUTH) as client:
        long_job = _submit_training_job(client, epochs=1000)
        _wait_running(client, long_job)
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{long_job}/cancel").status_code == 202
        job = wait_for(client, long_job, {"succeeded", "failed", "canceled"}, timeout=30)
        assert job["status"] == "canceled", job
        assert time.monotonic() - asked < 10
        next_job = _submit_training_job(client, epochs=1)
        assert wait_for(client, next_job, {"succeeded", "failed", "canceled"})["status"] == "succeeded"
