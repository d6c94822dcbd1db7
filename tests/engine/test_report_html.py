"""report.html: a self-contained page drawn from report.json that escapes user strings and renders in a browser."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from jobspec.steps import PipelineSpec
from worker.engine import PipelineHooks, inspect_model, run_pipeline
from worker.engine.report_html import render_html, reproduce_snippet
from worker.engine.report_plots import MAX_SPARSITY_BARS, latency_points

EVIL = "<img src=x onerror=alert(1)>"
CHROMIUM_TIMEOUT_S = 60


def _metrics(size: int, sparsity: float, top1: float | None, layers: dict[str, float], **extra: Any) -> dict[str, Any]:
    params = 1_000_000
    metrics = {
        "params": params, "nonzero_params": int(params * (1 - sparsity)), "sparsity": sparsity, "layer_sparsity": layers,
        "macs": 50_000_000, "size_bytes": size, "size_format": "safetensors", "compressed_size_bytes": int(size * 0.9),
        "sparse_size_bytes_estimate": size, "eval_samples": 20, **extra,
    }
    if top1 is not None:
        metrics.update(top1=top1, top5=min(1.0, top1 + 0.2))
    return metrics


def _bench(index: int, p50: float, original_p50: float) -> dict[str, Any]:
    rows = []
    for batch in (1, 8):
        model = {"p50_ms": p50 * batch, "p95_ms": p50 * batch * 1.05, "mean_ms": p50 * batch, "min_ms": p50, "throughput_per_s": 1000 / p50}
        original = {"p50_ms": original_p50 * batch, "p95_ms": original_p50 * batch * 1.1, "mean_ms": original_p50 * batch,
                    "min_ms": original_p50, "throughput_per_s": 1000 / original_p50}
        ratio = original_p50 / p50
        rows.append({"batch_size": batch, "model": model, "original": original, "speedup_vs_original": round(ratio, 4),
                     "speedup_significant": ratio >= 1.1, "slowdown_significant": False})
    spec = {"kind": "benchmark", "batch_sizes": [1, 8], "threads": 4, "warmup": 5, "repetitions": 30}
    return {"index": index, "kind": "benchmark", "spec": spec, "duration_s": 2.5,
            "details": {"device": "cpu", "threads": 4, "warmup": 5, "repetitions": 30, "results": rows}}


@pytest.fixture
def report() -> dict[str, Any]:
    """A report shaped like the pipeline's, with a user-controlled layer name carrying markup."""
    layers = {f"features.{i}.conv": round(0.3 + i / 100, 4) for i in range(60)} | {EVIL: 0.99}
    original = _metrics(40 * 2**20, 0.0, 0.81, {name: 0.0 for name in layers})
    pruned = _metrics(40 * 2**20, 0.5, 0.78, layers, top1_agreement=0.9, output_cosine=0.97, output_kl=0.02)
    tuned = _metrics(40 * 2**20, 0.5, 0.80, layers, top1_agreement=0.95, output_cosine=0.99, output_kl=0.01)
    steps = [
        {"index": 0, "kind": "prune", "spec": {"kind": "prune", "amount": 0.5}, "before": original, "after": pruned,
         "details": {"note": EVIL}, "duration_s": 1.2},
        {"index": 1, "kind": "finetune", "spec": {"kind": "finetune", "epochs": 2}, "before": pruned, "after": tuned,
         "details": {}, "duration_s": 30.0},
        {**_bench(2, 10.0, 20.0), "before": tuned, "after": tuned},
    ]
    artifacts = [
        {"name": "model.safetensors", "path": "/w/model.safetensors", "kind": "model", "format": "safetensors", "description": "weights"},
        {"name": "structure.json", "path": "/w/structure.json", "kind": "model", "format": "json", "description": "layout"},
    ]
    return {
        "schema_version": "1",
        "environment": {"torch": "2.5.0", "python": "3.11.7", "device": "cpu", "threads": 4, "cpu": "Test CPU", "cpu_count": 8, "gpu": None},
        "model": {"format": "safetensors", "architecture": "mobilenet_v3_small", "arch_kwargs": {"num_classes": 10},
                  "params": 1_000_000, "num_outputs": 10, "input_shape": [3, 32, 32]},
        "dataset": {"samples": 100, "classes": [EVIL, "cat"], "input_shape": [3, 32, 32], "train_samples": 80, "eval_samples": 20},
        "spec": {"steps": [s["spec"] for s in steps], "device": "cpu", "seed": 0},
        "original": original, "steps": steps, "final": tuned,
        "export": {"safetensors": {"ok": True, "verified": True, "max_abs_diff": 0.0},
                   "onnx": {"ok": False, "reason": f"RuntimeError: exporter said {EVIL}"}},
        "artifacts": artifacts,
        "duration_s": 40.0,
        "verdicts": {"model.safetensors": {"verdict": "faster", "reason": f"2.00x faster at batch size 1 {EVIL}"}},
        "targets": {"met": False, "checks": [
            {"name": "min_speedup", "target": 1.5, "measured": 2.0, "met": True, "reason": "lowest p50 speedup"},
            {"name": "max_size_ratio", "target": 0.5, "measured": 1.0, "met": False, "reason": EVIL},
        ]},
    }


class _Checker(HTMLParser):
    """Collects parse problems: unclosed or mismatched tags (void elements excepted)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "circle", "rect", "line", "polyline", "path"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()


def _parse(html: str) -> _Checker:
    checker = _Checker()
    checker.feed(html)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"unclosed: {checker.stack}"
    return checker


def test_page_is_well_formed_and_has_every_section(report):
    html = render_html(report)
    checker = _parse(html)
    for heading in ("Verdict", "Targets", "Plots", "Steps", "Benchmark", "Exports and artifacts", "Reproduce", "How it was measured"):
        assert heading in html
    assert "mobilenet_v3_small" in html and "Test CPU" in html and "2.5.0" in html
    assert html.count("<svg") == 3  # latency vs size, accuracy, per-layer sparsity
    assert "Step 1: finetune" in html and "1,000,000" in html and "40.00 MiB" in html
    assert "v-faster" in html and "\u2718 missed" in html and "skipped" in html and "exporter said" in html
    assert "5 warm-up and 30 timed forwards" in html
    assert not [t for t, _ in checker.tags if t in {"script", "iframe", "object", "embed", "link", "img"}]


def test_no_external_resources(report):
    html = render_html(report)
    _parse(html)
    lowered = html.lower()
    assert "<script" not in lowered and "@import" not in lowered and "url(" not in lowered
    for tag, attrs in _parse(html).tags:
        for name in ("src", "href", "xlink:href", "action"):
            assert not attrs.get(name), (tag, attrs)
    assert "http://" not in lowered and "https://" not in lowered


def test_user_strings_are_escaped(report):
    html = render_html(report)
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    # the sparsest layer (the malicious name) is drawn, as text only
    assert not [t for t, _ in _parse(html).tags if t == "img"]


def test_sparsity_plot_shows_the_top_layers(report):
    html = render_html(report)
    assert f"the {MAX_SPARSITY_BARS} sparsest of 61 conv / linear layers" in html
    assert "features.59.conv" in html and "features.0.conv" not in html  # 0.30 is below the top 40


def test_verdicts_look_different():
    pages = {
        verdict: render_html({"verdicts": {"m.safetensors": {"verdict": verdict, "reason": "r"}}})
        for verdict in ("faster", "smaller only", "no gain")
    }
    assert 'class="verdict v-faster"' in pages["faster"]
    assert 'class="verdict v-smaller"' in pages["smaller only"]
    assert 'class="verdict v-none"' in pages["no gain"]


def test_accuracy_plot_is_replaced_by_a_note_without_labels(report):
    for metrics in [report["original"], report["final"]] + [m for s in report["steps"] for m in (s["before"], s["after"])]:
        metrics.pop("top1", None)
        metrics.pop("top5", None)
    html = render_html(report)
    assert "no labelled evaluation data" in html and html.count("<svg") == 2


def test_latency_points_follow_the_model_states(report):
    points, batch, notes = latency_points(report)
    assert batch == 1
    assert [(p["label"], p["p50"]) for p in points] == [("original", 20.0), ("1: finetune", 10.0)]
    assert notes == ["not timed: 0: prune (no benchmark step after it)"]


def _quantize_step(index: int, before: dict[str, Any], candidates: Any) -> dict[str, Any]:
    """A static int8 quantize step whose runtime was chosen by timing the candidates side by side."""
    details = {"mode": "static", "backend": "x86", "runtime": "onnxruntime",
               "runtime_choice_note": "onnxruntime was the fastest runtime that met min_fidelity.",
               "runtime_candidates": candidates}
    return {"index": index, "kind": "quantize", "spec": {"kind": "quantize", "mode": "static", "runtime": "auto"},
            "before": before, "after": _metrics(10 * 2**20, 0.5, 0.79, {}), "details": details, "duration_s": 8.0}


def _candidate(runtime: str, **fields: Any) -> dict[str, Any]:
    base = {"runtime": runtime, "available": True, "p50_ms": None, "fp32_p50_ms": None, "speedup_vs_fp32": None,
            "cosine": None, "top1_agreement": None, "meets_fidelity": None, "chosen": False, "reason": None}
    return base | fields


def test_quantize_step_shows_its_runtime_candidates(report):
    candidates = [
        _candidate("fx", p50_ms=6.0, fp32_p50_ms=12.0, speedup_vs_fp32=2.0, cosine=0.998, top1_agreement=0.97,
                   meets_fidelity=True, reason="slower than onnxruntime"),
        _candidate("onnxruntime", p50_ms=4.0, fp32_p50_ms=12.0, speedup_vs_fp32=3.0, cosine=0.995, top1_agreement=0.96,
                   meets_fidelity=True, chosen=True),
        _candidate("pt2e", available=False, reason="torchao is not installed <script>alert(1)</script>"),
    ]
    report["steps"].insert(2, _quantize_step(2, report["final"], candidates))
    html = render_html(report)
    _parse(html)
    assert "int8 runtime: <code>onnxruntime</code>. onnxruntime was the fastest runtime that met min_fidelity." in html
    assert html.count('<tr class="marked">') == 1
    chosen_row = html.split('<tr class="marked">')[1].split("</tr>")[0]
    assert "<code>onnxruntime</code>" in chosen_row and "4.00 ms" in chosen_row and "\u00d73" in chosen_row
    assert "\u2714 chosen" in chosen_row
    assert "<code>fx</code>" in html and "not chosen: slower than onnxruntime" in html
    assert "unavailable: torchao is not installed &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()

    # odd candidate lists still draw; a report without the key draws no runtime table
    for odd in (None, [], "fx", [None, {"runtime": EVIL, "chosen": "yes", "p50_ms": "?"}]):
        report["steps"][2] = _quantize_step(2, report["final"], odd)
        html = render_html(report)
        assert "could not be drawn" not in html and EVIL not in html and '<tr class="marked">' not in html
        assert "int8 runtime: <code>onnxruntime</code>" in html
    del report["steps"][2]["details"]["runtime_candidates"]
    assert "int8 runtime" not in render_html(report)


def _paths(value: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    if depth == 0 or not isinstance(value, (dict, list)):
        return []
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    found = []
    for key in keys:
        if key == "layer_sparsity":
            continue
        found.append(prefix + (key,))
        found += _paths(value[key], prefix + (key,), depth - 1)
    return found


def test_tolerates_missing_and_odd_values(report):
    assert "No steps recorded" in render_html({})
    render_html({"steps": None, "verdicts": [], "environment": "cpu", "final": {"layer_sparsity": {"x": "nan"}}})
    for path in _paths(report):
        for replacement in ("delete", None, "?"):
            broken = copy.deepcopy(report)
            holder = broken
            for key in path[:-1]:
                holder = holder[key]
            if replacement == "delete":
                if isinstance(holder, dict):
                    del holder[path[-1]]
                else:
                    holder.pop(path[-1])
            else:
                holder[path[-1]] = replacement
            html = render_html(broken)
            assert "could not be drawn" not in html, (path, replacement)
            assert EVIL not in html


def test_reproduce_snippet_for_each_artifact_kind(report):
    assert "structure.json" in reproduce_snippet(report) and "torchvision" in reproduce_snippet(report)
    report["artifacts"] = [{"name": "model.torchscript.pt", "kind": "model", "format": "torchscript"}]
    snippet = reproduce_snippet(report)
    assert "torch.jit.load" in snippet and "torchvision" not in snippet and "modelpress" not in snippet.lower()
    assert "WARMUP, REPETITIONS = 5, 30" in snippet and "BATCH_SIZES = [1, 8]" in snippet
    compile(snippet, "snippet", "exec")
    report["reproduce"] = {"command": "modelpress reproduce job-1"}
    assert "modelpress reproduce job-1" in render_html(report)


def test_pipeline_writes_report_html_and_its_snippet_runs(tmp_path, save_safetensors, no_onnx):
    """A real job: report.html is an artifact, drawn from the final report; its timing script rebuilds the
    structurally pruned network with torchvision alone and runs."""
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(num_classes=10)  # few layers: the exports stay quick
    source, _ = inspect_model(save_safetensors(net, tmp_path / "m.safetensors"), "squeezenet1_1", {"num_classes": 10})
    spec = PipelineSpec.model_validate({
        "steps": [{"kind": "prune", "method": "structured", "amount": 0.25},
                  {"kind": "benchmark", "batch_sizes": [1, 2], "warmup": 0, "repetitions": 1}],
        "input_shape": [3, 32, 32], "device": "cpu", "targets": {"max_size_ratio": 0.9},
    })
    workdir = tmp_path / "out"
    result = run_pipeline(source, spec, None, workdir, PipelineHooks())
    page = next(a for a in result.artifacts if a.name == "report.html")
    assert (page.kind, page.format) == ("report", "html")
    assert {"report.json", "report.html"} <= {a["name"] for a in result.report["artifacts"]}
    stored = json.loads((workdir / "report.json").read_text())
    html = page.path.read_text(encoding="utf-8")
    assert html == render_html(stored) and "Targets" in html and "could not be drawn" not in html
    _parse(html)

    script = workdir / "time_it.py"
    script.write_text(reproduce_snippet(stored))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no ModelPress on the path
    done = subprocess.run([sys.executable, "-I", str(script)], cwd=workdir, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 1: p50" in done.stdout and "batch 2: p50" in done.stdout


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is not on PATH; CI must install it (apt-get install -y chromium)")
    return found


def test_renders_in_headless_chromium(tmp_path, report):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not on PATH (apt-get install -y chromium); the page was not rendered")
    from PIL import Image

    (tmp_path / "report.html").write_text(render_html(report), encoding="utf-8")
    shot = tmp_path / "r.png"
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
        (tmp_path / "report.html").as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = image.convert("RGB")
        colors = pixels.getcolors(maxcolors=1 << 20) or []
        assert len(colors) > 50, "the screenshot is (nearly) blank"
        present = {color for _, color in colors}
    # CSS and SVG took effect: the "faster" pill, the latency points and the sparsity bars are drawn.
    for name, rgb in {"faster pill": (0x1A, 0x7F, 0x37), "latency point": (0x09, 0x69, 0xDA), "sparsity bar": (0x82, 0x50, 0xDF)}.items():
        assert rgb in present, f"{name} colour {rgb} is missing from the screenshot"
    if os.environ.get("REPORT_HTML_SCREENSHOT"):  # keep the picture to look at (a CI artifact, say)
        shutil.copy(shot, Path(os.environ["REPORT_HTML_SCREENSHOT"]))
