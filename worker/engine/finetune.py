"""Fine-tuning: recover accuracy after compression, optionally with KD from the original model and
gradual (during-training) unstructured pruning."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from jobspec.steps import FinetuneStep

from .training import TrainConfig, accuracy, eval_mode, fit, kd_loss, precision_for
from .types import StepContext, StepError, StepOutcome

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def finetune(model: nn.Module, spec: FinetuneStep, ctx: StepContext) -> StepOutcome:
    """Train ``model`` on ``ctx.train``; pruned (exactly zero) weights stay zero."""
    train = ctx.train
    if train is None or len(train) == 0:
        raise StepError("fine-tuning needs a training dataset; none was given")
    if train.labels is None:
        raise StepError("fine-tuning needs labels; the dataset has none (use a distill step with loss='mse' instead)")

    device = ctx.device
    torch.manual_seed(ctx.seed)
    precision = precision_for(device)
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    accuracy_before = accuracy(model, ctx.eval, device)

    teacher = _teacher(ctx) if spec.distill_from_original else None
    masks = _SparsityMasks(model, target=spec.gradual_sparsity)

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        logits = model(inputs)
        if teacher is None:
            return nn.functional.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        if teacher_logits.shape != logits.shape:
            raise StepError(
                f"cannot distill from the original model: its outputs {list(teacher_logits.shape)} "
                f"differ from the current model's {list(logits.shape)}"
            )
        return kd_loss(logits, teacher_logits, labels, temperature=spec.temperature, alpha=spec.alpha)

    config = TrainConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        optimizer=spec.optimizer,
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        schedule=spec.schedule,
        max_batches_per_epoch=spec.max_batches_per_epoch,
    )
    try:
        losses = fit(
            [model],
            model.parameters(),  # read after masks are attached: weights are now `weight_orig`
            loss_fn,
            train,
            config,
            ctx,
            on_epoch_start=lambda epoch: masks.step(epoch, spec.epochs),
            progress_label="fine-tuning",
        )
    finally:
        # Make masks permanent even on cancel/failure so the module is never left reparametrized.
        sparsity = masks.make_permanent()

    model = model.to(memory_format=torch.contiguous_format).eval()
    details: dict[str, Any] = {
        "epochs": spec.epochs,
        "train_loss": losses,
        "device": str(device),
        "precision": precision.describe(),
        "eval_accuracy_before": accuracy_before,
        "eval_accuracy_after": accuracy(model, ctx.eval, device),
        "distilled_from_original": teacher is not None,
        **sparsity,
    }
    return StepOutcome(model=model, details=details)


def _teacher(ctx: StepContext) -> nn.Module:
    """The original model on the training device, in eval mode; copied rather than moved."""
    teacher = ctx.original
    first = next(teacher.parameters(), None)
    if first is not None and first.device != ctx.device:
        teacher = copy.deepcopy(teacher).to(ctx.device)
    return eval_mode(teacher)


class _SparsityMasks:
    """Pruning masks held with torch.nn.utils.prune: existing zeros, plus an optional cubic schedule.

    The prune reparametrization (weight = weight_orig * weight_mask, recomputed before each forward)
    keeps masked weights exactly zero while the optimizer updates `weight_orig`.
    """

    def __init__(self, model: nn.Module, target: float | None):
        if prune.is_pruned(model):
            # An earlier step left masks attached; fold them in so zeros are visible in `weight`.
            for module in model.modules():
                if isinstance(module, WEIGHT_LAYERS) and hasattr(module, "weight_orig"):
                    prune.remove(module, "weight")
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS) and m.weight is not None]
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        classifier = linears[-1] if linears else None
        self.target = target
        # The classifier is left out of the schedule: it is small and pruning it hurts most.
        self.scheduled = [m for n, m in layers if n != classifier] if target is not None else []
        if target is not None and not self.scheduled:
            raise StepError("gradual_sparsity found no conv/linear layers to prune besides the classifier")
        self.masked: list[nn.Module] = []
        self.kept_zeros = 0
        scheduled_ids = {id(m) for m in self.scheduled}
        for _, module in layers:
            with torch.no_grad():
                keep = (module.weight != 0).to(module.weight.dtype)
            zeros = int(keep.numel() - keep.sum())
            if zeros or id(module) in scheduled_ids:
                prune.custom_from_mask(module, "weight", keep)
                self.masked.append(module)
                self.kept_zeros += zeros

    def step(self, epoch: int, epochs: int) -> None:
        """Raise sparsity to this epoch's point on the cubic schedule s_f * (1 - (1 - t)^3)."""
        if self.target is None:
            return
        progress = (epoch + 1) / epochs
        self._prune_to(self.target * (1.0 - (1.0 - progress) ** 3))

    @torch.no_grad()
    def _prune_to(self, sparsity: float) -> None:
        # Global L1: one magnitude threshold across all scheduled layers, as in global_unstructured.
        magnitudes = torch.cat([(m.weight_orig * m.weight_mask).abs().flatten() for m in self.scheduled])
        count = int(round(sparsity * magnitudes.numel()))
        if count <= 0:
            return
        threshold = torch.kthvalue(magnitudes.float().cpu(), count).values.item()
        for module in self.scheduled:
            alive = (module.weight_orig * module.weight_mask).abs() > threshold
            module.weight_mask.mul_(alive.to(module.weight_mask.dtype))

    def make_permanent(self) -> dict[str, Any]:
        """Remove the reparametrization (zeros stay in `weight`) and report the sparsity reached."""
        for module in self.masked:
            prune.remove(module, "weight")
        self.masked = []
        report: dict[str, Any] = {"preexisting_zero_weights_kept": self.kept_zeros}
        if self.target is not None:
            total = sum(m.weight.numel() for m in self.scheduled)
            zeros = sum(int((m.weight == 0).sum()) for m in self.scheduled)
            report["gradual_sparsity"] = {
                "target": self.target,
                "reached": zeros / total,
                "layers": len(self.scheduled),
            }
        return report
