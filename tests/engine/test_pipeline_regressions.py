"""Regressions found by running whole jobs: the exported model must describe the network it holds,
and counts must not change because a layer was quantized."""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file

from jobspec import PipelineSpec
from worker.engine import inspect_dataset, inspect_model, rebuild_model, run_pipeline
from worker.engine.types import PipelineHooks


def _digits_like(tmp_path, count=40):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", inputs=rng.normal(size=(count, 3, 32, 32)).astype(np.float32),
             labels=np.arange(count) % 10)
    return inspect_dataset(tmp_path / "d.npz")[0]


def _source(tmp_path, save_safetensors, arch="squeezenet1_1"):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    return inspect_model(path, arch, {"num_classes": 10})[0]


def test_distilled_student_is_exported_as_the_student(tmp_path, save_safetensors, no_onnx):
    spec = PipelineSpec.model_validate({"steps": [
        {"kind": "distill", "student": "mobilenet_v3_small", "epochs": 1, "loss": "mse", "max_batches_per_epoch": 2},
    ]})
    result = run_pipeline(_source(tmp_path, save_safetensors), spec, _digits_like(tmp_path), tmp_path / "out",
                          PipelineHooks())
    names = {a.name for a in result.artifacts}
    assert {"model.safetensors", "structure.json"} <= names, result.report["export"]
    import json

    structure = json.loads((tmp_path / "out" / "structure.json").read_text())
    assert structure["architecture"] == "mobilenet_v3_small"
    assert structure["arch_kwargs"]["num_classes"] == 10
    rebuilt = rebuild_model(structure, load_file(str(tmp_path / "out" / "model.safetensors")))
    assert sum(p.numel() for p in rebuilt.parameters()) == result.report["final"]["params"]


def test_dynamic_quantization_keeps_the_parameter_count(tmp_path, save_safetensors, no_onnx):
    spec = PipelineSpec.model_validate({"input_shape": [3, 32, 32], "steps": [{"kind": "quantize", "mode": "dynamic"}]})
    source = _source(tmp_path, save_safetensors, "mobilenet_v3_small")
    report = run_pipeline(source, spec, None, tmp_path / "out", PipelineHooks()).report
    assert report["final"]["params"] == report["original"]["params"]
