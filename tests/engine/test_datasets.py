"""Dataset uploads: image-folder archives and tensor files, and the archive attacks they must resist."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from jobspec.steps import Preprocessing
from worker.engine import DatasetError, inspect_dataset, load_dataset
from worker.engine.datasets import ArchiveLimits, split


def _png(size=(12, 10), color=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


FOLDER = {"cats/a.png": _png(), "cats/b.png": _png(), "dogs/c.png": _png(color=(0, 0, 255))}


@pytest.mark.parametrize("top", ["", "mydata/"])
@pytest.mark.parametrize("writer", [_zip, _tar])
def test_imagefolder_archives(tmp_path, writer, top):
    members = {top + name: data for name, data in FOLDER.items()}
    members[top + "README.txt"] = b"ignored"
    members["__MACOSX/._x.png"] = b"junk"
    path = writer(tmp_path / "data.bin", members)
    source, info = inspect_dataset(path)
    assert source.format == info.format == "imagefolder"
    assert info.classes == ["cats", "dogs"] and info.num_samples == 3
    assert info.input_shape == [3, 10, 12]
    data = load_dataset(source, Preprocessing(image_size=16, mean=[0.5], std=[0.5]))
    assert data.inputs.shape == (3, 3, 16, 16) and data.inputs.dtype == torch.float32
    assert sorted(data.labels.tolist()) == [0, 0, 1]
    red = data.inputs[data.labels == 0][0]
    assert red[0].mean() > 0.5 and red[2].mean() < -0.5  # normalised: (x - 0.5) / 0.5


def test_mixed_sizes_need_image_size(tmp_path):
    path = _zip(tmp_path / "d.zip", {"a/1.png": _png((8, 8)), "b/2.png": _png((9, 9))})
    source, _ = inspect_dataset(path)
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset(source, Preprocessing())
    assert load_dataset(source, Preprocessing(image_size=8)).inputs.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png", "..\\evil.png"])
def test_zip_slip_and_absolute_paths(tmp_path, name):
    path = _zip(tmp_path / "d.zip", {**FOLDER, name: _png()})
    with pytest.raises(DatasetError) as caught:
        inspect_dataset(path)
    assert caught.value.details["member"] == name


def test_zip_symlink_member(tmp_path):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in FOLDER.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("cats/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(DatasetError, match="symlink"):
        inspect_dataset(path)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_devices(tmp_path, kind):
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in FOLDER.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        special = tarfile.TarInfo("cats/special.png")
        special.type = kind
        special.linkname = "/etc/passwd"
        archive.addfile(special)
    with pytest.raises(DatasetError) as caught:
        inspect_dataset(path)
    assert caught.value.details["member"] == "cats/special.png"


def test_member_count_cap(tmp_path):
    members = {f"c{i % 2}/{i}.png": _png() for i in range(30)}
    path = _zip(tmp_path / "d.zip", members)
    with pytest.raises(DatasetError, match="more than 20 members"):
        inspect_dataset(path, ArchiveLimits(max_members=20))


@pytest.mark.parametrize("writer", [_zip, _tar])
def test_zip_bomb_cap(tmp_path, writer):
    # 64 MiB of zeros compresses to a few tens of KiB: the declared size trips the cap.
    path = tmp_path / "bomb"
    if writer is _zip:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("a/1.png", _png())
            archive.writestr("a/big.png", b"\0" * (64 * 1024 * 1024))
    else:
        _tar(path, {"a/1.png": _png(), "a/big.png": b"\0" * (64 * 1024 * 1024)})
    assert path.stat().st_size < 1024 * 1024
    with pytest.raises(DatasetError, match="expands to more than"):
        inspect_dataset(path, ArchiveLimits(max_total_bytes=16 * 1024 * 1024))


def test_undecodable_images_are_listed(tmp_path):
    # An EPS file under an image name must not reach PIL's Ghostscript-based decoder.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    members = {**FOLDER, "dogs/broken.png": b"\x89PNG\r\n\x1a\nnot really", "cats/x.jpg": b"junk", "cats/ps.png": eps}
    with pytest.raises(DatasetError) as caught:
        inspect_dataset(_zip(tmp_path / "d.zip", members))
    assert caught.value.details["undecodable_count"] == 3
    assert "dogs/broken.png" in caught.value.details["undecodable_examples"]


def test_images_in_wrong_place(tmp_path):
    path = _zip(tmp_path / "d.zip", {"top.png": _png(), "a/1.png": _png()})
    with pytest.raises(DatasetError, match="one folder per class"):
        inspect_dataset(path)


def test_npz_and_safetensors_tensors(tmp_path):
    inputs = np.random.default_rng(0).normal(size=(20, 1, 8, 8)).astype(np.float64)
    labels = np.array([0, 1, 2, 10] * 5, dtype=np.int32)
    np.savez(tmp_path / "d.npz", inputs=inputs, labels=labels)
    source, info = inspect_dataset(tmp_path / "d.npz")
    assert source.format == "tensors" and info.classes == ["0", "1", "2", "10"] and info.input_shape == [1, 8, 8]
    data = load_dataset(source, Preprocessing())
    assert data.inputs.dtype == torch.float32 and data.labels.dtype == torch.int64 and len(data) == 20

    save_file({"inputs": torch.from_numpy(inputs).float(), "labels": torch.from_numpy(labels)}, str(tmp_path / "d.st"))
    source, info = inspect_dataset(tmp_path / "d.st")
    assert source.format == "tensors" and info.num_samples == 20


def test_npz_object_arrays_are_refused(tmp_path, marker):
    np.savez(tmp_path / "d.npz", inputs=np.array([[1.0, 2.0]], dtype=object), labels=np.array([0]))
    with pytest.raises(DatasetError, match="pickle"):
        inspect_dataset(tmp_path / "d.npz")


@pytest.mark.parametrize(
    "inputs, labels, match",
    [
        (np.zeros((4, 2)), np.zeros(3, dtype=np.int64), "same"),
        (np.zeros((4, 2)), np.zeros(4, dtype=np.float32), "integer"),
        (np.zeros(4), np.zeros(4, dtype=np.int64), "2 dimensions"),
        (np.full((4, 2), np.nan), np.zeros(4, dtype=np.int64), "NaN"),
        (np.zeros((4, 2)), -np.ones(4, dtype=np.int64), ">= 0"),
    ],
)
def test_bad_tensors(tmp_path, inputs, labels, match):
    np.savez(tmp_path / "d.npz", inputs=inputs, labels=labels)
    with pytest.raises(DatasetError, match=match):
        inspect_dataset(tmp_path / "d.npz")


def test_garbage_dataset(tmp_path):
    (tmp_path / "d").write_bytes(b"definitely not a dataset")
    with pytest.raises(DatasetError, match="not a zip"):
        inspect_dataset(tmp_path / "d")


def test_split_is_deterministic_and_disjoint():
    from worker.engine.types import TensorData

    data = TensorData(torch.arange(50).float()[:, None], torch.arange(50) % 3, ["0", "1", "2"])
    train, held = split(data, 0.2, seed=1)
    again, held_again = split(data, 0.2, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert torch.equal(held.inputs, held_again.inputs)
    assert not set(train.inputs[:, 0].tolist()) & set(held.inputs[:, 0].tolist())
    assert split(data, 0.0, seed=1)[1] is None
