"""Write the final model as loadable artifacts, each loaded back and checked against the model.

Never torch.save a module: weights go to safetensors (+ structure.json to rebuild the network),
the program to torch.export (.pt2), TorchScript and ONNX where those exporters succeed.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from worker.engine.device import is_quantized
from worker.engine.modelio import call_model, compare_outputs, is_exported, set_eval
from worker.engine.runtimes import int8_runtime
from worker.engine.types import Artifact, ModelError

STRUCTURE_VERSION = 1
RUNTIME_ARTIFACTS = {
    "onnxruntime": "int8 ONNX (QDQ) graph: onnxruntime.InferenceSession(path)",
    "pt2e": "int8 torch.export program: import torchao, then torch.compile(torch.export.load(path).module()) (eager it is slow)",
}
# Module attributes that hold sizes; structured pruning changes them, a rebuild must restore them.
SHAPE_ATTRS = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "num_groups", "num_channels", "embed_dim", "num_heads", "head_dim", "kdim",
    "vdim", "num_parameters", "num_embeddings", "embedding_dim", "hidden_dim",
)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp makes 0600; artifacts are read by other processes
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=False, default=str)))


def describe_structure(model: nn.Module, architecture: str | None, arch_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What modelio.rebuild_model needs: the architecture plus every layer's sizes and tensor shapes."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {}
        for attr in SHAPE_ATTRS:
            value = module.__dict__.get(attr)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value)):
                attrs[attr] = list(value) if isinstance(value, (tuple, list)) else value
        if attrs:
            layers[name] = {"type": type(module).__name__, **attrs}
    tensors = {key: list(value.shape) for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    return {
        "structure_version": STRUCTURE_VERSION,
        "architecture": architecture,
        "arch_kwargs": arch_kwargs,
        "layers": layers,
        "tensors": tensors,
    }


def unwrap_input_cast(model: nn.Module) -> tuple[nn.Module, torch.dtype | None]:
    """(inner model, its input dtype) for a wrapper that only casts inputs (fp16 / bf16 models)."""
    inner, dtype = getattr(model, "module", None), getattr(model, "dtype", None)
    if isinstance(inner, nn.Module) and isinstance(dtype, torch.dtype) and len(list(model.children())) == 1:
        return inner, dtype
    return model, None


def _try(name: str, status: dict[str, Any], action: Callable[[], dict[str, Any]], files: list[Path]) -> bool:
    try:
        status[name] = {"ok": True, **action()}
        return True
    except Exception as exc:  # an exporter failing must not fail the job: record why instead
        text = str(exc).strip()
        status[name] = {"ok": False, "reason": f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"}
        for path in files:  # a half-checked file must not be mistaken for an artifact
            path.unlink(missing_ok=True)
        return False


def _export_program(model: nn.Module, example: torch.Tensor) -> tuple[torch.export.ExportedProgram, str]:
    """torch.export with a dynamic batch when the model allows it, else at the example's batch size."""
    pair = torch.cat([example, example])  # batch 2: export specialises sizes 0 and 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    errors = []
    for args, dynamic, strict, label in (
        ((pair,), ({0: batch},), False, "dynamic batch, non-strict"),
        ((example,), None, False, "static batch, non-strict"),
        ((example,), None, True, "static batch, strict"),
    ):
        try:
            return torch.export.export(model, args, dynamic_shapes=dynamic, strict=strict), label
        except Exception as exc:  # try the next, more conservative mode
            errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:150]}")
    raise RuntimeError("; ".join(errors))


def write_model_artifacts(
    model: nn.Module,
    workdir: Path,
    example_input: torch.Tensor,
    architecture: str | None,
    arch_kwargs: dict[str, Any],
    onnx: bool = True,
) -> tuple[list[Artifact], dict[str, Any]]:
    """Write every artifact that works for this model; returns them and a per-artifact status."""
    from worker.engine.modelio import load_exported_artifact, rebuild_model

    workdir = Path(workdir)
    model = set_eval(model)
    example = example_input.detach().cpu()
    with torch.no_grad():
        expected = call_model(model, example)
    quantized = is_quantized(model)
    artifacts: list[Artifact] = []
    status: dict[str, Any] = {}
    runtime = int8_runtime(model)
    if runtime:  # an int8 graph for ONNX Runtime / torch.compile: its own file is the artifact
        name = model.artifact_name
        fmt = name.rsplit(".", 1)[-1]
        if _try(fmt, status, lambda: model.write_artifacts(workdir, example, expected, atomic_write), [workdir / name]):
            artifacts.append(Artifact(name, workdir / name, "model", fmt, RUNTIME_ARTIFACTS[runtime]))
        return artifacts, status

    def add(name: str, fmt: str, description: str) -> None:
        artifacts.append(Artifact(name, workdir / name, "model", fmt, description))

    weight_files = [workdir / "model.safetensors", workdir / "structure.json"]

    def weights() -> dict[str, Any]:
        from safetensors.torch import load_file, save_file

        if quantized:
            raise ValueError("packed int8 weights cannot be stored as safetensors; use the TorchScript artifact")
        inner, input_dtype = unwrap_input_cast(model)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in inner.state_dict().items()}
        structure = describe_structure(inner, architecture, arch_kwargs)
        if input_dtype is not None:
            structure["input_dtype"] = str(input_dtype).replace("torch.", "")
        files = weight_files
        atomic_write(files[0], lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        write_json(files[1], structure)
        if architecture is None:
            return {"verified": None, "note": "no torchvision architecture: load the .pt2 program, not these weights"}
        try:
            rebuilt = set_eval(rebuild_model(structure, load_file(str(files[0]))))
        except ModelError as exc:
            raise ValueError(
                f"the weights no longer fit the {architecture} layout ({exc.message}); use the TorchScript or .pt2 artifact"
            ) from exc
        with torch.no_grad():
            return compare_outputs(expected, call_model(rebuilt, example.to(input_dtype or example.dtype)).float())

    if _try("safetensors", status, weights, weight_files):
        add("model.safetensors", "safetensors", "weights; rebuild with structure.json (modelio.rebuild_model)")
        add("structure.json", "json", "architecture and layer sizes needed to rebuild the network")

    def program() -> dict[str, Any]:
        if quantized:
            raise ValueError("torch.export cannot serialise eager int8 modules; use the TorchScript artifact")
        exported, mode = _export_program(model, example)
        atomic_write(workdir / "model.pt2", lambda p: torch.export.save(exported, str(p)))
        with torch.no_grad():
            check = compare_outputs(expected, call_model(load_exported_artifact(workdir / "model.pt2"), example))
        return {"mode": mode, **check}

    if _try("pt2", status, program, [workdir / "model.pt2"]):
        add("model.pt2", "pt2", "torch.export program: torch.export.load(path).module()")

    def torchscript() -> dict[str, Any]:
        # TorchScript is deprecated upstream but remains the one portable format for eager int8 models.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # traced guards of exported programs
            traced = torch.jit.trace(model, example, check_trace=False)
            atomic_write(workdir / "model.torchscript.pt", lambda p: torch.jit.save(traced, str(p)))
            reloaded = torch.jit.load(str(workdir / "model.torchscript.pt"), map_location="cpu")
            return compare_outputs(expected, call_model(reloaded, example))

    if _try("torchscript", status, torchscript, [workdir / "model.torchscript.pt"]):
        add("model.torchscript.pt", "torchscript", "TorchScript (traced): torch.jit.load(path)")

    if quantized or is_exported(model):
        why = "int8 (quantized) modules" if quantized else "exported programs traced at a fixed batch size"
        status["onnx"] = {"ok": False, "reason": f"ONNX export is not attempted for {why}"}
    elif not onnx:
        status["onnx"] = {"ok": False, "reason": "ONNX export is turned off for this worker"}
    else:
        from worker.engine.onnx_export import export_onnx

        def onnx_artifact() -> dict[str, Any]:
            return export_onnx(model, example, expected, workdir / "model.onnx", atomic_write)

        if _try("onnx", status, onnx_artifact, [workdir / "model.onnx"]):
            add("model.onnx", "onnx", "ONNX (opset 18), checked with onnxruntime")
    return artifacts, status
