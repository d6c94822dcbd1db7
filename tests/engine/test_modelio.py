"""Model upload formats: what is accepted, what is refused, and that nothing unsafe is unpickled."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from worker.engine import ModelError, inspect_model, load_model
from worker.engine.modelio import call_model, classification_architectures, rebuild_model
from worker.engine.export import describe_structure


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape=(2, 3, 32, 32)) -> bool:
    x = torch.randn(*shape)
    with torch.no_grad():
        return torch.allclose(call_model(a, x), call_model(b, x), atol=1e-5)


def test_safetensors_round_trip(tmp_path, small_model, save_safetensors):
    model = small_model()
    path = save_safetensors(model, tmp_path / "weights.bin")  # detection is by content, not extension
    source, info = inspect_model(path, "mobilenet_v3_small", {"num_classes": 10})
    assert source.format == info.format == "safetensors"
    assert info.param_count == sum(p.numel() for p in model.parameters())
    assert info.num_outputs == 10
    assert _same_outputs(model, load_model(source).eval())


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "module_prefix", "legacy_format"])
def test_state_dict_round_trip(tmp_path, small_model, wrap):
    model = small_model()
    state = model.state_dict()
    if wrap == "module_prefix":
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrap in {"state_dict", "model"}:
        payload = {wrap: state, "epoch": 3}
    else:
        payload = state
    # legacy_format: the pre-1.6 non-zip torch.save layout
    torch.save(payload, tmp_path / "model.pt", _use_new_zipfile_serialization=wrap != "legacy_format")
    source, info = inspect_model(tmp_path / "model.pt", "mobilenet_v3_small", {"num_classes": 10})
    assert source.format == "state_dict" and info.num_outputs == 10
    assert _same_outputs(model, load_model(source).eval())


def test_export_program_round_trip(tmp_path):
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    torch.export.save(program, tmp_path / "model.pt2")
    source, info = inspect_model(tmp_path / "model.pt2", "ignored", {})
    assert source.format == "export" and source.architecture is None
    assert info.input_shape == [3, 32, 32] and info.num_outputs == 10
    loaded = load_model(source)
    # Exported at batch 1: call_model still runs any batch size (chunks and pads).
    assert _same_outputs(model, loaded, shape=(3, 3, 32, 32))


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path, small_model, save_safetensors):
    state = dict(small_model(num_classes=10).state_dict())
    state.pop("features.0.0.weight")
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ModelError) as caught:
        inspect_model(tmp_path / "model.pt", "mobilenet_v3_small", {"num_classes": 5})
    details = caught.value.details
    assert details["missing_keys"] == ["features.0.0.weight"]
    assert details["unexpected_keys"] == ["extra.weight"]
    shapes = {m["key"]: m for m in details["shape_mismatches"]}
    assert shapes["classifier.3.weight"]["expected"] == [5, 1024]
    assert shapes["classifier.3.weight"]["got"] == [10, 1024]


def test_classifier_only_mismatch_gets_a_num_classes_hint(tmp_path, small_model, save_safetensors):
    path = save_safetensors(small_model(num_classes=7), tmp_path / "m.safetensors")
    with pytest.raises(ModelError) as caught:
        inspect_model(path, "mobilenet_v3_small", {})
    assert caught.value.details["hint"] == 'the weights are for 7 classes: pass arch_kwargs {"num_classes": 7}'


def test_unknown_architecture_and_bad_kwargs(tmp_path, small_model, save_safetensors):
    path = save_safetensors(small_model(), tmp_path / "m.safetensors")
    with pytest.raises(ModelError) as caught:
        inspect_model(path, "resnet9000", {})
    assert caught.value.details["valid_architectures_example"]
    assert "fasterrcnn_resnet50_fpn" not in classification_architectures()
    with pytest.raises(ModelError, match="arch_kwargs"):
        inspect_model(path, "resnet18", {"no_such_argument": 1})
    with pytest.raises(ModelError, match="architecture"):
        inspect_model(path, None, {})


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload_type", [_ShellPayload, _ExecPayload])
@pytest.mark.parametrize("writer", ["torch_save", "pickle_dump", "inside_state_dict"])
def test_malicious_pickle_is_refused_without_running(tmp_path, marker, payload_type, writer):
    path = tmp_path / "model.pt"
    payload = payload_type(marker)
    if writer == "torch_save":
        torch.save(payload, path)
    elif writer == "inside_state_dict":
        torch.save({"conv.weight": torch.zeros(1), "evil": payload}, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(ModelError) as caught:
        inspect_model(path, "resnet18", {})
    assert "not accepted" in caught.value.message
    assert caught.value.details["accepted_formats"]
    assert not marker.exists()


def test_pickled_full_module_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10), tmp_path / "full.pt")
    with pytest.raises(ModelError, match="full pickled module") as caught:
        inspect_model(tmp_path / "full.pt", "resnet18", {"num_classes": 10})
    assert caught.value.details["refused_object"] == "torchvision.models.resnet.ResNet"


@pytest.mark.parametrize("content", [b"", b"hello, not a model", b"PK\x03\x04truncated", b"\x80\x02trunc"])
def test_garbage_files(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a safetensors, PyTorch state_dict or torch.export file"):
        inspect_model(path, "resnet18", {})


def test_truncated_safetensors(tmp_path, small_model, save_safetensors):
    path = save_safetensors(small_model(), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError):
        inspect_model(path, "mobilenet_v3_small", {"num_classes": 10})


def _rewrite_zip(source: Path, target: Path, edit) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = edit(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)


def test_pt2_with_pickled_weight_is_refused_without_running(tmp_path, marker):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 4),)), tmp_path / "ok.pt2")
    evil = pickle.dumps(_ShellPayload(marker), protocol=2)

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for meta in config["config"].values():
                meta["use_pickle"] = True
            return json.dumps(config).encode()
        if "/data/weights/weight_" in name:
            return evil
        return data

    _rewrite_zip(tmp_path / "ok.pt2", tmp_path / "evil.pt2", edit)
    with pytest.raises(ModelError, match="pickled"):
        inspect_model(tmp_path / "evil.pt2", None, {})
    assert not marker.exists()

    # Compiled-code members (AOTInductor) are refused too.
    _rewrite_zip(tmp_path / "ok.pt2", tmp_path / "aoti.pt2", lambda n, d: d)
    with zipfile.ZipFile(tmp_path / "aoti.pt2", "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/data/aotinductor/model/x.so", b"\x7fELF")
    with pytest.raises(ModelError) as caught:
        inspect_model(tmp_path / "aoti.pt2", None, {})
    assert any("aotinductor" in m for m in caught.value.details["refused_members"])


def test_rebuild_from_structure_restores_resized_layers(small_model):
    model = small_model()
    structure = describe_structure(model, "mobilenet_v3_small", {"num_classes": 10})
    rebuilt = rebuild_model(structure, model.state_dict()).eval()
    assert _same_outputs(model, rebuilt)


def test_safetensors_of_a_versioned_module(tmp_path, save_safetensors):
    # MNASNet refuses a state_dict without module version metadata, which safetensors cannot carry.
    model = torchvision.models.mnasnet0_5(num_classes=10).eval()
    source, _ = inspect_model(save_safetensors(model, tmp_path / "m.safetensors"), "mnasnet0_5", {"num_classes": 10})
    assert _same_outputs(model, load_model(source).eval())
