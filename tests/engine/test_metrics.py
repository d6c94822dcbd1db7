"""Metrics and benchmark building blocks: sparsity, sizes, MACs, accuracy, fidelity, timing."""

from __future__ import annotations

import pytest
import torch

from jobspec.steps import BenchmarkStep, PruneStep
from worker.engine.benchmark import benchmark, speedup_verdict, threads
from worker.engine.metrics import accuracy, count_macs, fidelity, measure, size_metrics
from worker.engine.prune import prune
from worker.engine.types import TensorData


def test_accuracy_top1_top5_and_label_range():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 3, 2, 1], [0, 1, 2, 3, 4, 5.0]])
    result = accuracy(logits, torch.tensor([0, 2, 0]))
    assert result["top1"] == pytest.approx(1 / 3, abs=1e-5)
    assert result["top5"] == pytest.approx(2 / 3, abs=1e-5)
    assert accuracy(logits, torch.tensor([0, 1, 9]))["top1"] is None  # label beyond the model's outputs


def test_fidelity_of_identical_and_different_outputs():
    logits = torch.randn(8, 4)
    same = fidelity(logits, logits)
    assert same["top1_agreement"] == 1.0 and same["output_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["output_kl"] == pytest.approx(0.0, abs=1e-6)
    other = fidelity(-logits, logits)
    assert other["output_cosine"] < 0 and other["output_kl"] > 0


def test_measure_reports_sparsity_size_macs_and_accuracy(small_model):
    model = small_model()
    data = TensorData(torch.randn(12, 3, 32, 32), torch.arange(12) % 10, [str(i) for i in range(10)])
    metrics, logits = measure(model, torch.randn(1, 3, 32, 32), data, reference_logits=None)
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert metrics["macs"] > 0 and metrics["size_bytes"] > 4 * metrics["params"]
    assert "features.0.0" in metrics["layer_sparsity"] and "top1" in metrics and "top5" in metrics
    assert logits.shape == (12, 10)


def test_sparse_size_estimate_rewards_high_sparsity(small_model, make_ctx):
    model = small_model()
    dense = size_metrics(model)
    prune(model, PruneStep(amount=0.9, layer_types=["conv", "linear"], ignore_layers=[]), make_ctx(model))
    sparse = size_metrics(model)
    assert sparse["size_bytes"] == dense["size_bytes"]  # zeros still take space in a dense file
    assert sparse["sparse_size_bytes_estimate"] < 0.35 * dense["size_bytes"]
    assert sparse["compressed_size_bytes"] < 0.5 * dense["compressed_size_bytes"]


def test_macs_of_exported_programs_match_the_module_count(tmp_path):
    from worker.engine.modelio import load_model
    from worker.engine.types import ModelSource

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    program_macs, why = count_macs(load_model(ModelSource("export", tmp_path / "m.pt2")), x)
    module_macs, _ = count_macs(model, x)
    assert why is None
    conv_and_linear = 8 * 30 * 30 * 3 * 9 + 8 * 30 * 30 * 10
    assert program_macs == conv_and_linear and abs(module_macs - conv_and_linear) / conv_and_linear < 0.05  # it also counts bias adds


def test_speedup_verdict_uses_paired_timings():
    slow = [10.0, 10.5, 9.8, 10.2] * 5
    fast = [5.0, 5.2, 4.9, 5.1] * 5
    assert speedup_verdict(fast, slow)["speedup_significant"] is True
    assert speedup_verdict(slow, fast)["slowdown_significant"] is True
    same = [10.1, 9.9, 10.0, 10.3] * 5
    assert not speedup_verdict(same, slow)["speedup_significant"]
    # Half the pairs fast, half slow: the median ratio may look good, the pairs say "noise".
    erratic = [4.0, 30.0] * 10
    verdict = speedup_verdict(erratic, slow)
    assert verdict["speedup_significant"] is False and verdict["paired_speedup_p25"] < 1


def test_speedup_survives_load_that_slows_both_models():
    # The machine got 3x slower half way: spreads overlap, but every pair still shows 2x.
    original = [10.0] * 10 + [30.0] * 10
    model = [5.0] * 10 + [15.0] * 10
    assert speedup_verdict(model, original)["speedup_significant"] is True


def test_benchmark_step_times_both_models_and_restores_threads(small_model, make_ctx):
    model = small_model()
    before = torch.get_num_threads()
    outcome = benchmark(model, BenchmarkStep(batch_sizes=[1, 3], threads=1, warmup=1, repetitions=3), make_ctx(small_model()))
    assert torch.get_num_threads() == before
    rows = outcome.details["results"]
    assert [r["batch_size"] for r in rows] == [1, 3] and outcome.details["threads"] == 1
    for row in rows:
        assert row["model"]["p50_ms"] > 0 and row["original"]["p95_ms"] >= row["original"]["p50_ms"]
        assert row["model"]["throughput_per_s"] > 0 and row["speedup_vs_original"] > 0


def test_threads_context_restores_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
