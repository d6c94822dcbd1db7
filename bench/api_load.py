"""Read-path load on the API: GET /v1/jobs/{id} and GET /v1/jobs?limit=20 with many concurrent clients.

Run: python bench/api_load.py [--duration 15] [--connections 64] [--workers 1,2] [--profile]

The API (uvicorn, `--workers` 1 and 2) runs on a scratch PostgreSQL database with Redis as broker.
Setup uploads a tiny torch.export model (validated by an inspect worker, stopped afterwards) and
creates --jobs jobs that stay queued (no jobs worker runs; the per-tenant limit is raised for the
API process so that a full page of 20 exists). The load generator is `wrk` when installed (C, one
thread by default), else an asyncio httpx client; either way it shares the machine's cores with the
server, so on a 2-core machine the figures are a lower bound for the server alone.

--profile adds one run of GET /v1/jobs/{id} on a 1-process API under `py-spy record` and prints the
functions with the most samples (self and inclusive).

Exit status 1 when something failed (setup, a process, a load run with errors); missed targets only print.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stack import (  # noqa: E402
    AUTH,
    BenchError,
    Stack,
    load_average,
    markdown_table,
    percentile,
    scratch_postgres,
    scratch_redis,
    submit_job,
    upload_model,
)

TARGET_RPS = 1500.0
TARGET_P99_MS = 50.0
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    detail: str = ""
    api_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def per_request_ms(self, cpu_s: float) -> float:
        return 1000 * cpu_s / self.requests if self.requests else float("nan")


def tiny_program_bytes() -> bytes:
    """A 2-layer torch.export program (3x8x8 -> 10): the upload is only there so jobs can reference it."""
    import io

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), buffer)
    return buffer.getvalue()


def create_jobs(stack: Stack, count: int) -> list[str]:
    """Upload the tiny model and submit `count` one-step jobs; they stay queued (no jobs worker)."""
    with stack.client() as client:
        model_id = upload_model(client, tiny_program_bytes(), filename="tiny.pt2")
        steps = [{"kind": "benchmark", "repetitions": 1}]
        return [submit_job(client, {"model_id": model_id, "steps": steps})["id"] for _ in range(count)]


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """Requests, duration, p50/p99 and errors (socket errors + non-2xx/3xx) from `wrk --latency` output."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (done and p50 and p99):
        raise BenchError(f"unexpected wrk output:\n{output[-2000:]}")
    errors, detail = 0, []
    if sockets := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        errors += sum(int(n) for n in sockets.groups())
        detail += [f"{kind} {n}" for kind, n in zip(("connect", "read", "write", "timeout"), sockets.groups()) if n != "0"]
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(non_2xx.group(1))
        detail.append(f"non-2xx {non_2xx.group(1)}")
    requests = int(done.group(1))
    if requests == 0:
        detail.append("no request completed: the server stalled")
    seconds = float(done.group(2)) * UNIT_MS[done.group(3)] / 1000
    p50_ms, p99_ms = (_ms(p50.group(1)), _ms(p99.group(1))) if requests else (float("nan"), float("nan"))
    return LoadResult(requests, seconds, p50_ms, p99_ms, errors, ", ".join(detail))


def run_wrk(url: str, duration_s: float, connections: int, threads: int) -> LoadResult:
    header = "Authorization: " + AUTH["Authorization"]
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration_s)}s", "--latency", "--timeout", "10s",
            "-H", header, url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + 60)
    if result.returncode != 0:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr[-2000:]}")
    return parse_wrk(result.stdout)


async def _httpx_load(url: str, duration_s: float, connections: int) -> LoadResult:
    latencies: list[float] = []
    errors = Counter()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers=AUTH, limits=limits, timeout=10) as client:
        started = time.perf_counter()
        deadline = started + duration_s

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    response = await client.get(url)
                    if response.status_code >= 400:
                        errors[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                latencies.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(one_client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    if not latencies:
        raise BenchError("the httpx load generator completed no request")
    return LoadResult(len(latencies), elapsed, percentile(latencies, 50), percentile(latencies, 99),
                      sum(errors.values()), ", ".join(f"{k}: {v}" for k, v in errors.items()))


def run_load(tool: str, url: str, duration_s: float, connections: int, threads: int) -> LoadResult:
    if tool == "wrk":
        return run_wrk(url, duration_s, connections, threads)
    return asyncio.run(_httpx_load(url, duration_s, connections))


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measured_load(stack: Stack, tool: str, url: str, duration_s: float, connections: int, threads: int) -> LoadResult:
    """run_load plus the CPU seconds the API processes and the load generator spent meanwhile."""
    loadgen = resource.RUSAGE_CHILDREN if tool == "wrk" else resource.RUSAGE_SELF
    api_before, gen_before = stack.cpu_seconds(["api"]), _cpu(loadgen)
    result = run_load(tool, url, duration_s, connections, threads)
    result.api_cpu_s = stack.cpu_seconds(["api"]) - api_before
    result.loadgen_cpu_s = _cpu(loadgen) - gen_before
    return result


def drain(base: str, path: str, timeout_s: float = 60) -> float:
    """Wait until requests left over from the last run are done: a DB-backed GET answers in < 0.5 s."""
    started = time.monotonic()
    with httpx.Client(base_url=base, headers=AUTH, timeout=5) as client:
        while time.monotonic() - started < timeout_s:
            time.sleep(1.0)
            sent = time.monotonic()
            try:
                if client.get(path).status_code == 200 and time.monotonic() - sent < 0.5:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
    raise BenchError(f"the API did not recover within {timeout_s} s after a load run")


def check_endpoints(base: str, paths: dict[str, str]) -> None:
    """Each endpoint answers 200 before it is loaded (a 401/404 would make a fast, meaningless benchmark)."""
    with httpx.Client(base_url=base, headers=AUTH, timeout=30) as client:
        for label, path in paths.items():
            response = client.get(path)
            if response.status_code != 200:
                raise BenchError(f"{label} ({path}): HTTP {response.status_code}: {response.text[:500]}")


def profile_run(stack: Stack, tool: str, path: str, duration_s: float, connections: int, threads: int,
                out: Path, top: int) -> str:
    """py-spy record on the 1-process API while it is loaded; returns markdown tables of the top frames."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("py-spy is not installed (pip install py-spy into this virtualenv)")
    raw = out / "profile.txt"
    run_load(tool, stack.url + path, 3, connections, threads)  # warm: first requests import and build things
    # --gil: only the thread holding the GIL is sampled, i.e. where the one Python CPU goes
    recorder = subprocess.Popen([py_spy, "record", "--pid", str(stack.pid("api")), "--format", "raw", "--rate", "200",
                                 "--gil", "--full-filenames", "--duration", str(int(duration_s) + 2), "--output", str(raw),
                                 "--nonblocking"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(1.0)
        result = run_load(tool, stack.url + path, duration_s, connections, threads)
        output, _ = recorder.communicate(timeout=duration_s + 60)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    if recorder.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed ({recorder.returncode}): {output[-2000:]}")
    return (f"profiled run: {result.rps:.0f} req/s, p99 {result.p99_ms:.1f} ms (py-spy at 200 Hz slows the server)\n\n"
            + summarize_profile(raw.read_text(), top))


_FRAME = re.compile(r"(.*) \((.*?)(?::\d+)?\)$")
# Frames every sample passes through (thread start, event loop, CLI): dropped from the inclusive table.
_PLUMBING = ("threading.py", "runpy", "click/core.py", "uvicorn/main.py", "uvicorn/server.py", "uvicorn/_compat.py",
             "uvicorn/__main__.py", "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py",
             "anyio/_backends/_asyncio.py")


def _split_frame(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    return (match.group(1), match.group(2)) if match else (frame, "")


def _short(function: str, path: str) -> str:
    parts = Path(path).parts
    return f"{function} ({'/'.join(parts[-2:]) if len(parts) >= 2 else path})"


def package_of(path: str) -> str:
    """sqlalchemy, starlette, ... for site-packages; 'app (ModelPress)' for this repository; stdlib:<module>."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if path.startswith(str(Path(__file__).resolve().parents[1])):
        return Path(path).relative_to(Path(__file__).resolve().parents[1]).parts[0] + " (ModelPress)"
    if path.startswith("<frozen"):
        return "stdlib:importlib"
    return "stdlib:" + (Path(path).parent.name if Path(path).parent.name not in {"python3.11", "lib"} else Path(path).stem)


def summarize_profile(raw: str, top: int) -> str:
    """Self time by package and by function, and inclusive time by function, as shares of all GIL samples."""
    by_package: Counter[str] = Counter()
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_split_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        count = int(count_text)
        total += count
        leaf_function, leaf_path = frames[-1]
        by_package[package_of(leaf_path)] += count
        self_counts[_short(leaf_function, leaf_path)] += count
        for name in {_short(f, p) for f, p in frames if not p.endswith(_PLUMBING) and "runpy" not in p}:
            incl_counts[name] += count
    if not total:
        return "(no samples)"

    def table(counts: Counter[str], title: str, what: str) -> str:
        rows = [[f"{100 * n / total:.1f}%", f"`{name}`"] for name, n in counts.most_common(top)]
        return f"{title}\n\n" + markdown_table(["share of samples", what], rows)

    return "\n\n".join([
        f"{total} samples of the thread holding the GIL (py-spy --gil)",
        table(by_package, "Self time by package:", "package"),
        table(self_counts, "Self time by function:", "function"),
        table(incl_counts, "Inclusive time by function (thread/event-loop plumbing left out):", "function"),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds per endpoint and API setting")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients")
    parser.add_argument("--workers", default="1,2", help="comma-separated uvicorn --workers values")
    parser.add_argument("--jobs", type=int, default=25, help="queued jobs to create (a full page of 20 needs 20+)")
    parser.add_argument("--tool", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load before each API setting is measured")
    parser.add_argument("--uvicorn-args", default="", help="extra uvicorn arguments, e.g. '--http httptools --loop uvloop'")
    parser.add_argument("--profile", action="store_true", help="also profile GET /v1/jobs/{id} with py-spy (1 process)")
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args()
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    workers_list = [int(w) for w in args.workers.split(",") if w.strip()]
    extra = args.uvicorn_args.split()

    scratch = Path(tempfile.mkdtemp(prefix="mp-bench-api-"))
    began = time.monotonic()
    rows, failures, notes = [], [], []
    try:
        print(f"# API load ({time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}; {tool}, "
              f"{args.connections} connections, {args.duration:.0f} s per run)\n", flush=True)
        with scratch_postgres() as pg_url, scratch_redis() as redis_url, \
                Stack(scratch, {"DATABASE_URL": pg_url, "CELERY_BROKER_URL": redis_url,
                                "MODELPRESS_MAX_CONCURRENT_JOBS": str(max(args.jobs + 8, 100))}) as stack:
            try:
                stack.migrate()
                stack.start_worker("modelpress.inspect", "inspect")
                stack.start_api(workers=1, extra_args=extra)
                job_ids = create_jobs(stack, args.jobs)
            finally:
                stack.stop("inspect")
                stack.stop("api")
            paths = {"GET /v1/jobs/{id}": f"/v1/jobs/{job_ids[len(job_ids) // 2]}",
                     "GET /v1/jobs?limit=20": "/v1/jobs?limit=20"}
            for workers in workers_list:
                stack.start_api(workers=workers, extra_args=extra)
                try:
                    check_endpoints(stack.url, paths)
                    run_load(tool, stack.url + paths["GET /v1/jobs/{id}"], args.warmup, args.connections, args.threads)
                    for label, path in paths.items():
                        if (settle := drain(stack.url, paths["GET /v1/jobs/{id}"])) > 5:
                            notes.append(f"workers={workers}: {settle:.0f} s before the API answered again after the "
                                         f"previous run (requests of disconnected clients still queued or stuck)")
                        result = measured_load(stack, tool, stack.url + path, args.duration, args.connections,
                                               args.threads)
                        print(f"  workers={workers} {label}: {result.rps:.0f} req/s, p50 {result.p50_ms:.1f} ms, "
                              f"p99 {result.p99_ms:.1f} ms, errors {result.errors}", flush=True)
                        rows.append([label, workers, f"{result.rps:.0f}", f"{result.p50_ms:.1f}", f"{result.p99_ms:.1f}",
                                     f"{result.errors}" + (f" ({result.detail})" if result.detail else ""),
                                     f"{result.per_request_ms(result.api_cpu_s):.2f}",
                                     f"{result.per_request_ms(result.loadgen_cpu_s):.2f}"])
                        if result.errors or not result.requests:
                            failures.append(f"workers={workers} {label}: {result.errors} errors {result.detail}")
                        if result.rps < TARGET_RPS or result.p99_ms > TARGET_P99_MS:
                            notes.append(f"MISSED target ({TARGET_RPS:.0f} req/s at p99 <= {TARGET_P99_MS:.0f} ms): "
                                         f"workers={workers} {label}")
                finally:
                    stack.stop("api")
            profile = ""
            if args.profile:
                stack.start_api(workers=1, extra_args=extra)
                try:
                    profile = profile_run(stack, tool, paths["GET /v1/jobs/{id}"], args.duration, args.connections,
                                          args.threads, scratch, args.profile_top)
                finally:
                    stack.stop("api")
        print("\n## Read-path load (API and load generator share the machine's cores)\n")
        print(markdown_table(["endpoint", "uvicorn workers", "req/s", "p50 ms", "p99 ms", "errors",
                              "API CPU ms/req", "load generator CPU ms/req"], rows))
        print()
        print("\n".join(notes) or f"target met everywhere ({TARGET_RPS:.0f} req/s at p99 <= {TARGET_P99_MS:.0f} ms)")
        if profile:
            print(f"\n## py-spy profile of GET /v1/jobs/{{id}}, 1 uvicorn process\n\n{profile}")
        print(f"\n(total {time.monotonic() - began:.0f} s, load average at the end {load_average()})")
        if failures:
            print("\nFAILED: " + "; ".join(failures), file=sys.stderr)
            return 1
        return 0
    except BenchError as exc:
        print(f"\nFAILED: {exc}\n--- api log ---\n{stack_tail(scratch)}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stack_tail(workdir: Path) -> str:
    path = workdir / "api.log"
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
