"""Device choice and a description of where the engine runs (for reports)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
from torch import nn

from worker.engine.types import StepError


def resolve_device(requested: str) -> torch.device:
    """Map a spec's ``device`` (auto | cpu | cuda) to a torch.device that exists here."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise StepError("the job asks for device 'cuda' but this worker has no CUDA GPU", {"device": requested})
    if requested not in {"cpu", "cuda"}:
        raise StepError(f"unknown device {requested!r}; use auto, cpu or cuda", {"device": requested})
    return torch.device(requested)


def module_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device a model's tensors live on (quantized models stay on CPU whatever the job asked)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return default


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds int8 kernels or quantized tensors, which most techniques cannot edit."""
    if isinstance(getattr(model, "int8_runtime", None), str):  # runtimes.OnnxRuntimeModel / CompiledPt2eModel
        return True
    for module in model.modules():
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            return True
    return any(t.is_quantized for t in list(model.parameters()) + list(model.buffers()))


def environment(device: torch.device) -> dict[str, Any]:
    """Facts a reader needs to interpret timings: versions, threads, CPU and GPU names."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux builds; /proc/cpuinfo names the model.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
