"""Job spec files (YAML): read, check early, and say which model / dataset files to upload first.

A spec file is the JSON body of `POST /v1/jobs` written as YAML, plus two conveniences:

    model: resnet18.pt                      # or {file: ..., architecture: ..., arch_kwargs: {...}, name: ...}
    dataset: {file: digits.npz, name: digits}
    model_id: ...                           # alternatively, ids of uploads that already exist

Relative file paths are relative to the spec file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_UPLOAD_KEYS = {"model", "dataset"}
_ID_KEYS = {"model_id", "dataset_id"}
_JOB_ONLY_KEYS = {"callback_url"}  # fields of the job request that are not part of the pipeline spec
_MODEL_FILE_KEYS = {"file", "architecture", "arch_kwargs", "name"}
_DATASET_FILE_KEYS = {"file", "name"}


class SpecError(Exception):
    """The spec file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class UploadRef:
    """A file the spec asks the CLI to upload before submitting."""

    file: Path
    name: str | None = None
    architecture: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFile:
    """A parsed spec file: the job body (without ids) and where the model and dataset come from."""

    body: dict[str, Any]
    model_id: str | None
    dataset_id: str | None
    model: UploadRef | None
    dataset: UploadRef | None

    @property
    def targets(self) -> dict[str, Any]:
        return dict(self.body.get("targets") or {})


def _upload_ref(value: Any, *, key: str, base: Path) -> UploadRef:
    allowed = _MODEL_FILE_KEYS if key == "model" else _DATASET_FILE_KEYS
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict) or "file" not in value:
        raise SpecError(f"`{key}` must be a file path or a mapping with `file` (keys: {', '.join(sorted(allowed))})")
    unknown = set(value) - allowed
    if unknown:
        raise SpecError(f"`{key}` has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    path = Path(str(value["file"])).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise SpecError(f"`{key}.file`: {path} does not exist or is not a file")
    arch_kwargs = value.get("arch_kwargs") or {}
    if isinstance(arch_kwargs, str):
        try:
            arch_kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise SpecError(f"`{key}.arch_kwargs` is not valid JSON: {exc.msg}") from exc
    if not isinstance(arch_kwargs, dict):
        raise SpecError(f"`{key}.arch_kwargs` must be a mapping, e.g. {{num_classes: 10}}")
    return UploadRef(file=path, name=value.get("name"), architecture=value.get("architecture"),
                     arch_kwargs=arch_kwargs)


def load(path: Path) -> JobFile:
    """Read and check a spec file; SpecError with a precise message when it is unusable."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must hold a mapping with at least `steps`")
    base = path.resolve().parent
    body = {k: v for k, v in raw.items() if k not in _UPLOAD_KEYS | _ID_KEYS}
    model = _upload_ref(raw["model"], key="model", base=base) if raw.get("model") is not None else None
    dataset = _upload_ref(raw["dataset"], key="dataset", base=base) if raw.get("dataset") is not None else None
    validate(body)
    return JobFile(body=body, model_id=raw.get("model_id"), dataset_id=raw.get("dataset_id"), model=model,
                   dataset=dataset)


def _check_targets(targets: Any) -> None:
    if targets is None:
        return
    if not isinstance(targets, dict) or not targets:
        raise SpecError("`targets` must be a mapping such as {max_accuracy_drop: 0.5, min_speedup: 2.0}")
    for name, value in targets.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"`targets.{name}` must be a number, not {value!r}")


def validate(body: dict[str, Any]) -> None:
    """Validate the job body with the same pydantic models as the server, when they are importable.

    The server validates again; this only spares an upload when the spec is wrong anyway.
    """
    try:
        from jobspec import PipelineSpec
    except ImportError:  # a CLI-only install without the spec package: the server will tell
        return
    from pydantic import ValidationError

    checked = {k: v for k, v in body.items() if k not in _JOB_ONLY_KEYS}
    if "targets" not in PipelineSpec.model_fields:  # older spec package: check the shape ourselves
        _check_targets(checked.pop("targets", None))
    try:
        PipelineSpec.model_validate(checked)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise SpecError(f"invalid job spec: {problems}") from exc
