"""Helpers shared by the engine benchmarks (engine_vs_peers.py, quality_digits.py).

Timing rule for every suite: warm up each variant first, then alternate the variants rep by rep
(one call of each per repetition) and report medians, so that load changes on the machine hit all
variants alike and the ratios measured in one run stay meaningful.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def setup(threads: int) -> None:
    """Fixed intra-op threads and quiet deprecation notices (torch.ao.quantization warns on import)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")


def machine_line(threads: int) -> str:
    """One line naming the date, CPU, core count, torch version and threads of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"quantized engine {torch.backends.quantized.engine}, {threads} threads"
    )


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, shape: Sequence[int], batches: int = 4, batch_size: int = 8, seed: int = 0) -> nn.Module:
    """Give a random-init network real BatchNorm statistics (random-init nets give degenerate
    activations otherwise): reset the running stats and average them over random batches."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, *shape, generator=generator))
    return model.eval()


@torch.no_grad()
def time_side_by_side(
    variants: dict[str, Callable[[], Any]], reps: int, warmup: int
) -> dict[str, dict[str, float]]:
    """p50 / p10 / p90 latency (ms) of each zero-argument callable, alternated rep by rep."""
    for call in variants.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(reps):
        for label, call in variants.items():
            began = time.perf_counter()
            call()
            samples[label].append((time.perf_counter() - began) * 1000.0)
    result = {}
    for label, values in samples.items():
        ordered = sorted(values)
        result[label] = {
            "p50_ms": statistics.median(ordered),
            "p10_ms": ordered[int(0.1 * (len(ordered) - 1))],
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
        }
    return result


def output_fidelity(out: torch.Tensor, reference: torch.Tensor, classes: bool = True) -> dict[str, float | None]:
    """Mean cosine of the outputs and (for logits) top-1 agreement with the reference."""
    out, reference = out.float().flatten(1), reference.float().flatten(1)
    cosine = float(F.cosine_similarity(out, reference, dim=1).mean())
    top1 = float((out.argmax(1) == reference.argmax(1)).float().mean()) if classes else None
    return {"cosine": cosine, "top1_agreement": top1}


@torch.no_grad()
def outputs(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def millions(value: int | None) -> str | None:
    return None if value is None else f"{value / 1e6:.2f}M"


def megabytes(value: int | None) -> str | None:
    return None if value is None else f"{value / 1e6:.2f} MB"
