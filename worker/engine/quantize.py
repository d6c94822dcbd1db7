"""Quantization with real low-precision kernels: int8 dynamic (PyTorch), int8 static (PyTorch FX,
ONNX Runtime or PT2E + torch.compile, chosen by measurement), int8 weight-only storage, and fp16 /
bf16 casts.

Every int8 mode goes through one fidelity guard (quantize_guard): quantize, compare outputs with
the fp32 model, and when `min_fidelity` is not met keep the most sensitive layers in fp32 and try again.
"""

from __future__ import annotations

import copy
import difflib
import io
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (
    QConfig,
    QConfigMapping,
    default_dynamic_qconfig,
    default_weight_observer,
    get_default_qconfig,
    get_default_qconfig_mapping,
    per_channel_dynamic_qconfig,
    quantize_dynamic,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from jobspec.steps import QuantizeStep

from .quantize_guard import (
    CONV_LAYERS,
    CPU,
    EXPORTED_HINT,
    Guarded,
    Quantizer,
    calibration_batches,
    candidates,
    guard,
    symmetric_int8,
)
from .training import eval_mode, predict
from .types import StepContext, StepError, StepOutcome

RNN_LAYERS = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
FIDELITY_SAMPLES = 256  # outputs compared with the fp32 model


def quantize(model: nn.Module, spec: QuantizeStep, ctx: StepContext) -> StepOutcome:
    """Quantize ``model`` as ``spec.mode`` says; int8 results run on CPU."""
    _check_layer_names(model, spec.skip_layers)
    if spec.backend not in torch.backends.quantized.supported_engines:
        raise StepError(
            f"quantized backend {spec.backend!r} is not available in this PyTorch build; "
            f"available: {', '.join(torch.backends.quantized.supported_engines)}"
        )
    if spec.mode in ("fp16", "bf16"):
        return _cast_half(model, spec, ctx)

    torch.backends.quantized.engine = spec.backend  # int8 kernels are picked by this global setting
    reference = eval_mode(copy.deepcopy(model).to(CPU))
    inputs, source = _fidelity_inputs(ctx)
    extra: dict[str, Any] = {}
    if spec.mode in ("static", "dynamic"):
        from .quantize_runtimes import quantize_on_runtimes

        eager = _Static if spec.mode == "static" else _Dynamic
        quantizer, guarded, extra = quantize_on_runtimes(reference, spec, ctx, inputs, lambda: eager(reference, spec, ctx))
    elif spec.mode == "weight_only":
        quantizer = _WeightOnly(reference, spec)
        guarded = guard(quantizer, reference, inputs, spec, ctx)
    else:
        raise StepError(f"unknown quantization mode {spec.mode!r}")
    details = _int8_details(quantizer, guarded, spec, reference, source)
    details.update(extra)
    ctx.progress(1.0, f"{spec.mode} quantization done")
    return StepOutcome(model=guarded.model, details=details)


def _int8_details(quantizer: Quantizer, guarded: Guarded, spec: QuantizeStep, reference: nn.Module, source: str) -> dict[str, Any]:
    quantized = guarded.model
    states = quantizer.layer_states(quantized, guarded.kept)
    details: dict[str, Any] = {
        "mode": spec.mode,
        "backend": spec.backend,
        "per_channel": spec.per_channel,
        "device": "cpu",
        "layers_quantized": [n for n, q in states.items() if q],
        "layers_fp32": [n for n, q in states.items() if not q],
        "skip_layers": list(spec.skip_layers),
        "kept_fp32_for_fidelity": guarded.kept,
        "fidelity": {**guarded.fidelity, "data": source},
        "min_fidelity": spec.min_fidelity,
        "guard_rounds": guarded.rounds,
        "size_bytes_before": _state_bytes(reference),
        "size_bytes_after": _state_bytes(quantized),
        **quantizer.details(),
    }
    details["size_ratio"] = details["size_bytes_before"] / max(1, details["size_bytes_after"])
    return details


class _EagerQuantizer(Quantizer):
    """Quantizers whose result is an eager PyTorch module: a layer is int8 when its module is."""

    def layer_states(self, model: nn.Module, kept: list[str]) -> dict[str, bool]:
        return {name: _is_quantized(_submodule(model, name)) for name in self.layers}


class _Dynamic(_EagerQuantizer):
    """Weights int8 ahead of time, activations quantized per batch at run time (Linear / RNNs)."""

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext | None = None):
        self.model = model
        self.spec = spec
        self.layers = candidates(model, nn.Linear, *RNN_LAYERS, skip=[])
        self.candidates = candidates(model, nn.Linear, *RNN_LAYERS, skip=spec.skip_layers)
        if not self.candidates:
            raise StepError(
                "dynamic quantization applies to nn.Linear / LSTM / GRU layers and this model has none "
                "(outside skip_layers); use mode='static' for convolutional models" + EXPORTED_HINT
            )

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        qconfig_spec = {}
        for name in self.candidates:
            if name in keep_fp32:
                continue
            module = self.model.get_submodule(name)
            # Per-channel dynamic weights exist for Linear only; RNN weights stay per-tensor.
            per_channel = self.spec.per_channel and isinstance(module, nn.Linear)
            qconfig_spec[name] = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        return quantize_dynamic(copy.deepcopy(self.model), qconfig_spec, dtype=torch.qint8)


class _Static(_EagerQuantizer):
    """Post-training static int8 in FX graph mode: prepare (fuse + observers), calibrate, convert.

    Calibration happens once; each guard round only re-runs convert on a copy of the calibrated
    model with more layers' qconfig set to None.
    """

    quantizes_outputs = True

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        self.spec = spec
        self.layers = candidates(model, *CONV_LAYERS, nn.Linear, skip=[])
        self.candidates = candidates(model, *CONV_LAYERS, nn.Linear, skip=spec.skip_layers)
        if not self.candidates:
            raise StepError("static quantization found no conv / linear layers to quantize (outside skip_layers)" + EXPORTED_HINT)
        batches, self.calibration_source = calibration_batches(ctx, spec)
        # One QConfig instance reused across mappings: convert_fx checks its mapping against prepare's.
        self.qconfig = _static_qconfig(spec)
        example = (ctx.example_input.detach().to(CPU),)
        try:
            self.prepared = prepare_fx(copy.deepcopy(model), self._mapping(frozenset()), example)
        except Exception as exc:  # noqa: BLE001 - symbolic tracing fails with many exception types
            raise StepError(
                "static int8 needs a model that torch.fx can trace symbolically, and tracing failed "
                f"({type(exc).__name__}: {exc}); data-dependent control flow is the usual cause. "
                "Use mode='dynamic' (Linear/RNN layers) or 'weight_only' instead.",
                {"reason": f"{type(exc).__name__}: {exc}"[:500]},
            ) from exc
        self.calibration_samples = 0
        with torch.no_grad():
            for index, batch in enumerate(batches):
                ctx.check_canceled()
                self.prepared(batch)
                self.calibration_samples += int(batch.shape[0])
                ctx.progress(0.5 * (index + 1) / len(batches), "calibrating")

    def _mapping(self, keep_fp32: frozenset[str]) -> QConfigMapping:
        mapping = get_default_qconfig_mapping(self.spec.backend).set_global(self.qconfig)
        for name in [*self.spec.skip_layers, *sorted(keep_fp32)]:
            mapping.set_module_name(name, None)
        return mapping

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        return convert_fx(copy.deepcopy(self.prepared), qconfig_mapping=self._mapping(keep_fp32))

    def details(self) -> dict[str, Any]:
        return {"calibration_samples": self.calibration_samples, "calibration_data": self.calibration_source}


class _WeightOnly(_EagerQuantizer):
    """Linear weights stored as int8 + per-output-channel scales, dequantized in forward."""

    def __init__(self, model: nn.Module, spec: QuantizeStep):
        self.model = model
        self.spec = spec
        self.layers = candidates(model, nn.Linear, skip=[])
        self.candidates = candidates(model, nn.Linear, skip=spec.skip_layers)
        if not self.candidates:
            raise StepError(
                "weight_only quantization applies to nn.Linear layers and this model has none (outside skip_layers)"
                + EXPORTED_HINT
            )

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        quantized = copy.deepcopy(self.model)
        for name in self.candidates:
            if name not in keep_fp32:
                _replace(quantized, name, WeightOnlyInt8Linear.from_linear(quantized.get_submodule(name), self.spec.per_channel))
        return quantized

    quantizes_inputs = False

    def details(self) -> dict[str, Any]:
        return {"note": "int8 weight storage shrinks the model; weights are dequantized per call, so no CPU speedup is expected"}


class WeightOnlyInt8Linear(nn.Module):
    """A Linear whose weight is stored as int8 with a float scale per output row (or one scale)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = int(weight_int8.shape[1])
        self.out_features = int(weight_int8.shape[0])
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool) -> WeightOnlyInt8Linear:
        with torch.no_grad():
            weight = linear.weight.detach().float()
            q, scale = symmetric_int8(weight, per_channel)
            bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1)
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


# ---------------------------------------------------------------------------------------------
# fp16 / bf16


class CastInputs(nn.Module):
    """Runs ``module`` in ``dtype``: casts float inputs to it and outputs back to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def _cast_half(model: nn.Module, spec: QuantizeStep, ctx: StepContext) -> StepOutcome:
    dtype = torch.float16 if spec.mode == "fp16" else torch.bfloat16
    device = ctx.device
    reference = eval_mode(model.to(device))
    inputs, source = _fidelity_inputs(ctx)
    reference_out = predict(reference, inputs, device)
    halved = CastInputs(copy.deepcopy(reference).to(dtype), dtype)
    try:
        out = predict(halved, inputs, device)
    except StepError as exc:
        raise StepError(f"the model cannot run in {spec.mode} on {device.type}: {exc.message}", exc.details) from exc
    cosine = float(nn.functional.cosine_similarity(out.flatten(1), reference_out.flatten(1), dim=1).mean())
    top1 = float((out.argmax(1) == reference_out.argmax(1)).float().mean()) if out.dim() == 2 else None
    fidelity = {"cosine": round(cosine, 6), "top1_agreement": top1, "samples": int(inputs.shape[0]), "data": source}
    if spec.min_fidelity is not None and cosine < spec.min_fidelity:
        raise StepError(
            f"{spec.mode} reached output cosine similarity {cosine:.5f}, below min_fidelity {spec.min_fidelity}; "
            "half-precision casts have no per-layer fallback",
            {"fidelity": fidelity},
        )
    notes = [f"{spec.mode} is meant for GPU inference; the wrapper casts inputs to {spec.mode} and outputs to float32"]
    if device.type == "cpu":
        notes.append(f"on CPU {spec.mode} is usually not faster than fp32 (often slower); only the size halves")
    details = {
        "mode": spec.mode,
        "device": str(device),
        "fidelity": fidelity,
        "size_bytes_before": _state_bytes(reference),
        "size_bytes_after": _state_bytes(halved),
        "notes": notes,
    }
    details["size_ratio"] = details["size_bytes_before"] / max(1, details["size_bytes_after"])
    return StepOutcome(model=halved, details=details)


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_layer_names(model: nn.Module, names: list[str]) -> None:
    known = [name for name, _ in model.named_modules() if name]
    unknown = [name for name in names if name not in set(known)]
    if unknown:
        suggestions = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
        raise StepError(
            f"skip_layers names layers the model does not have: {', '.join(unknown)}",
            {"unknown_layers": unknown, "suggestions": suggestions},
        )


def _static_qconfig(spec: QuantizeStep) -> QConfig:
    qconfig = get_default_qconfig(spec.backend)
    if spec.per_channel:
        return qconfig
    return QConfig(activation=qconfig.activation, weight=default_weight_observer)


def _fidelity_inputs(ctx: StepContext) -> tuple[torch.Tensor, str]:
    """Inputs to compare outputs on: eval data first, then training data, then the example input."""
    for data, source in ((ctx.eval, "eval"), (ctx.train, "train")):
        if data is not None and len(data) > 0:
            return data.inputs[:FIDELITY_SAMPLES], source
    return ctx.example_input.detach(), "example_input"


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _is_quantized(module: nn.Module | None) -> bool:
    if module is None:
        return False
    return isinstance(module, WeightOnlyInt8Linear) or ".quantized" in type(module).__module__


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _state_bytes(model: nn.Module) -> int:
    """Serialized state_dict size; a measurement only, not an export format."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
