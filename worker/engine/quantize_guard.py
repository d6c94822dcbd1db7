"""The fidelity guard every int8 mode goes through, and the per-layer sensitivity it ranks by.

Quantize, compare outputs with the fp32 model, and when ``min_fidelity`` is not met keep the most
sensitive layers in fp32 and try again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from jobspec.steps import QuantizeStep

from .training import eval_mode, predict
from .types import StepContext, StepError, TensorData

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CALIBRATION_BATCH_SIZE = 32
SENSITIVITY_SAMPLES = 32  # inputs for the per-layer sensitivity passes (one forward per layer)
MAX_GUARD_ROUNDS = 5  # keeps the top 1, 2, 4, 8, 16 most sensitive layers in fp32
CPU = torch.device("cpu")


# Every int8 mode and runtime shares one interface: the layers it may quantize, and a builder that
# quantizes all of them except a given set kept in fp32.


class Quantizer:
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

    def layer_states(self, model: nn.Module, kept: list[str]) -> dict[str, bool]:
        """Layer name -> whether the built model runs it in int8."""
        return {name: name in self.candidates and name not in kept for name in self.layers}

    def fidelity_view(self, model: nn.Module) -> nn.Module:
        """What the guard compares with fp32: the model itself, or a cheaper equivalent of it."""
        return model



@dataclass
class SensitivityCache:
    """Per-layer sensitivity, computed once per step and shared by the runtimes it builds."""

    scores: dict[tuple, dict[str, float]] = field(default_factory=dict)


@dataclass
class Guarded:
    model: nn.Module
    kept: list[str]
    fidelity: dict[str, Any]
    rounds: list[dict[str, Any]]


def guard(
    quantizer: Quantizer,
    reference: nn.Module,
    inputs: torch.Tensor,
    spec: QuantizeStep,
    ctx: StepContext,
    cache: SensitivityCache | None = None,
) -> Guarded:
    """Build ``quantizer``'s model, keeping the most sensitive layers in fp32 until min_fidelity holds."""
    reference_out = predict(reference, inputs, CPU)
    model = quantizer.build(frozenset())
    fidelity = output_fidelity(quantizer.fidelity_view(model), inputs, reference_out)
    rounds = [{"kept_fp32": [], **fidelity}]
    if spec.min_fidelity is None or fidelity["cosine"] >= spec.min_fidelity:
        return Guarded(model, [], fidelity, rounds)

    key = (tuple(quantizer.candidates), quantizer.quantizes_inputs, quantizer.quantizes_outputs)
    cache = cache if cache is not None else SensitivityCache()
    if key not in cache.scores:
        cache.scores[key] = layer_sensitivity(
            reference,
            quantizer.candidates,
            inputs[:SENSITIVITY_SAMPLES],
            quantize_inputs=quantizer.quantizes_inputs,
            quantize_outputs=quantizer.quantizes_outputs,
            per_channel=spec.per_channel,
            activation_levels=activation_levels(spec.backend),
        )
    sensitivity = cache.scores[key]
    ranking = sorted(quantizer.candidates, key=lambda name: sensitivity.get(name, 0.0), reverse=True)
    for round_index in range(MAX_GUARD_ROUNDS):
        ctx.check_canceled()
        ctx.progress(0.5 + 0.5 * round_index / MAX_GUARD_ROUNDS, "keeping sensitive layers in fp32")
        keep = ranking[: 2**round_index]
        model = quantizer.build(frozenset(keep))
        fidelity = output_fidelity(quantizer.fidelity_view(model), inputs, reference_out)
        rounds.append({"kept_fp32": keep, **fidelity})
        if fidelity["cosine"] >= spec.min_fidelity:
            return Guarded(model, keep, fidelity, rounds)
        if len(keep) == len(ranking):
            break
    raise StepError(
        f"quantization could not reach min_fidelity {spec.min_fidelity}: best output cosine similarity was "
        f"{max(r['cosine'] for r in rounds):.5f} even with up to {len(rounds[-1]['kept_fp32'])} layers kept in fp32",
        {"min_fidelity": spec.min_fidelity, "rounds": rounds, "sensitivity": sensitivity},
    )


def output_fidelity(model: nn.Module, inputs: torch.Tensor, reference_out: torch.Tensor) -> dict[str, Any]:
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
        weight = _dequantize(*symmetric_int8(module.weight.float(), per_channel)).to(module.weight.dtype)
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
                restored = _dequantize(*symmetric_int8(weight.float(), per_channel=False))
                errors.append(float(((restored - weight) ** 2).sum() / (weight**2).sum().clamp_min(1e-12)))
            scores[name] = max(errors, default=0.0)
    return scores


def symmetric_int8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


def activation_levels(backend: str) -> int:
    # x86 / fbgemm observers use reduce_range (7-bit activations) to avoid int16 overflow in VPMADDUBSW.
    return 128 if backend in ("x86", "fbgemm") else 256


# ---------------------------------------------------------------------------------------------
# Helpers shared by the int8 modes and runtimes


EXPORTED_HINT = (
    "; a model loaded from a torch.export program keeps its layers as graph operations, not modules: "
    "PyTorch's int8 modes need a state_dict / safetensors upload (runtime 'onnxruntime' works on programs)"
)


def graph_layers(model: nn.Module, kinds: tuple[str, ...], skip: list[str]) -> list[str]:
    """Conv / linear layer names for graph runtimes (ONNX Runtime). A torch.export program has no
    layer modules: its layers are found by their weights, as metrics.weight_layers does."""
    from .metrics import weight_layers
    from .modelio import is_exported

    if not is_exported(model):
        types = tuple(t for kind, group in (("conv", CONV_LAYERS), ("linear", (nn.Linear,))) if kind in kinds for t in group)
        return candidates(model, *types, skip=skip)
    return [name for name in weight_layers(model, kinds) if not any(name == s or name.startswith(s + ".") for s in skip)]


def candidates(model: nn.Module, *types: type, skip: list[str]) -> list[str]:
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


def calibration_data(ctx: StepContext) -> tuple[TensorData, str]:
    if ctx.train is not None and len(ctx.train) > 0:
        return ctx.train, "train"
    if ctx.eval is not None and len(ctx.eval) > 0:
        return ctx.eval, "eval"
    raise StepError("static quantization needs calibration data; the job has no dataset (use mode='dynamic')")


def calibration_batches(ctx: StepContext, spec: QuantizeStep) -> tuple[list[torch.Tensor], str]:
    """The calibration inputs in batches of CALIBRATION_BATCH_SIZE, and which split they came from."""
    data, source = calibration_data(ctx)
    count = min(len(data), spec.calibration_batches * CALIBRATION_BATCH_SIZE)
    return [data.inputs[start : start + CALIBRATION_BATCH_SIZE] for start in range(0, count, CALIBRATION_BATCH_SIZE)], source


class StaticRuntimeQuantizer(Quantizer):
    """Set-up shared by the static int8 runtimes: their conv / linear layers and calibration batches."""

    quantizes_outputs = True

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        self.spec = spec
        self.ctx = ctx
        self.layers = graph_layers(model, ("conv", "linear"), skip=[])
        self.candidates = graph_layers(model, ("conv", "linear"), skip=spec.skip_layers)
        if not self.candidates:
            raise StepError("static quantization found no conv / linear layers to quantize (outside skip_layers)")
        self.batches, self.calibration_source = calibration_batches(ctx, spec)

    def details(self) -> dict[str, Any]:
        return {
            "calibration_samples": sum(int(batch.shape[0]) for batch in self.batches),
            "calibration_data": self.calibration_source,
        }
