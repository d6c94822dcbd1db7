"""CPU latency of fp32 vs static FX int8 vs dynamic int8 for resnet18 and mobilenet_v2 at 224x224.

Run: python bench/quantize_speed.py [--reps 30] [--threads 2]

Weights are random (weights=None) but BatchNorm statistics are first estimated on random inputs so
activations have realistic ranges; int8 variants come from the engine's own `quantize` function.
Variants are timed round-robin (one call of each per repetition) so that load changes on the
machine hit all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobspec.steps import QuantizeStep  # noqa: E402
from worker.engine.quantize import quantize  # noqa: E402
from worker.engine.types import StepContext, TensorData  # noqa: E402

SIZE = 224


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: int = 4, batch_size: int = 8) -> nn.Module:
    """Give a random-init network real BN statistics so its activations are not degenerate."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, 3, SIZE, SIZE))
    return model.eval()


def variants(name: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = calibrate_batchnorm(torchvision.models.get_model(name, weights=None))
    data = TensorData(torch.randn(64, 3, SIZE, SIZE), None, [])
    ctx = StepContext(
        original=model, example_input=data.inputs[:1], device=torch.device("cpu"), workdir=Path("."),
        train=data, eval=TensorData(data.inputs[:16], None, []),
    )
    static = quantize(model, QuantizeStep(mode="static", calibration_batches=2), ctx)
    dynamic = quantize(model, QuantizeStep(mode="dynamic"), ctx)
    for label, outcome in (("static", static), ("dynamic", dynamic)):
        fid = outcome.details["fidelity"]
        print(f"  {name} {label}: cosine {fid['cosine']:.4f}, size {outcome.details['size_bytes_before'] / 1e6:.1f} MB"
              f" -> {outcome.details['size_bytes_after'] / 1e6:.1f} MB", flush=True)
    return {"fp32": model, "int8 static (FX)": static.model, "int8 dynamic": dynamic.model}


@torch.no_grad()
def p50_latencies(models: dict[str, nn.Module], reps: int, warmup: int) -> dict[str, float]:
    x = torch.randn(1, 3, SIZE, SIZE)
    for model in models.values():
        for _ in range(warmup):
            model(x)
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(reps):
        for label, model in models.items():
            start = time.perf_counter()
            model(x)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(samples) * 1000 for label, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao.quantization deprecation notices
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, engine {torch.backends.quantized.engine}, threads {args.threads}, "
          f"batch 1, {SIZE}x{SIZE}, p50 of {args.reps} round-robin reps")
    rows = []
    for name in args.models:
        latencies = p50_latencies(variants(name), args.reps, args.warmup)
        base = latencies["fp32"]
        rows += [(name, label, ms, base / ms) for label, ms in latencies.items()]
    print(f"\n{'model':<14}{'variant':<20}{'p50 ms':>10}{'speedup':>10}")
    for name, label, ms, speedup in rows:
        print(f"{name:<14}{label:<20}{ms:>10.2f}{speedup:>9.2f}x")


if __name__ == "__main__":
    main()
