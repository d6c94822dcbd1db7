"""Tenants, API keys, isolation between tenants, idempotency keys and the concurrent-job limit."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from app.main import app
from tests import factories
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def new_tenant(client: TestClient, **fields) -> tuple[str, dict[str, str]]:
    tenant = client.post("/v1/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}", **fields}, headers=ADMIN)
    assert tenant.status_code == 201, tenant.text
    key = client.post(f"/v1/admin/tenants/{tenant.json()['id']}/keys", json={"name": "ci"}, headers=ADMIN)
    assert key.status_code == 201, key.text
    assert key.json()["key"].startswith(key.json()["prefix"])
    return tenant.json()["id"], {"Authorization": f"Bearer {key.json()['key']}"}


def test_requests_without_a_valid_key_are_401(queue):
    with TestClient(app) as anonymous:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}):
            response = anonymous.get("/v1/jobs", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
        assert anonymous.get("/healthz").status_code == 200


def test_admin_and_tenant_keys_are_kept_apart(client):
    assert client.get("/v1/jobs", headers=ADMIN).status_code == 403
    assert client.post("/v1/admin/tenants", json={"name": "x"}).status_code == 403  # local tenant key


def test_x_api_key_header_works(client):
    _, headers = new_tenant(client)
    key = headers["Authorization"].removeprefix("Bearer ")
    assert client.get("/v1/jobs", headers={"Authorization": "", "X-API-Key": key}).status_code == 200


def test_revoked_key_is_401(client):
    tenant_id, headers = new_tenant(client)
    assert client.get("/v1/models", headers=headers).status_code == 200
    key_id = client.get(f"/v1/admin/tenants/{tenant_id}/keys", headers=ADMIN).json()[0]["id"]
    assert client.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN).json()["revoked_at"]
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_duplicate_tenant_name_is_409(client):
    name = f"dup-{uuid.uuid4().hex[:6]}"
    assert client.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN).status_code == 201
    assert client.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN).status_code == 409


@pytest.fixture
def tenant_a_objects(client):
    _, a = new_tenant(client)
    files = {"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))}
    model = client.post("/v1/models", files=files, headers=a,
                        data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'}).json()
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", factories.digits_npz(60))}, headers=a).json()
    job = client.post("/v1/jobs", headers=a, json={
        "model_id": model["id"], "dataset_id": dataset["id"],
        "steps": [{"kind": "prune", "amount": 0.3}, {"kind": "benchmark", "repetitions": 2, "warmup": 0}]}).json()
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=a).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=a).json()["status"] == "succeeded"
    return {"headers": a, "model": model["id"], "dataset": dataset["id"], "job": job["id"], "artifact": artifacts[0]["id"]}


def test_another_tenant_sees_nothing(client, tenant_a_objects):
    objs = tenant_a_objects
    _, b = new_tenant(client)
    job = objs["job"]
    for method, path in [
        ("GET", f"/v1/models/{objs['model']}"),
        ("GET", f"/v1/datasets/{objs['dataset']}"),
        ("GET", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/events"),
        ("GET", f"/v1/jobs/{job}/artifacts"),
        ("GET", f"/v1/jobs/{job}/artifacts/{objs['artifact']}"),
        ("GET", f"/v1/jobs/{job}/report"),
        ("POST", f"/v1/jobs/{job}/cancel"),
    ]:
        response = client.request(method, path, headers=b)
        assert response.status_code == 404, (method, path, response.text)
        # ... while the owner can.
        if method == "GET":
            assert client.request(method, path, headers=objs["headers"]).status_code == 200, path
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        assert client.get(path, headers=b).json()["items"] == []
    stolen = client.post("/v1/jobs", headers=b, json={"model_id": objs["model"], "dataset_id": objs["dataset"],
                                                      "steps": [{"kind": "benchmark"}]})
    assert stolen.status_code == 404


def test_idempotent_job_submission(client, tenant_a_objects, queue):
    queue.run_jobs = False
    sent_before = len(queue.sent)
    headers = tenant_a_objects["headers"] | {"Idempotency-Key": "retry-1"}
    body = {"model_id": tenant_a_objects["model"], "steps": [{"kind": "benchmark"}], "input_shape": [3, 32, 32]}
    first = client.post("/v1/jobs", json=body, headers=headers)
    second = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert queue.sent[sent_before:] == [("job", first.json()["id"])]
    other = client.post("/v1/jobs", json=body | {"input_shape": [3, 64, 64]}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"


def test_idempotent_upload(client):
    _, headers = new_tenant(client)
    headers |= {"Idempotency-Key": "upload-1"}
    content = factories.digits_npz(40)
    first = client.post("/v1/datasets", files={"file": ("d.npz", content)}, headers=headers)
    second = client.post("/v1/datasets", files={"file": ("d.npz", content)}, headers=headers)
    assert first.status_code == 201 and second.status_code in (200, 201)
    assert first.json()["id"] == second.json()["id"]
    assert len(client.get("/v1/datasets", headers=headers).json()["items"]) == 1


def test_concurrent_job_limit_is_429(client, queue):
    _, headers = new_tenant(client, max_concurrent_jobs=1)
    queue.run_jobs = False
    files = {"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))}
    model = client.post("/v1/models", files=files, headers=headers,
                        data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'}).json()
    body = {"model_id": model["id"], "steps": [{"kind": "benchmark"}], "input_shape": [3, 32, 32]}
    assert client.post("/v1/jobs", json=body, headers=headers).status_code == 202
    limited = client.post("/v1/jobs", json=body, headers=headers)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "too_many_jobs"
