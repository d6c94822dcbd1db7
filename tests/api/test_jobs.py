from __future__ import annotations

import json

import pytest

from tests import factories
from tests.api.conftest import upload


@pytest.fixture
def model_id(client) -> str:
    response = upload(client, "/v1/models", factories.safetensors_bytes("squeezenet1_1"), "m.safetensors",
                      architecture="squeezenet1_1", arch_kwargs='{"num_classes": 10}')
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def dataset_id(client) -> str:
    response = upload(client, "/v1/datasets", factories.digits_npz(120), "digits.npz")
    assert response.status_code == 201, response.text
    return response.json()["id"]


PRUNE_AND_BENCH = [
    {"kind": "prune", "method": "unstructured", "amount": 0.5, "layer_amounts": {"features.0": 0.5}},
    {"kind": "benchmark", "repetitions": 3, "warmup": 1},
]


def test_job_runs_to_artifacts_and_report(client, model_id, dataset_id):
    response = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "steps": PRUNE_AND_BENCH})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"

    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["progress"] == 100
    assert job["started_at"] and job["finished_at"]

    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    kinds = [(e["type"], e.get("kind") or e.get("status")) for e in events]
    assert kinds[0] == ("status", "queued")
    assert ("step_started", "prune") in kinds and ("step_finished", "benchmark") in kinds
    assert kinds[-1] == ("status", "succeeded")

    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    prune_step = report["steps"][0]
    assert prune_step["kind"] == "prune"
    assert prune_step["after"]["sparsity"] > prune_step["before"]["sparsity"]
    assert prune_step["after"]["params"] == prune_step["before"]["params"]

    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert {a["kind"] for a in artifacts} >= {"model", "report"}
    for artifact in artifacts:
        download = client.get(artifact["download_url"])
        assert download.status_code == 200
        assert len(download.content) == artifact["size_bytes"]
        assert download.headers["x-content-sha256"] == artifact["sha256"]


def test_job_list_filters_and_paginates(client, model_id, queue):
    queue.run_jobs = False
    created = [client.post("/v1/jobs", json={"model_id": model_id, "steps": PRUNE_AND_BENCH, "input_shape": [3, 32, 32]}).json()["id"]
               for _ in range(3)]
    seen, cursor = [], None
    while True:
        params = {"status": "queued", "limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        assert all(j["status"] == "queued" for j in page["items"])
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert set(created) <= set(seen)
    assert len(seen) == len(set(seen))
    assert seen.index(created[2]) < seen.index(created[0])  # newest first
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "!!"}).status_code == 422


def test_cancel_queued_then_cancel_again_is_409(client, model_id, queue):
    queue.run_jobs = False
    job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": PRUNE_AND_BENCH, "input_shape": [3, 32, 32]}).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "canceled"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"
    # The worker that later receives the canceled job leaves it alone.
    from worker.jobs import execute_job

    execute_job(job_id, worker_name="late")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([{"kind": "explode"}], "steps.0"),
        ([{"kind": "prune", "amount": 1.5}], "steps.0.prune.amount"),
        ([{"kind": "prune", "amount": -0.1}], "steps.0.prune.amount"),
        ([{"kind": "finetune", "epochs": 10**9}], "steps.0.finetune.epochs"),
        ([{"kind": "finetune", "batch_size": 0}], "steps.0.finetune.batch_size"),
        ([{"kind": "prune", "amout": 0.3}], "steps.0.prune.amout"),
        ([], "steps"),
    ],
)
def test_bad_spec_is_422_naming_the_field(client, model_id, steps, field):
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": steps})
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]


def test_step_needing_data_without_dataset_is_422(client, model_id):
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"kind": "finetune"}]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "dataset_required"
    assert "steps.0" in response.json()["error"]["message"]


def test_unknown_input_shape_is_422(client, model_id):
    response = client.post("/v1/jobs", json={"model_id": model_id, "steps": PRUNE_AND_BENCH})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "input_shape_required"


def test_unknown_model_is_404(client):
    response = client.post("/v1/jobs", json={"model_id": "missing", "steps": PRUNE_AND_BENCH})
    assert response.status_code == 404
    assert response.json()["error"]["details"]["field"] == "model_id"


def test_unknown_layer_fails_the_job_with_a_clear_message(client, model_id):
    steps = [{"kind": "prune", "layer_amounts": {"no.such.layer": 0.5}}]
    job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": steps, "input_shape": [3, 32, 32]}).json()["id"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert "no.such.layer" in job["error"]["message"] + str(job["error"]["details"])
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()
    assert [a["name"] for a in artifacts] == ["job.log"]  # no model, but the log that explains the failure
    lines = [json.loads(line) for line in client.get(artifacts[0]["download_url"]).text.splitlines()]
    assert lines and all(line["job_id"] == job_id for line in lines)
    assert any(line["message"].startswith("job failed") for line in lines)


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"] and "/v1/models" in schema["paths"]


def test_times_are_utc_with_an_offset(client, model_id, queue):
    queue.run_jobs = False
    job = client.post("/v1/jobs", json={"model_id": model_id, "steps": PRUNE_AND_BENCH, "input_shape": [3, 32, 32]}).json()
    assert job["created_at"].endswith(("Z", "+00:00"))
