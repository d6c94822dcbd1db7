"""Artifacts: written atomically, loaded back and compared; failures recorded instead of failing the job."""

from __future__ import annotations

import json

import torch
import torchvision
from torch import nn

from worker.engine.export import write_model_artifacts
from worker.engine.modelio import load_artifacts


class _Half(nn.Module):
    """Same shape as the quantize step's input-casting wrapper: `module` run in `dtype`."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module.to(dtype), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def _squeezenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.squeezenet1_0(num_classes=10).eval()


def test_all_artifacts_verified_and_no_temp_files(tmp_path):
    artifacts, status = write_model_artifacts(_squeezenet(), tmp_path, torch.randn(1, 3, 32, 32), "squeezenet1_0", {"num_classes": 10}, onnx=False)
    assert {a.name for a in artifacts} == {"model.safetensors", "structure.json", "model.pt2", "model.torchscript.pt"}
    assert all(s["verified"] for s in status.values() if s["ok"])
    assert status["pt2"]["mode"].startswith("dynamic batch")
    assert status["onnx"] == {"ok": False, "reason": "ONNX export is turned off for this worker"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(a.name for a in artifacts)
    structure = json.loads((tmp_path / "structure.json").read_text())
    assert structure["architecture"] == "squeezenet1_0" and structure["layers"]["classifier.1"]["out_channels"] == 10


def test_half_precision_wrapper_is_stored_unwrapped(tmp_path):
    model = _Half(_squeezenet(), torch.float16)
    _, status = write_model_artifacts(model, tmp_path, torch.randn(1, 3, 32, 32), "squeezenet1_0", {"num_classes": 10}, onnx=False)
    assert status["safetensors"]["verified"] is True
    assert json.loads((tmp_path / "structure.json").read_text())["input_dtype"] == "float16"
    rebuilt = load_artifacts(tmp_path)
    assert rebuilt.features[0].weight.dtype == torch.float16


def test_weights_that_do_not_fit_the_architecture_are_not_published(tmp_path):
    model = _squeezenet()
    model.register_buffer("extra_state", torch.zeros(3))  # e.g. a layer replaced by a custom one
    artifacts, status = write_model_artifacts(model, tmp_path, torch.randn(1, 3, 32, 32), "squeezenet1_0", {"num_classes": 10}, onnx=False)
    assert status["safetensors"]["ok"] is False and "TorchScript" in status["safetensors"]["reason"]
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "structure.json").exists()
    assert "model.torchscript.pt" in {a.name for a in artifacts}
