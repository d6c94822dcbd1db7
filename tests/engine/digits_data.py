"""Real (tiny) data and really trained models for engine tests: sklearn's 8x8 digits, 10 classes.

Everything expensive is cached per process, so a pytest session trains each model once. Public
functions hand out deep copies of cached models, so a test may change what it gets freely; the
cached TensorData must be treated as read-only (tensors are shared).
"""

from __future__ import annotations

import contextlib
import copy
from functools import lru_cache
from pathlib import Path

import torch
import torchvision
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from worker.engine.types import StepContext, TensorData

NUM_CLASSES = 10
EVAL_FRACTION = 0.2


@lru_cache(maxsize=None)
def digits(size: int = 8, channels: int = 1, seed: int = 0) -> tuple[TensorData, TensorData]:
    """(train, eval) splits; inputs (N, channels, size, size) float32, standardized; labels int64."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    # Standardize with one global mean/std, as image pipelines do, so activations are O(1).
    images = (images - images.mean()) / images.std()
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if channels != 1:
        images = images.repeat(1, channels, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_eval = int(len(labels) * EVAL_FRACTION)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    classes = [str(c) for c in range(NUM_CLASSES)]
    train = TensorData(images[train_idx].contiguous(), labels[train_idx].contiguous(), classes)
    evaluation = TensorData(images[eval_idx].contiguous(), labels[eval_idx].contiguous(), classes)
    return train, evaluation


def digits_rgb32() -> tuple[TensorData, TensorData]:
    """Digits upsampled to 3x32x32, the smallest input torchvision classifiers handle well."""
    return digits(size=32, channels=3)


class SmallCNN(nn.Module):
    """A few-thousand-parameter CNN for 1x8x8 digits (conv+BN+ReLU blocks, a pooled Linear head)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """A Linear-heavy model (flattened 1x8x8 input) for dynamic / weight-only quantization."""

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def train_quickly(model: nn.Module, data: TensorData, *, epochs: int, lr: float, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Plain Adam + cosine training on CPU; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(data) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.inputs[idx]), data.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorData, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``data``."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.inputs[start : start + batch_size])
        correct += int((logits.argmax(1) == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


@lru_cache(maxsize=None)
def _trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    return train_quickly(SmallCNN(), digits()[0], epochs=12, lr=1e-2)


@lru_cache(maxsize=None)
def _trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    return train_quickly(MLP(), digits()[0], epochs=15, lr=3e-3)


@lru_cache(maxsize=None)
def _trained_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    return train_quickly(model, digits_rgb32()[0], epochs=2, lr=3e-3)


def trained_cnn() -> nn.Module:
    """SmallCNN trained on 1x8x8 digits (eval accuracy > 0.9); a fresh copy per call."""
    return copy.deepcopy(_trained_cnn())


def trained_mlp() -> nn.Module:
    """MLP trained on 1x8x8 digits (eval accuracy > 0.9); a fresh copy per call."""
    return copy.deepcopy(_trained_mlp())


def trained_resnet18() -> nn.Module:
    """torchvision resnet18(num_classes=10) trained on 3x32x32 digits; a fresh copy per call."""
    return copy.deepcopy(_trained_resnet18())


@contextlib.contextmanager
def torch_threads(count: int):
    """Run with ``count`` intra-op threads. One thread keeps these tiny models fast on a shared
    2-core machine: with 2 threads, OpenMP barriers made a 3 s training take ~50 s under load."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_context(
    original: nn.Module,
    train: TensorData | None,
    evaluation: TensorData | None,
    *,
    workdir: Path | None = None,
    example_input: torch.Tensor | None = None,
    **overrides,
) -> StepContext:
    """A CPU StepContext over the given data; the example input defaults to the first sample."""
    source = train if train is not None else evaluation
    if example_input is None:
        if source is None:
            raise ValueError("make_context needs data or an explicit example_input")
        example_input = source.inputs[:1].clone()
    return StepContext(
        original=original,
        example_input=example_input,
        device=torch.device("cpu"),
        workdir=workdir or Path("."),
        train=train,
        eval=evaluation,
        **overrides,
    )
