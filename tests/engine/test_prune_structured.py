"""Structured pruning: physically smaller models that still run and rebuild from safetensors + structure.json
(and, across architectures, then quantize to int8 on ONNX Runtime)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import load, save

from jobspec.steps import PipelineSpec, PruneStep, QuantizeStep
from worker.engine import PipelineHooks, StepError, inspect_model, run_pipeline
from worker.engine.export import atomic_write, describe_structure
from worker.engine.metrics import count_macs
from worker.engine.modelio import load_artifacts, rebuild_model
from worker.engine.prune import prune
from worker.engine.quantize import quantize
from worker.engine.runtimes import OnnxRuntimeModel
from worker.engine.types import TensorData

slow = pytest.mark.slow
# (architecture, extra arch_kwargs, input side); every model gets num_classes=10.
ARCHITECTURES = [
    ("resnet18", {}, 32),
    ("mobilenet_v2", {}, 32),
    ("mobilenet_v3_small", {}, 32),
    ("squeezenet1_0", {}, 64),
    ("googlenet", {"aux_logits": False, "init_weights": True}, 32),
    ("regnet_x_400mf", {}, 32),
    ("mnasnet0_5", {}, 32),
    pytest.param("efficientnet_b0", {}, 32, marks=slow),
    pytest.param("densenet121", {}, 32, marks=slow),
    pytest.param("convnext_tiny", {}, 32, marks=slow),
    pytest.param("vit_b_16", {"image_size": 32}, 32, marks=slow),
    pytest.param("swin_t", {}, 32, marks=slow),
]


def _build(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()


@pytest.mark.parametrize("name, kwargs, side", ARCHITECTURES)
def test_structured_pruning_across_architectures(name, kwargs, side, make_ctx):
    model = _build(name, kwargs)
    params = sum(p.numel() for p in model.parameters())
    ctx = make_ctx(model, shape=(3, side, side))
    outcome = prune(model, PruneStep(method="structured", criterion="l2", amount=0.3), ctx)
    pruned = outcome.model
    # Attention models only lose MLP hidden neurons, so they shrink less.
    assert sum(p.numel() for p in pruned.parameters()) < params * (0.9 if name.startswith(("vit", "swin")) else 0.7)
    assert outcome.details["layer_channels"]
    with torch.no_grad():
        expected = pruned(ctx.example_input)
    assert expected.shape == (1, 10)

    # Reload the way a user would: safetensors bytes + structure.json -> rebuilt network.
    structure = describe_structure(pruned, name, {"num_classes": 10, **kwargs})
    rebuilt = rebuild_model(structure, load(save({k: v.contiguous() for k, v in pruned.state_dict().items()}))).eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(ctx.example_input), expected, atol=1e-4)
    if name.startswith(("vit", "swin")):
        assert "MLP hidden" in outcome.details["notes"][0]

    # Then static int8 on ONNX Runtime: real int8 weights, runs, and its file reloads in a fresh session.
    calibration = TensorData(torch.randn(16, 3, side, side), None, [])
    int8 = quantize(pruned, QuantizeStep(mode="static", runtime="onnxruntime", calibration_batches=1),
                    make_ctx(pruned, shape=(3, side, side), train=calibration)).model
    assert isinstance(int8, OnnxRuntimeModel)
    assert any(t.dtype == torch.int8 and t.ndim >= 2 for t in int8.weight_tensors().values())
    assert int8(ctx.example_input).shape == (1, 10)
    assert sum(t.numel() * t.element_size() for t in int8.weight_tensors().values()) < sum(
        p.numel() * p.element_size() for p in pruned.parameters()) / 2
    written = int8.write_artifacts(ctx.workdir, ctx.example_input, int8(ctx.example_input), atomic_write)
    assert written["verified"], written


def test_shufflenet_is_refused_with_a_reason(make_ctx):
    model = _build("shufflenet_v2_x0_5", {})
    with pytest.raises(StepError, match="unstructured"):
        prune(model, PruneStep(method="structured"), make_ctx(model, shape=(3, 64, 64)))


@pytest.fixture
def tiny_data():
    torch.manual_seed(0)
    return TensorData(torch.randn(48, 3, 32, 32), torch.randint(0, 10, (48,)), [str(i) for i in range(10)])


@pytest.mark.parametrize("criterion", ["l1", "random", "taylor", "activation", "bn_scale", "fpgm"])
def test_criteria(criterion, small_model, make_ctx, tiny_data):
    # SqueezeNet traces in a fraction of a second; it has no BatchNorm, so bn_scale gets MobileNet.
    build = small_model if criterion == "bn_scale" else lambda: _build("squeezenet1_0", {})
    model = build()
    ctx = make_ctx(build(), train=tiny_data, eval=tiny_data)
    outcome = prune(model, PruneStep(method="structured", criterion=criterion, amount=0.4, calibration_batches=1), ctx)
    assert outcome.details["params_after"] < outcome.details["params_before"]
    assert not any("_importance" in m.__dict__ for m in outcome.model.modules())


def test_data_criteria_need_data(small_model, make_ctx):
    model = small_model()
    with pytest.raises(StepError, match="needs a dataset"):
        prune(model, PruneStep(method="structured", criterion="taylor"), make_ctx(model))


def test_target_macs_reduction(make_ctx):
    model = _build("resnet18", {})
    ctx = make_ctx(model)
    base, _ = count_macs(model, ctx.example_input)
    outcome = prune(model, PruneStep(method="structured", target_macs_reduction=2.0), ctx)
    after, _ = count_macs(outcome.model, ctx.example_input)
    assert base / after >= 2.0
    assert base / after < 2.6  # stops soon after reaching the target, not at the maximum ratio
    assert outcome.details["macs_reduction"] == pytest.approx(base / after, rel=1e-3)


def test_layer_amounts_global_and_ignore(make_ctx):
    model = _build("resnet18", {})
    spec = PruneStep(method="structured", amount=0.2, layer_amounts={"layer1.0.conv1": 0.75}, ignore_layers=["layer2.0.conv1"], scope="global")
    outcome = prune(model, spec, make_ctx(model))
    channels = outcome.details["layer_channels"]
    assert channels["layer1.0.conv1"] == {"before": 64, "after": 16}
    assert "layer2.0.conv1" not in channels
    assert outcome.model.fc.out_features == 10
    with pytest.raises(StepError) as caught:
        prune(_build("resnet18", {}), PruneStep(method="structured", layer_amounts={"layer9": 0.5}), make_ctx(model))
    assert caught.value.details["unknown"] == ["layer9"]


def test_structured_pipeline_artifacts_rebuild(tmp_path, save_safetensors, no_onnx):
    model = _build("squeezenet1_0", {})
    source, _ = inspect_model(save_safetensors(model, tmp_path / "m.safetensors"), "squeezenet1_0", {"num_classes": 10})
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "method": "structured", "criterion": "l1", "amount": 0.5}], "input_shape": [3, 64, 64],
    })
    report = run_pipeline(source, spec, None, tmp_path / "out", PipelineHooks()).report
    assert report["final"]["size_bytes"] < 0.4 * report["original"]["size_bytes"]
    assert report["final"]["macs"] < 0.4 * report["original"]["macs"]
    assert report["export"]["safetensors"]["verified"] is True
    assert report["verdicts"]["model.safetensors"]["verdict"] == "smaller only"  # no benchmark step
    rebuilt = load_artifacts(tmp_path / "out")
    assert rebuilt.features[3].squeeze.out_channels == 8  # was 16
    assert rebuilt.classifier[1].out_channels == 10  # SqueezeNet's classifier is a conv: never pruned
