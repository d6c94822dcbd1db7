from __future__ import annotations

import io
import os
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest

from app.core.config import get_settings
from tests import factories
from tests.api.conftest import upload


def _blob_count() -> int:
    blobs = get_settings().blob_dir
    return sum(1 for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else 0


def _assert_rejected(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def test_safetensors_upload_is_validated_and_recorded(client):
    content = factories.safetensors_bytes()
    response = upload(client, "/v1/models", content, "m.safetensors", architecture="mobilenet_v3_small",
                      arch_kwargs='{"num_classes": 10}')
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["format"] == "safetensors"
    import torchvision

    expected = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10)
    assert body["param_count"] == sum(p.numel() for p in expected.parameters())
    assert body["num_outputs"] == 10
    assert response.headers["location"] == f"/v1/models/{body['id']}"
    assert client.get(f"/v1/models/{body['id']}").json()["sha256"] == body["sha256"]


def test_state_dict_pt_upload(client):
    response = upload(client, "/v1/models", factories.state_dict_pt_bytes(), "m.pt",
                      architecture="mobilenet_v3_small", arch_kwargs='{"num_classes": 10}')
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "state_dict"


def test_exported_program_upload_needs_no_architecture(client):
    response = upload(client, "/v1/models", factories.exported_program_bytes(), "m.pt2")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "export"
    assert body["input_shape"] == [3, 32, 32]


def test_unknown_architecture_is_422_and_leaves_nothing(client):
    blobs = _blob_count()
    response = upload(client, "/v1/models", factories.safetensors_bytes(), "m.safetensors",
                      architecture="resnet9000")
    error = _assert_rejected(response, 422)
    assert "resnet9000" in error["message"]
    assert _blob_count() == blobs
    assert all(m["architecture"] != "resnet9000" for m in client.get("/v1/models").json()["items"])


def test_mismatched_weights_name_the_keys_and_shapes(client):
    response = upload(client, "/v1/models", factories.safetensors_bytes(num_classes=10), "m.safetensors",
                      architecture="mobilenet_v3_small", arch_kwargs='{"num_classes": 7}')
    error = _assert_rejected(response, 422)
    assert "classifier.3.weight" in str(error["details"])


def test_pickled_module_is_refused_with_the_accepted_formats(client):
    error = _assert_rejected(upload(client, "/v1/models", factories.pickled_module_bytes(), "m.pt",
                                    architecture="squeezenet1_1"), 422)
    assert "safetensors" in error["message"].lower() or "safetensors" in str(error["details"]).lower()


def test_malicious_pickle_never_runs(client, tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    content = factories.malicious_pickle_pt_bytes(str(marker))
    _assert_rejected(upload(client, "/v1/models", content, "evil.pt", architecture="squeezenet1_1"), 422)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a model at all", b"\x00" * 64], ids=["text", "zeros"])
def test_garbage_model_file_is_422(client, content):
    _assert_rejected(upload(client, "/v1/models", content, "m.bin", architecture="squeezenet1_1"), 422)


def test_truncated_safetensors_is_422(client):
    content = factories.safetensors_bytes("squeezenet1_1")
    _assert_rejected(upload(client, "/v1/models", content[: len(content) // 2], "m.safetensors",
                            architecture="squeezenet1_1"), 422)


def test_empty_file_is_422(client):
    _assert_rejected(upload(client, "/v1/models", b"", "m.safetensors", architecture="squeezenet1_1"), 422,
                     "empty_file")


def test_bad_arch_kwargs_json_is_422(client):
    error = _assert_rejected(upload(client, "/v1/models", b"x", "m.pt", architecture="resnet18",
                                    arch_kwargs="{not json"), 422)
    assert error["details"]["field"] == "arch_kwargs"


def test_oversized_upload_is_413(client, monkeypatch):
    from app.core import config

    limited = config.Settings(MODELPRESS_MAX_UPLOAD_BYTES=1000)
    from app.main import app
    from app.api.deps import current_settings as settings_dep

    app.dependency_overrides[settings_dep] = lambda: limited
    try:
        blobs = _blob_count()
        response = upload(client, "/v1/models", b"x" * 5000, "big.pt", architecture="resnet18")
        _assert_rejected(response, 413, "upload_too_large")
        assert _blob_count() == blobs
    finally:
        app.dependency_overrides.pop(settings_dep, None)


def test_npz_dataset_upload(client):
    response = upload(client, "/v1/datasets", factories.digits_npz(100), "digits.npz")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "tensors"
    assert body["num_samples"] == 100
    assert body["input_shape"] == [3, 32, 32]
    assert len(body["classes"]) == 10


def test_imagefolder_zip_dataset_upload(client):
    response = upload(client, "/v1/datasets", factories.digits_imagefolder_zip(60), "digits.zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "imagefolder"
    assert body["num_samples"] == 60
    assert body["classes"] == [str(i) for i in range(10)]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_slip_dataset_is_rejected(client):
    png = factories.digits_imagefolder_zip(1)
    with zipfile.ZipFile(io.BytesIO(png)) as archive:
        image = archive.read(archive.namelist()[0])
    content = _zip({"a/1.png": image, "../../evil/2.png": image})
    error = _assert_rejected(upload(client, "/v1/datasets", content, "evil.zip"), 422)
    assert "evil" in str(error)


def test_tar_with_symlink_is_rejected(client):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("cls/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    _assert_rejected(upload(client, "/v1/datasets", buffer.getvalue(), "evil.tar.gz"), 422)


def test_corrupt_archive_is_rejected(client):
    content = factories.digits_imagefolder_zip(20)
    _assert_rejected(upload(client, "/v1/datasets", content[: len(content) // 3], "cut.zip"), 422)


def test_unknown_object_is_404(client):
    for path in ("/v1/models/nope", "/v1/datasets/nope", "/v1/jobs/nope"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_uploads_are_content_addressed(client):
    content = factories.digits_npz(50)
    first = upload(client, "/v1/datasets", content, "a.npz").json()
    second = upload(client, "/v1/datasets", content, "b.npz").json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    from app.storage import get_blob_store

    assert get_blob_store().local_path(first["sha256"]).read_bytes() == content


def test_list_pagination_walks_every_model_once(client):
    ids = set()
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/models", params=params).json()
        ids.update(m["id"] for m in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(ids) == len(client.get("/v1/models", params={"limit": 200}).json()["items"])


def test_no_temporary_files_are_left(client):
    tmp = get_settings().tmp_dir
    assert not tmp.exists() or not any(Path(tmp).iterdir()), os.listdir(tmp)
