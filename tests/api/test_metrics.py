from __future__ import annotations

import re

from tests import factories


def _value(text: str, name: str, **labels: str) -> float:
    label_re = ",".join(f'{k}="{re.escape(v)}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{label_re}\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_metrics_expose_http_latency_jobs_steps_and_queues(client):
    files = {"file": ("m.safetensors", factories.safetensors_bytes("squeezenet1_1"))}
    model = client.post("/v1/models", files=files, data={"architecture": "squeezenet1_1", "arch_kwargs": '{"num_classes": 10}'}).json()
    client.post("/v1/jobs", json={"model_id": model["id"], "input_shape": [3, 32, 32],
                                  "steps": [{"kind": "prune", "amount": 0.2},
                                            {"kind": "benchmark", "repetitions": 1, "warmup": 0}]})
    client.get(f"/v1/models/{model['id']}")

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    # Route templates, never ids, label the latency histogram.
    assert _value(text, "modelpress_http_request_duration_seconds_count",
                  method="GET", route="/v1/models/{model_id}", status="200") >= 1
    assert model["id"] not in text.split("modelpress_running_job")[0]
    assert _value(text, "modelpress_jobs", status="succeeded") >= 1
    assert _value(text, "modelpress_step_duration_seconds_count", kind="prune") >= 1
    assert _value(text, "modelpress_step_duration_seconds_sum", kind="benchmark") > 0
    assert _value(text, "modelpress_queue_depth", queue="modelpress.jobs") >= 0
