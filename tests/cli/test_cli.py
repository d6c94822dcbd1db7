"""The `modelpress` CLI as a user runs it: `python -m modelpress_cli.main` in a subprocess, against a
real API + Celery worker processes on the embedded default (SQLite + filesystem broker)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import factories
from tests.integration.conftest import ROOT, free_port
from tests.integration.test_faults import Processes

pytestmark = pytest.mark.integration


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(*args: str, url: str, cwd: Path | None = None, timeout: float = 240) -> Result:
    env = os.environ | {"MODELPRESS_URL": url, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("MODELPRESS_API_KEY", None)  # the documented local dev key is the default
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "modelpress_cli.main", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("cli-service"), {"MODELPRESS_VALIDATION_WAIT_S": "60"})
    procs.start_worker("modelpress.jobs", "jobs")
    yield procs
    for process in procs.running:  # stop all at once: a Celery worker's warm shutdown takes seconds
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in procs.running:  # a throwaway service: do not wait long for a worker's warm shutdown
        try:
            process.wait(timeout=12)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # never leave a worker behind
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-files")
    (folder / "squeezenet.safetensors").write_bytes(factories.safetensors_bytes("squeezenet1_1"))
    (folder / "digits.npz").write_bytes(factories.digits_npz(120))
    (folder / "garbage.safetensors").write_bytes(b"this is not a model" * 100)
    return folder


def write_spec(folder: Path, name: str, text: str, steps: str = "") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text) + steps)
    return path


QUICK_STEPS = """\
steps:
  - {kind: prune, method: unstructured, amount: 0.5}
  - {kind: benchmark, batch_sizes: [1], repetitions: 3, warmup: 1}
"""


@pytest.fixture(scope="module")
def model_id(service, files) -> str:
    result = cli("upload-model", str(files / "squeezenet.safetensors"), "--architecture", "squeezenet1_1",
                 "--arch-kwargs", '{"num_classes": 10}', "--quiet", url=service.url)
    assert result.code == 0, result.output + service.tail()
    return result.stdout.strip()


@pytest.fixture(scope="module")
def succeeded(service, files) -> tuple[str, Result]:
    """One job through the one-line CI gate: the spec names the files; the CLI uploads them first."""
    spec = write_spec(files, "ok.yaml", """\
        model: {file: squeezenet.safetensors, architecture: squeezenet1_1, arch_kwargs: {num_classes: 10}}
        dataset: digits.npz
        """, QUICK_STEPS)
    result = cli("submit", str(spec), "--wait", "--timeout", "180", url=service.url)
    job_id = result.stdout.split()[1] if result.stdout.startswith("job ") else ""
    return job_id, result


# -- without a service ------------------------------------------------------------------------------


def test_help_documents_the_exit_codes():
    result = cli("submit", "--help", url="http://127.0.0.1:9")
    assert result.code == 0
    for line in ("Exit codes", "missed a declared target", "timed out", "unreachable"):
        assert line in result.stdout


def test_unreachable_service_is_one_clear_line_and_exit_5():
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("--retries", "0", "jobs", url=url)
    assert result.code == 5
    assert result.stderr.strip().count("\n") == 0 and url in result.stderr
    assert "Traceback" not in result.output


def test_invalid_spec_is_refused_before_any_upload(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"never uploaded")
    spec = write_spec(tmp_path, "bad.yaml", """\
        model: {file: m.safetensors, architecture: squeezenet1_1}
        steps:
          - {kind: prune, amount: 1.5}
        """)
    result = cli("submit", str(spec), url=f"http://127.0.0.1:{free_port()}")  # nothing listens: refused locally
    assert result.code == 2, result.output
    assert "steps.0.prune.amount" in result.stderr
    missing = write_spec(tmp_path, "missing.yaml", "model: nowhere.pt\n", QUICK_STEPS)
    result = cli("submit", str(missing), url=f"http://127.0.0.1:{free_port()}")
    assert result.code == 2 and "nowhere.pt" in result.stderr


def test_report_rendering_tolerates_missing_keys_and_shows_targets():
    from rich.console import Console

    from modelpress_cli.render import print_report

    for partial in ({}, {"steps": None, "original": "?"}, {"steps": [{"kind": "benchmark", "details": {"results": [{}]}}]},
                    {"final": {}, "verdicts": {"m.onnx": None}, "targets": {"checks": [{}]}}):
        print_report(Console(file=io.StringIO(), width=120), partial)
    console = Console(file=io.StringIO(), width=160)
    print_report(console, {
        "original": {"params": 1000, "size_bytes": 4000, "top1": 0.9},
        "steps": [{"index": 0, "kind": "prune", "after": {"params": 1000, "sparsity": 0.5, "top1": 0.85}}],
        "targets": {"met": False, "checks": [
            {"name": "max_accuracy_drop", "target": 1.0, "measured": 5.0, "met": False, "reason": "[top-1] 90% -> 85%"},
            {"name": "min_speedup", "target": 2.0, "measured": None, "met": False, "reason": "not measured"}]},
    })
    text = console.file.getvalue()
    assert "missed" in text and "max_accuracy_drop" in text and "[top-1] 90% -> 85%" in text
    assert "50.00 %" in text and "0 prune" in text


def test_the_exit_code_follows_status_and_targets():
    from modelpress_cli.main import Exit, _conclude

    class Reports:
        def __init__(self, report: dict):
            self.report = report

        def get(self, path: str, **params) -> dict:
            assert path == "/v1/jobs/j/report"
            return self.report

    declared = {"id": "j", "status": "succeeded", "spec": {"targets": {"min_speedup": 2.0}}}
    assert _conclude(Reports({"targets": {"met": True, "checks": []}}), declared, quiet=True) == Exit.OK
    assert _conclude(Reports({"targets": {"met": False, "checks": []}}), declared, quiet=True) == Exit.TARGETS_MISSED
    assert _conclude(Reports({}), declared, quiet=True) == Exit.TARGETS_MISSED  # declared, never evaluated
    assert _conclude(Reports({}), {"id": "j", "status": "succeeded", "spec": {}}, quiet=True) == Exit.OK
    for status in ("failed", "canceled"):
        assert _conclude(Reports({}), {"id": "j", "status": status, "spec": {}}, quiet=True) == Exit.JOB_FAILED


def test_the_cli_never_imports_torch_or_server_code():
    code = "import sys, modelpress_cli.main; print(' '.join(sys.modules))"
    loaded = {m.split(".")[0] for m in subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                                      capture_output=True, text=True).stdout.split()}
    assert not loaded & {"torch", "torchvision", "app", "worker", "fastapi", "sqlalchemy", "celery"}


# -- against the service ------------------------------------------------------------------------------


def test_upload_model_quiet_prints_only_the_id(service, model_id):
    assert model_id and len(model_id.split()) == 1
    model = httpx.get(f"{service.url}/v1/models/{model_id}", headers=factories.LOCAL_AUTH).json()
    assert model["status"] == "ready" and model["architecture"] == "squeezenet1_1"


def test_upload_dataset_prints_the_id_and_what_was_found(service, files):
    result = cli("upload-dataset", str(files / "digits.npz"), "--name", "digits", url=service.url)
    assert result.code == 0, result.output
    assert result.stdout.startswith("dataset ") and "120 samples" in result.stdout


def test_a_bad_model_file_exits_2_with_the_reason(service, files):
    result = cli("upload-model", str(files / "garbage.safetensors"), "--architecture", "squeezenet1_1",
                 url=service.url)
    assert result.code == 2, result.output
    assert "invalid_model" in result.stderr and "Traceback" not in result.output


def test_submit_wait_succeeds_with_exit_0(service, succeeded):
    job_id, result = succeeded
    assert result.code == 0, result.output + service.tail()
    assert job_id and "succeeded" in result.stderr
    job = httpx.get(f"{service.url}/v1/jobs/{job_id}", headers=factories.LOCAL_AUTH).json()
    assert job["status"] == "succeeded" and job["dataset_id"]


def test_download_verifies_and_writes_every_artifact(service, succeeded, tmp_path):
    job_id, _ = succeeded
    listed = httpx.get(f"{service.url}/v1/jobs/{job_id}/artifacts", headers=factories.LOCAL_AUTH).json()
    result = cli("download", job_id, "--dir", str(tmp_path / "out"), url=service.url)
    assert result.code == 0, result.output
    written = {p.name: p for p in (tmp_path / "out").iterdir()}
    assert set(written) == {a["name"] for a in listed}  # no leftover partial files
    for artifact in listed:
        assert hashlib.sha256(written[artifact["name"]].read_bytes()).hexdigest() == artifact["sha256"]

    again = cli("download", job_id, "--dir", str(tmp_path / "out"), "--name", "report.json", url=service.url)
    assert again.code == 0 and "up to date" in again.stderr
    unknown = cli("download", job_id, "--dir", str(tmp_path / "out"), "--name", "nope.bin", url=service.url)
    assert unknown.code == 2 and "report.json" in unknown.stderr


def test_report_prints_a_table_and_json(service, succeeded):
    job_id, _ = succeeded
    result = cli("report", job_id, url=service.url)
    assert result.code == 0, result.output
    for text in ("Model after each step", "original", "0 prune", "sparsity", "Benchmark", "Verdicts"):
        assert text in result.stdout
    raw = cli("report", job_id, "--json", url=service.url)
    assert raw.code == 0 and json.loads(raw.stdout)["steps"][0]["kind"] == "prune"


def test_watch_on_a_finished_job_ends_promptly(service, succeeded):
    job_id, _ = succeeded
    result = cli("watch", job_id, url=service.url)
    assert result.code == 0, result.output
    assert result.seconds < 15 and "succeeded" in result.stderr


def test_jobs_lists_and_cancel_of_a_finished_job_is_refused(service, succeeded):
    job_id, _ = succeeded
    listed = cli("jobs", "--status", "succeeded", url=service.url)
    assert listed.code == 0 and job_id in listed.stdout
    refused = cli("cancel", job_id, url=service.url)
    assert refused.code == 2 and "job_finished" in refused.stderr
    missing = cli("report", "no-such-job", url=service.url)
    assert missing.code == 2 and "not_found" in missing.stderr


def test_a_failing_job_exits_1_with_the_engine_message(service, files, model_id):
    spec = write_spec(files, "fail.yaml", """\
        input_shape: [3, 32, 32]
        steps:
          - {kind: prune, method: unstructured, layer_amounts: {no.such.layer: 0.5}}
        """)
    result = cli("submit", str(spec), "--model-id", model_id, "--wait", "--timeout", "120", url=service.url)
    assert result.code == 1, result.output + service.tail()
    assert "failed" in result.stderr and "no.such.layer" in result.stderr


def test_a_missed_target_exits_3_with_the_checks(service, files, model_id):
    spec = write_spec(files, "targets.yaml", f"""\
        model_id: {model_id}
        input_shape: [3, 32, 32]
        targets: {{min_speedup: 1000, max_size_ratio: 10}}
        """, QUICK_STEPS)
    submitted = cli("submit", str(spec), "--quiet", url=service.url)
    if submitted.code == 2 and "targets" in submitted.stderr:
        pytest.xfail("targets not yet evaluated server-side (the API refuses the field)")
    assert submitted.code == 0, submitted.output
    job_id = submitted.stdout.strip()
    result = cli("watch", job_id, "--no-sse", "--timeout", "120", url=service.url)  # the long-poll path
    report = httpx.get(f"{service.url}/v1/jobs/{job_id}/report", headers=factories.LOCAL_AUTH)
    if report.status_code == 200 and "targets" not in report.json():
        pytest.xfail("targets not yet evaluated server-side")
    assert result.code == 3, result.output + service.tail()
    assert "min_speedup" in result.stdout and "max_size_ratio" in result.stdout
