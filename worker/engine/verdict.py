"""Plain-language verdicts: did compression make the model faster, only smaller, or neither?"""

from __future__ import annotations

from typing import Any

# A size change under this fraction is not worth reporting as a gain.
MIN_SIZE_GAIN = 0.10
RUNTIME_NOTES = {
    "model.int8.onnx": " (timed on ONNX Runtime, as shipped)",
    "model.int8.pt2": " (timed compiled with torch.compile; loaded without compiling it runs slower than fp32)",
}


def _speed(report: dict[str, Any]) -> tuple[bool | None, str]:
    benchmarks = [step for step in report["steps"] if step["kind"] == "benchmark"]
    if not benchmarks:
        return None, "speed not measured (add a benchmark step)"
    rows = benchmarks[-1]["details"].get("results", [])
    faster = [r for r in rows if r.get("speedup_significant")]
    if faster:
        best = max(faster, key=lambda r: r["speedup_vs_original"])
        return True, f"{best['speedup_vs_original']:.2f}x faster at batch size {best['batch_size']} (at least 3 in 4 paired timings show >= 1.1x)"
    ratios = ", ".join(f"{r['speedup_vs_original']}x at batch {r['batch_size']}" for r in rows)
    if any(r.get("slowdown_significant") for r in rows):
        return False, f"slower than the original ({ratios})"
    return False, f"no speedup beyond the timing noise ({ratios})"


def _size(report: dict[str, Any]) -> tuple[bool, str]:
    original, final = report["original"], report["final"]
    stored = 1 - final["size_bytes"] / original["size_bytes"] if original.get("size_bytes") else 0.0
    packed = 1 - final["compressed_size_bytes"] / original["compressed_size_bytes"] if original.get("compressed_size_bytes") else 0.0
    if stored >= MIN_SIZE_GAIN:
        return True, f"{stored:.0%} smaller on disk"
    if packed >= MIN_SIZE_GAIN:
        return True, f"{packed:.0%} smaller once compressed (zip/gzip), same size uncompressed: the zeros only pay off compressed or with sparse storage"
    return False, "no meaningful size reduction"


def verdicts(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """One verdict per model artifact (they hold the same model; timings are of the PyTorch model)."""
    faster, speed_reason = _speed(report)
    smaller, size_reason = _size(report)
    if faster:
        verdict = "faster"
    elif smaller:
        verdict = "smaller only"
    else:
        verdict = "no gain"
    reason = f"{speed_reason}; {size_reason}"
    result = {}
    for artifact in report["artifacts"]:
        if artifact["kind"] == "model" and artifact["format"] != "json":
            if artifact["name"] in RUNTIME_NOTES:  # the int8 runtime's own file: that runtime was timed
                note = RUNTIME_NOTES[artifact["name"]]
            elif artifact["format"] == "safetensors":
                note = ""
            else:
                note = " (timed as the eager PyTorch model, not this runtime)"
            result[artifact["name"]] = {"verdict": verdict, "reason": reason + note}
    return result
