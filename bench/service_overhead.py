"""What the service adds on top of the engine: the same pipeline run directly and through the HTTP service.

Run: python bench/service_overhead.py [--runs 5] [--latency-jobs 20] [--backends postgres+redis,embedded]

Part 1 (wall time): one pipeline (resnet18(num_classes=10) safetensors + the digits npz upsampled to
3x32x32; prune unstructured 0.5 -> benchmark) is run
  (a) directly: `worker.engine.inspect_model` / `inspect_dataset` on the files, then
      `worker.engine.run_pipeline` in this process, exactly what the worker calls;
  (b) through the service on PostgreSQL + Redis: upload model and dataset (each validated by the
      inspect worker) -> POST /v1/jobs -> long-poll GET /v1/jobs/{id}?wait= until it is finished.
The two alternate (direct first on even runs, service first on odd runs) after one warm-up run of
each, which is reported but kept out of the medians (it pays torch imports in a fresh worker).

Part 2 (submit -> running): tiny jobs (one benchmark step, repetitions=1, on a 2-layer torch.export
program so that a job takes well under a second) submitted one at a time to an idle worker; the
latency is the job's `started_at - created_at` as recorded by the server (API and worker share a clock).
Run on every backend of --backends: postgres+redis, embedded (SQLite + kombu filesystem broker, the
`make run` default) and postgres+filesystem.

Exit status 1 when something failed (a job, an upload, a process); missed targets only print.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stack import (  # noqa: E402
    BenchError,
    Stack,
    load_average,
    markdown_table,
    median,
    percentile,
    scratch_postgres,
    scratch_redis,
    submit_job,
    upload_dataset,
    upload_model,
    wait_terminal,
)

TARGET_RATIO = 1.05
TARGET_P50_MS = 100.0
BACKENDS = ("postgres+redis", "embedded", "postgres+filesystem")


@dataclass
class Workload:
    architecture: str
    arch_kwargs: dict[str, Any]
    model_path: Path
    dataset_path: Path
    steps: list[dict[str, Any]]
    tiny_model_path: Path

    @property
    def arch_kwargs_json(self) -> str:
        return json.dumps(self.arch_kwargs)


@dataclass
class Timings:
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return median([run[key] for run in self.runs])


def build_workload(workdir: Path, architecture: str, samples: int, repetitions: int) -> Workload:
    from tests.factories import digits_npz, safetensors_bytes

    model_path, dataset_path = workdir / "model.safetensors", workdir / "digits.npz"
    model_path.write_bytes(safetensors_bytes(architecture, num_classes=10))
    dataset_path.write_bytes(digits_npz(samples, 32))
    steps = [{"kind": "prune", "method": "unstructured", "amount": 0.5},
             {"kind": "benchmark", "batch_sizes": [1, 8], "warmup": 2, "repetitions": repetitions}]
    return Workload(architecture, {"num_classes": 10}, model_path, dataset_path, steps, tiny_program(workdir))


def tiny_program(workdir: Path) -> Path:
    """A 2-layer torch.export program (3x8x8 -> 10): the cheapest model a job can run on."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    path = workdir / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), path)
    return path


def run_direct(work: Workload, scratch: Path) -> dict[str, float]:
    """inspect_model + inspect_dataset + run_pipeline in this process, as worker/jobs.py calls them."""
    from jobspec import PipelineSpec
    from worker import engine

    workdir = scratch / f"direct-{time.monotonic_ns()}"
    cpu_before = _own_cpu_seconds()
    started = time.perf_counter()
    model_source, _ = engine.inspect_model(work.model_path, work.architecture, dict(work.arch_kwargs))
    dataset_source, _ = engine.inspect_dataset(work.dataset_path)
    inspected = time.perf_counter()
    spec = PipelineSpec.model_validate({"steps": work.steps})
    engine.run_pipeline(model_source, spec, dataset_source, workdir, engine.PipelineHooks())
    finished = time.perf_counter()
    cpu = _own_cpu_seconds() - cpu_before
    shutil.rmtree(workdir, ignore_errors=True)
    return {"total": finished - started, "prepare": inspected - started, "job": finished - inspected, "cpu": cpu}


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _seconds(job: dict[str, Any], later: str, earlier: str) -> float:
    return (datetime.fromisoformat(job[later]) - datetime.fromisoformat(job[earlier])).total_seconds()


def run_service(stack: Stack, work: Workload, wait_s: float) -> dict[str, float]:
    """Upload both files (validated by the inspect worker), submit, long-poll until finished."""
    with stack.client() as client:
        cpu_before = stack.cpu_seconds()
        started = time.perf_counter()
        model_id = upload_model(client, work.model_path.read_bytes(), work.architecture, work.arch_kwargs_json)
        dataset_id = upload_dataset(client, work.dataset_path.read_bytes())
        uploaded = time.perf_counter()
        job = submit_job(client, {"model_id": model_id, "dataset_id": dataset_id, "steps": work.steps})
        job = wait_terminal(client, job["id"], wait_s=wait_s)
        finished = time.perf_counter()
        cpu = stack.cpu_seconds() - cpu_before
    if job["status"] != "succeeded":
        raise BenchError(f"service job {job['id']} {job['status']}: {job.get('error')}")
    return {"total": finished - started, "prepare": uploaded - started, "job": finished - uploaded,
            "queued": _seconds(job, "started_at", "created_at"), "worker": _seconds(job, "finished_at", "started_at"), "cpu": cpu}


def overhead(stack: Stack, work: Workload, runs: int, wait_s: float, scratch: Path,
             deadline: float) -> tuple[Timings, Timings, list[str]]:
    """One warm-up of each, then `runs` alternating pairs (fewer if the time budget runs out, at least 2)."""
    direct, service = Timings(), Timings()
    notes = []
    warm_direct, warm_service = run_direct(work, scratch), run_service(stack, work, wait_s)
    notes.append(f"warm-up (not in the medians): direct {warm_direct['total']:.2f} s, service {warm_service['total']:.2f} s")
    for i in range(runs):
        if i >= 2 and time.monotonic() > deadline:
            notes.append(f"stopped after {i} of {runs} pairs: time budget spent (the machine is slower than expected)")
            break
        order = (("direct", direct), ("service", service)) if i % 2 == 0 else (("service", service), ("direct", direct))
        for label, sink in order:
            sink.runs.append(run_direct(work, scratch) if label == "direct" else run_service(stack, work, wait_s))
        print(f"  run {i + 1}/{runs}: direct {direct.runs[-1]['total']:.2f} s, service {service.runs[-1]['total']:.2f} s",
              flush=True)
    return direct, service, notes


def overhead_table(direct: Timings, service: Timings) -> str:
    def cell(value: float) -> str:
        return f"{value:.2f}"

    rows = [
        ["end to end (inspect/upload + run/job)", cell(direct.median("total")), cell(service.median("total")),
         f"{service.median('total') / direct.median('total'):.3f}x"],
        ["prepare: inspect files / upload + validate", cell(direct.median("prepare")), cell(service.median("prepare")),
         f"{service.median('prepare') / direct.median('prepare'):.3f}x"],
        ["job: run_pipeline / submit -> finished seen", cell(direct.median("job")), cell(service.median("job")),
         f"{service.median('job') / direct.median('job'):.3f}x"],
        ["  of which queued (started_at - created_at)", "", f"{service.median('queued'):.3f}", ""],
        ["  of which in the worker (finished_at - started_at)", "", cell(service.median("worker")),
         f"{service.median('worker') / direct.median('job'):.3f}x"],
        ["CPU seconds (direct: this process; service: API + both workers)", cell(direct.median("cpu")),
         cell(service.median("cpu")), f"{service.median('cpu') / direct.median('cpu'):.3f}x"],
    ]
    return markdown_table(["median, s", "direct (engine)", "service (HTTP, PG + Redis)", "service / direct"], rows)


def tiny_job_latencies(stack: Stack, work: Workload, count: int, gap_s: float, wait_s: float) -> dict[str, list[float]]:
    """Submit `count` one-step jobs one at a time to an idle worker; server-side and client-side latencies."""
    steps = [{"kind": "benchmark", "batch_sizes": [1], "warmup": 0, "repetitions": 1}]
    out: dict[str, list[float]] = {"queued": [], "post": [], "done": []}
    with stack.client() as client:
        model_id = upload_model(client, work.tiny_model_path.read_bytes(), filename="tiny.pt2")
        for i in range(count + 1):  # the first job warms the worker's imports and is dropped
            time.sleep(gap_s)
            sent = time.perf_counter()
            job = submit_job(client, {"model_id": model_id, "steps": steps})
            answered = time.perf_counter()
            job = wait_terminal(client, job["id"], wait_s=wait_s, timeout_s=300)
            done = time.perf_counter()
            if job["status"] != "succeeded":
                raise BenchError(f"tiny job {job['id']} {job['status']}: {job.get('error')}")
            if i == 0:
                continue
            out["queued"].append(_seconds(job, "started_at", "created_at") * 1000)
            out["post"].append((answered - sent) * 1000)
            out["done"].append((done - sent) * 1000)
    return out


def backend_env(backend: str, pg_url: str | None, redis_url: str | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if backend.startswith("postgres"):
        env["DATABASE_URL"] = pg_url or ""
    if backend.endswith("redis"):
        env["CELERY_BROKER_URL"] = redis_url or ""
    return env


@contextmanager
def running_stack(workdir: Path, env: dict[str, str]) -> Iterator[Stack]:
    """Migrations, an inspect worker, a jobs worker and the API; a failure carries the processes' log tails."""
    stack = Stack(workdir, env)
    try:
        stack.migrate()
        stack.start_worker("modelpress.inspect", "inspect")
        stack.start_worker("modelpress.jobs", "jobs")
        stack.start_api(workers=1)
        yield stack
    except BenchError as exc:
        tails = "\n".join(f"--- {name} log ---\n{stack.tail(name, 1500)}" for name in ("api", "inspect", "jobs"))
        raise BenchError(f"{exc}\n{tails}") from exc
    finally:
        stack.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="alternating direct/service pairs (after one warm-up each)")
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--samples", type=int, default=300, help="digits samples in the dataset")
    parser.add_argument("--repetitions", type=int, default=10, help="benchmark step repetitions per batch size")
    parser.add_argument("--latency-jobs", type=int, default=20, help="tiny jobs per backend for submit -> running")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between tiny jobs (the worker is idle)")
    parser.add_argument("--wait", type=float, default=10, help="long-poll ?wait= seconds")
    parser.add_argument("--backends", default="postgres+redis,embedded",
                        help=f"comma-separated, for the latency part: {', '.join(BACKENDS)}")
    parser.add_argument("--overhead-budget", type=float, default=360,
                        help="seconds after which part 1 stops starting new pairs (at least 2 pairs run)")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}")

    scratch = Path(tempfile.mkdtemp(prefix="mp-bench-overhead-"))
    began = time.monotonic()
    try:
        work = build_workload(scratch, args.architecture, args.samples, args.repetitions)
        print(f"# Service overhead ({time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()})\n", flush=True)
        with scratch_postgres() as pg_url, scratch_redis() as redis_url:
            if not args.skip_overhead:
                print(f"part 1: {args.architecture}, digits {args.samples} x 3x32x32, steps prune unstructured 0.5 -> "
                      f"benchmark batch [1, 8] x {args.repetitions} repetitions", flush=True)
                with running_stack(scratch / "overhead", backend_env("postgres+redis", pg_url, redis_url)) as stack:
                    direct, service, notes = overhead(stack, work, args.runs, args.wait, scratch,
                                                      began + args.overhead_budget)
                print(f"\n## Wall time, median of {len(direct.runs)} alternating runs\n")
                print(overhead_table(direct, service))
                ratio = service.median("total") / direct.median("total")
                extra = service.median("total") - direct.median("total")
                verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
                pairs = sorted(sv["total"] / dv["total"] for sv, dv in zip(service.runs, direct.runs))
                notes.append("per-pair service/direct wall ratios: " + ", ".join(f"{r:.2f}" for r in pairs)
                             + f" (median {median(pairs):.3f}); CPU ratio {service.median('cpu') / direct.median('cpu'):.3f}")
                print("\n" + "\n".join(notes))
                print(f"service adds {extra:+.2f} s per job (median); "
                      f"target service/direct <= {TARGET_RATIO}x: {verdict} ({ratio:.3f}x)")
            if not args.skip_latency:
                latency_rows = []
                for backend in backends:
                    print(f"\nsubmit -> running on {backend} ...", flush=True)
                    with running_stack(scratch / backend.replace("+", "-"), backend_env(backend, pg_url, redis_url)) as stack:
                        lat = tiny_job_latencies(stack, work, args.latency_jobs, args.gap, args.wait)
                    latency_rows.append([
                        backend, len(lat["queued"]), f"{percentile(lat['queued'], 50):.0f}", f"{percentile(lat['queued'], 95):.0f}",
                        f"{max(lat['queued']):.0f}", f"{percentile(lat['post'], 50):.0f}", f"{percentile(lat['done'], 50):.0f}",
                    ])
                print("\n## Submit -> running (server: started_at - created_at), tiny jobs on an idle worker\n")
                print(markdown_table(["backend", "jobs", "p50 ms", "p95 ms", "max ms", "POST /v1/jobs p50 ms",
                                      "submit -> finished seen p50 ms"], latency_rows))
                print()
                for row in latency_rows:
                    verdict = "met" if float(row[2]) <= TARGET_P50_MS else "MISSED"
                    print(f"target submit -> running p50 <= {TARGET_P50_MS:.0f} ms on {row[0]}: {verdict} ({row[2]} ms)")
        print(f"\n(total {time.monotonic() - began:.0f} s, load average at the end {load_average()})")
        return 0
    except BenchError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
