"""Shared helpers for the service benchmarks: scratch PostgreSQL / Redis, API and worker processes.

Every process is started in its own process group and stopped (SIGTERM, then SIGKILL) by `Stack.stop_all`;
the scratch database is dropped and the Redis database flushed on exit, also after an error.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("MODELPRESS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_BENCH_REDIS", "redis://127.0.0.1:6379/9")
AUTH = {"Authorization": "Bearer mp-local-dev-key"}  # the dev key of the built-in local tenant
STOP_TIMEOUT_S = 20.0


class BenchError(RuntimeError):
    """Something the benchmark needs did not work (not a missed target)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def scratch_postgres(admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL), dropped on exit."""
    import psycopg

    name = f"modelpress_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_redis(url: str = REDIS_URL) -> Iterator[str]:
    """The Redis database of `url`, flushed before and after."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


class Stack:
    """The API (uvicorn) and Celery workers as separate processes sharing one data folder and database."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = os.environ | {
            "MODELPRESS_DATA_DIR": str(self.workdir / "data"),
            "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "MODELPRESS_VALIDATION_WAIT_S": "60",
        } | env
        self.env.pop("MODELPRESS_ENV", None)
        self.processes: dict[str, subprocess.Popen] = {}
        self.url = ""

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def migrate(self) -> None:
        result = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"alembic upgrade failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        if name in self.processes:
            raise BenchError(f"{name} is already running")
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=self.env,
                                   stdout=self.log_path(name).open("ab"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def start_api(self, *, workers: int = 1, extra_args: Sequence[str] = (), timeout_s: float = 60) -> str:
        """Start uvicorn on a free port and wait until /healthz answers; returns the base URL."""
        port = free_port()
        self._spawn("api", ["uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                            "--workers", str(workers), "--no-access-log", *extra_args])
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes["api"].poll() is not None:
                raise BenchError(f"uvicorn exited early:\n{self.tail('api')}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BenchError(f"the API did not answer /healthz in {timeout_s} s:\n{self.tail('api')}")

    def start_worker(self, queue: str, name: str, timeout_s: float = 90) -> subprocess.Popen:
        """Start one Celery worker (concurrency 1) on `queue` and wait for its ' ready.' log line."""
        process = self._spawn(name, ["celery", "-A", "worker.celery_app", "worker", "-Q", queue, "-c", "1",
                                     "-n", f"{name}@%h", "--loglevel=INFO"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(f"worker {name} exited early:\n{self.tail(name)}")
            if " ready." in self.log_path(name).read_text(errors="replace"):
                return process
            time.sleep(0.2)
        raise BenchError(f"worker {name} was not ready in {timeout_s} s:\n{self.tail(name)}")

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def cpu_seconds(self, names: Sequence[str] | None = None) -> float:
        """User + system CPU seconds so far of every live process in these processes' groups (all by default).

        CPU time is much less sensitive than wall time to other work on the machine; children that
        already exited count through their parent's cutime/cstime.
        """
        groups = {self.processes[n].pid for n in (names or self.processes) if n in self.processes}
        return sum(ticks for pgrp, ticks in _proc_cpu_ticks() if pgrp in groups) / os.sysconf("SC_CLK_TCK")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait_s)
                # the group may hold children that outlive the leader (uvicorn --workers, prefork pool)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def client(self, timeout_s: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s, headers=AUTH)


def _proc_cpu_ticks() -> Iterator[tuple[int, int]]:
    """(process group, utime + stime + cutime + cstime) of every process in /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited meanwhile
        # fields[0] is the state (field 3 of proc(5)): pgrp is field 5, utime..cstime fields 14-17
        yield int(fields[2]), sum(int(v) for v in fields[11:15])


def _expect(response: httpx.Response, status: int | set[int], what: str) -> dict[str, Any]:
    allowed = {status} if isinstance(status, int) else status
    if response.status_code not in allowed:
        raise BenchError(f"{what}: HTTP {response.status_code}: {response.text[:1000]}")
    return response.json()


def _until_ready(client: httpx.Client, path: str, body: dict[str, Any], timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while body["status"] == "validating" and time.monotonic() < deadline:
        time.sleep(0.2)
        body = _expect(client.get(path), 200, f"GET {path}")
    if body["status"] != "ready":
        raise BenchError(f"{path} is {body['status']}: {body.get('error')}")
    return body["id"]


def upload_model(client: httpx.Client, data: bytes, architecture: str | None = None, arch_kwargs: str = "{}",
                 filename: str = "model.safetensors") -> str:
    """Upload a model (a torchvision architecture's weights, or a .pt2 program without one); its id once validated."""
    form = {"architecture": architecture, "arch_kwargs": arch_kwargs} if architecture else {}
    body = _expect(client.post("/v1/models", files={"file": (filename, data)}, data=form), {201, 202}, "model upload")
    return _until_ready(client, f"/v1/models/{body['id']}", body)


def upload_dataset(client: httpx.Client, data: bytes) -> str:
    """Upload a dataset and return its id once a worker has validated it."""
    body = _expect(client.post("/v1/datasets", files={"file": ("data.npz", data)}), {201, 202}, "dataset upload")
    return _until_ready(client, f"/v1/datasets/{body['id']}", body)


def submit_job(client: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    return _expect(client.post("/v1/jobs", json=payload), 202, "job submission")


TERMINAL = {"succeeded", "failed", "canceled"}


def wait_terminal(client: httpx.Client, job_id: str, *, wait_s: float = 10, timeout_s: float = 600) -> dict[str, Any]:
    """Long-poll GET /v1/jobs/{id}?wait= until the job is finished (bounded by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = _expect(client.get(f"/v1/jobs/{job_id}", params={"wait": wait_s}), 200, "job status")
        if job["status"] in TERMINAL:
            return job
    raise BenchError(f"job {job_id} did not finish in {timeout_s} s")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every timing here."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
