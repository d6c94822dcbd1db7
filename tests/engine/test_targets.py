from __future__ import annotations

from jobspec import Targets
from worker.engine.targets import evaluate_targets


def _report(top1_before=0.95, top1_after=0.94, speedups=(2.5, 1.8), size=(100, 40)):
    return {
        "original": {"top1": top1_before, "size_bytes": size[0]},
        "final": {"top1": top1_after, "size_bytes": size[1], "top1_agreement": 0.97, "output_cosine": 0.99},
        "steps": [{"kind": "benchmark", "details": {"results": [
            {"batch_size": b, "speedup_vs_original": s} for b, s in zip((1, 8), speedups)]}}],
    }


def test_no_targets_means_no_verdict():
    assert evaluate_targets(_report(), None) is None


def test_all_met():
    result = evaluate_targets(_report(), Targets(max_accuracy_drop=1.5, min_speedup=1.5, max_size_ratio=0.5,
                                                 min_top1_agreement=0.95, min_output_cosine=0.98))
    assert result["met"] is True
    assert {c["name"]: c["measured"] for c in result["checks"]} == {
        "max_accuracy_drop": 1.0, "min_speedup": 1.8, "max_size_ratio": 0.4,
        "min_top1_agreement": 0.97, "min_output_cosine": 0.99,
    }


def test_speedup_uses_the_worst_batch_size():
    result = evaluate_targets(_report(speedups=(2.5, 1.8)), Targets(min_speedup=2.0))
    assert result["met"] is False
    assert result["checks"][0]["measured"] == 1.8


def test_accuracy_drop_missed():
    result = evaluate_targets(_report(top1_after=0.90), Targets(max_accuracy_drop=0.5))
    assert result["met"] is False and result["checks"][0]["measured"] == 5.0


def test_unmeasurable_target_is_missed_with_reason():
    report = _report()
    report["steps"] = []
    report["original"]["top1"] = None
    result = evaluate_targets(report, Targets(min_speedup=1.1, max_accuracy_drop=1))
    assert result["met"] is False
    assert all(c["measured"] is None and "not measured" in c["reason"] for c in result["checks"])


def test_targets_round_trip_as_dicts():
    targets = Targets(max_accuracy_drop=0.5, min_speedup=2)
    assert Targets.model_validate(targets.model_dump()) == targets
