"""Distillation into torchvision students and into a copy of the current model, on real digits."""

from __future__ import annotations

import dataclasses

import pytest

from jobspec.steps import DistillStep
from tests.engine.digits_data import (
    accuracy,
    digits,
    digits_rgb32,
    make_context,
    torch_threads,
    trained_cnn,
    trained_resnet18,
)
from worker.engine.distill import distill
from worker.engine.types import StepError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_kl_distillation_with_feature_loss_into_a_torchvision_student():
    train, evaluation = digits_rgb32()
    teacher = trained_resnet18()
    spec = DistillStep(student="shufflenet_v2_x0_5", loss="kl", feature_loss_weight=1.0, epochs=3, lr=3e-3)
    outcome = distill(teacher, spec, make_context(teacher, train, evaluation))

    student = outcome.model
    assert type(student).__name__ == "ShuffleNetV2"
    assert accuracy(student, evaluation) > 0.5  # chance is 0.1
    details = outcome.details
    assert details["used_labels"] is True and details["batchnorm_recalibrated"] is True
    # resnet18 feeds 512 features to its fc, shufflenet_v2_x0_5 1024: a projection bridges them.
    assert details["feature_loss"] == {"teacher_dim": 512, "student_dim": 1024, "projection": True}
    assert details["student_params"] < details["teacher_params"] / 10
    assert details["student_eval_accuracy"] == pytest.approx(accuracy(student, evaluation))


def test_mse_distillation_needs_no_labels():
    train, evaluation = digits_rgb32()
    teacher = trained_resnet18()
    unlabelled = dataclasses.replace(train, labels=None)
    spec = DistillStep(student="shufflenet_v2_x0_5", loss="mse", epochs=3, lr=3e-3)
    outcome = distill(teacher, spec, make_context(teacher, unlabelled, evaluation))

    assert outcome.details["used_labels"] is False
    assert accuracy(outcome.model, evaluation) > 0.5
    assert outcome.details["eval_top1_agreement"] > 0.5


def test_distill_into_current_copies_the_teacher():
    train, evaluation = digits()
    teacher = trained_cnn()
    spec = DistillStep(student="current", loss="kl", feature_loss_weight=0.5, epochs=1, max_batches_per_epoch=5)
    outcome = distill(teacher, spec, make_context(teacher, train, evaluation))

    assert outcome.model is not teacher
    assert outcome.details["feature_loss"]["projection"] is False  # same widths
    assert accuracy(outcome.model, evaluation) > 0.9


def test_unknown_student_lists_valid_names():
    train, evaluation = digits()
    with pytest.raises(StepError, match="unknown student 'resnet9000'") as info:
        distill(trained_cnn(), DistillStep(student="resnet9000"), make_context(trained_cnn(), train, evaluation))
    assert "mobilenet_v2" in info.value.details["valid_students"]


def test_one_channel_data_into_a_torchvision_student_explains_the_channels():
    train, evaluation = digits()  # 1x8x8
    with pytest.raises(StepError, match="3-channel"):
        distill(trained_cnn(), DistillStep(student="resnet18"), make_context(trained_cnn(), train, evaluation))


def test_distill_needs_training_data():
    _, evaluation = digits()
    with pytest.raises(StepError, match="training dataset"):
        distill(trained_cnn(), DistillStep(student="current"), make_context(trained_cnn(), None, evaluation))
