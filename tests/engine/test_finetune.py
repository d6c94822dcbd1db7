"""Fine-tuning on real digits data with a really trained CNN."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from jobspec.steps import FinetuneStep
from tests.engine.digits_data import accuracy, digits, make_context, torch_threads, trained_cnn
from worker.engine.finetune import finetune
from worker.engine.types import Canceled, StepError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _damaged_cnn() -> nn.Module:
    """The trained CNN with noisy conv weights and 60% of them pruned (zeros made permanent)."""
    model = trained_cnn()
    torch.manual_seed(1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.add_(torch.randn_like(conv.weight) * conv.weight.std() * 0.6)
    prune.global_unstructured([(c, "weight") for c in convs], pruning_method=prune.L1Unstructured, amount=0.6)
    for conv in convs:
        prune.remove(conv, "weight")
    return model


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_finetune_recovers_accuracy_and_keeps_pruned_zeros():
    train, evaluation = digits()
    damaged = _damaged_cnn()
    zeros_before = _zero_masks(damaged)
    before = accuracy(damaged, evaluation)
    assert before < 0.8  # the damage is real

    spec = FinetuneStep(epochs=3, optimizer="adam", lr=1e-3, schedule="cosine")
    outcome = finetune(damaged, spec, make_context(trained_cnn(), train, evaluation))

    after = accuracy(outcome.model, evaluation)
    assert after > 0.9 and after > before + 0.1
    assert outcome.details["eval_accuracy_before"] == pytest.approx(before)
    assert outcome.details["eval_accuracy_after"] == pytest.approx(after)
    assert len(outcome.details["train_loss"]) == 3
    assert outcome.details["preexisting_zero_weights_kept"] == sum(int(z.sum()) for z in zeros_before.values())
    for name, module in outcome.model.named_modules():
        if name in zeros_before:
            assert not hasattr(module, "weight_orig")  # masks were made permanent
            assert bool((module.weight[zeros_before[name]] == 0).all()), name


def test_gradual_sparsity_reaches_target_and_spares_the_classifier():
    train, evaluation = digits()
    spec = FinetuneStep(epochs=3, optimizer="sgd", lr=0.01, gradual_sparsity=0.7, schedule="step")
    outcome = finetune(trained_cnn(), spec, make_context(trained_cnn(), train, evaluation))

    convs = [m for m in outcome.model.modules() if isinstance(m, nn.Conv2d)]
    zeros = sum(int((c.weight == 0).sum()) for c in convs)
    total = sum(c.weight.numel() for c in convs)
    assert zeros / total == pytest.approx(0.7, abs=0.01)
    assert int((outcome.model.classifier.weight == 0).sum()) == 0
    report = outcome.details["gradual_sparsity"]
    assert report["reached"] == pytest.approx(0.7, abs=0.01) and report["layers"] == 3
    assert accuracy(outcome.model, evaluation) > 0.8


def test_distillation_from_original_runs_and_reports_progress():
    train, evaluation = digits()
    fractions: list[float] = []
    ctx = make_context(trained_cnn(), train, evaluation, progress=lambda f, _msg: fractions.append(f))
    spec = FinetuneStep(epochs=2, optimizer="adamw", lr=1e-3, distill_from_original=True, alpha=0.7, max_batches_per_epoch=5)
    outcome = finetune(_damaged_cnn(), spec, ctx)

    assert outcome.details["distilled_from_original"] is True
    assert all(loss == loss and loss > 0 for loss in outcome.details["train_loss"])  # finite, positive
    assert len(fractions) == 10 and fractions[-1] == pytest.approx(1.0)
    assert fractions == sorted(fractions)


def test_cancel_stops_training_and_leaves_no_masks():
    train, evaluation = digits()
    calls = {"n": 0}

    def check_canceled() -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise Canceled("canceled by test")

    model = _damaged_cnn()
    with pytest.raises(Canceled):
        finetune(model, FinetuneStep(epochs=5), make_context(trained_cnn(), train, evaluation, check_canceled=check_canceled))
    assert not prune.is_pruned(model)


def test_finetune_needs_labelled_training_data():
    train, evaluation = digits()
    with pytest.raises(StepError, match="training dataset"):
        finetune(trained_cnn(), FinetuneStep(), make_context(trained_cnn(), None, evaluation))
    unlabelled = dataclasses.replace(train, labels=None)
    with pytest.raises(StepError, match="labels"):
        finetune(trained_cnn(), FinetuneStep(), make_context(trained_cnn(), unlabelled, evaluation))
