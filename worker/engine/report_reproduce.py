"""Reproduction: a standalone timing script for the job's model and the page section that explains the timings."""

from __future__ import annotations

import json
from typing import Any

from worker.engine.report_format import _DASH, _bench_rows, _benchmarks, _d, _e, _l, _num, _step_label

_LOAD_SAFETENSORS = '''structure = json.load(open("structure.json"))
model = torchvision.models.get_model(structure["architecture"], weights=None, **structure["arch_kwargs"])
modules = dict(model.named_modules())
for name, record in structure["layers"].items():  # structured pruning resized some layers
    for attr, value in record.items():
        if attr != "type" and attr in modules[name].__dict__:
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
for key, shape in structure["tensors"].items():
    owner, _, attr = key.rpartition(".")
    module = modules[owner]
    table = module._parameters if attr in module._parameters else module._buffers
    if table.get(attr) is not None and list(table[attr].shape) != shape:
        fresh = torch.zeros(shape, dtype=table[attr].dtype)
        table[attr] = torch.nn.Parameter(fresh) if table is module._parameters else fresh
dtype = getattr(torch, structure.get("input_dtype", "float32"))
model = model.to(dtype)
model.load_state_dict(load_file("model.safetensors"))'''


# int8 runtimes: the file is timed the way the job timed it, wrapped as a module for the loop below.
_LOAD_INT8_ONNX = '''import onnxruntime
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = torch.get_num_threads()  # the same thread count as PyTorch
options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the job timed it
session = onnxruntime.InferenceSession("model.int8.onnx", options, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name


class Int8Onnx(torch.nn.Module):
    def forward(self, x):
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


model = Int8Onnx()  # int8 kernels of ONNX Runtime, on the CPU
DEVICE = "cpu"
dtype = torch.float32'''
_LOAD_INT8_PT2 = '''import torch._inductor.config
import torchao  # noqa: F401  registers the quantized_decomposed ops the int8 program calls

torch._inductor.config.freezing = True  # folds the int8 weights into prepacked kernels
compiled = torch.compile(torch.export.load("model.int8.pt2").module())  # eager, the program is slow


class Int8Compiled(torch.nn.Module):
    def forward(self, x):
        return compiled(x)


model = Int8Compiled()  # compiles on the first warm-up call; int8 kernels on the CPU
DEVICE = "cpu"
dtype = torch.float32'''


def reproduce_snippet(report: dict[str, Any]) -> str:
    """Standalone Python (torch, torchvision, safetensors or onnxruntime; no ModelPress) that loads the result and times it."""
    names = {_d(a).get("name") for a in _l(report.get("artifacts"))}
    architecture = _d(report.get("model")).get("architecture")
    bench = _d(_benchmarks(report)[-1].get("details")) if _benchmarks(report) else {}
    batch_sizes = [r.get("batch_size") for r in _bench_rows(_benchmarks(report)[-1])] if bench else [1]
    shape = _d(report.get("model")).get("input_shape") or [3, 224, 224]
    device = "cuda" if str(bench.get("device") or _d(report.get("environment")).get("device", "cpu")).startswith("cuda") else "cpu"
    imports = ["import statistics", "import time", "", "import torch"]
    if "model.int8.onnx" in names:
        load = _LOAD_INT8_ONNX
    elif "model.int8.pt2" in names:
        load = _LOAD_INT8_PT2
    elif "model.safetensors" in names and architecture:
        imports[:0] = ["import json"]
        imports += ["import torchvision", "from safetensors.torch import load_file"]
        load = _LOAD_SAFETENSORS
    elif "model.torchscript.pt" in names:
        load = 'model = torch.jit.load("model.torchscript.pt", map_location="cpu")  # int8 models run on the CPU\ndtype = torch.float32'
    elif "model.pt2" in names:
        load = 'model = torch.export.load("model.pt2").module()\ndtype = torch.float32'
    else:
        return "# This job wrote no model artifact that can be loaded and timed."
    settings = (f"INPUT_SHAPE = {json.dumps([int(v) for v in shape if _num(v) is not None])}\n"
                f"BATCH_SIZES = {json.dumps([int(b) for b in batch_sizes if _num(b) is not None] or [1])}\n"
                f"WARMUP, REPETITIONS = {int(_num(bench.get('warmup')) or 5)}, {int(_num(bench.get('repetitions')) or 30)}\n"
                f"DEVICE = {device!r}\n")
    threads = _num(bench.get("threads"))
    if threads is not None:
        settings += f"torch.set_num_threads({int(threads)})\n"
    timing = '''model = model.eval().to(DEVICE)
sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
with torch.no_grad():
    for batch_size in BATCH_SIZES:
        x = torch.randn(batch_size, *INPUT_SHAPE).to(DEVICE, dtype)
        for _ in range(WARMUP):
            model(x)
        sync()
        times = []
        for _ in range(REPETITIONS):
            began = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - began) * 1000)
        times.sort()
        p50, p95 = times[round(0.5 * (len(times) - 1))], times[round(0.95 * (len(times) - 1))]
        print(f"batch {batch_size}: p50 {p50:.2f} ms, p95 {p95:.2f} ms, "
              f"{batch_size * 1000 / statistics.fmean(times):.1f} samples/s")'''
    return "\n".join(imports) + "\n\n" + settings + "\n" + load + "\n\n" + timing + "\n"


def reproduce_section(report: dict[str, Any]) -> str:
    env = _d(report.get("environment"))
    parts = []
    for step in _benchmarks(report):
        details = _d(step.get("details"))
        sizes = ", ".join(_e(r.get("batch_size")) for r in _bench_rows(step))
        parts.append(
            f"<li>step {_e(_step_label(step))}: device {_e(details.get('device', env.get('device', _DASH)))}, "
            f"threads {_e(details.get('threads') or env.get('threads') or 'default')}, batch sizes {sizes or _DASH}, "
            f"{_e(details.get('warmup', '?'))} warm-up and {_e(details.get('repetitions', '?'))} timed forwards per batch size</li>"
        )
    how = ("<p>Each timed forward runs on one input repeated to the batch size, under <code>torch.no_grad()</code>; "
           "the compressed model and the original alternate run by run so that drift affects both alike "
           "(wall clock on the CPU, CUDA events on a GPU). The speedup is the original's p50 over the model's p50; "
           "it counts as significant only when at least 3 in 4 neighbouring pairs of timings show a speedup of 1.1x or more.</p>")
    measured = f"<ul>{''.join(parts)}</ul>" if parts else '<p class="muted">No benchmark step: nothing was timed.</p>'
    command = report.get("reproduce")
    if isinstance(command, dict):
        command = command.get("command")
    if command:
        code = f"<pre><code>{_e(command)}</code></pre>"
    else:
        code = ("<p>Download the model artifacts next to this file and run (needs torch, torchvision and safetensors; "
                "not ModelPress):</p>" + f"<pre><code>{_e(reproduce_snippet(report))}</code></pre>")
    return "<h3>How it was measured</h3>" + how + measured + "<h3>Timing it yourself</h3>" + code

