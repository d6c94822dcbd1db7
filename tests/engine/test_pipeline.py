"""End-to-end pipeline runs: steps in order, before/after metrics, loadable artifacts, report.json."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from jobspec.steps import PipelineSpec
from worker.engine import Canceled, PipelineHooks, StepError, inspect_dataset, inspect_model, run_pipeline
from worker.engine.modelio import load_artifacts, load_exported_artifact


@pytest.fixture(scope="module")
def resnet_source(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "resnet18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=10).state_dict(), str(path))
    source, _ = inspect_model(path, "resnet18", {"num_classes": 10})
    return source


def test_prune_then_benchmark_end_to_end(tmp_path, resnet_source):
    events = []
    hooks = PipelineHooks(
        on_step_start=lambda i, kind: events.append(("start", i, kind)),
        on_step_end=lambda i, kind, summary: events.append(("end", i, kind, summary)),
        on_progress=lambda percent, message: events.append(("progress", percent)),
    )
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "amount": 0.5}, {"kind": "benchmark", "batch_sizes": [1, 2], "warmup": 1, "repetitions": 3}],
        "input_shape": [3, 32, 32],
        "device": "cpu",
    })
    result = run_pipeline(resnet_source, spec, None, tmp_path, hooks)
    report = result.report

    assert report["schema_version"] == "1"
    assert report["environment"]["torch"] == torch.__version__
    assert [s["kind"] for s in report["steps"]] == ["prune", "benchmark"]
    prune_step = report["steps"][0]
    assert prune_step["before"]["sparsity"] < 0.01
    assert prune_step["after"]["sparsity"] > 0.45
    assert prune_step["spec"]["amount"] == 0.5
    assert report["final"]["compressed_size_bytes"] < report["original"]["compressed_size_bytes"]
    rows = report["steps"][1]["details"]["results"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert all(r["speedup_vs_original"] > 0 and r["model"]["p50_ms"] > 0 for r in rows)
    assert report["verdicts"]["model.safetensors"]["verdict"] in {"faster", "smaller only", "no gain"}

    assert ("start", 0, "prune") in events and any(e[0] == "end" and e[1] == 1 for e in events)
    percents = [e[1] for e in events if e[0] == "progress"]
    assert percents == sorted(percents) and percents[-1] == 100.0

    names = {a.name for a in result.artifacts}
    assert {"model.safetensors", "structure.json", "model.pt2", "model.torchscript.pt", "model.onnx", "report.json"} <= names
    assert all(a.path.exists() for a in result.artifacts)
    assert json.loads((tmp_path / "report.json").read_text())["steps"][0]["kind"] == "prune"
    assert all(status["ok"] and status["verified"] for name, status in report["export"].items()), report["export"]
    assert not list(tmp_path.glob(".tmp-*"))

    # Every artifact loads back and reproduces the pruned model.
    x = torch.randn(2, 3, 32, 32)
    reference = load_artifacts(tmp_path).eval()
    assert float((reference.layer1[0].conv1.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(load_exported_artifact(tmp_path / "model.pt2")(x), expected, atol=1e-4)
        assert torch.allclose(torch.jit.load(str(tmp_path / "model.torchscript.pt"))(x), expected, atol=1e-4)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, expected.numpy(), atol=1e-4)


def _tensor_dataset(tmp_path, classes=10, count=40):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "data.npz",
        inputs=rng.normal(size=(count, 3, 64, 64)).astype(np.float32),
        labels=np.arange(count) % classes,
    )
    return inspect_dataset(tmp_path / "data.npz")[0]


def test_dataset_gives_accuracy_and_fidelity(tmp_path, save_safetensors, no_onnx):
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=10)
    source, _ = inspect_model(save_safetensors(model, tmp_path / "m.safetensors"), "squeezenet1_0", {"num_classes": 10})
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "amount": 0.3, "scope": "global"}],
        "preprocessing": {"eval_fraction": 0.25},
    })
    report = run_pipeline(source, spec, _tensor_dataset(tmp_path), tmp_path / "out", PipelineHooks()).report
    assert report["dataset"]["eval_samples"] == 10 and report["dataset"]["train_samples"] == 30
    assert report["model"]["input_shape"] == [3, 64, 64]  # taken from the dataset
    original, final = report["original"], report["final"]
    assert 0.0 <= original["top1"] <= 1.0 and "top5" in original
    assert 0.0 <= final["top1_agreement"] <= 1.0 and -1.0 <= final["output_cosine"] <= 1.0
    assert final["output_kl"] >= 0.0


def test_step_needing_data_without_dataset(tmp_path, resnet_source):
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "benchmark"}, {"kind": "prune", "method": "structured", "criterion": "taylor"}],
        "input_shape": [3, 32, 32],
    })
    with pytest.raises(StepError) as caught:
        run_pipeline(resnet_source, spec, None, tmp_path, PipelineHooks())
    assert caught.value.details == {"step_index": 1, "kind": "prune"}


def test_input_shape_required_without_dataset(tmp_path, resnet_source):
    spec = PipelineSpec.model_validate({"steps": [{"kind": "benchmark"}]})
    with pytest.raises(StepError, match="input_shape"):
        run_pipeline(resnet_source, spec, None, tmp_path, PipelineHooks())


def test_wrong_input_shape_is_a_step_error(tmp_path, resnet_source):
    spec = PipelineSpec.model_validate({"steps": [{"kind": "benchmark"}], "input_shape": [5, 32, 32]})
    with pytest.raises(StepError, match="does not accept"):
        run_pipeline(resnet_source, spec, None, tmp_path, PipelineHooks())


def test_cancel_between_steps(tmp_path, resnet_source):
    started = []

    def check() -> None:
        if started:
            raise Canceled("canceled by the user")

    hooks = PipelineHooks(on_step_start=lambda i, kind: started.append(i), check_canceled=check)
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "amount": 0.2}, {"kind": "benchmark", "repetitions": 1}],
        "input_shape": [3, 32, 32],
    })
    with pytest.raises(Canceled):
        run_pipeline(resnet_source, spec, None, tmp_path, hooks)
    assert started == [0]
    assert not (tmp_path / "report.json").exists()


def test_engine_import_stays_off_the_web_stack():
    code = (
        "import sys, worker.engine, worker.engine.pipeline\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'app') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_exported_program_source(tmp_path, no_onnx):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    ).eval()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 16, 16),)), tmp_path / "net.pt2")
    source, info = inspect_model(tmp_path / "net.pt2", None, {})
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "amount": 0.5, "ignore_layers": []}, {"kind": "benchmark", "batch_sizes": [1, 3], "repetitions": 2}],
    })
    result = run_pipeline(source, spec, None, tmp_path / "out", PipelineHooks())
    report = result.report
    assert report["model"]["input_shape"] == [3, 16, 16]  # from the program's example input
    assert report["final"]["sparsity"] > 0.4 and report["final"]["macs"] > 0
    assert report["export"]["pt2"]["verified"] and not report["export"]["onnx"]["ok"]
    program = load_exported_artifact(tmp_path / "out" / "model.pt2")
    assert float((program.get_parameter("0.weight") == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_imagefolder_dataset_end_to_end(tmp_path, save_safetensors, no_onnx):
    import io
    import zipfile

    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    with zipfile.ZipFile(tmp_path / "digits.zip", "w") as archive:
        for index in range(30):
            label = int(digits.target[index])
            buffer = io.BytesIO()
            Image.fromarray((digits.images[index] * 16).astype(np.uint8), mode="L").save(buffer, format="PNG")
            archive.writestr(f"digits/class_{label}/{index}.png", buffer.getvalue())
    dataset, info = inspect_dataset(tmp_path / "digits.zip")
    assert info.classes == [f"class_{d}" for d in range(10)] and info.input_shape == [3, 8, 8]

    torch.manual_seed(0)
    source, _ = inspect_model(
        save_safetensors(torchvision.models.squeezenet1_0(num_classes=10), tmp_path / "m.safetensors"), "squeezenet1_0", {"num_classes": 10}
    )
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "amount": 0.2}],
        "preprocessing": {"image_size": 32, "mean": [0.5], "std": [0.25], "eval_fraction": 0.2},
    })
    report = run_pipeline(source, spec, dataset, tmp_path / "out", PipelineHooks()).report
    assert report["dataset"]["input_shape"] == [3, 32, 32] and report["dataset"]["eval_samples"] == 6
    assert report["original"]["eval_samples"] == 6 and "top1" in report["final"]
