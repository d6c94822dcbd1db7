"""Recognise, validate and load uploaded datasets: image-folder archives or tensor files.

Archives are never extracted to disk: members are validated from their headers first (names,
types, counts, sizes) and then read one at a time into memory.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from jobspec.steps import Preprocessing
from worker.engine.types import DatasetError, DatasetInfo, DatasetSource, TensorData

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# PIL picks a decoder from the bytes, not the name; limit it to plain raster formats so that e.g.
# an EPS file renamed .png never reaches Ghostscript.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
NOT_A_DATASET = (
    "not a zip / tar(.gz) of one folder per class of images, nor a safetensors / .npz file with "
    "'inputs' and 'labels'"
)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds that keep a hostile archive (zip bomb, millions of members) from exhausting the worker."""

    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3  # sum of uncompressed member sizes
    max_decoded_bytes: int = 4 * 1024**3  # float32 tensor built from the images


DEFAULT_LIMITS = ArchiveLimits()


# ---------------------------------------------------------------------------------------------
# Archive members
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    name: str  # normalised with '/' separators
    size: int
    is_dir: bool


def _check_name(raw: str) -> str:
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise DatasetError("archive member name contains a NUL byte", {"member": raw[:200]})
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"archive member {raw!r} has an absolute path", {"member": raw})
    if ".." in PurePosixPath(name).parts:
        raise DatasetError(f"archive member {raw!r} points outside the archive ('..')", {"member": raw})
    return name


def _count(members: list[_Member], limits: ArchiveLimits) -> None:
    if len(members) > limits.max_members:
        raise DatasetError(
            f"the archive has more than {limits.max_members} members", {"limit": limits.max_members}
        )
    total = sum(m.size for m in members)
    if total > limits.max_total_bytes:
        raise DatasetError(
            f"the archive expands to more than {limits.max_total_bytes} bytes",
            {"limit_bytes": limits.max_total_bytes, "declared_bytes_so_far": total},
        )


_SPECIAL_MODES = {stat.S_IFLNK: "symlink", stat.S_IFCHR: "device", stat.S_IFBLK: "device", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _zip_members(archive: zipfile.ZipFile, limits: ArchiveLimits) -> list[_Member]:
    members: list[_Member] = []
    for info in archive.infolist():
        name = _check_name(info.filename)
        kind = _SPECIAL_MODES.get(stat.S_IFMT(info.external_attr >> 16))
        if kind:
            raise DatasetError(f"archive member {info.filename!r} is a {kind}; only files and folders are accepted", {"member": info.filename})
        if info.flag_bits & 0x1:
            raise DatasetError(f"archive member {info.filename!r} is encrypted", {"member": info.filename})
        members.append(_Member(name, int(info.file_size), info.is_dir()))
        # Check while going so a header-only bomb fails early.
        if len(members) > limits.max_members or len(members) % 1000 == 0:
            _count(members, limits)
    _count(members, limits)
    return members


def _tar_members(archive: tarfile.TarFile, limits: ArchiveLimits) -> list[_Member]:
    members: list[_Member] = []
    total = 0
    for info in archive:  # streaming: stops at the first refused header
        name = _check_name(info.name)
        if info.issym() or info.islnk():
            raise DatasetError(f"archive member {info.name!r} is a link; only files and folders are accepted", {"member": info.name})
        if not (info.isfile() or info.isdir()):
            raise DatasetError(f"archive member {info.name!r} is a device or special file", {"member": info.name})
        total += int(info.size)
        members.append(_Member(name, int(info.size), info.isdir()))
        if len(members) > limits.max_members or total > limits.max_total_bytes:
            _count(members, limits)
    _count(members, limits)
    return members


class _Archive:
    """Read-only view of a validated zip or tar archive."""

    def __init__(self, path: Path, kind: str, limits: ArchiveLimits):
        self.path, self.kind = path, kind
        try:
            if kind == "zip":
                with zipfile.ZipFile(path) as archive:
                    self.members = _zip_members(archive, limits)
            else:
                with tarfile.open(path, "r:*") as archive:
                    self.members = _tar_members(archive, limits)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"the archive is damaged: {exc}") from exc

    def read(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """Yield (name, bytes) for the wanted file members, in archive order."""
        try:
            if self.kind == "zip":
                with zipfile.ZipFile(self.path) as archive:
                    for info in archive.infolist():
                        name = info.filename.replace("\\", "/")
                        if name in wanted:
                            yield name, archive.read(info)
            else:
                with tarfile.open(self.path, "r:*") as archive:
                    for info in archive:
                        if info.name.replace("\\", "/") in wanted and info.isfile():
                            handle = archive.extractfile(info)
                            if handle is not None:
                                yield info.name.replace("\\", "/"), handle.read()
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"the archive is damaged: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _ignored(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or PurePosixPath(name).name in {"Thumbs.db", "desktop.ini"}


def _class_layout(members: list[_Member]) -> dict[str, list[str]]:
    """Map class name -> image member names; the folder above the images names the class."""
    images = [
        m.name for m in members
        if not m.is_dir and not _ignored(m.name) and PurePosixPath(m.name).suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not images:
        raise DatasetError(f"no images found: {NOT_A_DATASET}", {"image_extensions": sorted(IMAGE_EXTENSIONS)})
    parts = [PurePosixPath(name).parts for name in images]
    # Allow everything wrapped in one top-level folder (what zipping a folder produces).
    if all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    misplaced = [name for name, p in zip(images, parts) if len(p) != 2]
    if misplaced:
        raise DatasetError(
            "images must sit in one folder per class (class_name/image.png, optionally under one top folder)",
            {"misplaced_examples": misplaced[:10], "misplaced_count": len(misplaced)},
        )
    layout: dict[str, list[str]] = {}
    for name, p in zip(images, parts):
        layout.setdefault(p[0], []).append(name)
    return dict(sorted(layout.items()))


def _open_image(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # A decompression-bomb warning means an absurd pixel count: treat it as undecodable.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        image.load()
    return image.convert("RGB")


def _verify_image(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.open(io.BytesIO(data), formats=PIL_FORMATS).verify()


def _inspect_images(archive: _Archive) -> DatasetInfo:
    layout = _class_layout(archive.members)
    first_of_class = {names[0] for names in layout.values()}
    wanted = {name for names in layout.values() for name in names}
    bad: list[str] = []
    first_shape: list[int] | None = None
    for name, data in archive.read(wanted):
        try:
            if name in first_of_class:
                image = _open_image(data)
                if first_shape is None:
                    first_shape = [3, image.height, image.width]
            else:
                _verify_image(data)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors)
            bad.append(name)
    if bad:
        raise DatasetError(
            f"{len(bad)} image(s) cannot be decoded", {"undecodable_examples": bad[:10], "undecodable_count": len(bad)}
        )
    return DatasetInfo("imagefolder", len(wanted), list(layout), first_shape or [3, 0, 0])


def _load_images(archive: _Archive, preprocessing: Preprocessing, limits: ArchiveLimits) -> TensorData:
    layout = _class_layout(archive.members)
    label_of = {name: index for index, names in enumerate(layout.values()) for name in names}
    size = preprocessing.image_size
    pixels: list[torch.Tensor] = []
    labels: list[int] = []
    decoded = 0
    for name, data in archive.read(set(label_of)):
        try:
            image = _open_image(data)
        except Exception as exc:  # PIL raises many types
            raise DatasetError(f"image {name!r} cannot be decoded: {exc}", {"member": name}) from exc
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        decoded += array.numel() * 4
        if decoded > limits.max_decoded_bytes:
            raise DatasetError(
                "the decoded images exceed the memory limit; set preprocessing.image_size to shrink them",
                {"limit_bytes": limits.max_decoded_bytes},
            )
        pixels.append(array)
        labels.append(label_of[name])
    shapes = sorted({tuple(p.shape) for p in pixels})
    if len(shapes) > 1:
        raise DatasetError(
            "images have different sizes; set preprocessing.image_size to resize them to one square size",
            {"sizes_seen": [list(s) for s in shapes[:10]]},
        )
    inputs = torch.stack(pixels).float().div_(255.0)
    inputs = _normalize(inputs, preprocessing)
    return TensorData(inputs, torch.tensor(labels, dtype=torch.int64), list(layout))


def _normalize(inputs: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    mean, std = preprocessing.mean, preprocessing.std
    if mean is None and std is None:
        return inputs
    channels = inputs.shape[1]
    mean = mean or [0.0]
    std = std or [1.0]
    for label, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise DatasetError(f"preprocessing.{label} has {len(values)} values; the images have {channels} channels")
    shape = (1, -1, 1, 1)
    return (inputs - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


# ---------------------------------------------------------------------------------------------
# Tensor files
# ---------------------------------------------------------------------------------------------


def _read_tensor_file(path: Path, kind: str, limits: ArchiveLimits) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise DatasetError(f"damaged safetensors file: {exc}") from exc
        missing = [k for k in ("inputs", "labels") if k not in tensors]
        if missing:
            raise DatasetError("the safetensors file needs tensors named 'inputs' and 'labels'", {"missing": missing, "found": sorted(tensors)[:20]})
        return tensors["inputs"], tensors["labels"]
    with zipfile.ZipFile(path) as archive:  # .npz is a zip: the same bomb limits apply
        _zip_members(archive, limits)
    try:
        with np.load(path, allow_pickle=False) as npz:
            inputs, labels = np.asarray(npz["inputs"]), np.asarray(npz["labels"])
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DatasetError(f"the .npz holds arrays that need pickle (object dtype), which are not accepted: {exc}") from exc
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"damaged .npz file: {exc}") from exc
    for label, array in (("inputs", inputs), ("labels", labels)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.issubdtype(array.dtype, np.complexfloating):
            raise DatasetError(f"'{label}' has dtype {array.dtype}; a numeric array is needed")
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def _check_tensors(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    if inputs.is_complex() or inputs.ndim < 2:
        raise DatasetError("'inputs' must be a real tensor of shape (N, ...) with at least 2 dimensions", {"shape": list(inputs.shape)})
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DatasetError("'labels' must be a 1-D integer tensor", {"shape": list(labels.shape), "dtype": str(labels.dtype)})
    if labels.shape[0] != inputs.shape[0] or inputs.shape[0] == 0:
        raise DatasetError("'inputs' and 'labels' must have the same, non-zero length", {"inputs": inputs.shape[0], "labels": labels.shape[0]})
    inputs = inputs.to(torch.float32)
    labels = labels.to(torch.int64)
    if labels.min() < 0:
        raise DatasetError("'labels' must be class indices >= 0")
    if not torch.isfinite(inputs).all():
        raise DatasetError("'inputs' contains NaN or infinite values")
    classes = [str(int(v)) for v in torch.unique(labels).tolist()]
    return inputs, labels, classes


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def sniff_dataset_format(path: Path) -> str:
    """zip | tar | safetensors | npz, from the file's bytes."""
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(16)
        size = Path(path).stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read the dataset file: {exc}") from exc
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except zipfile.BadZipFile as exc:
            raise DatasetError(f"the zip archive is damaged: {exc}") from exc
        return "npz" if {"inputs.npy", "labels.npy"} <= names else "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, tarfile.TarError):
        pass
    raise DatasetError(NOT_A_DATASET)


def inspect_dataset(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> tuple[DatasetSource, DatasetInfo]:
    """Detect the format by content and validate the whole dataset without extracting it."""
    path = Path(path)
    kind = sniff_dataset_format(path)
    if kind in {"zip", "tar"}:
        info = _inspect_images(_Archive(path, kind, limits))
        return DatasetSource("imagefolder", path), info
    inputs, labels, classes = _check_tensors(*_read_tensor_file(path, kind, limits))
    return DatasetSource("tensors", path), DatasetInfo("tensors", int(inputs.shape[0]), classes, list(inputs.shape[1:]))


def load_dataset(source: DatasetSource, preprocessing: Preprocessing, limits: ArchiveLimits = DEFAULT_LIMITS) -> TensorData:
    """Materialise the dataset as float32 tensors (images: RGB, resized, scaled to [0, 1], normalised)."""
    path = Path(source.path)
    kind = sniff_dataset_format(path)
    if source.format == "imagefolder":
        if kind not in {"zip", "tar"}:
            raise DatasetError(f"expected an image archive, found a {kind} file")
        return _load_images(_Archive(path, kind, limits), preprocessing, limits)
    if kind not in {"safetensors", "npz"}:
        raise DatasetError(f"expected a tensor file, found a {kind} archive")
    inputs, labels, classes = _check_tensors(*_read_tensor_file(path, kind, limits))
    return TensorData(inputs, labels, classes)


def split(data: TensorData, eval_fraction: float, seed: int) -> tuple[TensorData, TensorData | None]:
    """Shuffle with ``seed`` and hold out ``eval_fraction`` of the samples (at least one when > 0)."""
    count = len(data)
    if eval_fraction <= 0 or count < 2:
        return data, None
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = min(count - 1, max(1, int(round(count * eval_fraction))))
    eval_idx, train_idx = order[:held], order[held:]

    def take(index: torch.Tensor) -> TensorData:
        labels = data.labels[index] if data.labels is not None else None
        return TensorData(data.inputs[index], labels, data.classes)

    return take(train_idx), take(eval_idx)
