"""ModelPress compression engine: pure torch, callable from a task, a notebook or a test.

Public API (imported lazily so ``import worker.engine`` stays light):
    inspect_model, load_model, inspect_dataset, load_dataset, run_pipeline, rebuild_model, load_artifacts.
"""

from __future__ import annotations

import importlib
from typing import Any

from worker.engine.types import (  # noqa: F401  (re-exported)
    Artifact,
    Canceled,
    DatasetError,
    DatasetInfo,
    DatasetSource,
    EngineError,
    ModelError,
    ModelInfo,
    ModelSource,
    PipelineHooks,
    PipelineResult,
    StepContext,
    StepError,
    StepOutcome,
    TensorData,
)

_LAZY = {
    "inspect_model": "worker.engine.modelio",
    "load_model": "worker.engine.modelio",
    "rebuild_model": "worker.engine.modelio",
    "load_artifacts": "worker.engine.modelio",
    "inspect_dataset": "worker.engine.datasets",
    "load_dataset": "worker.engine.datasets",
    "run_pipeline": "worker.engine.pipeline",
}

__all__ = sorted(_LAZY) + [
    "Artifact", "Canceled", "DatasetError", "DatasetInfo", "DatasetSource", "EngineError", "ModelError",
    "ModelInfo", "ModelSource", "PipelineHooks", "PipelineResult", "StepContext", "StepError", "StepOutcome",
    "TensorData",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'worker.engine' has no attribute {name!r}")
