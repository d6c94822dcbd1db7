"""Shared fixtures for the engine tests: tiny torchvision models, file builders, a step context."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from worker.engine.types import StepContext


@pytest.fixture
def small_model() -> Callable[..., torch.nn.Module]:
    """Factory for a small real classifier (BN, depthwise convs, SE, Linear head) that runs at 32x32."""

    def build(num_classes: int = 10) -> torch.nn.Module:
        torch.manual_seed(0)
        return torchvision.models.mobilenet_v3_small(num_classes=num_classes).eval()

    return build


@pytest.fixture
def save_safetensors() -> Callable[[torch.nn.Module, Path], Path]:
    def save(model: torch.nn.Module, path: Path) -> Path:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    return save


@pytest.fixture
def make_ctx(tmp_path: Path) -> Callable[..., StepContext]:
    """Factory for a CPU StepContext whose original model is ``model``."""

    def build(model: torch.nn.Module, shape=(3, 32, 32), **kwargs) -> StepContext:
        torch.manual_seed(0)
        return StepContext(
            original=model, example_input=torch.randn(1, *shape), device=torch.device("cpu"), workdir=tmp_path, **kwargs
        )

    return build


@pytest.fixture
def no_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the ONNX artifact in pipeline tests that are about something else (it costs seconds)."""
    monkeypatch.setattr("worker.engine.pipeline.EXPORT_ONNX", False)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file a malicious payload would create; tests assert it never appears."""
    return tmp_path / "pwned"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a heavier engine test (large torchvision model); deselect with -m 'not slow'")
