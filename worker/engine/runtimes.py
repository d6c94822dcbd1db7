"""int8 models that run outside eager PyTorch modules, wrapped as modules so the pipeline can
evaluate, time and export them like any other model.

- OnnxRuntimeModel: an ONNX QDQ graph run by ONNX Runtime's int8 kernels.
- CompiledPt2eModel: a torchao PT2E int8 program run through torch.compile (inductor fuses the
  quantize / dequantize pairs into int8 kernels; run eagerly, the same program is slower than fp32).

Both carry ``int8_runtime`` (the runtime's name), which device.is_quantized reads, so techniques
that edit layers refuse them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from worker.engine.modelio import compare_outputs


def _numel_by_name(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors.items() if t.numel() > 0}


class OnnxRuntimeModel(nn.Module):
    """An ONNX graph executed by onnxruntime on CPU; the graph bytes are its only state."""

    int8_runtime = "onnxruntime"
    artifact_name = "model.int8.onnx"

    def __init__(self, onnx_bytes: bytes):
        super().__init__()
        # A uint8 buffer: the state_dict (and so the measured size) is exactly the stored graph.
        self.register_buffer("onnx_model", torch.frombuffer(bytearray(onnx_bytes), dtype=torch.uint8))
        self._sessions: dict[int, Any] = {}

    def graph_bytes(self) -> bytes:
        return self.onnx_model.numpy().tobytes()

    def _session(self) -> Any:
        # The session follows torch's thread count (rebuilt when it changes): benchmarks set it, and
        # the comparison with PyTorch is fair only when ONNX Runtime uses as many threads.
        threads = torch.get_num_threads()
        session = self._sessions.get(threads)
        if session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # ORT's idle threads spin on the cores after each run; timed in alternation with PyTorch
            # (as benchmarks do) that doubled the fp32 model's p50 here (3.4 -> 7.4 ms, ResNet-18 at
            # 32 px) and so inflated int8's speedup. Without spinning the ratio is honest.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(self.graph_bytes(), options, providers=["CPUExecutionProvider"])
            self._sessions = {threads: session}
        return session

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        session = self._session()
        feed = {session.get_inputs()[0].name: inputs.detach().cpu().contiguous().numpy()}  # ids stay int64
        return torch.from_numpy(session.run(None, feed)[0])

    def __deepcopy__(self, memo: dict) -> OnnxRuntimeModel:
        return OnnxRuntimeModel(self.graph_bytes())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The graph's weights and biases (quantization scales and zero points left out)."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load_from_string(self.graph_bytes()).graph
        tensors = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
            for init in graph.initializer
            if not init.name.endswith(("_scale", "_zero_point"))
        }
        return _numel_by_name(tensors)

    def write_artifacts(
        self, workdir: Path, example: torch.Tensor, expected: torch.Tensor, write: Callable[[Path, Callable[[Path], None]], None]
    ) -> dict[str, Any]:
        """Write the graph and check that a fresh ONNX Runtime session reproduces the outputs."""
        import onnxruntime

        path = Path(workdir) / self.artifact_name
        write(path, lambda p: p.write_bytes(self.graph_bytes()))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: example.contiguous().numpy()})[0]
        return compare_outputs(expected, torch.from_numpy(got))


class CompiledPt2eModel(nn.Module):
    """A PT2E-converted int8 program, compiled with inductor on first use."""

    int8_runtime = "pt2e"
    artifact_name = "model.int8.pt2"

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program
        self._compiled: Callable[..., Any] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            import torch._inductor.config as inductor_config

            # Freezing constant-folds the dequantized weights into prepacked int8 ones; without it
            # inductor keeps per-call weight quantization and most of the speedup is lost.
            inductor_config.freezing = True
            self._compiled = torch.compile(self.program)
        with torch.no_grad():
            return self._compiled(inputs)

    def train(self, mode: bool = True) -> CompiledPt2eModel:
        # Inference only; exported programs refuse train()/eval() (their BN/dropout ops are fixed).
        return self

    def __deepcopy__(self, memo: dict) -> CompiledPt2eModel:
        return CompiledPt2eModel(copy.deepcopy(self.program, memo))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled"] = None
        return state

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        state = self.program.state_dict()
        return _numel_by_name({k: v for k, v in state.items() if not k.endswith(("scale", "zero_point"))})

    def write_artifacts(
        self, workdir: Path, example: torch.Tensor, expected: torch.Tensor, write: Callable[[Path, Callable[[Path], None]], None]
    ) -> dict[str, Any]:
        """torch.export the int8 program with a dynamic batch; reload it and compare with the eager program.

        The reference is the uncompiled program: the reloaded file runs eagerly too, and inductor's
        fused kernels round differently by up to one quantization step.
        """
        batch = torch.export.Dim("batch", min=1, max=4096)
        pair = example[:1].expand(2, *example.shape[1:]).contiguous()  # a batch of 1 would be specialized
        with torch.no_grad():
            exported = torch.export.export(self.program, (pair,), dynamic_shapes=({0: batch},))
            reference = self.program(example)
        path = Path(workdir) / self.artifact_name
        write(path, lambda p: torch.export.save(exported, str(p)))
        with torch.no_grad():
            got = torch.export.load(str(path)).module()(example)
        return {**compare_outputs(reference, got), "note": "import torchao (it registers the int8 ops), then run it fast with torch.compile(torch.export.load(path).module())"}


def int8_runtime(model: nn.Module) -> str | None:
    """The runtime name of an OnnxRuntimeModel / CompiledPt2eModel, None for eager PyTorch models."""
    name = getattr(model, "int8_runtime", None)
    return name if isinstance(name, str) else None
