"""int8 on several runtimes, chosen by measurement.

Which int8 runtime is fastest depends on the model: measured here (torch 2.14.1, 2 x86 cores),
ONNX Runtime's QDQ kernels ran ResNet-18 fastest while PT2E + inductor beat PyTorch's eager FX
kernels on MobileNetV2, whose many small ops pay per-op overhead in eager mode. So `runtime="auto"`
builds each available runtime's int8 model through the same fidelity guard, times them side by side
with the fp32 model, and keeps the fastest one that meets min_fidelity (within 5 %, the easiest to
deploy). Dynamic int8 chooses the same way between PyTorch and ONNX Runtime (on MiniLM, ORT's
per-channel weights kept cosine 0.993 where PyTorch's gave 0.974, at the same speed).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from jobspec.steps import QuantizeStep

from .benchmark import time_models
from .quantize_guard import Guarded, Quantizer, SensitivityCache, guard
from .types import StepContext, StepError

RUNTIMES = {"static": ("fx", "onnxruntime", "pt2e"), "dynamic": ("fx", "onnxruntime")}
TIE_RATIO = 1.05
# Most portable first: ONNX runs without PyTorch; TorchScript loads in plain PyTorch; the PT2E
# program needs torchao and a torch.compile (and a C++ compiler) to be fast.
PORTABILITY = ("onnxruntime", "fx", "pt2e")
CHOICE_WARMUP = 3  # the first call of the PT2E model compiles it
CHOICE_REPETITIONS = 20
_DESCRIPTIONS = {
    "fx": "PyTorch eager int8 kernels (torch.ao)",
    "onnxruntime": "ONNX Runtime int8 kernels",
    "pt2e": "torchao PT2E program compiled with torch.compile (inductor)",
}


def _factory(name: str, reference: nn.Module, spec: QuantizeStep, ctx: StepContext, build_fx: Callable[[], Quantizer]) -> Quantizer:
    if name == "fx":
        return build_fx()
    if name == "onnxruntime":
        from .quantize_ort import OrtDynamic, OrtStatic

        return (OrtStatic if spec.mode == "static" else OrtDynamic)(reference, spec, ctx)
    from .quantize_pt2e import Pt2eStatic

    return Pt2eStatic(reference, spec, ctx)


def quantize_on_runtimes(
    reference: nn.Module,
    spec: QuantizeStep,
    ctx: StepContext,
    inputs: torch.Tensor,
    build_fx: Callable[[], Quantizer],
) -> tuple[Quantizer, Guarded, dict[str, Any]]:
    """The chosen runtime's quantizer and guarded model, plus report details of the choice."""
    names = RUNTIMES[spec.mode] if spec.runtime == "auto" else (spec.runtime,)
    cache = SensitivityCache()
    built: list[tuple[str, Quantizer, Guarded]] = []
    rows: dict[str, dict[str, Any]] = {}
    for position, name in enumerate(names):
        ctx.check_canceled()
        ctx.progress(position / (len(names) + 1), f"building the {name} int8 model")
        try:
            quantizer = _factory(name, reference, spec, ctx, build_fx)
            guarded = guard(quantizer, reference, inputs, spec, ctx, cache)
        except StepError as exc:
            if len(names) == 1:
                raise
            rows[name] = _row(name, available=False, reason=exc.message)
            continue
        built.append((name, quantizer, guarded))
        rows[name] = _row(name, available=True, cosine=guarded.fidelity["cosine"], top1=guarded.fidelity["top1_agreement"])
    if not built:
        reasons = "; ".join(f"{name}: {row['reason']}" for name, row in rows.items())
        raise StepError(f"no int8 runtime could quantize this model ({reasons})", {"runtime_candidates": list(rows.values())})

    chosen, ort_fp32_ms = built[0], None
    if len(built) > 1:
        ctx.progress(len(names) / (len(names) + 1), "timing the int8 runtimes side by side")
        chosen, ort_fp32_ms = _fastest(reference, built, rows, ctx)
        note = (
            f"{chosen[0]} ({_DESCRIPTIONS[chosen[0]]}) was the fastest at batch 1 (p50) of {len(built)} int8 "
            "runtimes timed side by side with the fp32 model, or within 5 % of it and easier to deploy"
        )
    else:
        note = f"{chosen[0]} ({_DESCRIPTIONS[chosen[0]]})" + (
            " was requested" if spec.runtime != "auto" else " was the only runtime that could quantize this model"
        )
    rows[chosen[0]]["chosen"] = True
    extra: dict[str, Any] = {
        "runtime": chosen[0],
        "runtime_choice_note": note,
        "runtime_candidates": [rows[name] for name in names if name in rows],
    }
    if chosen[0] == "onnxruntime" and ort_fp32_ms is not None:
        extra["onnxruntime_fp32_p50_ms"] = ort_fp32_ms
    return chosen[1], chosen[2], extra


def _fastest(
    reference: nn.Module, built: list[tuple[str, Quantizer, Guarded]], rows: dict[str, dict[str, Any]], ctx: StepContext
) -> tuple[tuple[str, Quantizer, Guarded], float | None]:
    """Time fp32 and every int8 model in one alternating loop at batch 1; the fastest wins.

    ONNX Runtime's fp32 graph is timed too (its p50 is returned with the winner), so the report can
    say how much of ONNX Runtime's gain is int8's.
    """
    models: list[nn.Module] = [reference] + [guarded.model for _, _, guarded in built]
    ort = next((q for name, q, _ in built if name == "onnxruntime"), None)
    if ort is not None:
        models.append(ort.fp32_model())  # type: ignore[attr-defined]
    example = ctx.example_input.detach().to("cpu")
    timings = time_models(models, example, CHOICE_WARMUP, CHOICE_REPETITIONS, ctx.check_canceled)
    fp32_ms = timings[0]["p50_ms"]
    for (name, _, _), timing in zip(built, timings[1:]):
        rows[name].update(
            p50_ms=timing["p50_ms"],
            fp32_p50_ms=fp32_ms,
            speedup_vs_fp32=round(fp32_ms / timing["p50_ms"], 4) if timing["p50_ms"] else None,
        )
    ort_fp32_ms = timings[-1]["p50_ms"] if ort is not None else None
    best = min(rows[name]["p50_ms"] for name, _, _ in built)
    # Within TIE_RATIO of the fastest the timings cannot tell runtimes apart (run-to-run spread is
    # ~10 % here): prefer the artifact that is easiest to deploy, so repeated jobs agree.
    close = [item for item in built if rows[item[0]]["p50_ms"] <= best * TIE_RATIO]
    return min(close, key=lambda item: PORTABILITY.index(item[0])), ort_fp32_ms


def _row(name: str, *, available: bool, reason: str | None = None, cosine: float | None = None, top1: float | None = None) -> dict[str, Any]:
    return {
        "runtime": name,
        "available": available,
        "p50_ms": None,
        "fp32_p50_ms": None,
        "speedup_vs_fp32": None,
        "cosine": round(cosine, 6) if cosine is not None else None,
        "top1_agreement": top1,
        # A built runtime passed the guard: it met min_fidelity, or none was asked for.
        "meets_fidelity": True if available else None,
        "chosen": False,
        "reason": reason,
    }
