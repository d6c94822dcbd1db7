"""Webhooks: a signed POST on every final state, retried until the receiver accepts it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from app.services.webhooks import sign
from tests import factories
from worker.webhooks import MAX_ATTEMPTS, retry_delay


class Receiver:
    """A local HTTP endpoint that answers with the given statuses in turn and records what it got."""

    def __init__(self, statuses: list[int]):
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver([500, 503])  # two failures, then success
    yield r
    r.close()


def _model(client) -> str:
    files = {"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))}
    return client.post("/v1/models", files=files,
                       data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'}).json()["id"]


def test_signed_delivery_with_retries(client, receiver):
    body = {"model_id": _model(client), "input_shape": [3, 32, 32], "callback_url": receiver.url,
            "steps": [{"kind": "benchmark", "repetitions": 2, "warmup": 0}]}
    job = client.post("/v1/jobs", json=body).json()
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"

    assert len(receiver.requests) == 3  # 500, 503, then 200
    secret = client.get("/v1/tenant").json()["webhook_secret"]
    for headers, payload in receiver.requests:
        assert headers["x-modelpress-signature"] == sign(secret, headers["x-modelpress-timestamp"], payload)
        assert sign("wrong-secret", headers["x-modelpress-timestamp"], payload) != headers["x-modelpress-signature"]
    delivered = json.loads(receiver.requests[-1][1])
    assert delivered["event"] == "job.succeeded"
    assert delivered["job"]["id"] == job["id"] and delivered["job"]["status"] == "succeeded"

    hooks = [e for e in client.get(f"/v1/jobs/{job['id']}/events").json() if e["type"] == "webhook"]
    assert [h["data"]["delivered"] for h in hooks] == [False, False, True]


def test_cancel_of_a_queued_job_also_notifies(client, queue, receiver):
    queue.run_jobs = False
    receiver.statuses.clear()
    body = {"model_id": _model(client), "input_shape": [3, 32, 32], "callback_url": receiver.url,
            "steps": [{"kind": "benchmark"}]}
    job = client.post("/v1/jobs", json=body).json()
    assert receiver.requests == []  # nothing until a final state
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert json.loads(receiver.requests[0][1])["event"] == "job.canceled"


def test_unreachable_receiver_gives_up_after_max_attempts(client):
    body = {"model_id": _model(client), "input_shape": [3, 32, 32], "callback_url": "http://127.0.0.1:9/nothing",
            "steps": [{"kind": "benchmark", "repetitions": 1, "warmup": 0}]}
    job = client.post("/v1/jobs", json=body).json()
    hooks = [e for e in client.get(f"/v1/jobs/{job['id']}/events").json() if e["type"] == "webhook"]
    assert len(hooks) == MAX_ATTEMPTS
    assert "giving up" in hooks[-1]["message"]


def test_backoff_grows_and_is_capped():
    delays = [retry_delay(a) for a in range(12)]
    assert delays[:4] == [1, 2, 4, 8]
    assert max(delays) == 300


def test_callback_url_must_be_http(client):
    body = {"model_id": _model(client), "input_shape": [3, 32, 32], "callback_url": "file:///etc/passwd",
            "steps": [{"kind": "benchmark"}]}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert "callback_url" in response.json()["error"]["message"]
