"""Pruning: unstructured (zero individual weights) here; structured (remove channels) in prune_structured."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jobspec.steps import PruneStep
from worker.engine.device import is_quantized
from worker.engine.metrics import weight_layers
from worker.engine.types import StepContext, StepError, StepOutcome


def prune(model: nn.Module, spec: PruneStep, ctx: StepContext) -> StepOutcome:
    """Apply one PruneStep; returns the pruned model (edited in place) and per-layer facts."""
    if is_quantized(model):
        raise StepError("pruning cannot edit a quantized model: put prune steps before quantize", {"step": "prune"})
    if spec.method == "structured":
        from worker.engine.prune_structured import prune_structured

        return prune_structured(model, spec, ctx)
    return _prune_unstructured(model, spec, ctx)


def classifier_name(layers: dict[str, Any]) -> str | None:
    """The last Linear layer (or the last layer when there is none, e.g. SqueezeNet's final conv)."""
    names = list(layers)
    linear = [name for name in names if layers[name][0] == "linear"]
    return linear[-1] if linear else (names[-1] if names else None)


def check_layer_names(requested: list[str], valid: list[str], field: str) -> None:
    """StepError naming unknown layers and showing some valid ones (closest first)."""
    unknown = [name for name in requested if name not in valid]
    if unknown:
        hint = [v for v in valid if any(v.startswith(u.split(".")[0]) for u in unknown)] or valid
        raise StepError(
            f"unknown layer name(s) in {field}: {', '.join(unknown[:10])}",
            {"field": field, "unknown": unknown, "valid_examples": hint[:15], "valid_count": len(valid)},
        )


def _scores(weight: torch.Tensor, criterion: str, generator: torch.Generator) -> torch.Tensor:
    # Element-wise, |w| and w**2 give the same ranking; both names are accepted for symmetry with
    # structured pruning where the norm matters.
    if criterion == "random":
        return torch.rand(weight.shape, generator=generator).flatten()
    return weight.detach().abs().flatten().float().cpu()


def _zero_lowest(weights: list[torch.Tensor], scores: list[torch.Tensor], count: int) -> None:
    """Zero exactly ``count`` entries with the lowest scores across the given weights."""
    if count <= 0:
        return
    flat = torch.cat(scores)
    chosen = torch.topk(flat, count, largest=False).indices
    offset = 0
    with torch.no_grad():
        for weight, score in zip(weights, scores):
            size = score.numel()
            local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
            if local.numel():
                weight.view(-1)[local.to(weight.device)] = 0
            offset += size


def _prune_unstructured(model: nn.Module, spec: PruneStep, ctx: StepContext) -> StepOutcome:
    every_layer = weight_layers(model)
    if not every_layer:
        raise StepError("the model has no conv or linear layers to prune", {"step": "prune"})
    valid = list(every_layer)
    check_layer_names(list(spec.layer_amounts), valid, "layer_amounts")
    if spec.ignore_layers is not None:
        check_layer_names(spec.ignore_layers, valid, "ignore_layers")
        ignored = set(spec.ignore_layers)
    else:
        ignored = {classifier_name(every_layer)}
    clash = sorted(ignored & set(spec.layer_amounts))
    if clash:
        raise StepError("layers appear in both ignore_layers and layer_amounts", {"layers": clash})

    chosen_types = set(spec.layer_types)
    # Explicit per-layer amounts win over layer_types; other layers follow layer_types.
    explicit = {name: spec.layer_amounts[name] for name in valid if name in spec.layer_amounts}
    shared = [name for name in valid if name not in ignored and name not in explicit and every_layer[name][0] in chosen_types]
    if not explicit and not shared:
        raise StepError("no layer is left to prune after ignore_layers / layer_types", {"ignored": sorted(ignored)})

    generator = torch.Generator().manual_seed(ctx.seed)
    for index, (name, amount) in enumerate(explicit.items()):
        weight = every_layer[name][1]
        _zero_lowest([weight], [_scores(weight, spec.criterion, generator)], round(amount * weight.numel()))
        ctx.check_canceled()
    if spec.scope == "global" and shared:
        weights = [every_layer[name][1] for name in shared]
        total = sum(int(w.numel()) for w in weights)
        _zero_lowest(weights, [_scores(w, spec.criterion, generator) for w in weights], round(spec.effective_amount * total))
    else:
        for index, name in enumerate(shared):
            weight = every_layer[name][1]
            _zero_lowest([weight], [_scores(weight, spec.criterion, generator)], round(spec.effective_amount * weight.numel()))
            ctx.progress((index + 1) / len(shared), f"pruned {name}")
            ctx.check_canceled()

    pruned = list(explicit) + shared
    layer_sparsity = {
        name: round(1.0 - int(torch.count_nonzero(every_layer[name][1])) / every_layer[name][1].numel(), 6) for name in pruned
    }
    zeros = sum(int(every_layer[n][1].numel() - torch.count_nonzero(every_layer[n][1])) for n in pruned)
    size = sum(int(every_layer[n][1].numel()) for n in pruned)
    return StepOutcome(
        model,
        {
            "method": "unstructured",
            "criterion": spec.criterion,
            "scope": spec.scope,
            "pruned_layers": len(pruned),
            "ignored_layers": sorted(n for n in ignored if n),
            "pruned_weights_sparsity": round(zeros / size, 6) if size else 0.0,
            "layer_sparsity": layer_sparsity,
            "note": "zeros are written into the weights (no masks kept); dense kernels do not run faster, "
            "the gain is in compressed size unless a sparse runtime is used",
        },
    )
