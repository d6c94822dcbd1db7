"""Quantization with real low-precision kernels: int8 dynamic / static (FX graph mode), int8
weight-only storage, and fp16 / bf16 casts.

Every int8 mode goes through one fidelity guard: quantize, compare outputs with the fp32 model,
and when `min_fidelity` is not met keep the most sensitive layers in fp32 and try again.
"""

from __future__ import annotations

import copy
import difflib
import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
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

from .training import eval_mode, predict
from .types import StepContext, StepError, StepOutcome, TensorData

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RNN_LAYERS = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
CALIBRATION_BATCH_SIZE = 32
FIDELITY_SAMPLES = 256  # outputs compared with the fp32 model
SENSITIVITY_SAMPLES = 32  # inputs for the per-layer sensitivity passes (one forward per layer)
MAX_GUARD_ROUNDS = 5  # keeps the top 1, 2, 4, 8, 16 most sensitive layers in fp32
CPU = torch.device("cpu")


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
    if spec.mode == "dynamic":
        quantizer: _Quantizer = _Dynamic(reference, spec)
    elif spec.mode == "static":
        quantizer = _Static(reference, spec, ctx)
    elif spec.mode == "weight_only":
        quantizer = _WeightOnly(reference, spec)
    else:
        raise StepError(f"unknown quantization mode {spec.mode!r}")

    guarded = _guard(quantizer, reference, inputs, spec, ctx)
    quantized = guarded.model
    states = {name: _is_quantized(_submodule(quantized, name)) for name in quantizer.layers}
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
    ctx.progress(1.0, f"{spec.mode} quantization done")
    return StepOutcome(model=quantized, details=details)


# ---------------------------------------------------------------------------------------------
# The three int8 modes share one interface: the layers they may quantize, and a builder that
# quantizes all of them except a given set kept in fp32.


class _Quantizer:
    layers: list[str]  # every layer of the kinds this mode handles, for the report
    candidates: list[str]  # those it may quantize (outside skip_layers)

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        raise NotImplementedError

    # Which tensors the int8 version rounds besides weights: layer inputs (dynamic, static) and
    # layer outputs (static only: dynamic and weight-only layers return float).
    quantizes_inputs = True
    quantizes_outputs = False

    def details(self) -> dict[str, Any]:
        return {}


class _Dynamic(_Quantizer):
    """Weights int8 ahead of time, activations quantized per batch at run time (Linear / RNNs)."""

    def __init__(self, model: nn.Module, spec: QuantizeStep):
        self.model = model
        self.spec = spec
        self.layers = _candidates(model, nn.Linear, *RNN_LAYERS, skip=[])
        self.candidates = _candidates(model, nn.Linear, *RNN_LAYERS, skip=spec.skip_layers)
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


class _Static(_Quantizer):
    """Post-training static int8 in FX graph mode: prepare (fuse + observers), calibrate, convert.

    Calibration happens once; each guard round only re-runs convert on a copy of the calibrated
    model with more layers' qconfig set to None.
    """

    quantizes_outputs = True

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        self.spec = spec
        self.layers = _candidates(model, *CONV_LAYERS, nn.Linear, skip=[])
        self.candidates = _candidates(model, *CONV_LAYERS, nn.Linear, skip=spec.skip_layers)
        if not self.candidates:
            raise StepError("static quantization found no conv / linear layers to quantize (outside skip_layers)" + EXPORTED_HINT)
        calibration, self.calibration_source = _calibration_data(ctx)
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
            for start in range(0, min(len(calibration), spec.calibration_batches * CALIBRATION_BATCH_SIZE), CALIBRATION_BATCH_SIZE):
                ctx.check_canceled()
                batch = calibration.inputs[start : start + CALIBRATION_BATCH_SIZE]
                self.prepared(batch)
                self.calibration_samples += int(batch.shape[0])
                ctx.progress(min(1.0, self.calibration_samples / (spec.calibration_batches * CALIBRATION_BATCH_SIZE)) * 0.5, "calibrating")

    def _mapping(self, keep_fp32: frozenset[str]) -> QConfigMapping:
        mapping = get_default_qconfig_mapping(self.spec.backend).set_global(self.qconfig)
        for name in [*self.spec.skip_layers, *sorted(keep_fp32)]:
            mapping.set_module_name(name, None)
        return mapping

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        return convert_fx(copy.deepcopy(self.prepared), qconfig_mapping=self._mapping(keep_fp32))

    def details(self) -> dict[str, Any]:
        return {"calibration_samples": self.calibration_samples, "calibration_data": self.calibration_source}


class _WeightOnly(_Quantizer):
    """Linear weights stored as int8 + per-output-channel scales, dequantized in forward."""

    def __init__(self, model: nn.Module, spec: QuantizeStep):
        self.model = model
        self.spec = spec
        self.layers = _candidates(model, nn.Linear, skip=[])
        self.candidates = _candidates(model, nn.Linear, skip=spec.skip_layers)
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
            q, scale = _symmetric_int8(weight, per_channel)
            bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1)
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


# ---------------------------------------------------------------------------------------------
# Fidelity guard


@dataclass
class _Guarded:
    model: nn.Module
    kept: list[str]
    fidelity: dict[str, Any]
    rounds: list[dict[str, Any]]


def _guard(quantizer: _Quantizer, reference: nn.Module, inputs: torch.Tensor, spec: QuantizeStep, ctx: StepContext) -> _Guarded:
    reference_out = predict(reference, inputs, CPU)
    model = quantizer.build(frozenset())
    fidelity = _fidelity(model, inputs, reference_out)
    rounds = [{"kept_fp32": [], **fidelity}]
    if spec.min_fidelity is None or fidelity["cosine"] >= spec.min_fidelity:
        return _Guarded(model, [], fidelity, rounds)

    sensitivity = layer_sensitivity(
        reference,
        quantizer.candidates,
        inputs[:SENSITIVITY_SAMPLES],
        quantize_inputs=quantizer.quantizes_inputs,
        quantize_outputs=quantizer.quantizes_outputs,
        per_channel=spec.per_channel,
        activation_levels=_activation_levels(spec.backend),
    )
    ranking = sorted(quantizer.candidates, key=lambda name: sensitivity.get(name, 0.0), reverse=True)
    for round_index in range(MAX_GUARD_ROUNDS):
        ctx.check_canceled()
        ctx.progress(0.5 + 0.5 * round_index / MAX_GUARD_ROUNDS, "keeping sensitive layers in fp32")
        keep = ranking[: 2**round_index]
        model = quantizer.build(frozenset(keep))
        fidelity = _fidelity(model, inputs, reference_out)
        rounds.append({"kept_fp32": keep, **fidelity})
        if fidelity["cosine"] >= spec.min_fidelity:
            return _Guarded(model, keep, fidelity, rounds)
        if len(keep) == len(ranking):
            break
    raise StepError(
        f"quantization could not reach min_fidelity {spec.min_fidelity}: best output cosine similarity was "
        f"{max(r['cosine'] for r in rounds):.5f} even with up to {len(rounds[-1]['kept_fp32'])} layers kept in fp32",
        {"min_fidelity": spec.min_fidelity, "rounds": rounds, "sensitivity": sensitivity},
    )


def _fidelity(model: nn.Module, inputs: torch.Tensor, reference_out: torch.Tensor) -> dict[str, Any]:
    try:
        out = predict(model, inputs, CPU)
    except StepError as exc:
        raise StepError(f"the quantized model fails to run: {exc.message}", exc.details) from exc
    cosine = nn.functional.cosine_similarity(out.flatten(1), reference_out.flatten(1), dim=1).mean()
    top1 = (out.argmax(1) == reference_out.argmax(1)).float().mean() if out.dim() == 2 else None
    return {
        "cosine": float(cosine),
        "top1_agreement": float(top1) if top1 is not None else None,
        "samples": int(inputs.shape[0]),
    }


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    names: list[str],
    inputs: torch.Tensor,
    *,
    quantize_inputs: bool,
    quantize_outputs: bool = False,
    per_channel: bool,
    activation_levels: int = 256,
) -> dict[str, float]:
    """Noise-to-signal ratio of the model's output when only one layer at a time is int8.

    One fp32 forward pass per layer: a hook swaps that layer's output for one computed from
    fake-quantized input and weights (and a rounded output where the mode rounds outputs), so the
    score includes how much the rest of the network amplifies that layer's error. RNN layers are
    ranked by their weight error alone.
    """
    eval_mode(model)
    reference = model(inputs)
    power = (reference.float() ** 2).sum().clamp_min(1e-12)
    scores: dict[str, float] = {}

    def simulate(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if quantize_inputs:
            x = _fake_quant_activation(x, activation_levels)
        weight = _dequantize(*_symmetric_int8(module.weight.float(), per_channel)).to(module.weight.dtype)
        if isinstance(module, nn.Linear):
            simulated = nn.functional.linear(x, weight, module.bias)
        else:
            simulated = module._conv_forward(x, weight, module.bias)
        if quantize_outputs:
            simulated = _fake_quant_activation(simulated, activation_levels)
        return simulated

    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (nn.Linear, *CONV_LAYERS)):
            handle = module.register_forward_hook(simulate)
            try:
                out = model(inputs)
            finally:
                handle.remove()
            scores[name] = float(((out.float() - reference.float()) ** 2).sum() / power)
        else:
            weights = [p for p_name, p in module.named_parameters() if "weight" in p_name]
            errors = []
            for weight in weights:
                restored = _dequantize(*_symmetric_int8(weight.float(), per_channel=False))
                errors.append(float(((restored - weight) ** 2).sum() / (weight**2).sum().clamp_min(1e-12)))
            scores[name] = max(errors, default=0.0)
    return scores


def _symmetric_int8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights in [-127, 127] and their scale (one per output channel, or one in all)."""
    if per_channel:
        max_abs = weight.abs().flatten(1).amax(dim=1)
    else:
        max_abs = weight.abs().amax().reshape(1)
    scale = (max_abs / 127.0).clamp_min(1e-12)
    shaped = scale.view(-1, *([1] * (weight.dim() - 1))) if per_channel else scale
    q = torch.clamp(torch.round(weight / shaped), -127, 127).to(torch.int8)
    if not per_channel:
        scale = scale.expand(weight.shape[0]).clone()  # one scale per row keeps the dequant code uniform
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.view(-1, *([1] * (q.dim() - 1)))


def _fake_quant_activation(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Affine per-tensor quantize/dequantize over the batch's range (what observers would pick)."""
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((high - low) / (levels - 1), min=1e-12)
    zero_point = torch.round(-low / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels - 1)
    return (q - zero_point) * scale


def _activation_levels(backend: str) -> int:
    # x86 / fbgemm observers use reduce_range (7-bit activations) to avoid int16 overflow in VPMADDUBSW.
    return 128 if backend in ("x86", "fbgemm") else 256


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


EXPORTED_HINT = (
    "; a model loaded from a torch.export program keeps its layers as graph operations, not modules, "
    "so use a state_dict / safetensors upload for int8, or mode='fp16' / 'bf16'"
)


def _candidates(model: nn.Module, *types: type, skip: list[str]) -> list[str]:
    """Names of modules of ``types`` that are not skip_layers nor inside one.

    MultiheadAttention's out_proj is left alone: the attention forward reads its `.weight` as a
    tensor, which a swapped-in quantized Linear no longer has (torch marks it NonDynamicallyQuantizable).
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, types)
        and not isinstance(module, NonDynamicallyQuantizableLinear)
        and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def _static_qconfig(spec: QuantizeStep) -> QConfig:
    qconfig = get_default_qconfig(spec.backend)
    if spec.per_channel:
        return qconfig
    return QConfig(activation=qconfig.activation, weight=default_weight_observer)


def _calibration_data(ctx: StepContext) -> tuple[TensorData, str]:
    if ctx.train is not None and len(ctx.train) > 0:
        return ctx.train, "train"
    if ctx.eval is not None and len(ctx.eval) > 0:
        return ctx.eval, "eval"
    raise StepError("static quantization needs calibration data; the job has no dataset (use mode='dynamic')")


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
