"""Unstructured pruning: real zeros in the weights, per layer or global, with named-layer control."""

from __future__ import annotations

import pytest
import torch

from jobspec.steps import PruneStep
from worker.engine import StepError
from worker.engine.metrics import weight_layers
from worker.engine.modelio import load_model
from worker.engine.prune import prune


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def test_layer_scope_l1_zeroes_the_smallest_weights(small_model, make_ctx):
    model = small_model()
    before = {name: w.detach().clone() for name, (_, w) in weight_layers(model).items()}
    outcome = prune(model, PruneStep(amount=0.5, criterion="l1"), make_ctx(model))
    layers = weight_layers(outcome.model)
    assert _sparsity(layers["classifier.3"][1]) == 0.0  # the classifier is left alone by default
    for name, (_, weight) in layers.items():
        if name == "classifier.3":
            continue
        assert abs(_sparsity(weight) - 0.5) < 0.02, name
        kept = before[name][weight != 0].abs()
        dropped = before[name][weight == 0].abs()
        assert dropped.max() <= kept.min() + 1e-12
    assert outcome.details["layer_sparsity"]["features.0.0"] == pytest.approx(0.5, abs=0.02)
    assert not any(hasattr(m, "weight_mask") for m in outcome.model.modules())  # no masks left behind


def test_global_scope_reaches_overall_amount(small_model, make_ctx):
    model = small_model()
    outcome = prune(model, PruneStep(amount=0.7, scope="global", criterion="l2"), make_ctx(model))
    assert outcome.details["pruned_weights_sparsity"] == pytest.approx(0.7, abs=1e-3)
    per_layer = outcome.details["layer_sparsity"].values()
    assert max(per_layer) - min(per_layer) > 0.05  # global ranking prunes layers unevenly


def test_layer_amounts_ignore_and_types(small_model, make_ctx):
    model = small_model()
    spec = PruneStep(amount=0.3, layer_amounts={"features.0.0": 0.9}, ignore_layers=["features.1.block.0.0"], layer_types=["conv"])
    outcome = prune(model, spec, make_ctx(model))
    layers = weight_layers(outcome.model)
    assert _sparsity(layers["features.0.0"][1]) == pytest.approx(0.9, abs=0.01)
    assert _sparsity(layers["features.1.block.0.0"][1]) == 0.0
    assert _sparsity(layers["classifier.0"][1]) == 0.0  # linear layers not selected
    assert _sparsity(layers["features.2.block.0.0"][1]) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("field", ["layer_amounts", "ignore_layers"])
def test_unknown_layer_names(small_model, make_ctx, field):
    model = small_model()
    spec = PruneStep(**{field: {"featurez.0": 0.5} if field == "layer_amounts" else ["featurez.0"]})
    with pytest.raises(StepError) as caught:
        prune(model, spec, make_ctx(model))
    assert caught.value.details["unknown"] == ["featurez.0"]
    assert "features.0.0" in caught.value.details["valid_examples"]


def test_random_criterion_follows_the_seed(small_model, make_ctx):
    masks = []
    for _ in range(2):
        model = small_model()
        prune(model, PruneStep(amount=0.5, criterion="random"), make_ctx(model, seed=7))
        masks.append(weight_layers(model)["features.0.0"][1] == 0)
    assert torch.equal(masks[0], masks[1])


def test_exported_program_can_be_pruned(tmp_path, small_model, make_ctx):
    from worker.engine.types import ModelSource

    model = small_model()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), tmp_path / "m.pt2")
    program = load_model(ModelSource("export", tmp_path / "m.pt2"))
    outcome = prune(program, PruneStep(amount=0.5), make_ctx(program))
    assert outcome.details["pruned_weights_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert outcome.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_structured_on_exported_program_is_refused(tmp_path, small_model, make_ctx):
    from worker.engine.types import ModelSource

    model = small_model()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), tmp_path / "m.pt2")
    program = load_model(ModelSource("export", tmp_path / "m.pt2"))
    with pytest.raises(StepError, match="structured"):
        prune(program, PruneStep(method="structured", criterion="l1"), make_ctx(program))
