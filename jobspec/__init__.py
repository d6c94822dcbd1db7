"""Job specification: the typed, torch-free contract between the API and the engine.

The API validates requests with these models (and publishes them in OpenAPI); the engine takes
the same objects as the one config per technique. Every spec round-trips through plain dicts.
"""

from jobspec.steps import (
    BenchmarkStep,
    DistillStep,
    FinetuneStep,
    PipelineSpec,
    Preprocessing,
    PruneStep,
    QuantizeStep,
    Step,
    StepKind,
    Targets,
)

__all__ = [
    "BenchmarkStep",
    "DistillStep",
    "FinetuneStep",
    "PipelineSpec",
    "Preprocessing",
    "PruneStep",
    "QuantizeStep",
    "Step",
    "StepKind",
    "Targets",
]
