"""Upload -> job -> poll -> download through real processes, as the README's curl sequence does."""

from __future__ import annotations

import hashlib
import time

import pytest

from tests import factories

pytestmark = pytest.mark.integration


def wait_for(client, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def run_squeezenet_job(client, stack, steps: list[dict], samples: int) -> dict:
    """Upload a SqueezeNet and digits, run ``steps`` on them, and return the succeeded job."""
    model = client.post(
        "/v1/models",
        files={"file": ("squeezenet.safetensors", factories.safetensors_bytes("squeezenet1_1"))},
        data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'},
    )
    assert model.status_code == 201, model.text + stack.log()
    dataset = client.post("/v1/datasets", files={"file": ("digits.npz", factories.digits_npz(samples))})
    assert dataset.status_code == 201, dataset.text
    spec = {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"], "steps": steps}
    submitted = client.post("/v1/jobs", json=spec)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"], {"succeeded", "failed", "canceled"})
    assert job["status"] == "succeeded", f"{job}\n{stack.log()}"
    return job


def test_upload_job_poll_download(stack):
    with stack.client() as client:
        steps = [
            {"kind": "prune", "method": "unstructured", "amount": 0.5},
            {"kind": "benchmark", "repetitions": 5, "warmup": 1},
        ]
        job = run_squeezenet_job(client, stack, steps, samples=120)
        assert job["attempts"] == 1

        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert report["steps"][0]["after"]["sparsity"] >= 0.4

        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
        by_name = {a["name"]: a for a in artifacts}
        assert any(a["format"] == "safetensors" for a in artifacts)
        for artifact in artifacts:
            body = client.get(artifact["download_url"]).content
            assert hashlib.sha256(body).hexdigest() == artifact["sha256"]

        weights = next(a for a in artifacts if a["format"] == "safetensors")
        from safetensors.torch import load

        tensors = load(client.get(weights["download_url"]).content)
        conv = tensors["features.0.weight"]
        assert float((conv == 0).float().mean()) >= 0.45
        assert "report.json" in by_name

        metrics = client.get("/metrics").text  # the real workers registered themselves
        assert 'modelpress_workers_alive{queue="modelpress.jobs"} 1.0' in metrics
        assert 'modelpress_workers_alive{queue="modelpress.inspect"} 1.0' in metrics
        assert 'modelpress_jobs{status="succeeded"} 1.0' in metrics


def test_bad_upload_through_real_worker_is_422(stack):
    with stack.client() as client:
        response = client.post(
            "/v1/models",
            files={"file": ("m.pt", factories.pickled_module_bytes())},
            data={"architecture": "squeezenet1_1"},
        )
        assert response.status_code == 422, response.text
        assert client.get("/v1/models").json()["items"] == []


@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_static_int8_runtimes_are_timed_inside_a_real_worker(stack):
    """runtime=auto builds FX, ONNX Runtime and PT2E (torch.compile inside a Celery worker process),
    times them there and ships the chosen runtime's own file."""
    with stack.client() as client:
        steps = [
            {"kind": "quantize", "mode": "static", "calibration_batches": 1},
            {"kind": "benchmark", "repetitions": 3, "warmup": 1},
        ]
        job = run_squeezenet_job(client, stack, steps, samples=64)

        details = client.get(f"/v1/jobs/{job['id']}/report").json()["steps"][0]["details"]
        rows = {row["runtime"]: row for row in details["runtime_candidates"]}
        assert set(rows) == {"fx", "onnxruntime", "pt2e"}
        assert all(row["available"] and row["p50_ms"] > 0 for row in rows.values()), rows
        names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
        expected = {"fx": "model.torchscript.pt", "onnxruntime": "model.int8.onnx", "pt2e": "model.int8.pt2"}
        assert expected[details["runtime"]] in names, (details["runtime"], names)
