"""Attention head pruning: physically fewer heads, exact when nothing is removed, rebuildable from artifacts."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from jobspec.steps import PruneStep
from tests.engine.digits_data import (
    SmallCNN,
    accuracy,
    digits_rgb32,
    make_context,
    torch_threads,
    train_quickly,
)
from worker.engine import modelio
from worker.engine.export import write_model_artifacts
from worker.engine.metrics import count_macs
from worker.engine.prune import prune
from worker.engine.prune_heads import HeadPrunedAttention, prune_heads
from worker.engine.types import StepError

TINY_VIT = "tiny_vit"


def _tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises it: every output would be 0
    return model.eval()


@pytest.fixture
def tiny_vit_architecture(monkeypatch: pytest.MonkeyPatch) -> str:
    """torchvision registers no ViT this small: let rebuild_model build it by a test-only name."""
    build = modelio.build_architecture
    monkeypatch.setattr(modelio, "build_architecture", lambda name, kwargs: _tiny_vit() if name == TINY_VIT else build(name, kwargs))
    return TINY_VIT


@pytest.mark.parametrize("batch_first", [True, False])
def test_unpruned_replacement_reproduces_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    copy_ = HeadPrunedAttention.from_multihead(mha).eval()
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with torch.no_grad():
        for kwargs in ({"need_weights": False}, {}, {"key_padding_mask": padding, "attn_mask": causal, "need_weights": False}):
            expected, expected_weights = mha(x, x, x, **kwargs)
            got, weights = copy_(x, x, x, **kwargs)
            assert torch.allclose(got, expected, atol=1e-6), kwargs
            assert (weights is None) == (expected_weights is None)
            if weights is not None:
                assert torch.allclose(weights, expected_weights, atol=1e-6)


def test_unpruned_vit_keeps_outputs_and_macs():
    model = _tiny_vit()
    copy_ = copy.deepcopy(model)
    for block in copy_.encoder.layers:
        block.self_attention = HeadPrunedAttention.from_multihead(block.self_attention)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(copy_(x), model(x), atol=1e-6)
    # torch-pruning's counter knows nn.MultiheadAttention; the replacement must count the same.
    assert count_macs(copy_, x[:1]) == count_macs(model, x[:1])


def test_vit_heads_pruned_smaller_and_rebuilt_from_artifacts(make_ctx, tmp_path, tiny_vit_architecture):
    model = _tiny_vit()
    example = torch.randn(1, 3, 32, 32)
    params = sum(p.numel() for p in model.parameters())
    macs, _ = count_macs(model, example)
    outcome = prune(model, PruneStep(method="structured", head_amount=0.5, amount=0.25), make_ctx(_tiny_vit()))
    pruned = outcome.model
    attention = [block.self_attention for block in pruned.encoder.layers]
    assert [type(a).__name__ for a in attention] == ["HeadPrunedAttention"] * 2
    assert [a.num_heads for a in attention] == [2, 2]
    assert attention[0].q_proj.weight.shape == (32, 64) and attention[0].out_proj.weight.shape == (64, 32)
    assert pruned.encoder.layers[0].mlp[0].out_features == 96  # MLP neurons pruned too
    details = outcome.details
    assert details["params_after"] == sum(p.numel() for p in pruned.parameters()) < params
    assert details["macs_after"] < details["macs_before"] == macs
    heads = details["attention_heads"]["heads"]
    assert {layer["before"] for layer in heads.values()} == {4}
    assert {layer["after"] for layer in heads.values()} == {2}
    assert "heads and MLP hidden neurons were pruned" in details["notes"][0]

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = pruned(x)
    assert expected.shape == (4, 10)
    _, status = write_model_artifacts(pruned, tmp_path, example, tiny_vit_architecture, {}, onnx=False)
    assert status["safetensors"]["verified"] is True, status["safetensors"]
    assert status["pt2"]["verified"] is True, status["pt2"]
    rebuilt = modelio.load_artifacts(tmp_path).eval()
    assert isinstance(rebuilt.encoder.layers[1].self_attention, HeadPrunedAttention)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), expected, atol=1e-5)


def test_head_amount_alone_removes_heads_only(make_ctx):
    model = _tiny_vit()
    spec = PruneStep(method="structured", head_amount=0.5)
    assert spec.amount is None and spec.effective_amount is None
    outcome = prune(model, spec, make_ctx(model))
    pruned = outcome.model
    assert all(block.mlp[0].out_features == 128 for block in pruned.encoder.layers)  # MLPs untouched
    assert {layer["after"] for layer in outcome.details["attention_heads"]["heads"].values()} == {2}
    assert outcome.details["layer_channels"] == {} and outcome.details["rounds"] == 0
    # Any channel request brings back the default ratio for the MLP neurons.
    assert PruneStep(method="structured").effective_amount == 0.5
    assert PruneStep(method="structured", head_amount=0.5, target_macs_reduction=2.0).effective_amount == 0.5


def test_amount_rounds_down_and_keeps_a_head():
    model = _tiny_vit()
    details = prune_heads(model, 0.2, "l1")  # 0.2 * 4 heads < 1: nothing to remove
    assert all(isinstance(block.self_attention, nn.MultiheadAttention) for block in model.encoder.layers)
    assert "removes no head" in details["notes"][0]
    details = prune_heads(model, 0.99, "l2")
    assert {layer["after"] for layer in details["heads"].values()} == {1}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_random_criterion_is_seeded_and_others_fall_back_to_magnitude():
    removed = [prune_heads(_tiny_vit(), 0.5, "random", seed=7)["heads"] for _ in range(2)]
    assert removed[0] == removed[1]
    details = prune_heads(_tiny_vit(), 0.5, "fpgm")
    assert details["head_criterion"] == "l2"
    assert "fpgm" in details["notes"][0]


def test_transformer_encoder_layers_run_after_head_pruning():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -3:] = True
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=padding)
        prune_heads(model, 0.5, "l2")
        got = model(x, src_key_padding_mask=padding)
    assert got.shape == expected.shape
    assert [m.self_attn.num_heads for m in model.layers] == [2, 2]


class _SelfAttention(nn.Module):
    """Mirrors Hugging Face's BertSelfAttention: attribute names and head bookkeeping."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = heads * self.attention_head_size
        self.query = nn.Linear(hidden, self.all_head_size)
        self.key = nn.Linear(hidden, self.all_head_size)
        self.value = nn.Linear(hidden, self.all_head_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(x.shape[0], x.shape[1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.all_head_size)


class _Dense(nn.Module):
    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.dense = nn.Linear(fan_in, fan_out)
        self.norm = nn.LayerNorm(fan_out)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _Dense(hidden, hidden)
        self.pruned_heads: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.attention = _Attention(hidden, heads)
        self.intermediate = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU())
        self.output = _Dense(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class TinyBert(nn.Module):
    """Token features (batch, length, hidden) -> class scores through BERT-shaped layers."""

    def __init__(self, hidden: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads) for _ in range(layers))
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return self.classifier(x.mean(1))


def test_bert_style_heads_are_sliced_in_place(make_ctx):
    torch.manual_seed(0)
    model = TinyBert().eval()
    ctx = make_ctx(copy.deepcopy(model), shape=(6, 32))
    outcome = prune(model, PruneStep(method="structured", criterion="l2", head_amount=0.5, amount=0.25), ctx)
    for layer in outcome.model.layer:
        attention = layer.attention
        assert attention.self.num_attention_heads == 2 and attention.self.all_head_size == 16
        assert attention.self.query.out_features == attention.self.value.weight.shape[0] == 16
        assert attention.output.dense.in_features == 16 and attention.output.dense.out_features == 32
        assert len(attention.pruned_heads) == 2
        assert layer.intermediate[0].out_features == 96
    assert outcome.details["params_after"] < outcome.details["params_before"]
    with torch.no_grad():
        assert outcome.model(torch.randn(3, 6, 32)).shape == (3, 10)

    # A second round counts pruned heads in the original numbering, as Hugging Face does.
    before = set(outcome.model.layer[0].attention.pruned_heads)
    details = prune_heads(outcome.model, 0.5, "l1")
    after = outcome.model.layer[0].attention.pruned_heads
    assert len(after) == 3 and before < after <= {0, 1, 2, 3}
    first = details["heads"]["layer.0.attention.self"]
    assert (first["before"], first["after"]) == (2, 1)


def test_hugging_face_bert_heads():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed; TinyBert covers the same layout")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=16
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    details = prune_heads(model, 0.5, "l2")
    assert {layer["after"] for layer in details["heads"].values()} == {2}
    with torch.no_grad():
        assert model(ids).last_hidden_state.shape == expected.shape


def test_head_amount_on_a_cnn_is_refused(make_ctx):
    model = SmallCNN().eval()
    with pytest.raises(StepError, match="attention"):
        prune(model, PruneStep(method="structured", head_amount=0.5), make_ctx(model, shape=(1, 8, 8)))


def test_unstructured_head_amount_is_refused():
    with pytest.raises(ValueError, match="head_amount"):
        PruneStep(method="unstructured", head_amount=0.5)


@cache
def _trained_vit() -> nn.Module:
    with torch_threads(1):
        return train_quickly(_tiny_vit(), digits_rgb32()[0], epochs=12, lr=3e-3)


@pytest.mark.parametrize("criterion", ["l2", "taylor"])
def test_trained_vit_keeps_accuracy_after_head_pruning_and_finetune(criterion):
    train, evaluation = digits_rgb32()
    base = accuracy(_trained_vit(), evaluation)
    assert base > 0.9
    model = copy.deepcopy(_trained_vit())
    ctx = make_context(copy.deepcopy(model), train, evaluation)
    spec = PruneStep(method="structured", criterion=criterion, head_amount=0.5, amount=0.25, calibration_batches=2)
    with torch_threads(1):
        outcome = prune(model, spec, ctx)
        assert outcome.details["attention_heads"]["head_criterion"] == criterion
        tuned = train_quickly(outcome.model, train, epochs=5, lr=2e-3)
    assert accuracy(tuned, evaluation) >= base - 0.06
