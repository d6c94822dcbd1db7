"""Recognise, validate and load uploaded models without ever unpickling untrusted code."""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from worker.engine.types import ModelError, ModelInfo, ModelSource

ACCEPTED_FORMATS = (
    "safetensors weights (+ a torchvision architecture name)",
    "a PyTorch state_dict saved with torch.save(model.state_dict()) (+ a torchvision architecture name)",
    "a torch.export program saved with torch.export.save (.pt2)",
)
NOT_A_MODEL = "not a safetensors, PyTorch state_dict or torch.export file"
# Set on exported GraphModules whose graph was traced for one fixed batch size (see call_model).
FIXED_BATCH_KEY = "modelpress_fixed_batch"
INPUT_SHAPE_KEY = "modelpress_input_shape"

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


# ---------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------


def sniff_model_format(path: Path) -> str:
    """Return safetensors | pt2 | torch_zip | pickle from the file's bytes, or raise ModelError."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise ModelError(f"cannot read the model file: {exc}") from exc
    if size == 0:
        raise ModelError(f"the model file is empty: {NOT_A_MODEL}", {"accepted_formats": list(ACCEPTED_FORMATS)})
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(_SAFETENSORS_MAX_HEADER, size - 8) and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise _not_a_model(f"damaged zip archive ({exc})") from exc
        if any(name.split("/", 1)[-1] == "archive_format" for name in names):
            return "pt2"
        return "torch_zip"
    if head[:1] == b"\x80":  # pickle protocol opcode: legacy (non-zip) torch.save
        return "pickle"
    raise _not_a_model("unrecognised content")


def _not_a_model(reason: str) -> ModelError:
    return ModelError(f"{NOT_A_MODEL}: {reason}", {"accepted_formats": list(ACCEPTED_FORMATS)})


# ---------------------------------------------------------------------------------------------
# torchvision architectures
# ---------------------------------------------------------------------------------------------


def classification_architectures() -> list[str]:
    """torchvision's classification model names (detection, segmentation, video are other modules)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_architecture(name: str | None, arch_kwargs: dict[str, Any]) -> nn.Module:
    """Build a randomly initialised torchvision classifier; never downloads weights."""
    valid = classification_architectures()
    if not name:
        raise ModelError(
            "this model format holds only weights: name its torchvision architecture",
            {"valid_architectures_example": valid[:10]},
        )
    if name not in valid:
        raise ModelError(
            f"unknown architecture {name!r}: use a torchvision classification model name",
            {"architecture": name, "valid_architectures_example": [n for n in valid if n[:3] == name[:3]][:10] or valid[:10]},
        )
    if "weights" in arch_kwargs:
        raise ModelError("arch_kwargs may not set 'weights': the uploaded file provides them", {"arch_kwargs": arch_kwargs})
    try:
        return torchvision.models.get_model(name, weights=None, **arch_kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(
            f"arch_kwargs do not fit architecture {name!r}: {exc}",
            {"architecture": name, "arch_kwargs": arch_kwargs},
        ) from exc


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights requiring identical keys and shapes; the error lists every difference."""
    expected = model.state_dict()
    # Older checkpoints may lack BatchNorm counters; they do not affect inference.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        {"key": k, "expected": list(expected[k].shape), "got": list(state_dict[k].shape)}
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    hint = None
    classes = {tuple(m["got"])[0] for m in mismatched if m["key"].endswith((".weight", ".bias")) and m["got"]}
    if mismatched and not missing and not unexpected and len(classes) == 1 and len(mismatched) <= 2:
        # Only the classifier differs: the checkpoint was trained for another number of classes.
        count = classes.pop()
        hint = f'the weights are for {count} classes: pass arch_kwargs {{"num_classes": {count}}}'
    if missing or unexpected or mismatched:
        raise ModelError(
            "the weights do not match the architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} with another shape)",
            {
                "missing_keys": missing[:50],
                "unexpected_keys": unexpected[:50],
                "shape_mismatches": mismatched[:50],
                "counts": {"missing": len(missing), "unexpected": len(unexpected), "shape_mismatches": len(mismatched)},
                "hint": hint,
            },
        )
    loaded = OrderedDict(state_dict)
    # Module versions (e.g. torchvision MNASNet checks one) travel in _metadata, which safetensors
    # does not store: fall back to the versions of the architecture just built.
    loaded._metadata = getattr(state_dict, "_metadata", None) or getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(loaded, strict=False)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"the weights cannot be loaded into the architecture: {str(exc)[:300]}") from exc


# ---------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_a_model(f"damaged safetensors file ({exc})") from exc


def _read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for bad input; all mean "not a usable file"
        text = str(exc)
        if "Weights only load failed" in text and ("GLOBAL" in text or "global" in text):
            refused = re.search(r"GLOBAL ([\w.]+)", text)
            raise ModelError(
                "a full pickled module (or any pickle holding Python objects) is not accepted; "
                "save the weights with torch.save(model.state_dict()) or safetensors",
                {"accepted_formats": list(ACCEPTED_FORMATS), "refused_object": refused.group(1) if refused else None},
            ) from exc
        raise _not_a_model(f"{type(exc).__name__}: {text[:200]}") from exc
    return _unwrap_state_dict(loaded)


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        for key in _WRAPPER_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                loaded = inner
                break
    if not isinstance(loaded, dict) or not loaded:
        raise ModelError(
            f"the file holds a {type(loaded).__name__}, not a state_dict (a dict of tensors)",
            {"accepted_formats": list(ACCEPTED_FORMATS)},
        )
    bad = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError("the state_dict holds entries that are not tensors", {"keys": bad[:20]})
    # Checkpoints saved from DataParallel / DDP prefix every key.
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


# ---------------------------------------------------------------------------------------------
# torch.export programs
# ---------------------------------------------------------------------------------------------

_PT2_FIXED_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_ALLOWED = {
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}


def _check_pt2_archive(path: Path) -> None:
    """Refuse .pt2 archives with parts that torch.export.load would unpickle or execute.

    torch.export.load unpickles with weights_only=False for 'use_pickle' payloads, custom / opaque
    objects, legacy weight files and sample inputs that fail the safe loader; AOTInductor parts
    are native code. A program exported from plain tensors needs none of these.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names}
            if len(roots) != 1 or any("/" not in name for name in names):
                raise _not_a_model("a .pt2 archive has exactly one top-level folder")
            root = roots.pop()
            relative = {name[len(root) + 1:] for name in names}
            if archive.read(f"{root}/archive_format").strip() != b"pt2":
                raise _not_a_model("archive_format is not 'pt2'")
            refused = sorted(
                name
                for name in relative
                if name not in _PT2_FIXED_FILES
                and name not in _PT2_ALLOWED
                and not name.startswith("extra/")
                and not (name.startswith("data/weights/weight_") and "/" not in name[len("data/weights/"):])
                and not (name.startswith("data/constants/tensor_") and "/" not in name[len("data/constants/"):])
            )
            if refused:
                raise ModelError(
                    "this .pt2 archive holds parts the service does not load (pickled objects, compiled code "
                    "or several programs); export a plain program with torch.export.save",
                    {"refused_members": refused[:20]},
                )
            if "models/model.json" not in relative:
                raise _not_a_model("the .pt2 archive has no models/model.json")
            for config_name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
                if config_name not in relative:
                    continue
                config = json.loads(archive.read(f"{root}/{config_name}")).get("config", {})
                pickled = [k for k, meta in config.items() if meta.get("use_pickle")]
                odd = [k for k, meta in config.items() if not str(meta.get("path_name", "")).startswith(("weight_", "tensor_"))]
                if pickled or odd:
                    raise ModelError(
                        "this .pt2 archive stores pickled tensors or objects, which are not accepted",
                        {"entries": (pickled + odd)[:20]},
                    )
            if "data/sample_inputs/model.pt" in relative:
                # torch falls back to an unsafe load when the safe one fails: make sure it cannot fail.
                torch.load(io.BytesIO(archive.read(f"{root}/data/sample_inputs/model.pt")), weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # damaged zip, bad JSON, refused pickle in sample inputs
        raise ModelError(f"the .pt2 archive is damaged or unsafe: {type(exc).__name__}: {str(exc)[:200]}") from exc



def _load_exported(path: Path) -> torch.export.ExportedProgram:
    _check_pt2_archive(path)
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # deserialisation raises assorted types
        raise ModelError(f"cannot load the torch.export program: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _exported_shapes(program: torch.export.ExportedProgram) -> tuple[list[int] | None, int | None, int | None]:
    """(input shape without batch, batch size, number of outputs) read from the graph's metadata."""
    user_inputs = set(program.graph_signature.user_inputs)
    input_shape: list[int] | None = None
    batch: int | None = None
    num_outputs: int | None = None
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and input_shape is None and hasattr(value, "shape"):
            dims = list(value.shape)
            if dims and all(isinstance(d, int) for d in dims[1:]):
                input_shape = [int(d) for d in dims[1:]]
                batch = int(dims[0]) if isinstance(dims[0], int) else None
        if node.op == "output":
            outputs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            first = outputs[0].meta.get("val") if outputs and hasattr(outputs[0], "meta") else None
            if first is not None and hasattr(first, "shape") and len(first.shape) == 2 and isinstance(first.shape[1], int):
                num_outputs = int(first.shape[1])
    return input_shape, batch, num_outputs


def _program_module(program: torch.export.ExportedProgram) -> nn.Module:
    module = program.module()
    input_shape, batch, _ = _exported_shapes(program)
    if batch is not None:
        module.meta[FIXED_BATCH_KEY] = batch
    if input_shape is not None:
        module.meta[INPUT_SHAPE_KEY] = input_shape
    return module


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def inspect_model(path: Path, architecture: str | None, arch_kwargs: dict[str, Any]) -> tuple[ModelSource, ModelInfo]:
    """Detect the format by content, load the model once to validate it, and describe it."""
    path = Path(path)
    kind = sniff_model_format(path)
    if kind == "pt2":
        program = _load_exported(path)
        input_shape, _, num_outputs = _exported_shapes(program)
        params = sum(int(p.numel()) for p in program.parameters())
        source = ModelSource(format="export", path=path, architecture=None, arch_kwargs={})
        return source, ModelInfo("export", None, params, input_shape, num_outputs)
    weights = _read_safetensors(path) if kind == "safetensors" else _read_torch_state_dict(path)
    model = build_architecture(architecture, dict(arch_kwargs))
    load_state_dict_strict(model, weights)
    fmt = "safetensors" if kind == "safetensors" else "state_dict"
    source = ModelSource(format=fmt, path=path, architecture=architecture, arch_kwargs=dict(arch_kwargs))
    params = sum(int(p.numel()) for p in model.parameters())
    return source, ModelInfo(fmt, architecture, params, None, classifier_outputs(model))


def load_model(source: ModelSource) -> nn.Module:
    """Rebuild the uploaded model on CPU; exported programs come back as a GraphModule."""
    if source.format == "export":
        return _program_module(_load_exported(Path(source.path)))
    kind = sniff_model_format(Path(source.path))
    weights = _read_safetensors(Path(source.path)) if kind == "safetensors" else _read_torch_state_dict(Path(source.path))
    model = build_architecture(source.architecture, dict(source.arch_kwargs))
    load_state_dict_strict(model, weights)
    return model


def classifier_outputs(model: nn.Module) -> int | None:
    """Number of classes from the last Linear (or, e.g. SqueezeNet, the last 1x1 conv)."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    if isinstance(last, nn.Linear):
        return int(last.out_features)
    if isinstance(last, nn.Conv2d):
        return int(last.out_channels)
    return None


def is_exported(model: nn.Module) -> bool:
    """True for GraphModules from ExportedProgram.module(): they call aten ops on their weights, not
    nn.Conv2d / nn.Linear modules (FX GraphModules, e.g. from FX int8 conversion, keep their layers)."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    from worker.engine.device import is_quantized

    layers = (nn.modules.conv._ConvNd, nn.Linear)
    return not is_quantized(model) and not any(isinstance(m, layers) for m in model.modules())


def set_eval(model: nn.Module) -> nn.Module:
    """model.eval(), tolerating exported programs (already traced in one mode; eval() raises there)."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def set_train(model: nn.Module) -> nn.Module:
    try:
        model.train()
    except NotImplementedError:
        pass
    return model


def call_model(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run a forward at any batch size, also for exported programs traced at one fixed batch size."""
    meta = getattr(model, "meta", None)
    fixed = meta.get(FIXED_BATCH_KEY) if isinstance(meta, dict) else None
    if not fixed or inputs.shape[0] == fixed:
        return _first_output(model(inputs))
    outputs = []
    for start in range(0, inputs.shape[0], fixed):
        chunk = inputs[start:start + fixed]
        real = chunk.shape[0]
        if real < fixed:  # pad to the traced batch size, then drop the padding's outputs
            pad = torch.zeros((fixed - real, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
            chunk = torch.cat([chunk, pad])
        outputs.append(_first_output(model(chunk))[:real])
    return torch.cat(outputs)


def _first_output(output: Any) -> torch.Tensor:
    # GoogLeNet / Inception return named tuples in training mode; classification logits come first.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "logits"):
        return output.logits
    raise ModelError(f"the model returned {type(output).__name__}; the engine expects a logits tensor")


# ---------------------------------------------------------------------------------------------
# Artifacts written by the engine
# ---------------------------------------------------------------------------------------------


def compare_outputs(expected: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    """Whether a reloaded artifact reproduces the in-memory model's output (relative tolerance 1e-3)."""
    if expected.shape != got.shape:
        return {"verified": False, "reason": f"output shape {list(got.shape)} != {list(expected.shape)}"}
    diff = float((expected.float() - got.float()).abs().max())
    scale = float(expected.float().abs().max()) or 1.0
    ok = diff <= 1e-3 * scale + 1e-4
    result: dict[str, Any] = {"verified": ok, "max_abs_diff": diff}
    if not ok:
        result["reason"] = "reloaded artifact's output differs from the in-memory model"
    return result


def load_exported_artifact(path: Path) -> nn.Module:
    """Load a .pt2 the engine wrote (through the same safety checks as an upload)."""
    return _program_module(_load_exported(Path(path)))


def rebuild_model(structure: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """Build the architecture named in structure.json, resize its layers to the recorded sizes
    (structured pruning shrinks them), then load the weights strictly."""
    if not structure.get("architecture"):
        raise ModelError("structure.json names no architecture; load the .pt2 program instead")
    model = build_architecture(structure["architecture"], dict(structure.get("arch_kwargs") or {}))
    _restore_pruned_attention(model, structure.get("layers", {}))
    modules = dict(model.named_modules())
    for name, record in structure.get("layers", {}).items():
        module = modules.get(name)
        if module is None:
            raise ModelError(f"structure.json names layer {name!r}, which the architecture does not have")
        for attr, value in record.items():
            if attr != "type" and attr in module.__dict__:
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, shape in structure.get("tensors", {}).items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue  # reported as an unexpected key by the strict load below
        current = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        if current is None or list(current.shape) == list(shape):
            continue
        replacement = torch.zeros(shape, dtype=current.dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(replacement, requires_grad=current.requires_grad)
        else:
            owner._buffers[attr] = replacement
    dtype = structure.get("input_dtype")
    if dtype is not None:
        if dtype not in {"float16", "bfloat16"}:
            raise ModelError(f"structure.json has an unsupported input_dtype {dtype!r}")
        model = model.to(getattr(torch, dtype))  # the model then expects inputs of this dtype
    load_state_dict_strict(model, weights)
    return model


def _restore_pruned_attention(model: nn.Module, layers: dict[str, Any]) -> None:
    """Swap in a HeadPrunedAttention (with the recorded head count) wherever head pruning put one."""
    from worker.engine.prune_heads import HeadPrunedAttention

    modules = dict(model.named_modules())
    for name, record in layers.items():
        if record.get("type") != HeadPrunedAttention.__name__:
            continue
        parent_name, _, child = name.rpartition(".")
        original = getattr(modules.get(parent_name), child, None)
        heads = record.get("num_heads")
        if not isinstance(original, nn.MultiheadAttention) or not isinstance(heads, int) or not 0 < heads <= original.num_heads:
            raise ModelError(f"structure.json records pruned attention at {name!r} that does not fit the architecture")
        setattr(modules[parent_name], child, HeadPrunedAttention.like(original, heads))


def load_artifacts(workdir: Path) -> nn.Module:
    """Rebuild the model from an engine run's model.safetensors + structure.json."""
    from safetensors.torch import load_file

    workdir = Path(workdir)
    structure = json.loads((workdir / "structure.json").read_text())
    return rebuild_model(structure, load_file(str(workdir / "model.safetensors")))
