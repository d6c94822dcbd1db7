"""One pydantic model per compression step, joined by a discriminated union on ``kind``."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
LayerName = Annotated[str, Field(min_length=1, max_length=200)]


class _Spec(BaseModel):
    # Unknown fields are errors: a typo in a spec must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_PRUNE_AMOUNT = 0.5


class PruneStep(_Spec):
    """Remove weights (unstructured) or whole channels / neurons / heads (structured)."""

    kind: Literal["prune"] = "prune"
    method: Literal["unstructured", "structured"] = "unstructured"
    criterion: Literal["l1", "l2", "random", "taylor", "activation", "bn_scale", "fpgm"] = "l1"
    amount: Fraction | None = Field(
        None,
        description=(
            "Fraction of weights (unstructured) or channels / neurons (structured) to remove. Default 0.5; "
            "when head_amount is the only thing asked for, no channels are removed."
        ),
    )
    layer_amounts: dict[LayerName, Fraction] = Field(
        default_factory=dict,
        description="Per-layer ratios, e.g. {'conv1': 0.2, 'layer1.0.conv1': 0.3}; overrides `amount` for those layers.",
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="Unstructured: rank weights within each layer or across all selected layers."
    )
    layer_types: list[Literal["conv", "linear"]] = Field(default_factory=lambda: ["conv", "linear"], min_length=1)
    ignore_layers: list[LayerName] | None = Field(
        None, description="Layers to leave alone; default: the classifier (last Linear)."
    )
    target_macs_reduction: Annotated[float, Field(gt=1.0, le=100.0)] | None = Field(
        None, description="Structured: prune until MACs shrink by this factor (e.g. 2.0), instead of `amount`."
    )
    iterative_steps: Annotated[int, Field(ge=1, le=100)] = 1
    calibration_batches: Annotated[int, Field(ge=1, le=1000)] = 4
    head_amount: Fraction | None = Field(
        None,
        description="Structured, attention models: fraction of attention heads to remove in every attention layer.",
    )

    @model_validator(mode="after")
    def _needs_data(self) -> PruneStep:
        if self.method == "unstructured" and self.criterion not in {"l1", "l2", "random"}:
            raise ValueError("unstructured pruning supports criterion l1, l2 or random")
        if self.method == "unstructured" and self.head_amount is not None:
            raise ValueError("head_amount needs method 'structured'")
        return self

    @property
    def effective_amount(self) -> float | None:
        """The channel / weight ratio to apply; None when only attention heads are to be removed."""
        if self.amount is not None:
            return self.amount
        if self.head_amount is not None and not self.layer_amounts and self.target_macs_reduction is None:
            return None
        return DEFAULT_PRUNE_AMOUNT

    @property
    def needs_data(self) -> bool:
        return self.criterion in {"taylor", "activation"}


class FinetuneStep(_Spec):
    """Train the current model on the job's dataset (optionally distilling from the original)."""

    kind: Literal["finetune"] = "finetune"
    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.01
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    max_batches_per_epoch: Annotated[int, Field(ge=1)] | None = None
    distill_from_original: bool = Field(False, description="Add a KD loss against the unmodified uploaded model.")
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 4.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.5, description="Weight of the distillation loss.")
    gradual_sparsity: Fraction | None = Field(
        None, description="Prune gradually to this unstructured sparsity over the epochs (during-training pruning)."
    )

    needs_data: ClassVar[bool] = True


class DistillStep(_Spec):
    """Train a lighter student network to imitate the current model (the teacher)."""

    kind: Literal["distill"] = "distill"
    student: Annotated[str, Field(min_length=1, max_length=100)] = Field(
        "mobilenet_v2", description="A torchvision classifier name, or 'current' to distill into the current model."
    )
    student_kwargs: dict[str, int | float | bool | str] = Field(default_factory=dict)
    loss: Literal["mse", "kl"] = Field("kl", description="mse: logit matching (needs no labels); kl: Hinton KD + CE.")
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 4.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    feature_loss_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.001
    max_batches_per_epoch: Annotated[int, Field(ge=1)] | None = None

    needs_data: ClassVar[bool] = True


class QuantizeStep(_Spec):
    """Convert to lower precision with real low-precision kernels where the platform has them."""

    kind: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static", "fp16", "bf16", "weight_only"] = "dynamic"
    per_channel: bool = True
    backend: Literal["x86", "qnnpack", "fbgemm"] = "x86"
    calibration_batches: Annotated[int, Field(ge=1, le=1000)] = 8
    skip_layers: list[LayerName] = Field(default_factory=list)
    min_fidelity: Annotated[float, Field(ge=-1.0, le=1.0)] | None = Field(
        None, description="Minimum output cosine similarity to the input model; layers are kept in fp32 to reach it."
    )
    runtime: Literal["auto", "fx", "onnxruntime", "pt2e"] = Field(
        "auto",
        description=(
            "Static / dynamic int8: which runtime runs the result. fx: PyTorch eager int8 kernels (TorchScript "
            "artifact); onnxruntime: ONNX Runtime int8 graph (model.int8.onnx); pt2e (static only): torchao PT2E + "
            "torch.compile (model.int8.pt2, compile it to run fast); auto: build each available one, time them side "
            "by side and keep the fastest that meets min_fidelity."
        ),
    )

    @model_validator(mode="after")
    def _runtime_fits_mode(self) -> QuantizeStep:
        allowed = {"static": ("auto", "fx", "onnxruntime", "pt2e"), "dynamic": ("auto", "fx", "onnxruntime")}
        if self.runtime not in allowed.get(self.mode, ("auto",)):
            raise ValueError(f"runtime {self.runtime!r} does not apply to mode {self.mode!r}")
        return self

    @property
    def needs_data(self) -> bool:
        return self.mode == "static"


class BenchmarkStep(_Spec):
    """Measure size, params, MACs, latency, memory and (with data) accuracy and fidelity."""

    kind: Literal["benchmark"] = "benchmark"
    batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=lambda: [1], min_length=1, max_length=8)
    threads: Annotated[int, Field(ge=1, le=256)] | None = None
    warmup: Annotated[int, Field(ge=0, le=1000)] = 5
    repetitions: Annotated[int, Field(ge=1, le=10000)] = 30

    needs_data: ClassVar[bool] = False


Step = Annotated[
    Union[PruneStep, FinetuneStep, DistillStep, QuantizeStep, BenchmarkStep],
    Field(discriminator="kind"),
]
StepKind = Literal["prune", "finetune", "distill", "quantize", "benchmark"]


class Preprocessing(_Spec):
    """How dataset images become tensors (ImageFolder datasets); tensor datasets are used as stored."""

    image_size: Annotated[int, Field(ge=8, le=1024)] | None = Field(None, description="Resize to a square of this side.")
    mean: list[float] | None = Field(None, min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0.0)]] | None = Field(None, min_length=1, max_length=4)
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.2, description="Share of the dataset held out for accuracy / fidelity measurement."
    )
    seed: int = 0


class Targets(_Spec):
    """Goals the result must meet; a missed target is reported (and fails `modelpress submit --wait`)."""

    max_accuracy_drop: Annotated[float, Field(ge=0.0, le=100.0)] | None = Field(
        None, description="Top-1 accuracy may fall by at most this many percentage points (needs labelled data)."
    )
    min_speedup: Annotated[float, Field(gt=0.0, le=1000.0)] | None = Field(
        None, description="Measured p50 speedup vs the original at every benchmarked batch size (needs a benchmark step)."
    )
    max_size_ratio: Annotated[float, Field(gt=0.0, le=10.0)] | None = Field(
        None, description="Serialized size of the result / the original's."
    )
    min_top1_agreement: Fraction | None = Field(None, description="Share of inputs where the top-1 class is unchanged.")
    min_output_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None


class PipelineSpec(_Spec):
    """The ordered steps of one job plus what the engine needs to run them."""

    steps: list[Step] = Field(min_length=1, max_length=32)
    input_shape: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="One sample's shape without the batch dimension (e.g. [3, 224, 224]); default: the dataset's.",
    )
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    targets: Targets | None = None

    @field_validator("steps")
    @classmethod
    def _bounded_work(cls, steps: list) -> list:
        total_epochs = sum(getattr(s, "epochs", 0) for s in steps)
        if total_epochs > 1000:
            raise ValueError(f"the steps ask for {total_epochs} epochs in all; the limit is 1000")
        return steps

    @property
    def needs_data(self) -> bool:
        return any(step.needs_data for step in self.steps)
