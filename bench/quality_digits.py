"""Accuracy, size and speed of ModelPress's compression recipes on real data (sklearn digits), end to end.

Run:  python bench/quality_digits.py            # ~6-8 min on 2 idle cores (15 min under load 5)
      python bench/quality_digits.py --quick    # ~2 min: ResNet-18 only, fewer epochs
      python bench/quality_digits.py --models resnet18 --size 64

What it does, per model (resnet18, mobilenet_v2; num_classes=10):
  1. writes sklearn's 1,797 digits, upsampled to 3 x SIZE x SIZE and standardised, to an .npz;
  2. trains the model on the pipeline's own train split (worker.engine.datasets.split with the
     job's eval_fraction and seed, so the pipeline's held-out accuracy is honest), saves safetensors;
  3. builds the sources with worker.engine.inspect_model / inspect_dataset and runs the worker's
     function, worker.engine.run_pipeline, on three jobs:
       chain:  prune (structured, l1, target_macs_reduction) -> benchmark -> finetune -> benchmark
               -> quantize (static int8, runtime auto: the fastest of FX / ONNX Runtime / PT2E) -> benchmark
       int8:   quantize (static int8) -> benchmark               (int8 alone, for attribution)
       kd:     distill (into a smaller torchvision student) -> benchmark
  4. prints one table per model, every number read from the pipeline's report.json: top-1 on the
     held-out split, MACs, params, stored size, p50 latency at batch 1 and the speedup vs the
     original timed side by side inside the same benchmark step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from _common import machine_line, markdown_table, megabytes, millions, setup  # noqa: E402
from jobspec.steps import (  # noqa: E402
    BenchmarkStep,
    DistillStep,
    FinetuneStep,
    PipelineSpec,
    Preprocessing,
    PruneStep,
    QuantizeStep,
)
from worker.engine import PipelineHooks, TensorData, inspect_dataset, inspect_model, run_pipeline  # noqa: E402
from worker.engine.datasets import split  # noqa: E402
from tests.engine.digits_data import accuracy, train_quickly  # noqa: E402

NUM_CLASSES = 10
STUDENTS = {"resnet18": "mobilenet_v2", "mobilenet_v2": "mobilenet_v3_small"}


def write_digits(path: Path, size: int) -> TensorData:
    """sklearn digits as (N, 3, size, size) float32, standardised with one global mean/std."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    np.savez(path, inputs=images.numpy(), labels=labels.numpy())
    return TensorData(images, labels, [str(c) for c in range(NUM_CLASSES)])


def train(name: str, data: TensorData, epochs: int, lr: float, seed: int = 0) -> torch.nn.Module:
    """Adam + one-cycle on the given split (the engine tests' recipe); returns the model in eval mode."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    return train_quickly(model, data, epochs=epochs, lr=lr, seed=seed)


def jobs(name: str, args: argparse.Namespace) -> dict[str, list[Any]]:
    bench = BenchmarkStep(batch_sizes=[1], threads=args.threads, warmup=10, repetitions=args.reps)
    return {
        "chain": [
            PruneStep(method="structured", criterion="l1", target_macs_reduction=args.macs_reduction),
            bench,
            FinetuneStep(epochs=args.finetune_epochs, optimizer="adam", lr=1e-3, schedule="cosine"),
            bench,
            QuantizeStep(mode="static"),
            bench,
        ],
        "int8": [QuantizeStep(mode="static"), bench],
        "kd": [
            DistillStep(student=STUDENTS[name], student_kwargs={"num_classes": NUM_CLASSES}, loss="kl",
                        epochs=args.distill_epochs, optimizer="adam", lr=2e-3),
            bench,
        ],
    }


def _timing(step: dict[str, Any]) -> dict[str, Any]:
    return step["details"]["results"][0]


def rows_from(reports: dict[str, dict[str, Any]]) -> tuple[list[list[Any]], dict[str, Any]]:
    """Table rows (one per model state), read from the reports only."""
    chain = reports["chain"]
    original = chain["original"]
    first_bench = next(s for s in chain["steps"] if s["kind"] == "benchmark")
    rows = [["original (fp32)", original.get("top1"), 0.0, original.get("macs"), original.get("params"),
             original.get("size_bytes"), _timing(first_bench)["original"]["p50_ms"], 1.0, "", ""]]
    labels = {"prune": "prune", "finetune": "+ finetune", "quantize": "+ static int8", "distill": "KD student"}
    facts: dict[str, Any] = {}
    for job, report in reports.items():
        steps = report["steps"]
        last_macs = report["original"].get("macs")
        trail: list[str] = []
        for index, step in enumerate(steps):
            if step["kind"] == "benchmark":
                continue
            after = step["after"]
            macs = after.get("macs")
            note = ""
            if step["kind"] == "quantize":
                note = f"int8 runtime: {step['details'].get('runtime', 'fx')}"
                if macs is None:
                    macs, note = last_macs, note + "; MACs of the fp32 graph it was made from"
            last_macs = after.get("macs") or last_macs
            trail.append(labels[step["kind"]] if step["kind"] != "distill" else f"KD -> {step['spec']['student']}")
            bench = steps[index + 1] if index + 1 < len(steps) and steps[index + 1]["kind"] == "benchmark" else None
            timing = _timing(bench) if bench else None
            top1 = after.get("top1")
            label = " ".join(trail) if job != "int8" else "static int8 only"
            if step["kind"] == "prune":
                facts[f"{job}.prune_macs_reduction"] = step["details"].get("macs_reduction")
            if step["kind"] == "quantize":
                facts[f"{job}.kept_fp32"] = step["details"].get("kept_fp32_for_fidelity")
                facts[f"{job}.fidelity"] = step["details"].get("fidelity")
            rows.append([
                label, top1, (top1 - original["top1"]) * 100 if top1 is not None and original.get("top1") is not None else None,
                macs, after.get("params"), after.get("size_bytes"),
                timing["model"]["p50_ms"] if timing else None,
                timing["speedup_vs_original"] if timing else None,
                (timing["original"]["p50_ms"] if timing else None),
                note,
            ])
    for row in rows:
        row[3] = None if row[3] is None else f"{row[3] / 1e6:.1f}M"
        row[4] = millions(row[4])
        row[5] = megabytes(row[5])
        row[1] = None if row[1] is None else f"{row[1] * 100:.2f}%"
        row[2] = None if row[2] is None or row[0].startswith("original") else f"{row[2]:+.2f} pt"
    return rows, facts


HEADERS = ["model state", "top-1 (held out)", "Δ top-1", "MACs", "params", "size", "p50 ms (batch 1)",
           "speedup vs original", "original p50 ms (same step)", "note"]


def run_model(name: str, args: argparse.Namespace, root: Path) -> None:
    began = time.perf_counter()
    dataset_path = root / "digits.npz"
    data = write_digits(dataset_path, args.size) if not dataset_path.exists() else None
    preprocessing = Preprocessing(eval_fraction=0.2, seed=0)
    dataset_source, info = inspect_dataset(dataset_path)
    if data is None:
        loaded = np.load(dataset_path)
        data = TensorData(torch.from_numpy(loaded["inputs"]), torch.from_numpy(loaded["labels"]), [])
    train_split, eval_split = split(data, preprocessing.eval_fraction, preprocessing.seed)  # what the pipeline will use
    model = train(name, train_split, args.epochs, args.lr)
    trained_top1 = accuracy(model, eval_split)
    weights = root / f"{name}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    model_source, _ = inspect_model(weights, name, {"num_classes": NUM_CLASSES})
    trained_s = time.perf_counter() - began
    print(f"  {name}: trained {args.epochs} epochs on {len(train_split)} samples in {trained_s:.0f}s, "
          f"held-out top-1 {trained_top1:.4f}", flush=True)
    reports: dict[str, dict[str, Any]] = {}
    durations = {}
    for job, steps in jobs(name, args).items():
        if args.quick and job == "int8":
            continue
        spec = PipelineSpec(steps=steps, device="cpu", preprocessing=preprocessing, seed=0)
        workdir = root / f"{name}-{job}"
        result = run_pipeline(model_source, spec, dataset_source, workdir, PipelineHooks())
        reports[job] = result.report
        durations[job] = result.report["duration_s"]
        if args.keep_reports:
            args.keep_reports.mkdir(parents=True, exist_ok=True)
            (args.keep_reports / f"{name}-{job}.json").write_text(json.dumps(result.report, indent=1))
        print(f"    job {job}: {result.report['duration_s']:.0f}s", flush=True)
    rows, facts = rows_from(reports)
    print(f"\n### {name} (3x{args.size}x{args.size}, {info.num_samples} samples, "
          f"{len(eval_split)} held out; trained {args.epochs} epochs)\n")
    print(markdown_table(HEADERS, rows))
    print(f"\nfacts: {json.dumps(facts)}; job durations (s): {json.dumps(durations)}; "
          f"total {time.perf_counter() - began:.0f}s\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2 min: resnet18 only, fewer epochs and reps, no int8-only job")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"], choices=sorted(STUDENTS))
    parser.add_argument("--size", type=int, default=32, help="images are upsampled to 3 x SIZE x SIZE")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of the original")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--distill-epochs", type=int, default=None)
    parser.add_argument("--macs-reduction", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=None, help="benchmark step repetitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep-reports", type=Path, default=None, help="folder to copy each job's report.json to")
    args = parser.parse_args()
    if args.quick:
        args.models = ["resnet18"] if "--models" not in sys.argv else args.models
    args.epochs = args.epochs or (3 if args.quick else 4)
    args.finetune_epochs = args.finetune_epochs or (1 if args.quick else 2)
    args.distill_epochs = args.distill_epochs or (2 if args.quick else 3)
    args.reps = args.reps or (30 if args.quick else 60)
    setup(args.threads)
    print(f"# quality on digits — {machine_line(args.threads)}; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            run_model(name, args, Path(tmp))
    print(f"total {time.perf_counter() - started:.0f}s; load average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
