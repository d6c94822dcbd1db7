"""Static model metrics: size, parameters, sparsity, MACs, accuracy and fidelity to the original."""

from __future__ import annotations

import io
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.device import is_quantized, module_device
from worker.engine.modelio import call_model, is_exported, set_eval
from worker.engine.runtimes import int8_runtime
from worker.engine.types import TensorData

EVAL_BATCH_SIZE = 256
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


def weight_layers(model: nn.Module, kinds: tuple[str, ...] = ("conv", "linear")) -> dict[str, tuple[str, torch.Tensor]]:
    """Layer name -> (kind, weight) for conv / linear layers.

    Exported GraphModules lose module types, so there a layer is recognised by its weight's rank
    (2-D: linear, 3- to 5-D: conv).
    """
    layers: dict[str, tuple[str, torch.Tensor]] = {}
    if is_exported(model):
        for name, param in model.named_parameters():
            if not name.endswith(".weight"):
                continue
            kind = "linear" if param.ndim == 2 else "conv" if 3 <= param.ndim <= 5 else None
            if kind in kinds:
                layers[name[: -len(".weight")]] = (kind, param)
        return layers
    for name, module in model.named_modules():
        kind = "conv" if isinstance(module, _CONV_TYPES) else "linear" if isinstance(module, nn.Linear) else None
        weight = getattr(module, "weight", None)
        if kind is None and callable(weight) and type(module).__module__.startswith(_QUANTIZED_MODULES):
            # quantized Linear / Conv and their fused forms (ConvReLU2d, LinearReLU, ...): tell by rank
            packed = weight()
            kind = "linear" if isinstance(packed, torch.Tensor) and packed.ndim == 2 else "conv"
            weight = packed
        if kind not in kinds:
            continue
        if callable(weight):
            weight = weight()
        if isinstance(weight, torch.Tensor):
            layers[name] = (kind, weight.dequantize() if weight.is_quantized else weight)
    return layers


def sparsity(model: nn.Module) -> dict[str, Any]:
    """Parameter counts and the share of exact zeros, overall and per conv / linear layer."""
    if int8_runtime(model):
        return _tensor_sparsity(model.weight_tensors())
    params = list(model.parameters())
    tensors = [p.detach() for p in params]
    layers = weight_layers(model)
    if is_quantized(model):  # packed int8 weights are not Parameters; fp32 layers' weights already are
        known = {id(p) for p in params}
        tensors += [w.detach() for _, w in layers.values() if id(w) not in known]
        for module in model.modules():  # quantized layers keep their bias outside Parameters too
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if isinstance(bias, torch.Tensor) and id(bias) not in known:
                tensors.append(bias.detach())
    total = sum(int(t.numel()) for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors)
    per_layer = {
        name: round(1.0 - int(torch.count_nonzero(w)) / max(1, w.numel()), 6) for name, (_, w) in layers.items()
    }
    return {
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": round(1.0 - nonzero / total, 6) if total else 0.0,
        "layer_sparsity": per_layer,
    }


def _tensor_sparsity(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same counts for a graph's weight tensors (int8 runtimes keep no nn.Parameters)."""
    total = sum(int(t.numel()) for t in tensors.values())
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors.values())
    return {
        "params": total,
        "nonzero_params": nonzero,
        "sparsity": round(1.0 - nonzero / total, 6) if total else 0.0,
        "layer_sparsity": {
            name: round(1.0 - int(torch.count_nonzero(t)) / t.numel(), 6) for name, t in tensors.items() if t.ndim >= 2
        },
    }


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int | None, str | None]:
    """MACs of one forward at the example input's batch size, or (None, why not)."""
    runtime = int8_runtime(model)
    if runtime:
        return None, f"MACs are not counted inside {runtime} int8 graphs; the fp32 model's count applies"
    if is_quantized(model):
        return None, "MAC counting does not understand quantized modules"
    if is_exported(model):
        return _aten_macs(model, example_input)
    import torch_pruning as tp

    try:
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(model, example_input.to(module_device(model, example_input.device)))
    except Exception as exc:  # third-party tracing: any failure just means "not measured"
        return None, f"MAC counting failed: {type(exc).__name__}: {str(exc)[:200]}"
    return int(macs), None


def _aten_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int | None, str | None]:
    """MACs from the aten ops a forward runs (conv, matmul, attention): works for exported programs,
    whose layers are no longer nn.Conv / nn.Linear modules."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_input.to(module_device(model, example_input.device)))
    except Exception as exc:  # any failure just means "not measured"
        return None, f"MAC counting failed: {type(exc).__name__}: {str(exc)[:200]}"
    macs = int(counter.get_total_flops() // 2)
    return (macs, None) if macs > 0 else (None, "no conv / matmul operations were counted")


def serialized_bytes(model: nn.Module) -> tuple[bytes, str]:
    """The weights as they would be stored: safetensors, or a torch state_dict for packed int8 models."""
    state = model.state_dict()
    if all(isinstance(v, torch.Tensor) and not v.is_quantized for v in state.values()):
        from safetensors.torch import save

        # clone() breaks storage sharing, which safetensors refuses.
        return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}), "safetensors"
    buffer = io.BytesIO()
    torch.save(state, buffer)  # a state_dict of tensors / packed params, never a module
    return buffer.getvalue(), "state_dict"


def size_metrics(model: nn.Module) -> dict[str, Any]:
    """Stored size, plus a zlib-compressed size that shows what unstructured zeros save on disk."""
    data, fmt = serialized_bytes(model)
    return {
        "size_bytes": len(data),
        "size_format": fmt,
        "compressed_size_bytes": len(zlib.compress(data, 1)),
        "sparse_size_bytes_estimate": None if is_quantized(model) else sparse_size_estimate(model, len(data)),
    }


def sparse_size_estimate(model: nn.Module, dense_bytes: int) -> int:
    """Stored size if each conv / linear weight used CSR (values + int32 column indices + row
    pointers) wherever that is smaller than dense: what a sparse runtime would need to hold."""
    saved = 0
    for _, weight in weight_layers(model).values():
        rows = weight.shape[0]
        nonzero = int(torch.count_nonzero(weight))
        dense = weight.numel() * weight.element_size()
        csr = nonzero * (weight.element_size() + 4) + (rows + 1) * 4
        saved += max(0, dense - csr)
    return dense_bytes - saved


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Logits for all inputs (float32, CPU), in batches on the model's own device."""
    set_eval(model)
    device = module_device(model, torch.device("cpu"))
    outputs = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start:start + batch_size].to(device)
        outputs.append(call_model(model, batch).float().cpu())
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    if labels.numel() == 0:
        return {"top1": None, "accuracy_note": "no evaluation samples"}
    if logits.ndim != 2 or int(labels.max()) >= logits.shape[1]:
        return {
            "top1": None,
            "accuracy_note": f"labels go up to {int(labels.max())} but the model has {logits.shape[-1]} outputs",
        }
    result: dict[str, Any] = {"top1": round(float((logits.argmax(1) == labels).float().mean()), 6)}
    if logits.shape[1] >= 5:
        top5 = logits.topk(5, dim=1).indices
        result["top5"] = round(float((top5 == labels[:, None]).any(1).float().mean()), 6)
    return result


def fidelity(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """How closely the compressed model reproduces the original's outputs on the eval inputs."""
    if logits.shape != reference.shape:
        return {"fidelity_note": f"output shapes differ: {list(logits.shape)} vs {list(reference.shape)}"}
    flat, ref = logits.flatten(1), reference.flatten(1)
    kl = F.kl_div(F.log_softmax(flat, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return {
        "top1_agreement": round(float((flat.argmax(1) == ref.argmax(1)).float().mean()), 6),
        "output_cosine": round(float(F.cosine_similarity(flat, ref, dim=1).mean()), 6),
        "output_kl": round(float(kl), 6),
    }


def measure(
    model: nn.Module,
    example_input: torch.Tensor,
    eval_data: TensorData | None = None,
    reference_logits: torch.Tensor | None = None,
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """All static metrics for one model; also returns its eval logits for later fidelity checks."""
    metrics: dict[str, Any] = sparsity(model)
    macs, why = count_macs(model, example_input)
    metrics["macs"] = macs
    if why:
        metrics["macs_note"] = why
    metrics.update(size_metrics(model))
    logits = None
    if eval_data is not None and len(eval_data) > 0:
        logits = predict(model, eval_data.inputs)
        metrics["eval_samples"] = len(eval_data)
        if eval_data.labels is not None:
            metrics.update(accuracy(logits, eval_data.labels))
        if reference_logits is not None:
            metrics.update(fidelity(logits, reference_logits))
    return metrics, logits
