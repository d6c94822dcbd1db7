"""Static int8 on ONNX Runtime and PT2E + torch.compile, and the choice between runtimes by measurement."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jobspec.steps import PipelineSpec, QuantizeStep
from tests.engine.digits_data import accuracy, digits_rgb32, make_context, trained_resnet18
from worker.engine import PipelineHooks, inspect_dataset, inspect_model, run_pipeline
from worker.engine.device import is_quantized
from worker.engine.quantize import quantize
from worker.engine.runtimes import CompiledPt2eModel, OnnxRuntimeModel
from worker.engine.types import StepError


def _agreement(model: torch.nn.Module, other: torch.nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(inputs).argmax(1) == other(inputs).argmax(1)).float().mean())


@pytest.fixture(scope="module")
def resnet():
    train, evaluation = digits_rgb32()
    return trained_resnet18(), train, evaluation


def test_onnxruntime_static_int8_runs_int8_kernels(resnet):
    import onnx

    model, train, evaluation = resnet
    outcome = quantize(model, QuantizeStep(mode="static", runtime="onnxruntime", calibration_batches=4), make_context(model, train, evaluation))

    quantized = outcome.model
    assert isinstance(quantized, OnnxRuntimeModel) and is_quantized(quantized)
    graph = onnx.load_from_string(quantized.graph_bytes()).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == 21  # 20 convs + fc, per-channel int8
    assert _agreement(model, quantized, evaluation.inputs) > 0.95
    assert accuracy(quantized, evaluation) > accuracy(model, evaluation) - 0.03
    details = outcome.details
    assert details["runtime"] == "onnxruntime" and details["calibration_samples"] == 4 * 32
    assert details["size_ratio"] > 3.5 and len(details["layers_quantized"]) == 21
    assert [row["runtime"] for row in details["runtime_candidates"]] == ["onnxruntime"]
    assert copy.deepcopy(quantized)(evaluation.inputs[:3]).shape == (3, 10)  # sessions are rebuilt, not copied
    # Idle ORT threads must not spin: they would slow the PyTorch model timed right after (inflated speedups).
    options = quantized._session().get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == torch.get_num_threads()


def test_onnxruntime_guard_keeps_layers_fp32_by_node(resnet):
    import onnx

    model, train, evaluation = resnet
    ctx = make_context(model, train, evaluation)
    spec = QuantizeStep(mode="static", runtime="onnxruntime", calibration_batches=2, skip_layers=["conv1", "fc"])
    outcome = quantize(model, spec, ctx)

    graph = onnx.load_from_string(outcome.model.graph_bytes()).graph
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == 19
    assert outcome.details["layers_fp32"] == ["conv1", "fc"]
    assert "onnx_layer_mapping_note" not in outcome.details


def test_pt2e_static_int8_is_compiled_and_drops_fp32_weights(resnet):
    model, train, evaluation = resnet
    outcome = quantize(model, QuantizeStep(mode="static", runtime="pt2e", calibration_batches=2), make_context(model, train, evaluation))

    quantized = outcome.model
    assert isinstance(quantized, CompiledPt2eModel) and is_quantized(quantized)
    int8 = [t for t in quantized.program.state_dict().values() if t.dtype == torch.int8 and t.ndim >= 2]
    assert len(int8) == 21
    # Only the int8 weights (+ fp32 biases, scales) remain: ~4x smaller than the fp32 state.
    assert outcome.details["size_ratio"] > 3.5
    assert _agreement(model, quantized, evaluation.inputs[:64]) > 0.95  # compiled on this call
    assert quantized._compiled is not None


def test_auto_times_every_runtime_and_keeps_the_fastest(resnet):
    model, train, evaluation = resnet
    outcome = quantize(model, QuantizeStep(mode="static", calibration_batches=2), make_context(model, train, evaluation))

    details = outcome.details
    rows = {row["runtime"]: row for row in details["runtime_candidates"]}
    assert set(rows) == {"fx", "onnxruntime", "pt2e"}
    assert all(row["available"] and row["p50_ms"] > 0 and row["fp32_p50_ms"] > 0 for row in rows.values())
    assert sum(row["chosen"] for row in rows.values()) == 1
    chosen = rows[details["runtime"]]
    fastest = min(row["p50_ms"] for row in rows.values())
    assert chosen["chosen"] and chosen["p50_ms"] <= fastest * 1.05 and details["runtime"] in details["runtime_choice_note"]
    # Among runtimes within 5 % of the fastest, the most portable artifact wins (ONNX, TorchScript, .pt2).
    ties = [name for name in ("onnxruntime", "fx", "pt2e") if rows[name]["p50_ms"] <= fastest * 1.05]
    assert details["runtime"] == ties[0]
    for row in rows.values():
        assert row["speedup_vs_fp32"] == pytest.approx(row["fp32_p50_ms"] / row["p50_ms"], rel=1e-3)
        assert row["cosine"] > 0.99
    expected_type = {"fx": torch.fx.GraphModule, "onnxruntime": OnnxRuntimeModel, "pt2e": CompiledPt2eModel}
    assert isinstance(outcome.model, expected_type[details["runtime"]])


def test_auto_reports_a_runtime_that_cannot_be_built(resnet, monkeypatch):
    import worker.engine.quantize_pt2e as pt2e

    def refuse(model, example):
        raise StepError("the model cannot be captured with torch.export for PT2E: <test>")

    monkeypatch.setattr(pt2e, "_export", refuse)
    model, train, evaluation = resnet
    outcome = quantize(model, QuantizeStep(mode="static", calibration_batches=1), make_context(model, train, evaluation))
    rows = {row["runtime"]: row for row in outcome.details["runtime_candidates"]}
    assert rows["pt2e"]["available"] is False and "torch.export" in rows["pt2e"]["reason"]
    assert rows["pt2e"]["chosen"] is False and outcome.details["runtime"] in {"fx", "onnxruntime"}


def test_named_runtime_failure_is_the_step_error(resnet, monkeypatch):
    import worker.engine.quantize_pt2e as pt2e

    monkeypatch.setattr(pt2e, "_export", lambda model, example: (_ for _ in ()).throw(StepError("no export <test>")))
    model, train, evaluation = resnet
    with pytest.raises(StepError, match="no export <test>"):
        quantize(model, QuantizeStep(mode="static", runtime="pt2e"), make_context(model, train, evaluation))


def test_runtime_needs_static_mode():
    with pytest.raises(ValueError, match="does not apply to mode 'dynamic'"):
        QuantizeStep(mode="dynamic", runtime="pt2e")
    with pytest.raises(ValueError, match="does not apply to mode 'fp16'"):
        QuantizeStep(mode="fp16", runtime="onnxruntime")
    assert QuantizeStep.model_validate(QuantizeStep(mode="static", runtime="pt2e").model_dump()).runtime == "pt2e"


@pytest.mark.parametrize("runtime", ["onnxruntime", "pt2e"])
def test_pipeline_writes_the_int8_artifact_and_it_reloads(tmp_path, runtime):
    """prune -> quantize -> benchmark through run_pipeline; the int8 file loads without our code."""
    from safetensors.torch import save_file

    model, (_, evaluation) = trained_resnet18(), digits_rgb32()
    model_path = tmp_path / "in" / "model.safetensors"
    model_path.parent.mkdir()
    save_file(model.state_dict(), str(model_path))
    data_path = tmp_path / "in" / "digits.npz"
    np.savez(data_path, inputs=evaluation.inputs.numpy(), labels=evaluation.labels.numpy())
    model_source, _ = inspect_model(model_path, "resnet18", {"num_classes": 10})
    data_source, _ = inspect_dataset(data_path)
    spec = PipelineSpec.model_validate({
        "steps": [
            {"kind": "prune", "method": "structured", "amount": 0.25},
            {"kind": "quantize", "mode": "static", "runtime": runtime, "calibration_batches": 2},
            {"kind": "benchmark", "batch_sizes": [1, 4], "warmup": 2, "repetitions": 6},
        ],
        "device": "cpu",
    })
    out = tmp_path / "out"
    report = run_pipeline(model_source, spec, data_source, out, PipelineHooks()).report

    quantize_step = report["steps"][1]
    assert quantize_step["details"]["runtime"] == runtime
    after = quantize_step["after"]
    assert after["params"] > 0 and after["macs"] is None and runtime in after["macs_note"]
    assert after["size_bytes"] < quantize_step["before"]["size_bytes"] / 3
    assert after["top1"] >= quantize_step["before"]["top1"] - 0.05  # int8 keeps the pruned model's accuracy
    names = {a["name"] for a in report["artifacts"] if a["kind"] == "model"}
    artifact = {"onnxruntime": "model.int8.onnx", "pt2e": "model.int8.pt2"}[runtime]
    assert names == {artifact}
    fmt = artifact.rsplit(".", 1)[-1]
    assert report["export"][fmt]["ok"] and report["export"][fmt]["verified"], report["export"]
    verdict = report["verdicts"][artifact]
    assert verdict["verdict"] in {"faster", "smaller only", "no gain"} and "not this runtime" not in verdict["reason"]

    x = evaluation.inputs[:5]
    if runtime == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / artifact), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    else:
        with torch.no_grad():
            got = torch.compile(torch.export.load(str(out / artifact)).module())(x)
    assert got.shape == (5, 10) and torch.isfinite(got).all()

    # The report's standalone timing script loads the int8 file without ModelPress and runs.
    script = out / "time_it.py"
    script.write_text(report["reproduce"]["python"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", str(script)], cwd=out, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 1: p50" in done.stdout and "batch 4: p50" in done.stdout


def test_an_uploaded_torch_export_program_gets_int8_on_onnxruntime(resnet, tmp_path):
    """A .pt2 upload has no layer modules: PyTorch's int8 and PT2E say why they cannot apply, and
    ONNX Runtime quantizes the program's graph."""
    from worker.engine.modelio import is_exported, load_exported_artifact

    model, train, evaluation = resnet
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (evaluation.inputs[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    uploaded = load_exported_artifact(tmp_path / "model.pt2")
    assert is_exported(uploaded)

    outcome = quantize(uploaded, QuantizeStep(mode="static", calibration_batches=2), make_context(uploaded, train, evaluation))
    rows = {row["runtime"]: row for row in outcome.details["runtime_candidates"]}
    assert outcome.details["runtime"] == "onnxruntime" and isinstance(outcome.model, OnnxRuntimeModel)
    assert rows["fx"]["available"] is False and "torch.export program" in rows["fx"]["reason"]
    assert rows["pt2e"]["available"] is False and "layer modules" in rows["pt2e"]["reason"]
    assert len(outcome.details["layers_quantized"]) == 21
    assert outcome.details["fidelity"]["cosine"] > 0.99
    assert _agreement(model, outcome.model, evaluation.inputs) > 0.95
