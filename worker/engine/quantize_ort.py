"""int8 with ONNX Runtime: export the fp32 model to ONNX, quantize the graph with
onnxruntime.quantization (static: calibrated QDQ pairs; dynamic: int8 weights, activations
quantized per call), and run it on ONNX Runtime's int8 CPU kernels."""

from __future__ import annotations

import ast
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobspec.steps import QuantizeStep

from .quantize_guard import CONV_LAYERS, Quantizer, StaticRuntimeQuantizer, graph_layers
from .runtimes import OnnxRuntimeModel
from .types import StepContext, StepError

_ONNX_WEIGHT_OPS = {"Conv": "conv", "Gemm": "linear", "MatMul": "linear"}


class _OrtGraph:
    """The model's fp32 ONNX graph in a scratch folder, and its conv / linear layers' node names."""

    def __init__(self, model: nn.Module, ctx: StepContext):
        try:
            import onnx
            from onnxruntime import quantization  # noqa: F401
        except ImportError as exc:
            raise StepError(f"onnxruntime is not installed in this worker ({exc})") from exc
        from .onnx_export import write_onnx

        self._folder = tempfile.TemporaryDirectory(prefix="modelpress-ort-")
        self.fp32_path = Path(self._folder.name) / "fp32.onnx"
        self.int8_path = Path(self._folder.name) / "int8.onnx"
        example = ctx.example_input.detach().to("cpu")
        try:
            write_onnx(model, example, self.fp32_path)
        except Exception as exc:  # the exporter fails with many exception types
            raise StepError(f"the model cannot be exported to ONNX: {type(exc).__name__}: {str(exc)[:300]}") from exc
        self.fp32_bytes = self.fp32_path.read_bytes()
        self.nodes, self.mapping_note = _layer_nodes(model, example, onnx.load(str(self.fp32_path)))

    def excluded(self, layers: set[str]) -> list[str]:
        return [self.nodes[name] for name in sorted(layers) if name in self.nodes]

    def details(self) -> dict[str, Any]:
        result: dict[str, Any] = {"onnx_fp32_size_bytes": len(self.fp32_bytes)}
        if self.mapping_note:
            result["onnx_layer_mapping_note"] = self.mapping_note
        return result


class OrtStatic(StaticRuntimeQuantizer):
    """Each build re-runs ORT's calibration with the layers kept in fp32 excluded by node name."""

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        super().__init__(model, spec, ctx)
        self.graph = _OrtGraph(model, ctx)

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        with _quiet_root_logger():
            quantize_static(
                str(self.graph.fp32_path),
                str(self.graph.int8_path),
                _Reader(self.batches),
                quant_format=QuantFormat.QDQ,
                per_channel=self.spec.per_channel,
                # u8 activations / s8 weights: the combination ORT's x86 int8 kernels (VNNI) run fastest.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=self.graph.excluded({*keep_fp32, *self.spec.skip_layers}),
            )
        return OnnxRuntimeModel(self.graph.int8_path.read_bytes())

    def details(self) -> dict[str, Any]:
        return {**super().details(), **self.graph.details()}

    def fp32_model(self) -> OnnxRuntimeModel:
        """The same graph in fp32 on ONNX Runtime: separates the runtime's gain from int8's."""
        return OnnxRuntimeModel(self.graph.fp32_bytes)


class OrtDynamic(Quantizer):
    """int8 weights for Linear layers (MatMul / Gemm nodes); activations quantized per call."""

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        self.spec = spec
        self.layers = graph_layers(model, ("linear",), skip=[])
        self.candidates = graph_layers(model, ("linear",), skip=spec.skip_layers)
        if not self.candidates:
            raise StepError("dynamic quantization found no Linear layers to quantize (outside skip_layers)")
        self.graph = _OrtGraph(model, ctx)

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_root_logger():
            quantize_dynamic(
                str(self.graph.fp32_path),
                str(self.graph.int8_path),
                weight_type=QuantType.QInt8,
                per_channel=self.spec.per_channel,
                op_types_to_quantize=["MatMul", "Gemm"],  # ORT's dynamic convs are slower than fp32
                nodes_to_exclude=self.graph.excluded({*keep_fp32, *self.spec.skip_layers}),
            )
        return OnnxRuntimeModel(self.graph.int8_path.read_bytes())

    def details(self) -> dict[str, Any]:
        return self.graph.details()

    def fp32_model(self) -> OnnxRuntimeModel:
        return OnnxRuntimeModel(self.graph.fp32_bytes)


class _quiet_root_logger:
    """ORT's quantizers log a pre-processing suggestion on the root logger at every call."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over our calibration batches."""

    def __init__(self, batches: list[torch.Tensor]):
        self._batches = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch.contiguous().numpy()}

    def rewind(self) -> None:  # part of ORT's reader interface; calibration reads once
        pass


def _layer_nodes(model: nn.Module, example: torch.Tensor, graph_model: Any) -> tuple[dict[str, str], str | None]:
    """Module name -> ONNX node name for conv / linear layers.

    The exporter records each node's module path (`pkg.torch.onnx.name_scopes`): that names a
    Linear's MatMul / Gemm directly. A conv with BatchNorm folded into it is named after the BN,
    so convs fall back to execution order, when the graph's convs line up with the model's calls.
    """
    kinds = {
        name: "conv" if isinstance(module, CONV_LAYERS) else "linear"
        for name, module in model.named_modules()
        if isinstance(module, (*CONV_LAYERS, nn.Linear))
    }
    initializers = {init.name for init in graph_model.graph.initializer}
    nodes = [
        node for node in graph_model.graph.node
        if node.op_type in _ONNX_WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers
    ]
    mapping: dict[str, str] = {}
    for node in nodes:
        scope = _innermost_layer(node, kinds)
        if scope is not None and kinds[scope] == _ONNX_WEIGHT_OPS[node.op_type]:
            mapping.setdefault(scope, node.name)
    unmapped = [node for node in nodes if node.name not in mapping.values()]
    order = [name for name in _call_order(model, example, kinds) if name not in mapping]
    if len(unmapped) == len(order) and all(kinds[n] == _ONNX_WEIGHT_OPS[node.op_type] for n, node in zip(order, unmapped)):
        mapping.update({name: node.name for name, node in zip(order, unmapped)})
        return mapping, None
    return mapping, (
        f"{len(unmapped)} of the ONNX graph's weight layers could not be matched to the model's conv / linear "
        "layers; those layers cannot be kept in fp32 on this runtime"
    )


def _innermost_layer(node: Any, kinds: dict[str, str]) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return next((scope for scope in reversed(scopes) if scope in kinds), None)
    return None


def _call_order(model: nn.Module, example: torch.Tensor, kinds: dict[str, str]) -> list[str]:
    """Conv / linear module names in the order the forward pass first calls them."""
    order: list[str] = []
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: order.append(n) if n not in order else None)
        for name in kinds
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order
