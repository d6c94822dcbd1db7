"""Run a job's steps in order, measure the model around each, and write artifacts + report.json / .html."""

from __future__ import annotations

import copy
import importlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from jobspec.steps import PipelineSpec
from worker.engine.datasets import load_dataset, split
from worker.engine.device import environment, resolve_device
from worker.engine.export import atomic_write, write_json, write_model_artifacts
from worker.engine.metrics import measure
from worker.engine.modelio import INPUT_SHAPE_KEY, call_model, load_model, set_eval
from worker.engine.report_html import render_html, reproduce_snippet
from worker.engine.types import (
    Artifact,
    DatasetSource,
    EngineError,
    ModelSource,
    PipelineHooks,
    PipelineResult,
    StepContext,
    StepError,
    StepOutcome,
    TensorData,
)
from worker.engine.targets import evaluate_targets
from worker.engine.verdict import verdicts

REPORT_SCHEMA_VERSION = "1"
# Each technique is `fn(model, step_spec, ctx) -> StepOutcome`, imported on first use so a worker
# without one technique's module still runs the others.
TECHNIQUES: dict[str, tuple[str, str]] = {
    "prune": ("worker.engine.prune", "prune"),
    "finetune": ("worker.engine.finetune", "finetune"),
    "distill": ("worker.engine.distill", "distill"),
    "quantize": ("worker.engine.quantize", "quantize"),
    "benchmark": ("worker.engine.benchmark", "benchmark"),
}
_STEPS_SHARE = 95.0  # percent of the progress bar for the steps; the rest is export
# The ONNX artifact costs seconds per job (exporter start-up + onnxruntime check); a worker may opt out.
EXPORT_ONNX = True


def technique(kind: str) -> Callable[..., StepOutcome]:
    """The function implementing a step kind; StepError when this worker lacks it."""
    if kind not in TECHNIQUES:
        raise StepError(f"unknown step kind {kind!r}", {"known": sorted(TECHNIQUES)})
    module_name, function_name = TECHNIQUES[kind]
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise StepError(f"the {kind} technique is not available in this worker: {exc}", {"kind": kind}) from exc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _example_input(
    spec: PipelineSpec, data: TensorData | None, model: nn.Module, device: torch.device, seed: int
) -> torch.Tensor:
    """One batch-1 input: a real sample when the shapes agree, else seeded noise of input_shape."""
    meta = getattr(model, "meta", None)
    program_shape = meta.get(INPUT_SHAPE_KEY) if isinstance(meta, dict) else None
    shape = spec.input_shape or (list(data.inputs.shape[1:]) if data is not None else None) or program_shape
    if not shape:
        raise StepError(
            "the input shape is unknown: set input_shape in the job spec (e.g. [3, 224, 224]) or attach a dataset",
            {"field": "input_shape"},
        )
    if data is not None and list(data.inputs.shape[1:]) == list(shape):
        return data.inputs[:1].clone().to(device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn([1, *shape], generator=generator).to(device)


def _step_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("params", "nonzero_params", "sparsity", "macs", "size_bytes", "top1", "top1_agreement")
    return {key: metrics.get(key) for key in keys if key in metrics}


def run_pipeline(
    model_source: ModelSource,
    spec: PipelineSpec,
    dataset_source: DatasetSource | None,
    workdir: Path,
    hooks: PipelineHooks,
) -> PipelineResult:
    """Run all steps of ``spec`` on the uploaded model; artifacts and report.json go to ``workdir``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    device = resolve_device(spec.device)
    seed_everything(spec.seed)

    for index, step in enumerate(spec.steps):
        if step.needs_data and dataset_source is None:
            raise StepError(
                f"step {index} ({step.kind}) needs a dataset; attach one to the job",
                {"step_index": index, "kind": step.kind},
            )
    data = load_dataset(dataset_source, spec.preprocessing) if dataset_source is not None else None
    train, held_out = (None, None)
    if data is not None:
        train, held_out = split(data, spec.preprocessing.eval_fraction, spec.preprocessing.seed)

    original = set_eval(load_model(model_source)).to(device)
    for param in original.parameters():  # the reference never trains
        param.requires_grad_(False)
    example = _example_input(spec, data, original, device, spec.seed)
    try:
        with torch.no_grad():
            outputs = call_model(original, example)
    except EngineError:
        raise
    except Exception as exc:  # shape errors from the model's own forward
        raise StepError(
            f"the model does not accept inputs of shape {list(example.shape[1:])}: {type(exc).__name__}: {str(exc)[:200]}",
            {"input_shape": list(example.shape[1:])},
        ) from exc

    hooks.on_progress(0.0, "measuring the original model")
    original_metrics, reference_logits = measure(original, example, held_out)
    model = copy.deepcopy(original)
    for param in model.parameters():
        param.requires_grad_(True)

    steps_report: list[dict[str, Any]] = []
    before = original_metrics
    architecture, arch_kwargs = model_source.architecture, dict(model_source.arch_kwargs)
    count = len(spec.steps)
    for index, step in enumerate(spec.steps):
        hooks.check_canceled()
        hooks.on_step_start(index, step.kind)
        seed_everything(spec.seed + index)

        def progress(fraction: float, message: str, _index: int = index) -> None:
            fraction = min(1.0, max(0.0, fraction))
            hooks.on_progress(_STEPS_SHARE * (_index + fraction) / count, message)

        ctx = StepContext(
            original=original, example_input=example, device=device, workdir=workdir, train=train, eval=held_out,
            seed=spec.seed + index, progress=progress, check_canceled=hooks.check_canceled,
        )
        began = time.monotonic()
        try:
            outcome = technique(step.kind)(model, step, ctx)
        except EngineError as exc:
            exc.details.setdefault("step_index", index)
            exc.details.setdefault("kind", step.kind)
            raise
        except Exception as exc:  # surface the failing step to the user instead of a bare traceback
            raise StepError(
                f"step {index} ({step.kind}) failed: {type(exc).__name__}: {str(exc)[:300]}",
                {"step_index": index, "kind": step.kind},
            ) from exc
        model = set_eval(outcome.model)
        if "result_architecture" in outcome.details:  # e.g. distillation replaced the network
            architecture = outcome.details["result_architecture"]
            arch_kwargs = dict(outcome.details.get("result_arch_kwargs", {}))
        duration = time.monotonic() - began
        after, _ = measure(model, example, held_out, reference_logits)
        steps_report.append({
            "index": index, "kind": step.kind, "spec": step.model_dump(mode="json"), "before": before,
            "after": after, "details": outcome.details, "duration_s": round(duration, 3),
        })
        hooks.on_step_end(index, step.kind, {"duration_s": round(duration, 3), **_step_summary(after)})
        progress(1.0, f"step {index} ({step.kind}) done")
        before = after

    hooks.check_canceled()
    hooks.on_progress(_STEPS_SHARE, "writing artifacts")
    model = model.cpu() if not _is_cpu(model) else model
    artifacts, export_status = write_model_artifacts(
        model, workdir, example.cpu(), architecture, arch_kwargs, onnx=EXPORT_ONNX
    )
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "environment": environment(device),
        "model": {
            "format": model_source.format,
            "architecture": model_source.architecture,
            "arch_kwargs": dict(model_source.arch_kwargs),
            "params": original_metrics["params"],
            "num_outputs": int(outputs.shape[-1]) if outputs.ndim >= 1 else None,
            "input_shape": list(example.shape[1:]),
        },
        "dataset": _dataset_report(data, train, held_out),
        "spec": spec.model_dump(mode="json"),
        "original": original_metrics,
        "steps": steps_report,
        "final": before,
        "export": export_status,
        "artifacts": [a.to_dict() for a in artifacts],
        "duration_s": round(time.monotonic() - started, 3),
    }
    report["verdicts"] = verdicts(report)
    if spec.targets is not None:
        report["targets"] = evaluate_targets(report, spec.targets)
    # Standalone code (torch + torchvision only) that loads the result and times it as the benchmark did.
    report["reproduce"] = {"python": reproduce_snippet(report)}
    report = json.loads(json.dumps(report, default=str))  # guarantee JSON-ability for the caller
    report_artifact = Artifact("report.json", workdir / "report.json", "report", "json", "the job's measurements")
    page_artifact = Artifact("report.html", workdir / "report.html", "report", "html", "the report as a page for a browser")
    report["artifacts"] += [report_artifact.to_dict(), page_artifact.to_dict()]
    write_json(report_artifact.path, report)
    atomic_write(page_artifact.path, lambda p: p.write_text(render_html(report), encoding="utf-8"))
    hooks.on_progress(100.0, "done")
    return PipelineResult(report, artifacts + [report_artifact, page_artifact])


def _is_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))


def _dataset_report(data: TensorData | None, train: TensorData | None, held_out: TensorData | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {
        "samples": len(data),
        "classes": data.classes,
        "input_shape": list(data.inputs.shape[1:]),
        "train_samples": len(train) if train is not None else 0,
        "eval_samples": len(held_out) if held_out is not None else 0,
    }
