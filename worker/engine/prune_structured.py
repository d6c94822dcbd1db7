"""Structured pruning with torch-pruning: remove whole channels / neurons so the model gets smaller.

torch-pruning traces the model to find coupled layers (a conv's output channels, the next BN, the
next conv's inputs, residual adds, concats) and removes channels from all of them together.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jobspec.steps import PruneStep
from worker.engine.metrics import count_macs
from worker.engine.modelio import call_model, is_exported, set_eval
from worker.engine.prune import check_layer_names, classifier_name
from worker.engine.prune_heads import HeadPrunedAttention, attention_layers, prune_heads
from worker.engine.types import StepContext, StepError, StepOutcome

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# target_macs_reduction: prune in this many small rounds at most, checking MACs after each.
_MAC_SEARCH_ROUNDS = 20
_MAC_SEARCH_MAX_RATIO = 0.95
_CALIBRATION_BATCH = 32


def _importance(criterion: str) -> Any:
    import torch_pruning as tp

    factories = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "random": tp.importance.RandomImportance,
        "taylor": tp.importance.TaylorImportance,
        "bn_scale": tp.importance.BNScaleImportance,
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "activation": tp.importance.ActivationImportance,
    }
    return factories[criterion]()


def _is_transformer(model: nn.Module) -> bool:
    return bool(attention_layers(model)) or any("Attention" in type(m).__name__ for m in model.modules())


def _mlp_hidden_layers(model: nn.Module) -> set[str]:
    """The expanding Linear of each MLP block (d -> h with h > d, and some Linear maps h back to d):
    its outputs are the hidden neurons, removable without touching the embedding size.

    Matching shapes rather than container layout finds torchvision's `mlp.0` and Hugging Face's
    `intermediate.dense` alike. Linears inside attention modules are left out: after head pruning
    their shapes (d -> kept heads x head_dim -> d) would look like an MLP too.
    """
    attention = tuple(
        f"{name}." for name, m in model.named_modules()
        if name and (isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__)
    )
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.startswith(attention)}
    back = {(m.in_features, m.out_features) for m in linears.values()}
    return {
        name
        for name, m in linears.items()
        if m.out_features > m.in_features and (m.out_features, m.in_features) in back
    }


def _prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (*_CONV, nn.Linear))}


def _calibration(ctx: StepContext, batches: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    data = ctx.train or ctx.eval
    if data is None:
        return ctx.example_input, None
    count = min(len(data), batches * _CALIBRATION_BATCH)
    generator = torch.Generator().manual_seed(ctx.seed)
    index = torch.randperm(len(data), generator=generator)[:count]
    labels = data.labels[index] if data.labels is not None else None
    return data.inputs[index], labels


def _collect_gradients(model: nn.Module, ctx: StepContext, inputs: torch.Tensor, labels: torch.Tensor | None) -> None:
    """Taylor importance reads weight * grad: accumulate gradients of the task loss on calibration data."""
    model.zero_grad(set_to_none=True)
    device = ctx.device
    original = ctx.original
    for start in range(0, inputs.shape[0], _CALIBRATION_BATCH):
        batch = inputs[start:start + _CALIBRATION_BATCH].to(device)
        logits = call_model(model, batch)  # eval mode: BN statistics must not move
        if labels is not None:
            loss = F.cross_entropy(logits, labels[start:start + _CALIBRATION_BATCH].to(device))
        else:  # no labels: match the original model's outputs
            with torch.no_grad():
                target = call_model(original, batch)
            loss = F.mse_loss(logits, target)
        loss.backward()
        ctx.check_canceled()


def _channels(model: nn.Module) -> dict[str, int]:
    return {
        name: int(m.out_channels if isinstance(m, _CONV) else m.out_features)
        for name, m in _prunable_layers(model).items()
    }


def _prune_channels(
    model: nn.Module,
    spec: PruneStep,
    ctx: StepContext,
    example: torch.Tensor,
    ignored_modules: list[nn.Module],
    ratio_dict: dict[nn.Module, float],
    base_macs: int | None,
    calibration_data: tuple[torch.Tensor | None, torch.Tensor | None],
) -> int:
    """torch-pruning's pass over channels / neurons; returns the rounds it took."""
    import torch_pruning as tp

    calibration, labels = calibration_data
    target = spec.target_macs_reduction
    importance = _importance(spec.criterion)
    steps = _MAC_SEARCH_ROUNDS if target else spec.iterative_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning warns about unwrapped parameters it handles
        try:
            pruner = tp.pruner.BasePruner(
                model,
                example,
                importance=importance,
                global_pruning=spec.scope == "global",
                pruning_ratio=_MAC_SEARCH_MAX_RATIO if target else (spec.effective_amount or 0.0),
                pruning_ratio_dict=ratio_dict or None,
                iterative_steps=steps,
                ignored_layers=ignored_modules,
            )
        except Exception as exc:  # torch-pruning's tracer fails on some control flow
            shuffle = any("shuffle" in type(m).__name__.lower() for m in model.modules())
            hint = " (channel split / shuffle is not supported by torch-pruning)" if shuffle or "ShuffleNet" in type(model).__name__ else ""
            raise StepError(
                f"structured pruning cannot trace this model{hint}: {type(exc).__name__}: {str(exc)[:200]}; "
                "use method 'unstructured' instead",
                {"criterion": spec.criterion},
            ) from exc
        rounds = 0
        for rounds in range(1, steps + 1):
            if spec.criterion == "taylor":
                _collect_gradients(model, ctx, calibration, labels)
            if spec.criterion == "activation":
                with importance.compute_importance(model), torch.no_grad():
                    call_model(model, calibration.to(ctx.device))
            pruner.step()
            model.zero_grad(set_to_none=True)
            ctx.progress(rounds / steps, f"pruning round {rounds}")
            ctx.check_canceled()
            if target:
                macs, _ = count_macs(model, example)
                if macs is None or base_macs is None or base_macs / max(macs, 1) >= target:
                    break
    return rounds


def prune_structured(model: nn.Module, spec: PruneStep, ctx: StepContext) -> StepOutcome:
    """Remove channels (convs) / neurons (linears) by the chosen importance criterion."""
    if is_exported(model):
        raise StepError(
            "structured pruning needs the model's nn.Conv / nn.Linear layers, which an exported (.pt2) "
            "program no longer has; upload safetensors or a state_dict with its architecture name, or use "
            "method 'unstructured'",
            {"step": "prune", "method": "structured"},
        )
    if spec.needs_data and ctx.train is None and ctx.eval is None:
        raise StepError(f"criterion {spec.criterion!r} needs a dataset", {"criterion": spec.criterion})
    set_eval(model)
    layers = _prunable_layers(model)
    valid = list(layers)
    check_layer_names(list(spec.layer_amounts), valid, "layer_amounts")
    kinds = {name: ("linear" if isinstance(m, nn.Linear) else "conv", None) for name, m in layers.items()}
    # The classifier's outputs are the classes: removing any would change what the model predicts,
    # so it stays ignored even when the spec lists other layers to ignore.
    output_layer = classifier_name(kinds)
    ignored = {output_layer}
    if spec.ignore_layers is not None:
        check_layer_names(spec.ignore_layers, valid, "ignore_layers")
        clash = sorted(set(spec.ignore_layers) & set(spec.layer_amounts))
        if clash:
            raise StepError("layers appear in both ignore_layers and layer_amounts", {"layers": clash})
        ignored |= set(spec.ignore_layers)
    selected = tuple(t for kind, types in (("conv", _CONV), ("linear", (nn.Linear,))) if kind in spec.layer_types for t in types)
    ignored |= {name for name, m in layers.items() if not isinstance(m, selected)}
    notes: list[str] = []
    if spec.head_amount is not None and not attention_layers(model):
        raise StepError(
            "head_amount applies to attention models (nn.MultiheadAttention or BERT-style self-attention); "
            "this model has no attention layers: use amount / layer_amounts to remove channels instead",
            {"head_amount": spec.head_amount},
        )
    if _is_transformer(model):
        # The embedding size ties every block together through the residual stream; MLP hidden
        # neurons and (with head_amount) whole heads are what can go without touching it.
        hidden = _mlp_hidden_layers(model)
        if not hidden and spec.head_amount is None:
            raise StepError("structured pruning of this attention model is not supported (no MLP blocks found)")
        outside = sorted(set(spec.layer_amounts) - hidden)
        if outside:
            raise StepError(
                "in attention models only MLP hidden layers can be pruned structurally",
                {"layers": outside, "prunable_examples": sorted(hidden)[:15]},
            )
        ignored |= set(valid) - hidden
        notes.append(
            "attention model: attention heads and MLP hidden neurons were pruned; the embedding size is kept"
            if spec.head_amount is not None
            else "attention model: only MLP hidden neurons were pruned; attention heads (see head_amount) and the "
            "embedding size are kept"
        )
    if output_layer in spec.layer_amounts:
        raise StepError(
            f"layer {output_layer!r} produces the class scores; structured pruning cannot remove its outputs",
            {"layer": output_layer},
        )
    ignored -= set(spec.layer_amounts)  # an explicit ratio wins over defaults

    example = ctx.example_input.to(ctx.device)
    base_macs, _ = count_macs(model, example)
    before_params = sum(p.numel() for p in model.parameters())
    before_channels = _channels(model)
    calibration, labels = (None, None)
    if spec.criterion in {"taylor", "activation"}:
        calibration, labels = _calibration(ctx, spec.calibration_batches)
    head_details = None
    if spec.head_amount is not None:
        # Heads go before MLP neurons: a target_macs_reduction search then counts what the heads
        # saved, and torch-pruning traces the attention modules the model keeps, not ones about
        # to be replaced.
        if spec.criterion == "taylor":
            _collect_gradients(model, ctx, calibration, labels)
        head_details = prune_heads(model, spec.head_amount, spec.criterion, seed=ctx.seed)
        model.zero_grad(set_to_none=True)
        set_eval(model)
        layers = _prunable_layers(model)  # pruned nn.MultiheadAttention were replaced
        notes += head_details.pop("notes", [])
        ctx.check_canceled()
    ignored_modules = [layers[name] for name in ignored if name in layers]
    # torch-pruning must not resize attention: heads are pruned above, by prune_heads.
    ignored_modules += [m for m in model.modules() if isinstance(m, (nn.MultiheadAttention, HeadPrunedAttention))]
    target = spec.target_macs_reduction
    ratio_dict = {layers[name]: ratio for name, ratio in spec.layer_amounts.items()}
    rounds = 0
    if spec.effective_amount is not None or ratio_dict or target:  # else: heads only
        rounds = _prune_channels(model, spec, ctx, example, ignored_modules, ratio_dict, base_macs, (calibration, labels))
    for module in model.modules():  # ActivationImportance leaves per-layer scores behind
        module.__dict__.pop("_importance", None)
    set_eval(model)
    try:
        with torch.no_grad():
            call_model(model, example)
    except Exception as exc:
        raise StepError(f"the pruned model no longer runs: {type(exc).__name__}: {str(exc)[:200]}") from exc
    after_macs, _ = count_macs(model, example)
    after_channels = _channels(model)
    details: dict[str, Any] = {
        "method": "structured",
        "criterion": spec.criterion,
        "scope": spec.scope,
        "rounds": rounds,
        "params_before": before_params,
        "params_after": sum(p.numel() for p in model.parameters()),
        "macs_before": base_macs,
        "macs_after": after_macs,
        "macs_reduction": round(base_macs / after_macs, 4) if base_macs and after_macs else None,
        "ignored_layers": sorted(n for n in ignored if n)[:50],
        "layer_channels": {
            name: {"before": before_channels[name], "after": after_channels.get(name)}
            for name in before_channels
            if after_channels.get(name) != before_channels[name]
        },
    }
    if head_details is not None:
        details["attention_heads"] = head_details
    if target and details["macs_reduction"] is not None and details["macs_reduction"] < target:
        notes.append(f"MACs shrank {details['macs_reduction']}x, short of the requested {target}x")
    if notes:
        details["notes"] = notes
    return StepOutcome(model, details)

