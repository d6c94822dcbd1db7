"""Follow a job until it ends: Server-Sent Events when the API offers them, long-polling otherwise."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Protocol

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from modelpress_cli.client import ApiError, Client, Unreachable

TERMINAL = {"succeeded", "failed", "canceled"}
STEPS_SHARE = 95.0  # the engine maps the steps onto 0-95 % of the job's progress; the rest is export
LONG_POLL_S = 30.0
SSE_READ_TIMEOUT_S = 25.0  # the API sends a keepalive every 15 s
SSE_RECONNECTS = 3


class WaitTimeout(Exception):
    """What we waited for did not happen before the deadline; it goes on on the service."""

    @classmethod
    def job(cls, job_id: str) -> WaitTimeout:
        return cls(f"timed out waiting for job {job_id}; it keeps running (modelpress watch {job_id})")


class View(Protocol):
    def update(self, state: dict[str, Any]) -> None: ...
    def step_finished(self, event: dict[str, Any]) -> None: ...
    def close(self, job: dict[str, Any]) -> None: ...


def _steps(job: dict[str, Any]) -> list[str]:
    steps = (job.get("spec") or {}).get("steps") or []
    return [str(s.get("kind", "?")) if isinstance(s, dict) else "?" for s in steps]


def _step_fraction(progress: float, index: int, count: int) -> float:
    if count <= 0:
        return 0.0
    return min(1.0, max(0.0, progress / STEPS_SHARE * count - index))


class NullView:
    def update(self, state: dict[str, Any]) -> None:
        pass

    def step_finished(self, event: dict[str, Any]) -> None:
        pass

    def close(self, job: dict[str, Any]) -> None:
        pass


class LogView:
    """Plain lines for logs (CI): status changes, step starts / ends, and messages as they change."""

    def __init__(self, console: Console, job: dict[str, Any]):
        self.console = console
        self.steps = _steps(job)
        self.status: str | None = None
        self.step: int | None = None
        self.message: str | None = None
        self.printed_at = 0.0

    def _line(self, text: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)
        self.printed_at = time.monotonic()

    def update(self, state: dict[str, Any]) -> None:
        status, step = state.get("status"), state.get("current_step")
        if status != self.status:
            self.status = status
            self._line(f"status [bold]{escape(str(status))}[/bold] ({float(state.get('progress') or 0):.0f} %)")
        if step is not None and step != self.step:
            self.step = step
            self._line(escape(f"step {step} ({state.get('current_step_kind') or '?'}) running"))
        message = state.get("message")
        if message and message != self.message and time.monotonic() - self.printed_at > 2.0:
            self.message = message
            self._line(escape(f"  {float(state.get('progress') or 0):5.1f} %  {message}"))

    def step_finished(self, event: dict[str, Any]) -> None:
        duration = (event.get("data") or {}).get("duration_s")
        took = f" in {duration:.1f} s" if isinstance(duration, (int, float)) else ""
        self._line(escape(f"step {event.get('step')} ({event.get('kind')}) finished{took}"))

    def close(self, job: dict[str, Any]) -> None:
        pass


class ProgressView:
    """A live rich bar per step: kind, progress, the engine's latest message."""

    def __init__(self, console: Console, job: dict[str, Any]):
        self.steps = _steps(job)
        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(bar_width=30),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[message]}", style="dim", markup=False),
            console=console,
            transient=False,
        )
        self.job_task = self.progress.add_task(f"job {job.get('id', '')[:12]}", total=100, message="")
        self.tasks: list[TaskID] = [
            self.progress.add_task(escape(f"  {i} {kind}"), total=1.0, message="", start=False)
            for i, kind in enumerate(self.steps)
        ]
        self.progress.start()

    def update(self, state: dict[str, Any]) -> None:
        progress = float(state.get("progress") or 0.0)
        status = state.get("status") or "?"
        current = state.get("current_step")
        self.progress.update(self.job_task, completed=progress, message=status)
        for index, task in enumerate(self.tasks):
            if current is None or index > current:
                continue
            self.progress.start_task(task)
            fraction = 1.0 if index < current else _step_fraction(progress, index, len(self.tasks))
            fields: dict[str, Any] = {"completed": fraction}
            if index == current and state.get("message") and status not in TERMINAL:
                fields["message"] = str(state["message"])[:80]
            self.progress.update(task, **fields)

    def step_finished(self, event: dict[str, Any]) -> None:
        index = event.get("step")
        if isinstance(index, int) and 0 <= index < len(self.tasks):
            duration = (event.get("data") or {}).get("duration_s")
            took = f"done in {duration:.1f} s" if isinstance(duration, (int, float)) else "done"
            self.progress.start_task(self.tasks[index])
            self.progress.update(self.tasks[index], completed=1.0, message=took)

    def close(self, job: dict[str, Any]) -> None:
        status = job.get("status")
        if status == "succeeded":
            for task in self.tasks:
                self.progress.update(task, completed=1.0)
        elif status in TERMINAL and isinstance(job.get("current_step"), int) and job["current_step"] < len(self.tasks):
            self.progress.update(self.tasks[job["current_step"]], message=str(status))
        self.progress.update(self.job_task, completed=float(job.get("progress") or 0.0), message=status)
        self.progress.stop()


def make_view(console: Console, job: dict[str, Any], *, quiet: bool) -> View:
    if quiet:
        return NullView()
    if console.is_terminal:
        return ProgressView(console, job)
    return LogView(console, job)


class _SseUnavailable(Exception):
    pass


def _sse_events(response: httpx.Response) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, id) for each Server-Sent Event of the response."""
    event, data, event_id = "message", [], None
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data), event_id
            event, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value


def _remaining(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.monotonic()


def _follow_sse(client: Client, job_id: str, view: View, deadline: float | None) -> None:
    """Until the stream ends after the final status; _SseUnavailable when the API has no SSE."""
    last_id: str | None = None
    failures = 0
    while True:
        if _remaining(deadline) <= 0:
            raise WaitTimeout.job(job_id)
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            with client.stream(f"/v1/jobs/{job_id}/events", headers=headers,
                               read_timeout=min(SSE_READ_TIMEOUT_S, max(1.0, _remaining(deadline)))) as response:
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise _SseUnavailable("the API answered without an event stream")
                for event, data, event_id in _sse_events(response):
                    last_id = event_id or last_id
                    failures = 0
                    try:
                        payload = json.loads(data)
                    except ValueError:
                        continue
                    if event == "progress":
                        view.update(payload)
                    elif event == "step_finished":
                        view.step_finished(payload)
                    if _remaining(deadline) <= 0:
                        raise WaitTimeout.job(job_id)
            return  # the server closes the stream after the final status
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            if isinstance(exc, httpx.ReadTimeout) and _remaining(deadline) <= 0:
                raise WaitTimeout.job(job_id) from exc
            failures += 1
            if failures > SSE_RECONNECTS:
                raise _SseUnavailable(str(exc)) from exc
            time.sleep(min(2.0, 0.5 * failures))
        except ApiError as exc:
            if exc.status in (404, 401, 403):
                raise
            raise _SseUnavailable(exc.message) from exc


def _follow_poll(client: Client, job_id: str, view: View, deadline: float | None) -> dict[str, Any]:
    while True:
        wait = min(LONG_POLL_S, _remaining(deadline))
        if wait <= 0:
            raise WaitTimeout.job(job_id)
        job = client.get(f"/v1/jobs/{job_id}", wait=round(max(wait, 0.5), 1))
        view.update(job)
        if job.get("status") in TERMINAL:
            return job


def follow(client: Client, job_id: str, *, console: Console, quiet: bool = False, timeout_s: float | None = None,
           use_sse: bool = True) -> dict[str, Any]:
    """Show the job's progress until it reaches a final status; returns the final job.

    Raises WaitTimeout after `timeout_s` (the job keeps running), ApiError / Unreachable as they come.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    job = client.get(f"/v1/jobs/{job_id}")
    if job.get("status") in TERMINAL:
        return job
    view = make_view(console, job, quiet=quiet)
    try:
        view.update(job)
        if use_sse:
            try:
                _follow_sse(client, job_id, view, deadline)
                job = client.get(f"/v1/jobs/{job_id}")
            except (_SseUnavailable, Unreachable):
                job = client.get(f"/v1/jobs/{job_id}")  # Unreachable here is final
        if job.get("status") not in TERMINAL:
            job = _follow_poll(client, job_id, view, deadline)
        view.update(job)
    finally:
        view.close(job)
    return job
