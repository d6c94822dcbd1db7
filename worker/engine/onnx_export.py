"""ONNX artifact: exported with torch.onnx (dynamo exporter) and checked with onnxruntime."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

OPSET = 18


def write_onnx(model: nn.Module, example: torch.Tensor, target: Path) -> None:
    """Export ``model`` to ``target`` with a dynamic batch; the graph's input is named "input"."""
    example = example[:1].expand(2, *example.shape[1:]).contiguous()  # a batch of 1 gets specialized
    # The exporter reports progress on stdout; keep worker logs clean.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=OPSET, input_names=["input"], output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
        )
    program.save(str(target))


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    expected: torch.Tensor,
    path: Path,
    atomic_write: Callable[[Path, Callable[[Path], None]], None],
) -> dict[str, Any]:
    """Write ``path`` and compare onnxruntime's output on ``example`` with ``expected``."""
    import onnxruntime

    pair = torch.cat([example, example])
    atomic_write(path, lambda target: write_onnx(model, example, target))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.from_numpy(session.run(None, {name: pair.numpy()})[0])[:1]
    diff = float((expected.float() - got.float()).abs().max()) if got.shape == expected.shape else float("inf")
    scale = float(expected.float().abs().max()) or 1.0
    verified = diff <= 1e-3 * scale + 1e-4
    result: dict[str, Any] = {"verified": verified, "max_abs_diff": diff, "opset": OPSET}
    if not verified:
        result["reason"] = "onnxruntime's output differs from the in-memory model"
    return result
