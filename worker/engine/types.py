"""Plain data types shared by the engine's modules. Pure torch + stdlib: no web, DB or queue imports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

ModelFormat = Literal["safetensors", "state_dict", "export"]
DatasetFormat = Literal["imagefolder", "tensors"]


class EngineError(Exception):
    """An error the user can act on; ``details`` is JSON-able and names what is wrong."""

    code = "engine_error"

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class ModelError(EngineError):
    code = "invalid_model"


class DatasetError(EngineError):
    code = "invalid_dataset"


class StepError(EngineError):
    """A step cannot apply to this model / data (e.g. static int8 of an exported program)."""

    code = "step_failed"


class Canceled(EngineError):
    code = "canceled"


@dataclass(frozen=True)
class ModelSource:
    """Where an uploaded model lives and how to rebuild it."""

    format: ModelFormat
    path: Path
    architecture: str | None = None  # torchvision name; None for `export`
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    format: ModelFormat
    architecture: str | None
    param_count: int
    input_shape: list[int] | None  # known for exported programs
    num_outputs: int | None


@dataclass(frozen=True)
class DatasetSource:
    format: DatasetFormat
    path: Path


@dataclass(frozen=True)
class DatasetInfo:
    format: DatasetFormat
    num_samples: int
    classes: list[str]
    input_shape: list[int]  # of one sample; for image folders the shape before preprocessing resize


@dataclass
class TensorData:
    """A dataset materialised as tensors: inputs (N, ...) float32, labels (N,) int64 or None."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class StepContext:
    """Everything a technique needs besides its model and its one config object."""

    original: nn.Module  # the model as uploaded: teacher for KD, reference for fidelity
    example_input: torch.Tensor  # one batch-1 input on `device`
    device: torch.device
    workdir: Path
    train: TensorData | None = None
    eval: TensorData | None = None
    seed: int = 0
    # progress(fraction_of_this_step in [0, 1], message); cheap, call it between batches
    progress: Callable[[float, str], None] = lambda fraction, message: None
    # raises Canceled when the job was canceled; call it between batches
    check_canceled: Callable[[], None] = lambda: None


@dataclass
class StepOutcome:
    """What a technique returns: the new model plus facts it measured or decided."""

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    name: str  # file name inside the workdir, e.g. "model.pt2"
    path: Path
    kind: Literal["model", "report", "log"]
    format: str  # safetensors | pt2 | torchscript | onnx | json | html
    description: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass
class PipelineHooks:
    """How the caller follows a running pipeline; every callback is optional."""

    on_step_start: Callable[[int, str], None] = lambda index, kind: None
    on_step_end: Callable[[int, str, dict[str, Any]], None] = lambda index, kind, summary: None
    on_progress: Callable[[float, str], None] = lambda percent, message: None  # percent of the whole job
    check_canceled: Callable[[], None] = lambda: None


@dataclass
class PipelineResult:
    report: dict[str, Any]  # JSON-able, versioned (report["schema_version"])
    artifacts: list[Artifact]
