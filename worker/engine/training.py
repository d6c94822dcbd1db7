"""Training-loop pieces shared by fine-tuning and distillation.

One loop (`fit`) owns device placement, mixed precision, batching, cancellation and progress; the
techniques only supply a loss function and optional hooks around optimizer steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from .types import StepContext, StepError, TensorData

OptimizerName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["constant", "cosine", "step"]
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class TrainConfig:
    """The knobs `fit` needs; built from a FinetuneStep or DistillStep."""

    epochs: int
    batch_size: int
    optimizer: OptimizerName
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: ScheduleName = "constant"
    max_batches_per_epoch: int | None = None


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and whether a GradScaler is needed."""

    autocast_dtype: torch.dtype | None
    use_scaler: bool
    channels_last: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        if self.autocast_dtype is None:
            return "fp32"
        return {torch.bfloat16: "amp-bf16", torch.float16: "amp-fp16"}[self.autocast_dtype]


def precision_for(device: torch.device) -> Precision:
    """AMP only on CUDA: bf16 where supported (no loss scaling needed), else fp16 with a GradScaler."""
    if device.type != "cuda":
        return Precision(autocast_dtype=None, use_scaler=False, channels_last=False)
    if torch.cuda.is_bf16_supported():
        return Precision(autocast_dtype=torch.bfloat16, use_scaler=False, channels_last=True)
    return Precision(autocast_dtype=torch.float16, use_scaler=True, channels_last=True)


def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise StepError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise StepError(f"unknown optimizer {config.optimizer!r}; valid: sgd, adam, adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch, so short runs still see the whole schedule."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if config.schedule == "step":
        # Decay by 10x at a third and two thirds of training, the classic step recipe.
        milestones = sorted({max(1, total_steps // 3), max(1, 2 * total_steps // 3)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    raise StepError(f"unknown schedule {config.schedule!r}; valid: constant, cosine, step")


def batches_per_epoch(data: TensorData, config: TrainConfig) -> int:
    full = (len(data) + config.batch_size - 1) // config.batch_size
    return min(full, config.max_batches_per_epoch) if config.max_batches_per_epoch else full


def to_device(tensor: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    tensor = tensor.to(device, non_blocking=True)
    if precision.channels_last and tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def iterate_batches(
    data: TensorData, config: TrainConfig, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """One shuffled epoch of (inputs, labels) on CPU, cut at max_batches_per_epoch."""
    order = torch.randperm(len(data), generator=generator)
    for index in range(batches_per_epoch(data, config)):
        idx = order[index * config.batch_size : (index + 1) * config.batch_size]
        yield data.inputs[idx], (data.labels[idx] if data.labels is not None else None)


# loss_fn(inputs, labels) -> scalar loss; called inside autocast with tensors already on the device.
LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def fit(
    modules: list[nn.Module],
    params: Iterable[nn.Parameter],
    loss_fn: LossFn,
    data: TensorData,
    config: TrainConfig,
    ctx: StepContext,
    *,
    on_epoch_start: Callable[[int], None] | None = None,
    after_step: Callable[[], None] | None = None,
    progress_label: str = "training",
) -> list[float]:
    """Train ``params`` for ``config.epochs``; returns the mean loss of each epoch.

    ``modules`` are put in train mode (they must already be on ``ctx.device``); ``after_step`` runs
    after every optimizer step (e.g. to re-apply pruning masks).
    """
    device = ctx.device
    precision = precision_for(device)
    optimizer = make_optimizer(params, config)
    per_epoch = batches_per_epoch(data, config)
    total = per_epoch * config.epochs
    scheduler = make_scheduler(optimizer, config, total)
    scaler = torch.amp.GradScaler(device.type) if precision.use_scaler else None
    generator = torch.Generator().manual_seed(ctx.seed)
    for module in modules:
        try:
            module.train()
        except NotImplementedError as exc:
            raise StepError(
                "this model cannot be trained: modules from torch.export programs are fixed in the mode they "
                "were exported in; upload a state_dict / safetensors model to fine-tune or distill into it"
            ) from exc

    epoch_losses: list[float] = []
    done = 0
    for epoch in range(config.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        loss_sum, seen = 0.0, 0
        for inputs, labels in iterate_batches(data, config, generator):
            ctx.check_canceled()
            inputs = to_device(inputs, device, precision)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            with precision.autocast(device):
                loss = loss_fn(inputs, labels)
            if not torch.isfinite(loss):
                raise StepError(
                    f"{progress_label} diverged: loss became {float(loss)} in epoch {epoch + 1}; lower the learning rate",
                    {"epoch": epoch + 1, "lr": config.lr},
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            loss_sum += float(loss.detach()) * inputs.shape[0]
            seen += inputs.shape[0]
            done += 1
            ctx.progress(done / total, f"{progress_label}: epoch {epoch + 1}/{config.epochs}")
        epoch_losses.append(loss_sum / max(1, seen))
    for module in modules:
        module.eval()
    return epoch_losses


def eval_mode(model: nn.Module) -> nn.Module:
    """model.eval(), tolerating modules from torch.export programs, which refuse train/eval
    switches (they were captured in one mode already)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Float32 outputs of ``model`` (in eval mode) for ``inputs``, gathered on CPU."""
    eval_mode(model)
    outputs = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start : start + batch_size].to(device)
        try:
            out = model(batch)
        except Exception as exc:  # noqa: BLE001 - shape guards of exported programs raise AssertionError
            raise StepError(
                f"the model failed on a batch of shape {list(batch.shape)}: {type(exc).__name__}: {exc}",
                {"input_shape": list(batch.shape)},
            ) from exc
        if not isinstance(out, torch.Tensor):
            raise StepError(f"the model returned {type(out).__name__}, expected one logits tensor")
        outputs.append(out.float().cpu())
    return torch.cat(outputs)


def accuracy(model: nn.Module, data: TensorData | None, device: torch.device) -> float | None:
    """Top-1 accuracy on ``data``, or None when there is no labelled data."""
    if data is None or data.labels is None or len(data) == 0:
        return None
    logits = predict(model, data.inputs, device)
    return float((logits.argmax(1) == data.labels).float().mean())


def output_dim(model: nn.Module, example_input: torch.Tensor) -> int:
    """Size of the last output dimension (number of classes) from one forward pass."""
    with torch.no_grad():
        was_training = model.training
        eval_mode(model)
        out = model(example_input)
        if was_training:
            model.train()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StepError(f"expected the model to return (batch, classes) logits, got {shape}")
    return int(out.shape[1])


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels).

    T^2 keeps the soft-target gradients on the same scale as CE's as T changes. Without labels the
    KL term is used alone (at full weight).
    """
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits.float() / temperature, dim=1),
        nn.functional.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    if labels is None:
        return soft
    hard = nn.functional.cross_entropy(student_logits.float(), labels)
    return alpha * soft + (1.0 - alpha) * hard


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: TensorData, ctx: StepContext, *, max_batches: int = 32, batch_size: int = 64) -> bool:
    """Re-estimate BatchNorm running statistics with a cumulative average over training batches.

    A network trained for only a few epochs from scratch has running stats that lag far behind its
    weights (MobileNets use momentum 0.01), so its eval-mode accuracy collapses; one no-grad pass
    fixes that. Returns whether the model had BatchNorm layers.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over the batches below
    precision = precision_for(ctx.device)
    model.train()
    try:
        for start in range(0, min(len(data), max_batches * batch_size), batch_size):
            ctx.check_canceled()
            with precision.autocast(ctx.device):
                model(to_device(data.inputs[start : start + batch_size], ctx.device, precision))
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum
        model.eval()
    return True
