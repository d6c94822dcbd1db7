"""Regressions found by running whole jobs: the exported model must describe the network it holds,
and counts must not change because a layer was quantized."""

from __future__ import annotations

from pathlib import Path

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
    spec = PipelineSpec.model_validate({"input_shape": [3, 32, 32], "steps": [{"kind": "quantize", "mode": "dynamic", "runtime": "fx"}]})
    source = _source(tmp_path, save_safetensors, "mobilenet_v3_small")
    report = run_pipeline(source, spec, None, tmp_path / "out", PipelineHooks()).report
    assert report["final"]["params"] == report["original"]["params"]


def test_static_int8_counts_every_fused_layer():
    from jobspec import QuantizeStep
    from tests.engine.digits_data import digits_rgb32, make_context, trained_resnet18
    from worker.engine.metrics import sparsity
    from worker.engine.quantize import quantize

    model = trained_resnet18()
    train, held_out = digits_rgb32()
    outcome = quantize(model, QuantizeStep(mode="static", runtime="fx", calibration_batches=2), make_context(model, train, held_out))
    batchnorm = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    # BatchNorm folds into the convolutions: its scale into their weights, its shift into a new conv
    # bias per channel (half of BatchNorm's parameters). Every fused layer must still be counted.
    assert sparsity(outcome.model)["params"] == sparsity(model)["params"] - batchnorm // 2


def test_dynamic_int8_leaves_attention_out_projection_alone():
    from jobspec import QuantizeStep
    from worker.engine.quantize import quantize
    from worker.engine.types import StepContext

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    ctx = StepContext(original=model, example_input=torch.randn(1, 3, 32, 32), device=torch.device("cpu"),
                      workdir=Path("."))
    quantized = quantize(model, QuantizeStep(mode="dynamic", runtime="fx"), ctx).model
    out = quantized(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert "NonDynamicallyQuantizableLinear" in kinds  # out_proj stayed fp32


class _SelfAttention(torch.nn.Module):
    """Laid out like Hugging Face BERT: query / key / value share a container."""

    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        weights = torch.softmax(self.query(x) @ self.key(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return weights @ self.value(x)


class _Dense(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.dense(x)


class _BertLikeBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attention, self.intermediate, self.output = _SelfAttention(d), _Dense(d, 4 * d), _Dense(4 * d, d)

    def forward(self, x):
        x = x + self.attention(x)
        return x + self.output(torch.relu(self.intermediate(x)))


class _TinyBert(torch.nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = torch.nn.Linear(8, d)
        self.blocks = torch.nn.Sequential(_BertLikeBlock(d), _BertLikeBlock(d))
        self.classifier = torch.nn.Linear(d, 10)

    def forward(self, x):
        return self.classifier(self.blocks(self.embed(x)).mean(1))


def test_structured_pruning_finds_bert_style_mlp_layers():
    from jobspec import PruneStep
    from worker.engine.prune import prune
    from worker.engine.types import StepContext

    torch.manual_seed(0)
    model = _TinyBert().eval()
    ctx = StepContext(original=model, example_input=torch.randn(1, 6, 8), device=torch.device("cpu"), workdir=Path("."))
    pruned = prune(model, PruneStep(method="structured", amount=0.5), ctx).model
    assert pruned.blocks[0].intermediate.dense.out_features == 32  # 64 hidden neurons, half removed
    assert pruned.blocks[0].attention.query.out_features == 16  # attention untouched
    assert pruned(torch.randn(2, 6, 8)).shape == (2, 10)
