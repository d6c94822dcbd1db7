"""Knowledge distillation: train a lighter student to imitate the current model (the teacher)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torchvision
from torch import nn

from jobspec.steps import DistillStep

from .training import (
    TrainConfig,
    accuracy,
    eval_mode,
    fit,
    kd_loss,
    output_dim,
    precision_for,
    predict,
    recalibrate_batchnorm,
)
from .types import StepContext, StepError, StepOutcome


def distill(model: nn.Module, spec: DistillStep, ctx: StepContext) -> StepOutcome:
    """Return a student trained on the teacher's outputs over ``ctx.train`` (labels optional for mse)."""
    train = ctx.train
    if train is None or len(train) == 0:
        raise StepError("distillation needs a training dataset (labels are optional with loss='mse')")

    device = ctx.device
    torch.manual_seed(ctx.seed)
    precision = precision_for(device)
    teacher = eval_mode(model.to(device))
    example = ctx.example_input.to(device)
    num_classes = output_dim(teacher, example)
    student = _build_student(spec, teacher, num_classes, example).to(device)
    if precision.channels_last:
        student = student.to(memory_format=torch.channels_last)

    features = _FeaturePair(teacher, student, example) if spec.feature_loss_weight > 0 else None
    params = list(student.parameters()) + (list(features.parameters()) if features else [])
    use_labels = spec.loss == "kl" and train.labels is not None

    def loss_fn(inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        student_logits = student(inputs)
        if spec.loss == "mse":
            loss = nn.functional.mse_loss(student_logits.float(), teacher_logits.float())
        else:
            loss = kd_loss(
                student_logits,
                teacher_logits,
                labels if use_labels else None,
                temperature=spec.temperature,
                alpha=spec.alpha,
            )
        if features is not None:
            loss = loss + spec.feature_loss_weight * features.loss()
        return loss

    config = TrainConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        optimizer=spec.optimizer,
        lr=spec.lr,
        schedule="cosine",
        max_batches_per_epoch=spec.max_batches_per_epoch,
    )
    try:
        losses = fit([student] + ([features] if features else []), params, loss_fn, train, config, ctx,
                     progress_label="distillation")
    finally:
        if features is not None:
            features.close()

    recalibrated = recalibrate_batchnorm(student, train, ctx)
    student = student.to(memory_format=torch.contiguous_format).eval()
    details: dict[str, Any] = {
        "student": spec.student,
        "loss": spec.loss,
        "used_labels": use_labels,
        "feature_loss": features.describe() if features else None,
        "epochs": spec.epochs,
        "train_loss": losses,
        "device": str(device),
        "precision": precision.describe(),
        "batchnorm_recalibrated": recalibrated,
        "teacher_params": _param_count(teacher),
        "student_params": _param_count(student),
        "teacher_eval_accuracy": accuracy(teacher, ctx.eval, device),
        "student_eval_accuracy": accuracy(student, ctx.eval, device),
        "eval_top1_agreement": _agreement(teacher, student, ctx, device),
    }
    if spec.student != "current":
        # From here on the model is the student: exports must describe its architecture, not the upload's.
        details["result_architecture"] = spec.student
        details["result_arch_kwargs"] = {**spec.student_kwargs, "num_classes": num_classes}
    return StepOutcome(model=student, details=details)


def student_names() -> list[str]:
    """torchvision classification architectures a student may be built from."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build_student(spec: DistillStep, teacher: nn.Module, num_classes: int, example: torch.Tensor) -> nn.Module:
    if spec.student == "current":
        if spec.student_kwargs:
            raise StepError("student_kwargs cannot be used with student='current'")
        return copy.deepcopy(teacher)
    valid = student_names()
    if spec.student not in valid:
        raise StepError(
            f"unknown student {spec.student!r}; valid: 'current' or one of {', '.join(valid)}",
            {"valid_students": ["current", *valid]},
        )
    kwargs = {**spec.student_kwargs, "num_classes": num_classes}
    try:
        student = torchvision.models.get_model(spec.student, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise StepError(f"cannot build student {spec.student!r} with {spec.student_kwargs}: {exc}") from exc

    # Probe once: wrong channel count or too small an image fails here with a clear message
    # instead of deep inside the training loop.
    try:
        with torch.no_grad():
            out = student.eval()(example.cpu())
    except RuntimeError as exc:
        hint = ""
        if example.dim() == 4 and example.shape[1] != 3:
            hint = (
                f" torchvision classifiers expect 3-channel images and the data has {example.shape[1]};"
                " convert the dataset to RGB, or use student='current'."
            )
        raise StepError(
            f"student {spec.student!r} cannot take inputs of shape {list(example.shape)}:{hint} ({exc})",
            {"input_shape": list(example.shape)},
        ) from exc
    if not isinstance(out, torch.Tensor) or list(out.shape) != [example.shape[0], num_classes]:
        raise StepError(f"student {spec.student!r} does not return (batch, {num_classes}) logits")
    return student


class _FeaturePair(nn.Module):
    """MSE between the penultimate features (inputs of the last nn.Linear) of teacher and student.

    When widths differ a learned Linear projects the student's features to the teacher's width;
    it is trained with the student and discarded afterwards.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, example: torch.Tensor):
        super().__init__()
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            _last_linear(teacher, "teacher").register_forward_pre_hook(self._capture("teacher")),
            _last_linear(student, "student").register_forward_pre_hook(self._capture("student")),
        ]
        with torch.no_grad():
            eval_mode(teacher)(example)
            student.eval()(example)
        self.teacher_dim = self._captured["teacher"].shape[1]
        self.student_dim = self._captured["student"].shape[1]
        self.projection = (
            nn.Linear(self.student_dim, self.teacher_dim).to(example.device)
            if self.student_dim != self.teacher_dim
            else nn.Identity()
        )

    def _capture(self, role: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._captured[role] = torch.flatten(args[0], 1)

        return hook

    def loss(self) -> torch.Tensor:
        student = self.projection(self._captured["student"].float())
        return nn.functional.mse_loss(student, self._captured["teacher"].detach().float())

    def describe(self) -> dict[str, Any]:
        return {
            "teacher_dim": int(self.teacher_dim),
            "student_dim": int(self.student_dim),
            "projection": not isinstance(self.projection, nn.Identity),
        }

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._captured.clear()


def _last_linear(model: nn.Module, role: str) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StepError(f"feature_loss_weight needs a final nn.Linear in the {role}; none was found")
    return linears[-1]


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _agreement(teacher: nn.Module, student: nn.Module, ctx: StepContext, device: torch.device) -> float | None:
    if ctx.eval is None or len(ctx.eval) == 0:
        return None
    return float((predict(teacher, ctx.eval.inputs, device).argmax(1) == predict(student, ctx.eval.inputs, device).argmax(1)).float().mean())
