"""Static int8 with ONNX Runtime: export the fp32 model to ONNX, calibrate and insert QDQ pairs with
onnxruntime.quantization, and run the graph on ONNX Runtime's int8 CPU kernels."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobspec.steps import QuantizeStep

from .quantize_guard import CONV_LAYERS, StaticRuntimeQuantizer
from .runtimes import OnnxRuntimeModel
from .types import StepContext, StepError

_ONNX_WEIGHT_OPS = {"Conv": "conv", "Gemm": "linear", "MatMul": "linear"}


class OrtStatic(StaticRuntimeQuantizer):
    """Each build re-runs ORT's calibration with the layers kept in fp32 excluded by node name."""

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        try:
            import onnx
            from onnxruntime import quantization  # noqa: F401
        except ImportError as exc:
            raise StepError(f"onnxruntime is not installed in this worker ({exc})") from exc
        from .onnx_export import write_onnx

        super().__init__(model, spec, ctx)
        self._folder = tempfile.TemporaryDirectory(prefix="modelpress-ort-")
        self.fp32_path = Path(self._folder.name) / "fp32.onnx"
        example = ctx.example_input.detach().to("cpu")
        try:
            write_onnx(model, example, self.fp32_path)
        except Exception as exc:  # the exporter fails with many exception types
            raise StepError(f"the model cannot be exported to ONNX: {type(exc).__name__}: {str(exc)[:300]}") from exc
        self.fp32_bytes = self.fp32_path.read_bytes()
        self.nodes, self.mapping_note = _layer_nodes(model, example, onnx.load(str(self.fp32_path)))

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        excluded = [self.nodes[name] for name in sorted({*keep_fp32, *self.spec.skip_layers}) if name in self.nodes]
        target = Path(self._folder.name) / "int8.onnx"
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # ORT logs a pre-processing suggestion on the root logger each call
        try:
            quantize_static(
                str(self.fp32_path),
                str(target),
                _Reader(self.batches),
                quant_format=QuantFormat.QDQ,
                per_channel=self.spec.per_channel,
                # u8 activations / s8 weights: the combination ORT's x86 int8 kernels (VNNI) run fastest.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
            )
        finally:
            logger.setLevel(level)
        return OnnxRuntimeModel(target.read_bytes())

    def details(self) -> dict[str, Any]:
        result = {**super().details(), "onnx_fp32_size_bytes": len(self.fp32_bytes)}
        if self.mapping_note:
            result["onnx_layer_mapping_note"] = self.mapping_note
        return result

    def fp32_model(self) -> OnnxRuntimeModel:
        """The same graph in fp32 on ONNX Runtime: separates the runtime's gain from int8's."""
        return OnnxRuntimeModel(self.fp32_bytes)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over our calibration batches."""

    def __init__(self, batches: list[torch.Tensor]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch.float().numpy()}

    def rewind(self) -> None:  # part of ORT's reader interface; calibration reads once
        pass


def _layer_nodes(model: nn.Module, example: torch.Tensor, graph_model: Any) -> tuple[dict[str, str], str | None]:
    """Module name -> ONNX node name for conv / linear layers, by execution order.

    The exporter folds BatchNorm into the conv and names the fused node after the BN, so names
    cannot be matched; the order of the weight-carrying nodes follows the forward pass instead.
    """
    order: list[tuple[str, str]] = []
    hooks = []
    for name, module in model.named_modules():
        kind = "conv" if isinstance(module, CONV_LAYERS) else "linear" if isinstance(module, nn.Linear) else None
        if kind:
            hooks.append(module.register_forward_hook(lambda m, a, o, n=name, k=kind: order.append((n, k))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    initializers = {init.name for init in graph_model.graph.initializer}
    nodes = [
        (node.name, _ONNX_WEIGHT_OPS[node.op_type])
        for node in graph_model.graph.node
        if node.op_type in _ONNX_WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers
    ]
    if len(nodes) != len(order) or any(k1 != k2 for (_, k1), (_, k2) in zip(order, nodes)):
        return {}, (
            f"the ONNX graph's {len(nodes)} weight layers do not line up with the model's {len(order)} "
            "conv / linear calls, so no layer can be kept in fp32 on this runtime"
        )
    return {name: node for (name, _), (node, _) in zip(order, nodes)}, None
