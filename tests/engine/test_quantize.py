"""Quantization with real int8 kernels on really trained digits models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jobspec.steps import QuantizeStep
from tests.engine.digits_data import (
    accuracy,
    digits,
    digits_rgb32,
    make_context,
    torch_threads,
    trained_cnn,
    trained_mlp,
    trained_resnet18,
)
from worker.engine.quantize import CastInputs, WeightOnlyInt8Linear, quantize
from worker.engine.types import StepError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield

# torch.ao.quantization and torch.jit.trace warn about their own deprecation; the tests still need them.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning", "ignore::torch.jit.TracerWarning"
)


def _top1_agreement(a: nn.Module, b: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(inputs).argmax(1) == b.eval()(inputs).argmax(1)).float().mean())


def _assert_traces(model: nn.Module, inputs: torch.Tensor) -> None:
    """The exporter uses torch.jit.trace: the traced module must reproduce the outputs."""
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs[:2])
        assert torch.allclose(traced(inputs), model(inputs), atol=1e-5)


def test_dynamic_int8_of_an_mlp_uses_quantized_linear_kernels():
    train, evaluation = digits()
    model = trained_mlp()
    outcome = quantize(model, QuantizeStep(mode="dynamic", runtime="fx", skip_layers=["fc3"]), make_context(model, train, evaluation))

    quantized = outcome.model
    assert isinstance(quantized.fc1, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(quantized.fc2, torch.ao.nn.quantized.dynamic.Linear)
    assert type(quantized.fc3) is nn.Linear  # skipped
    assert _top1_agreement(model, quantized, evaluation.inputs) > 0.95
    details = outcome.details
    assert details["layers_quantized"] == ["fc1", "fc2"] and details["layers_fp32"] == ["fc3"]
    assert details["fidelity"]["cosine"] > 0.99 and details["fidelity"]["data"] == "eval"
    assert details["size_bytes_after"] < details["size_bytes_before"]
    _assert_traces(quantized, evaluation.inputs[:64])


def test_static_int8_of_a_trained_resnet18():
    train, evaluation = digits_rgb32()
    model = trained_resnet18()
    outcome = quantize(model, QuantizeStep(mode="static", runtime="fx", calibration_batches=8), make_context(model, train, evaluation))

    quantized = outcome.model
    kinds = {type(m) for m in quantized.modules()}
    assert torch.ao.nn.intrinsic.quantized.ConvReLU2d in kinds  # conv+bn+relu fused, int8
    assert torch.ao.nn.quantized.Conv2d in kinds
    assert torch.ao.nn.quantized.Linear in kinds
    assert not any(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in quantized.modules())
    assert _top1_agreement(model, quantized, evaluation.inputs) > 0.9
    assert accuracy(quantized, evaluation) > 0.85
    details = outcome.details
    assert len(details["layers_quantized"]) == 21 and details["layers_fp32"] == []  # 20 convs + fc
    assert details["calibration_samples"] == 8 * 32
    assert details["size_ratio"] > 3.5
    _assert_traces(quantized, evaluation.inputs[:32])


def test_fidelity_guard_keeps_sensitive_layers_in_fp32():
    train, evaluation = digits_rgb32()
    model = trained_resnet18()
    ctx = make_context(model, train, evaluation)
    baseline = quantize(model, QuantizeStep(mode="static", runtime="fx"), ctx).details["fidelity"]["cosine"]
    target = 1.0 - (1.0 - baseline) / 2  # halve the output error

    outcome = quantize(model, QuantizeStep(mode="static", runtime="fx", min_fidelity=target), ctx)
    details = outcome.details
    kept = details["kept_fp32_for_fidelity"]
    assert kept and details["fidelity"]["cosine"] >= target
    assert details["guard_rounds"][0]["kept_fp32"] == [] and len(details["guard_rounds"]) >= 2
    for name in kept:
        module = outcome.model.get_submodule(name)
        assert ".quantized" not in type(module).__module__, name  # really fp32
        assert name in details["layers_fp32"]
    _assert_traces(outcome.model, evaluation.inputs[:32])


def test_unreachable_fidelity_fails_with_the_numbers():
    train, evaluation = digits_rgb32()
    model = trained_resnet18()
    with pytest.raises(StepError, match="could not reach min_fidelity 1.0") as info:
        quantize(model, QuantizeStep(mode="static", runtime="fx", min_fidelity=1.0), make_context(model, train, evaluation))
    rounds = info.value.details["rounds"]
    assert len(rounds) == 6 and all(r["cosine"] < 1.0 for r in rounds)


def test_static_int8_skip_layers_and_per_tensor_weights():
    train, evaluation = digits()
    model = trained_cnn()
    spec = QuantizeStep(mode="static", runtime="fx", per_channel=False, skip_layers=["classifier"])
    outcome = quantize(model, spec, make_context(model, train, evaluation))

    assert type(outcome.model.get_submodule("classifier")) is nn.Linear
    assert outcome.details["layers_fp32"] == ["classifier"]
    assert _top1_agreement(model, outcome.model, evaluation.inputs) > 0.95
    _assert_traces(outcome.model, evaluation.inputs[:64])


def test_weight_only_int8_shrinks_linear_weights():
    train, evaluation = digits()
    model = trained_mlp()
    outcome = quantize(model, QuantizeStep(mode="weight_only"), make_context(model, train, evaluation))

    assert all(isinstance(outcome.model.get_submodule(n), WeightOnlyInt8Linear) for n in ("fc1", "fc2", "fc3"))
    assert outcome.model.fc1.weight_int8.dtype == torch.int8
    assert _top1_agreement(model, outcome.model, evaluation.inputs) > 0.95
    assert outcome.details["size_ratio"] > 3.0
    assert "no CPU speedup" in outcome.details["note"]
    _assert_traces(outcome.model, evaluation.inputs[:64])


@pytest.mark.parametrize("mode, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_wraps_casts_and_says_it_is_for_gpu(mode, dtype):
    train, evaluation = digits()
    model = trained_cnn()
    outcome = quantize(model, QuantizeStep(mode=mode), make_context(model, train, evaluation))

    wrapped = outcome.model
    assert isinstance(wrapped, CastInputs) and wrapped.module.classifier.weight.dtype == dtype
    with torch.no_grad():
        assert wrapped(evaluation.inputs[:8]).dtype == torch.float32  # float32 in, float32 out
    assert outcome.details["fidelity"]["top1_agreement"] > 0.95
    assert any("not faster" in note for note in outcome.details["notes"])
    _assert_traces(wrapped, evaluation.inputs[:16])


def test_unknown_skip_layer_is_an_error_with_suggestions():
    train, evaluation = digits()
    model = trained_mlp()
    with pytest.raises(StepError, match="fc4") as info:
        quantize(model, QuantizeStep(mode="dynamic", skip_layers=["fc4"]), make_context(model, train, evaluation))
    assert "fc1" in info.value.details["suggestions"]["fc4"] or info.value.details["suggestions"]["fc4"]


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace this
            x = x * 2
        return self.fc(x)


def test_untraceable_model_static_fails_and_suggests_dynamic():
    train, evaluation = digits()
    model = _DataDependent()
    with pytest.raises(StepError, match="mode='dynamic'"):
        quantize(model, QuantizeStep(mode="static", runtime="fx"), make_context(model, train, evaluation))


def test_dynamic_mode_on_a_conv_only_model_is_an_error():
    class ConvOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 8)

        def forward(self, x):
            return torch.flatten(self.conv(x), 1)

    train, evaluation = digits()
    model = ConvOnly()
    with pytest.raises(StepError, match="mode='static'"):
        quantize(model, QuantizeStep(mode="dynamic"), make_context(model, train, evaluation))
