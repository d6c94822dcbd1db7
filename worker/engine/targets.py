"""Check a finished report against the job's declared targets."""

from __future__ import annotations

from typing import Any

from jobspec import Targets


def _check(name: str, target: float, measured: float | None, met: bool, reason: str) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": measured, "met": met, "reason": reason}


def _missing(name: str, target: float, reason: str) -> dict[str, Any]:
    return _check(name, target, None, False, f"not measured: {reason}")


def _speedups(report: dict[str, Any]) -> list[float]:
    benchmarks = [step for step in report.get("steps", []) if step.get("kind") == "benchmark"]
    if not benchmarks:
        return []
    rows = benchmarks[-1].get("details", {}).get("results", [])
    return [r["speedup_vs_original"] for r in rows if r.get("speedup_vs_original") is not None]


def evaluate_targets(report: dict[str, Any], targets: Targets | None) -> dict[str, Any] | None:
    """{"met": all met, "checks": [...]}; a target that could not be measured counts as missed."""
    if targets is None:
        return None
    original, final = report.get("original", {}), report.get("final", {})
    checks: list[dict[str, Any]] = []

    if targets.max_accuracy_drop is not None:
        before, after = original.get("top1"), final.get("top1")
        if before is None or after is None:
            checks.append(_missing("max_accuracy_drop", targets.max_accuracy_drop, "needs a dataset with labels"))
        else:
            drop = round((before - after) * 100, 3)
            checks.append(_check("max_accuracy_drop", targets.max_accuracy_drop, drop, drop <= targets.max_accuracy_drop,
                                 f"top-1 {before:.2%} -> {after:.2%}"))

    if targets.min_speedup is not None:
        speedups = _speedups(report)
        if not speedups:
            checks.append(_missing("min_speedup", targets.min_speedup, "add a benchmark step"))
        else:
            worst = min(speedups)
            checks.append(_check("min_speedup", targets.min_speedup, worst, worst >= targets.min_speedup,
                                 "lowest measured p50 speedup over the benchmarked batch sizes"))

    if targets.max_size_ratio is not None:
        if not original.get("size_bytes") or final.get("size_bytes") is None:
            checks.append(_missing("max_size_ratio", targets.max_size_ratio, "size unknown"))
        else:
            ratio = round(final["size_bytes"] / original["size_bytes"], 4)
            checks.append(_check("max_size_ratio", targets.max_size_ratio, ratio, ratio <= targets.max_size_ratio,
                                 f"{final['size_bytes']} of {original['size_bytes']} bytes"))

    for name, key in (("min_top1_agreement", "top1_agreement"), ("min_output_cosine", "output_cosine")):
        target = getattr(targets, name)
        if target is None:
            continue
        measured = final.get(key)
        if measured is None:
            checks.append(_missing(name, target, "needs evaluation data"))
        else:
            checks.append(_check(name, target, measured, measured >= target, f"{key} of the result vs the original"))

    return {"met": all(c["met"] for c in checks), "checks": checks}
