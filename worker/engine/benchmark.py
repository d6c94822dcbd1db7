"""Latency / throughput / memory of the current model, timed side by side with the original."""

from __future__ import annotations

import copy
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from jobspec.steps import BenchmarkStep
from worker.engine.device import module_device
from worker.engine.modelio import call_model, set_eval
from worker.engine.types import StepContext, StepOutcome

# Below this ratio a "speedup" is within the run-to-run noise of CPU timing.
NOISE_RATIO = 1.1


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads and restore the previous setting afterwards."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _max_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # Linux reports KiB


def _summary(times_ms: list[float], batch_size: int) -> dict[str, Any]:
    ordered = sorted(times_ms)
    mean = statistics.fmean(times_ms)
    return {
        "p50_ms": round(_percentile(ordered, 0.5), 4),
        "p95_ms": round(_percentile(ordered, 0.95), 4),
        "mean_ms": round(mean, 4),
        "min_ms": round(ordered[0], 4),
        "throughput_per_s": round(batch_size * 1000.0 / mean, 2) if mean > 0 else None,
    }


def _once(model: nn.Module, inputs: torch.Tensor) -> float:
    """One forward's latency in ms (CUDA: device events, so queued kernels are counted)."""
    if inputs.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call_model(model, inputs)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    began = time.perf_counter()
    call_model(model, inputs)
    return (time.perf_counter() - began) * 1000.0


def _peak_memory(model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
        base = torch.cuda.memory_allocated(inputs.device)
        torch.cuda.reset_peak_memory_stats(inputs.device)
        call_model(model, inputs)
        torch.cuda.synchronize(inputs.device)
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(inputs.device) - base)}
    # tracemalloc does not see torch's allocator; the process high-water mark is honest but only
    # grows when this forward exceeds every earlier peak of the worker process.
    before = _max_rss_bytes()
    call_model(model, inputs)
    return {"process_peak_rss_increase_bytes": max(0, _max_rss_bytes() - before)}


@torch.no_grad()
def time_models(
    models: list[nn.Module],
    inputs: torch.Tensor,
    warmup: int,
    repetitions: int,
    check_canceled: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """Latency percentiles (ms), throughput (samples/s), peak memory and the raw timings of each model.

    Repetitions alternate between the models so that drift (turbo, caches, other load) affects
    all of them alike and their ratio stays meaningful.
    """
    for model in models:
        set_eval(model)
    memory = [_peak_memory(model, inputs) for model in models]
    for _ in range(warmup):
        for model in models:
            call_model(model, inputs)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
    times: list[list[float]] = [[] for _ in models]
    order = list(range(len(models)))
    for index in range(repetitions):
        # Alternate who goes first, so a model never always runs right after the same neighbour.
        for position in order if index % 2 == 0 else order[::-1]:
            times[position].append(_once(models[position], inputs))
        if index % 10 == 9:
            check_canceled()
    return [{**_summary(t, inputs.shape[0]), **m, "samples_ms": t} for t, m in zip(times, memory)]


def speedup_verdict(model_ms: list[float], original_ms: list[float]) -> dict[str, Any]:
    """Ratio of p50 latencies, and whether it holds beyond the noise.

    The repetitions alternate between the two models, so each pair of neighbouring timings saw the
    same machine state; the verdict looks at the ratios of those pairs rather than at overlapping
    spreads, which a loaded machine widens for both models alike. Faster means at least 3 in 4
    pairs show a speedup of NOISE_RATIO or more (slower: the mirror image).
    """
    model_p50 = statistics.median(model_ms)
    ratio = statistics.median(original_ms) / model_p50 if model_p50 > 0 else None
    pairs = sorted(o / m for o, m in zip(original_ms, model_ms) if m > 0)
    low, high = (_percentile(pairs, 0.25), _percentile(pairs, 0.75)) if pairs else (None, None)
    clear = ratio is not None and low is not None and ratio >= NOISE_RATIO and low >= NOISE_RATIO
    slower = ratio is not None and high is not None and ratio <= 1 / NOISE_RATIO and high <= 1 / NOISE_RATIO
    return {
        "speedup_vs_original": round(ratio, 4) if ratio else None,
        "paired_speedup_p25": round(low, 4) if low else None,
        "paired_speedup_p75": round(high, 4) if high else None,
        "speedup_significant": bool(clear),
        "slowdown_significant": bool(slower),
    }


def benchmark(model: nn.Module, spec: BenchmarkStep, ctx: StepContext) -> StepOutcome:
    """Time the current and the original model at each batch size, on the same device and threads."""
    device = module_device(model, ctx.device)
    original = ctx.original
    original_device = module_device(original, ctx.device)
    note = None
    if original_device != device:
        # e.g. an int8 model (CPU only) on a CUDA job: compare like with like on the model's device.
        note = f"the model runs on {device}; the original was timed on {device} too for a fair ratio"
        original = copy.deepcopy(original).to(device)
    rows = []
    with threads(spec.threads):
        used_threads = torch.get_num_threads()
        for index, batch_size in enumerate(spec.batch_sizes):
            inputs = ctx.example_input.to(device).expand(batch_size, *ctx.example_input.shape[1:]).contiguous()
            current, reference = time_models([model, original], inputs, spec.warmup, spec.repetitions, ctx.check_canceled)
            verdict = speedup_verdict(current.pop("samples_ms"), reference.pop("samples_ms"))
            rows.append({"batch_size": batch_size, "model": current, "original": reference, **verdict})
            ctx.progress((index + 1) / len(spec.batch_sizes), f"timed batch size {batch_size}")
    details: dict[str, Any] = {
        "device": str(device),
        "threads": used_threads if device.type == "cpu" else None,
        "warmup": spec.warmup,
        "repetitions": spec.repetitions,
        "results": rows,
    }
    if note:
        details["note"] = note
    return StepOutcome(model, details)
