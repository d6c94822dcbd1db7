"""S3-compatible storage: the blob store against a real S3-protocol server on loopback (moto's
standalone server), then a whole job with the API and the worker on separate data folders, sharing
only PostgreSQL, Redis and the bucket, as on separate machines."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from tests import factories
from tests.integration.conftest import free_port, require_service
from tests.integration.test_faults import Processes
from tests.integration.test_service_flow import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint():
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": "modelpress-test", "AWS_SECRET_ACCESS_KEY": "modelpress-test",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="modelpress-test")
    yield endpoint, credentials
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_s3_blob_store_round_trip(s3_endpoint, tmp_path):
    from app.storage import S3BlobStore, UploadTooLarge

    endpoint, _ = s3_endpoint
    store = S3BlobStore("modelpress-test", "unit", endpoint_url=endpoint, cache_dir=tmp_path / "cache",
                        tmp_dir=tmp_path / "tmp")
    content = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    sha, size = store.put_stream(io.BytesIO(content), max_bytes=10 * 1024 * 1024)
    assert (sha, size) == (hashlib.sha256(content).hexdigest(), len(content))
    assert b"".join(store.iter_bytes(sha)) == content
    cached = store.local_path(sha)
    assert cached.read_bytes() == content and store.local_path(sha) == cached
    assert store.put_stream(io.BytesIO(content), max_bytes=10 * 1024 * 1024) == (sha, size)  # idempotent
    with pytest.raises(UploadTooLarge):
        store.put_stream(io.BytesIO(content), max_bytes=1024)
    assert not any((tmp_path / "tmp").iterdir())  # nothing half-written left behind
    store.delete(sha)
    assert not cached.exists()
    with pytest.raises(Exception):
        b"".join(store.iter_bytes(sha))


def test_job_flow_with_api_and_worker_sharing_only_services(s3_endpoint, tmp_path, postgres_url, redis_url):
    require_service("PostgreSQL", "127.0.0.1", 5432)
    endpoint, credentials = s3_endpoint
    shared = {"DATABASE_URL": postgres_url, "CELERY_BROKER_URL": redis_url,
              "MODELPRESS_STORAGE_URL": "s3://modelpress-test/flow", "MODELPRESS_S3_ENDPOINT_URL": endpoint,
              "MODELPRESS_VALIDATION_WAIT_S": "60", **credentials}
    api_side = Processes(tmp_path / "api-machine", shared)  # API + inspection worker
    try:
        api_side.start_worker("modelpress.jobs", "remote-jobs",
                              env={"MODELPRESS_DATA_DIR": str(tmp_path / "worker-machine" / "data")})

        import httpx

        with httpx.Client(base_url=api_side.url, timeout=120, headers=factories.LOCAL_AUTH) as client:
            model = client.post("/v1/models", files={"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))},
                                data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'})
            assert model.status_code == 201, model.text + api_side.tail()
            dataset = client.post("/v1/datasets", files={"file": ("d.npz", factories.digits_npz(80))})
            assert dataset.status_code == 201, dataset.text
            job = client.post("/v1/jobs", json={"model_id": model.json()["id"], "dataset_id": dataset.json()["id"],
                                                "steps": [{"kind": "prune", "amount": 0.4},
                                                          {"kind": "benchmark", "repetitions": 2, "warmup": 0}]})
            done = wait_for(client, job.json()["id"], {"succeeded", "failed", "canceled"})
            assert done["status"] == "succeeded", f"{done}\n{api_side.tail()}"
            artifacts = client.get(f"/v1/jobs/{done['id']}/artifacts").json()
            for artifact in artifacts:
                body = client.get(artifact["download_url"]).content
                assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
        # Nothing went through a shared disk: the API machine never held the artifacts' bytes.
        api_files = {p.name for p in (tmp_path / "api-machine" / "data").rglob("*") if p.is_file()}
        assert not api_files & {a["sha256"] for a in artifacts}
        import boto3

        keys = {o["Key"].rsplit("/", 1)[-1] for o in boto3.client("s3", endpoint_url=endpoint)
                .list_objects_v2(Bucket="modelpress-test", Prefix="flow/")["Contents"]}
        assert {a["sha256"] for a in artifacts} <= keys
    finally:
        api_side.stop()
