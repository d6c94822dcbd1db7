"""`modelpress`: upload models and datasets, submit compression jobs, follow them, collect results.

Run as `modelpress ...` (console script) or `python -m modelpress_cli.main ...`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from modelpress_cli import __version__, render
from modelpress_cli import spec as spec_file
from modelpress_cli.client import DEFAULT_KEY, DEFAULT_URL, ApiError, Client, Unreachable
from modelpress_cli.download import ChecksumMismatch, download_artifacts
from modelpress_cli.follow import TERMINAL, WaitTimeout, follow
from modelpress_cli.spec import SpecError, UploadRef


class Exit(IntEnum):
    OK = 0
    JOB_FAILED = 1
    BAD_INPUT = 2
    TARGETS_MISSED = 3
    TIMEOUT = 4
    SERVICE = 5
    INTERRUPTED = 130


EXIT_CODES_HELP = """\
[bold]Exit codes[/bold] (the same for every command):

0  done; with --wait / watch: the job succeeded and met every declared target

1  the job failed or was canceled

2  bad input: the API refused the request (4xx: invalid spec or file, unknown id, bad API key, too many jobs), an unreadable or invalid spec file, or a usage error

3  the job succeeded but missed a declared target (or the service did not evaluate them)

4  timed out waiting (--timeout); the job keeps running: modelpress watch JOB_ID

5  the service is unreachable, answered with a server error (5xx), or sent a file whose sha256 does not match

130  interrupted (Ctrl-C); a submitted job keeps running
"""

app = typer.Typer(
    name="modelpress",
    help="Command-line client for ModelPress, compression-as-a-service for PyTorch models.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Logs (CI) are not terminals: rich would wrap tables at 80 columns; give them room.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, width=width, highlight=False)


out = _console(stderr=False)
err = _console(stderr=True)


@dataclass
class Config:
    url: str
    api_key: str
    retries: int

    def client(self) -> Client:
        return Client(url=self.url, api_key=self.api_key, retries=self.retries)


def _version(value: bool) -> None:
    if value:
        out.print(f"modelpress {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="MODELPRESS_URL", help="API base URL.")] = DEFAULT_URL,
    api_key: Annotated[str, typer.Option("--api-key", envvar="MODELPRESS_API_KEY", show_default=False,
                                         help=f"API key (default: the local dev key, {DEFAULT_KEY}).")] = DEFAULT_KEY,
    retries: Annotated[int, typer.Option(min=0, max=10, help="Retries on connection errors (uploads and job "
                                                              "submission carry an Idempotency-Key, so retries are safe).")] = 2,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    ctx.obj = Config(url=url, api_key=api_key, retries=retries)


# -- errors -> exit codes ---------------------------------------------------------------------------


def _print_details(details: Any) -> None:
    if isinstance(details, dict):
        errors = details.get("errors")
        if isinstance(errors, list):  # request validation: the message already names each field
            return
        for key, value in details.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            err.print(f"  {key}: {text[:500]}", highlight=False, markup=False)
    elif isinstance(details, list) and details:
        err.print(f"  {json.dumps(details)[:1000]}", markup=False)


def _fail(message: str, code: Exit, details: Any = None) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}" if message else "")
    _print_details(details)
    return typer.Exit(int(code))


@contextmanager
def handled() -> Iterator[None]:
    """Turn the client's exceptions into one clear message and a documented exit code."""
    try:
        yield
    except ApiError as exc:
        code = Exit.SERVICE if exc.status >= 500 else Exit.BAD_INPUT
        raise _fail(f"{exc.message} [{exc.code}, HTTP {exc.status}]", code, exc.details) from None
    except Unreachable as exc:
        raise _fail(str(exc), Exit.SERVICE) from None
    except SpecError as exc:
        raise _fail(str(exc), Exit.BAD_INPUT) from None
    except ChecksumMismatch as exc:
        raise _fail(str(exc), Exit.SERVICE) from None
    except WaitTimeout as exc:
        raise _fail(str(exc), Exit.TIMEOUT) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; anything submitted keeps running on the service", Exit.INTERRUPTED) from None


# -- uploads ------------------------------------------------------------------------------------------

UPLOAD_POLL_S = 1.0


def _upload(client: Client, kind: str, ref: UploadRef, *, quiet: bool, timeout_s: float) -> dict[str, Any]:
    """Upload one model / dataset file and wait until the service has validated it."""
    form: dict[str, str] = {}
    if ref.name:
        form["name"] = ref.name
    if kind == "models":
        if ref.architecture:
            form["architecture"] = ref.architecture
        if ref.arch_kwargs:
            form["arch_kwargs"] = json.dumps(ref.arch_kwargs)
    if not quiet:
        err.print(f"uploading {ref.file} ({render.human_bytes(ref.file.stat().st_size)}) ...")
    _, row = client.upload(f"/v1/{kind}", ref.file, form)
    deadline = time.monotonic() + timeout_s
    while row.get("status") == "validating":
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out waiting for the validation of {kind[:-1]} {row.get('id')}; "
                              f"see GET /v1/{kind}/{row.get('id')}")
        time.sleep(UPLOAD_POLL_S)
        row = client.get(f"/v1/{kind}/{row['id']}")
    if row.get("status") != "ready":
        error = row.get("error") or {}
        raise _fail(f"{kind[:-1]} {row.get('id')} is {row.get('status')}: {error.get('message', 'rejected')}"
                    f" [{error.get('code', 'invalid')}]", Exit.BAD_INPUT, error.get("details"))
    return row


def _describe_upload(row: dict[str, Any]) -> str:
    facts = [row.get("format"), row.get("architecture")]
    if row.get("param_count"):
        facts.append(f"{render.human_count(row['param_count'])} params")
    if row.get("num_samples"):
        facts.append(f"{row['num_samples']} samples")
    if row.get("input_shape"):
        facts.append(f"input {row['input_shape']}")
    return ", ".join(str(f) for f in facts if f)


def _job_id(value: str) -> str:
    if not value.strip() or "/" in value:
        raise typer.BadParameter("expected a job id as printed by `modelpress submit`")
    return value.strip()


JobId = Annotated[str, typer.Argument(metavar="JOB_ID", show_default=False, callback=_job_id)]
File = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, metavar="FILE",
                                                  show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the id on stdout (for `$(...)`).")]
Timeout = Annotated[Optional[float], typer.Option("--timeout", min=0, help="Give up waiting after this many "
                                                                            "seconds (exit 4).", show_default=False)]


@app.command("upload-model")
def upload_model(
    ctx: typer.Context,
    file: File,
    architecture: Annotated[Optional[str], typer.Option(help="torchvision name, e.g. resnet18 (not needed for "
                                                              "a torch.export .pt2).")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option(help='JSON, e.g. \'{"num_classes": 10}\'.')] = None,
    name: Annotated[Optional[str], typer.Option(help="Display name (default: the file name).")] = None,
    quiet: Quiet = False,
    timeout: Timeout = 600.0,
) -> None:
    """Upload a model (safetensors, state_dict .pt, or torch.export .pt2); prints its id once validated."""
    kwargs: dict[str, Any] = {}
    if arch_kwargs:
        try:
            kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise _fail(f"--arch-kwargs is not valid JSON: {exc.msg}", Exit.BAD_INPUT) from None
        if not isinstance(kwargs, dict):
            raise _fail("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'", Exit.BAD_INPUT)
    client = ctx.obj.client()
    with handled():
        row = _upload(client, "models", UploadRef(file=file, name=name, architecture=architecture, arch_kwargs=kwargs),
                      quiet=quiet, timeout_s=timeout or float("inf"))
    _print_id(row["id"], quiet, f"model {row['id']} ready ({_describe_upload(row)})")


@app.command("upload-dataset")
def upload_dataset(
    ctx: typer.Context,
    file: File,
    name: Annotated[Optional[str], typer.Option(help="Display name (default: the file name).")] = None,
    quiet: Quiet = False,
    timeout: Timeout = 600.0,
) -> None:
    """Upload a dataset (zip / tar.gz image folders, or .npz / safetensors with `inputs` and `labels`)."""
    client = ctx.obj.client()
    with handled():
        row = _upload(client, "datasets", UploadRef(file=file, name=name), quiet=quiet,
                      timeout_s=timeout or float("inf"))
    _print_id(row["id"], quiet, f"dataset {row['id']} ready ({_describe_upload(row)})")


def _print_id(object_id: str, quiet: bool, text: str) -> None:
    if quiet:
        print(object_id)
    else:
        out.print(text, markup=False)


# -- jobs -------------------------------------------------------------------------------------------


def _conclude(client: Client, job: dict[str, Any], *, quiet: bool) -> Exit:
    """Exit code of a finished job: failed / canceled, targets missed, or all good."""
    job_id, status = job.get("id"), job.get("status")
    if status != "succeeded":
        error = job.get("error") or {}
        message = error.get("message") or job.get("message") or ""
        err.print(f"job {escape(str(job_id))} {render.status_text(status)}" + (f": {escape(message)}" if message else ""))
        if error.get("code"):
            err.print(f"  code: {error['code']}", markup=False)
        _print_details(error.get("details"))
        return Exit.JOB_FAILED
    declared = (job.get("spec") or {}).get("targets")
    report = client.get(f"/v1/jobs/{job_id}/report") if declared else None
    if not quiet:
        took = _duration(job)
        err.print(f"job {escape(str(job_id))} {render.status_text(status)}{took}; details: modelpress report {escape(str(job_id))}")
    if not declared:
        return Exit.OK
    targets = (report or {}).get("targets")
    if not isinstance(targets, dict):
        err.print("[yellow]the job declares targets but the service reported no evaluation of them[/yellow]")
        return Exit.TARGETS_MISSED
    if not quiet or not targets.get("met"):
        out.print(render.targets_table(targets))
    return Exit.OK if targets.get("met") else Exit.TARGETS_MISSED


def _duration(job: dict[str, Any]) -> str:
    try:
        start = datetime.fromisoformat(str(job["started_at"]))
        end = datetime.fromisoformat(str(job["finished_at"]))
    except (KeyError, TypeError, ValueError):
        return ""
    return f" in {(end - start).total_seconds():.1f} s"


@app.command(epilog=EXIT_CODES_HELP)
def submit(
    ctx: typer.Context,
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, show_default=False,
                                         metavar="SPEC.yaml",
                                         help="YAML job spec: steps, targets, ... plus model_id / dataset_id or "
                                              "model: / dataset: files to upload first.")],
    model_id: Annotated[Optional[str], typer.Option(help="Use this uploaded model (overrides the spec).")] = None,
    dataset_id: Annotated[Optional[str], typer.Option(help="Use this uploaded dataset (overrides the spec).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job; the exit code tells whether it succeeded "
                                                      "and met its targets.")] = False,
    timeout: Timeout = None,
    quiet: Quiet = False,
    sse: Annotated[bool, typer.Option(help="Follow with Server-Sent Events (else long-poll).")] = True,
) -> None:
    """Submit a job from a YAML spec; prints the job id. With --wait, a one-line CI gate."""
    client: Client = ctx.obj.client()
    with handled():
        job_file = spec_file.load(spec)
        model = model_id or job_file.model_id
        dataset = dataset_id or job_file.dataset_id
        if not model and job_file.model is None:
            raise _fail(f"no model: give --model-id, or `model_id:` / `model:` (a file) in {spec}", Exit.BAD_INPUT)
        deadline = None if timeout is None else time.monotonic() + timeout
        upload_timeout = 600.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not model and job_file.model is not None:
            row = _upload(client, "models", job_file.model, quiet=quiet, timeout_s=upload_timeout)
            model = row["id"]
            if not quiet:
                err.print(f"model {model} ready ({_describe_upload(row)})", markup=False)
        if not dataset and job_file.dataset is not None:
            row = _upload(client, "datasets", job_file.dataset, quiet=quiet, timeout_s=upload_timeout)
            dataset = row["id"]
            if not quiet:
                err.print(f"dataset {dataset} ready ({_describe_upload(row)})", markup=False)
        body = {**job_file.body, "model_id": model}
        if dataset:
            body["dataset_id"] = dataset
        job = client.post_json("/v1/jobs", body, idempotent=True)
        _print_id(job["id"], quiet, f"job {job['id']} {job.get('status', 'queued')}")
        if not wait:
            return
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        job = follow(client, job["id"], console=err, quiet=quiet, timeout_s=remaining, use_sse=sse)
        code = _conclude(client, job, quiet=quiet)
    raise typer.Exit(int(code))


@app.command(epilog=EXIT_CODES_HELP)
def watch(
    ctx: typer.Context,
    job_id: JobId,
    timeout: Timeout = None,
    sse: Annotated[bool, typer.Option(help="Follow with Server-Sent Events (else long-poll).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; only the exit code.")] = False,
) -> None:
    """Follow a job live (a progress bar per step) until it ends; exits like `submit --wait`."""
    client: Client = ctx.obj.client()
    with handled():
        job = follow(client, job_id, console=err, quiet=quiet, timeout_s=timeout, use_sse=sse)
        code = _conclude(client, job, quiet=quiet)
    raise typer.Exit(int(code))


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="queued | running | succeeded | failed | canceled")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON list.")] = False,
) -> None:
    """List your jobs, newest first."""
    client: Client = ctx.obj.client()
    with handled():
        page = client.get("/v1/jobs", status=status, limit=limit)
    items = page.get("items", []) if isinstance(page, dict) else []
    if as_json:
        print(json.dumps(items, indent=2))
    elif not items:
        err.print("no jobs" + (f" with status {status}" if status else ""))
    else:
        out.print(render.jobs_table(items))


@app.command()
def cancel(ctx: typer.Context, job_id: JobId) -> None:
    """Cancel a queued job at once, or ask a running one to stop between batches."""
    client: Client = ctx.obj.client()
    with handled():
        job = client.post_json(f"/v1/jobs/{job_id}/cancel")
    state = "canceled" if job.get("status") == "canceled" else f"{job.get('status')}, cancel requested"
    out.print(f"job {job_id} {state}", markup=False)


@app.command()
def report(
    ctx: typer.Context,
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw report JSON.")] = False,
) -> None:
    """Show a finished job's report: metrics after each step, benchmarks, verdicts, targets."""
    client: Client = ctx.obj.client()
    with handled():
        body = client.get(f"/v1/jobs/{job_id}/report")
    if as_json:
        print(json.dumps(body, indent=2))
        return
    out.print(f"[bold]report of job {escape(job_id)}[/bold]")
    render.print_report(out, body if isinstance(body, dict) else {})


@app.command()
def download(
    ctx: typer.Context,
    job_id: JobId,
    directory: Annotated[Optional[Path], typer.Option("--dir", file_okay=False, help="Where to write "
                                                      "(default: ./modelpress-JOB_ID).", show_default=False)] = None,
    names: Annotated[Optional[list[str]], typer.Option("--name", help="Only this artifact (repeatable), e.g. "
                                                      "model.safetensors.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the written paths.")] = False,
) -> None:
    """Download a job's artifacts; each is checked against its sha256 and written atomically."""
    client: Client = ctx.obj.client()
    target = directory or Path(f"modelpress-{job_id}")
    with handled():
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts")
        if not artifacts:
            job = client.get(f"/v1/jobs/{job_id}")
            code = Exit.JOB_FAILED if job.get("status") in TERMINAL - {"succeeded"} else Exit.BAD_INPUT
            raise _fail(f"job {job_id} has no artifacts (status {job.get('status')})", code)
        wanted = artifacts
        if names:
            known = {a.get("name") for a in artifacts}
            missing = sorted(set(names) - known)
            if missing:
                raise _fail(f"no artifact named {', '.join(missing)} in job {job_id}; there are: "
                            f"{', '.join(sorted(str(k) for k in known))}", Exit.BAD_INPUT)
            wanted = [a for a in artifacts if a.get("name") in set(names)]
        results = download_artifacts(client, wanted, target, log=None if quiet else err)
    for result in results:
        if quiet:
            print(result.path)
    if not quiet:
        out.print(f"{len(results)} file(s) in {target}, sha256 verified", markup=False)


def run() -> None:
    """Console-script and `python -m` entry point."""
    app(prog_name="modelpress")


if __name__ == "__main__":
    run()
