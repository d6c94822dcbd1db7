"""Long-poll and Server-Sent Events for dashboards that would otherwise poll."""

from __future__ import annotations

import json
import threading
import time

from tests import factories
from worker.jobs import execute_job


def _queued_job(client, queue) -> str:
    queue.run_jobs = False
    model = client.post("/v1/models", files={"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))},
                        data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'}).json()
    job = client.post("/v1/jobs", json={"model_id": model["id"], "input_shape": [3, 32, 32],
                                        "steps": [{"kind": "prune", "amount": 0.3},
                                                  {"kind": "benchmark", "repetitions": 2, "warmup": 0}]})
    assert job.status_code == 202, job.text
    return job.json()["id"]


def _run_later(job_id: str, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        execute_job(job_id, worker_name="test-worker")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_long_poll_answers_on_change_not_on_timeout(client, queue):
    job_id = _queued_job(client, queue)
    started = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 0.5}).json()["status"] == "queued"
    assert time.monotonic() - started >= 0.45  # nothing changed: it waited the whole time

    worker = _run_later(job_id, 0.5)
    started = time.monotonic()
    job = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
    assert job["status"] != "queued"
    assert time.monotonic() - started < 20
    worker.join()
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 61}).status_code == 422


def test_server_sent_events_stream_the_timeline_and_end(client, queue):
    job_id = _queued_job(client, queue)
    worker = _run_later(job_id, 0.5)
    received: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((event, json.loads(line.removeprefix("data: "))))
    worker.join()
    kinds = [(e, d.get("status") or d.get("kind")) for e, d in received if e != "progress"]
    assert kinds[0] == ("status", "queued")
    assert ("step_started", "prune") in kinds and ("step_finished", "benchmark") in kinds
    assert kinds[-1] == ("status", "succeeded")
    assert any(e == "progress" for e, _ in received)


def test_sse_resumes_after_last_event_id(client, queue):
    job_id = _queued_job(client, queue)
    execute_job(job_id, worker_name="test-worker")
    events = client.get(f"/v1/jobs/{job_id}/events").json()
    with client.stream("GET", f"/v1/jobs/{job_id}/events",
                       headers={"Accept": "text/event-stream", "Last-Event-ID": str(events[-2]["id"])}) as response:
        ids = [int(line.removeprefix("id: ")) for line in response.iter_lines() if line.startswith("id: ")]
    assert ids == [events[-1]["id"]]
