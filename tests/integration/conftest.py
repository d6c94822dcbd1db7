"""Integration tests: the service as `make run` starts it (scripts/serve.sh: API + real Celery worker
processes), on the embedded default and on real PostgreSQL + Redis / RabbitMQ.

A backend whose server is not reachable is skipped with the reason, except under CI=true, where
skipping would hide a regression: there it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.factories import LOCAL_AUTH

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("MODELPRESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379/7")
AMQP_URL = os.environ.get("MODELPRESS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the integration tests against real services")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    process: subprocess.Popen
    log_path: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers=LOCAL_AUTH)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def start_stack(workdir: Path, extra_env: dict[str, str]) -> Stack:
    port = free_port()
    env = os.environ | {
        "MODELPRESS_DATA_DIR": str(workdir / "data"),
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "MODELPRESS_VALIDATION_WAIT_S": "60",
    } | extra_env
    env.pop("MODELPRESS_ENV", None)
    log_path = workdir / "stack.log"
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "serve.sh")], cwd=ROOT, env=env, stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, process=process, log_path=log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve.sh exited early:\n{stack.log()}")
        try:
            if httpx.get(f"{stack.url}/readyz", timeout=2).status_code == 200 and _workers_up(log_path):
                return stack
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_stack(stack)
    raise RuntimeError(f"the service did not become ready in 120 s:\n{stack.log()}")


def _workers_up(log_path: Path) -> bool:
    return log_path.read_text(errors="replace").count(" ready.") >= 2


def stop_stack(stack: Stack) -> None:
    try:
        os.killpg(stack.process.pid, signal.SIGTERM)
        stack.process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(stack.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"modelpress_it_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@pytest.fixture
def amqp_url() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL


@pytest.fixture(params=["embedded", "postgres+redis", "postgres+rabbitmq"])
def stack(request, tmp_path) -> Iterator[Stack]:
    env: dict[str, str] = {}
    if request.param != "embedded":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
        broker = "redis_url" if request.param.endswith("redis") else "amqp_url"
        env["CELERY_BROKER_URL"] = request.getfixturevalue(broker)
    stack = start_stack(tmp_path, env)
    yield stack
    stop_stack(stack)
