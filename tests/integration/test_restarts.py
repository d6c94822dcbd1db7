"""Restarts mid-job: the broker (a private redis-server on its own port, append-only file on) and the
API process go down and come back while a job runs and another waits; both jobs finish, once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import httpx
import pytest

from tests import factories
from tests.integration.conftest import free_port, require_service
from tests.integration.test_faults import FAST_HEARTBEAT, Processes, _kill, _submit_training_job, _wait_running
from tests.integration.test_service_flow import wait_for

pytestmark = pytest.mark.integration


class PrivateRedis:
    def __init__(self, workdir):
        self.port, self.dir = free_port(), workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() == b"PONG":
                return
            time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process:
            _kill(self.process, signal.SIGTERM)


@pytest.fixture
def private_redis(tmp_path):
    if not shutil.which("redis-server"):
        require_service("redis-server binary", "127.0.0.1", 0)
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    yield redis
    redis.stop()


def test_broker_and_api_restart_mid_job_lose_nothing(tmp_path, postgres_url, private_redis):
    env = FAST_HEARTBEAT | {"DATABASE_URL": postgres_url, "CELERY_BROKER_URL": f"redis://127.0.0.1:{private_redis.port}/0"}
    procs = Processes(tmp_path / "stack", env)
    try:
        procs.start_worker("modelpress.jobs", "jobs")
        with httpx.Client(base_url=procs.url, timeout=120, headers=factories.LOCAL_AUTH) as client:
            running = _submit_training_job(client, epochs=10)
            _wait_running(client, running)
            waiting = _submit_training_job(client, epochs=1)  # queued behind the running one

            private_redis.stop()
            time.sleep(1.0)
            private_redis.start()

            _kill(procs.api)
            procs.running.remove(procs.api)
            port = int(procs.url.rsplit(":", 1)[1])
            procs.api = procs._start(["uvicorn", "app.main:app", "--port", str(port)])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)

            for job_id in (running, waiting):
                job = wait_for(client, job_id, {"succeeded", "failed", "canceled"}, timeout=300)
                assert job["status"] == "succeeded", f"{job}\n{procs.tail()}"
                statuses = [e["status"] for e in client.get(f"/v1/jobs/{job_id}/events").json() if e["type"] == "status"]
                assert statuses.count("succeeded") == 1
            # The service still takes new work after the restarts.
            after = _submit_training_job(client, epochs=1)
            assert wait_for(client, after, {"succeeded", "failed", "canceled"})["status"] == "succeeded"
    finally:
        procs.stop()
