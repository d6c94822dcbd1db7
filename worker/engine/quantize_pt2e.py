"""Static int8 with torchao's PT2E flow: torch.export, X86InductorQuantizer, calibrate, convert; the
result runs through torch.compile, whose inductor backend fuses the int8 ops."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from jobspec.steps import QuantizeStep

from .quantize_guard import StaticRuntimeQuantizer
from .runtimes import CompiledPt2eModel
from .types import StepContext, StepError


class Pt2eStatic(StaticRuntimeQuantizer):
    """Exports once; each build annotates, calibrates and converts a fresh copy of the graph."""

    def __init__(self, model: nn.Module, spec: QuantizeStep, ctx: StepContext):
        try:
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
        except ImportError as exc:
            raise StepError(f"torchao (PT2E) is not installed in this worker ({exc})") from exc
        from .modelio import is_exported

        if is_exported(model):
            raise StepError("PT2E re-exports the model and names layers by module; an uploaded torch.export "
                            "program has no layer modules (runtime 'onnxruntime' quantizes programs)")
        super().__init__(model, spec, ctx)
        self.program = _export(model, ctx.example_input.detach().to("cpu"))

    def build(self, keep_fp32: frozenset[str]) -> nn.Module:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        for name in sorted({*keep_fp32, *self.spec.skip_layers}):
            quantizer.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(copy.deepcopy(self.program.module()), quantizer)
        with torch.no_grad():
            for batch in self.batches:
                self.ctx.check_canceled()
                prepared(batch)
        converted = convert_pt2e(prepared)
        _drop_unused_state(converted)
        return CompiledPt2eModel(converted)

    def fidelity_view(self, model: nn.Module) -> nn.Module:
        # The eager program computes what the compiled one does (up to rounding of fused kernels),
        # without a compile per guard round.
        return model.program

    def details(self) -> dict[str, Any]:
        return {**super().details(), "compile": "torch.compile (inductor, freezing=True) on first call"}


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch. strict=True first: non-strict export merges the calls of a
    reused module (torchvision's BasicBlock calls self.relu twice) and the x86 quantizer rejects that."""
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    example = example[:1].expand(2, *example.shape[1:]).contiguous()  # a batch of 1 would be specialized
    errors = []
    for strict in (True, False):
        try:
            return torch.export.export(copy.deepcopy(model).eval(), (example,), dynamic_shapes=dynamic, strict=strict)
        except Exception as exc:  # export fails with many exception types
            errors.append(f"strict={strict}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    raise StepError("the model cannot be captured with torch.export for PT2E: " + "; ".join(errors))


def _drop_unused_state(graph_module: torch.fx.GraphModule) -> None:
    """convert_pt2e folds int8 weights into new constants but keeps the fp32 originals as
    attributes (ResNet-18: 56 MB instead of 11 MB); drop every tensor the graph no longer reads."""
    used = {node.target for node in graph_module.graph.nodes if node.op == "get_attr"}
    names = [name for name, _ in graph_module.named_parameters()] + [name for name, _ in graph_module.named_buffers()]
    for name in names:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
        delattr(owner, attr)
