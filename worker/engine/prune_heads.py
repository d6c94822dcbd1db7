"""Structured pruning of attention heads: whole heads go, so attention layers get physically smaller.

nn.MultiheadAttention insists on num_heads * head_dim == embed_dim, so a pruned one is replaced by
HeadPrunedAttention, whose inner width (kept heads x head_dim) may be narrower than the embedding.
Hugging Face BERT-style self-attention (query / key / value Linears) is sliced in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.types import StepError

# amount * heads is rounded down; the tolerance keeps 0.3 * 10 from flooring to 2.
_FLOOR_TOLERANCE = 1e-9


class HeadPrunedAttention(nn.Module):
    """Multi-head attention whose heads may be fewer than embed_dim / head_dim.

    Called like nn.MultiheadAttention and returns (output, weights or None), so it drops into
    torchvision's EncoderBlock and nn.TransformerEncoderLayer. Batched (3-D) inputs only: the
    forward branches on no tensor value, which keeps it traceable by torch.export and torch.fx.
    """

    # nn.TransformerEncoderLayer's fused fast path reads MHA's packed in_proj weights; these flags
    # are the ones it checks to fall back to calling forward().
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(
        self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None, vdim: int | None = None,
        bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kdim = kdim or embed_dim
        self.vdim = vdim or embed_dim
        self.batch_first = batch_first
        self.dropout = dropout
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias=bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        _register_mac_counter()

    @classmethod
    def like(cls, mha: nn.MultiheadAttention, num_heads: int) -> HeadPrunedAttention:
        """An uninitialised replacement for ``mha`` with ``num_heads`` heads (weights to be loaded)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("attention with add_bias_kv or add_zero_attn cannot be head-pruned")
        new = cls(
            mha.embed_dim, num_heads, mha.head_dim, kdim=mha.kdim, vdim=mha.vdim,
            bias=mha.in_proj_bias is not None, batch_first=mha.batch_first, dropout=mha.dropout,
        )
        return new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> HeadPrunedAttention:
        """An exact copy of ``mha`` (all heads), gradients included for Taylor importance."""
        new = cls.like(mha, mha.num_heads)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for linear, weight, grad, bias in zip(
                (new.q_proj, new.k_proj, new.v_proj), _mha_inputs(mha), _mha_inputs(mha, grad=True), biases
            ):
                linear.weight.copy_(weight)
                linear.weight.grad = None if grad is None else grad.clone()
                if bias is not None:
                    linear.bias.copy_(bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            new.out_proj.weight.grad = None if mha.out_proj.weight.grad is None else mha.out_proj.weight.grad.clone()
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        shape = (self.num_heads, self.head_dim)
        q = self.q_proj(query).unflatten(-1, shape).transpose(1, 2)  # (batch, heads, length, head_dim)
        k = self.k_proj(key).unflatten(-1, shape).transpose(1, 2)
        v = self.v_proj(value).unflatten(-1, shape).transpose(1, 2)
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype)
        dropout = self.dropout if self.training else 0.0
        causal = is_causal and mask is None  # with a mask, MHA treats is_causal as a hint only
        weights = None
        if need_weights:  # SDPA does not return the attention map: compute it explicitly
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = F.dropout((scores if mask is None else scores + mask).softmax(-1), dropout, self.training)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """MHA's masks (True or -inf: do not attend) as one float mask SDPA adds to the scores."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        if attn_mask.dim() != 2:  # (batch * original heads, L, S) no longer lines up with the kept heads
            raise ValueError("per-head (3-D) attention masks are not supported after head pruning")
        merged = additive(attn_mask)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]
        merged = padding if merged is None else merged + padding
    return merged


def _mha_inputs(mha: nn.MultiheadAttention, grad: bool = False) -> tuple[torch.Tensor | None, ...]:
    """(q, k, v) input-projection weights (or their gradients) of an nn.MultiheadAttention."""
    if mha._qkv_same_embed_dim:
        packed = mha.in_proj_weight.grad if grad else mha.in_proj_weight
        return tuple(packed.chunk(3)) if packed is not None else (None, None, None)
    tensors = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    return tuple(t.grad if grad else t for t in tensors)


def _count_macs(module: HeadPrunedAttention, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
    """torch-pruning's counter adds up a module it knows instead of its children: count the
    projections and the attention itself the way it counts nn.MultiheadAttention, so MACs before
    and after head pruning compare like for like."""
    if not inputs:  # called with keyword arguments only: the hook cannot see them
        return
    query = inputs[0]
    key = inputs[1] if len(inputs) > 1 else query
    seq = 1 if module.batch_first else 0
    batch, q_len, k_len = query.shape[1 - seq], query.shape[seq], key.shape[seq]
    inner = module.num_heads * module.head_dim
    macs = q_len * inner  # query scaling
    macs += (q_len * module.embed_dim + k_len * module.kdim + k_len * module.vdim) * inner
    if module.q_proj.bias is not None:
        macs += (q_len + 2 * k_len) * inner
    macs += module.num_heads * q_len * k_len * (2 * module.head_dim + 1)  # QK^T, softmax, AV
    macs += q_len * module.embed_dim * (inner + (module.out_proj.bias is not None))
    module.__flops__ += int(macs * batch)


def _register_mac_counter() -> None:
    # On construction rather than import: every model holding one counts right, and code that
    # never builds one does not import torch-pruning.
    try:
        from torch_pruning.utils import op_counter
    except ImportError:
        return
    op_counter.MODULES_MAPPING.setdefault(HeadPrunedAttention, _count_macs)


def _is_bert_style(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")) and all(
        isinstance(getattr(module, n, None), int) for n in ("num_attention_heads", "attention_head_size")
    )


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> attention module whose heads prune_heads can remove."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.MultiheadAttention, HeadPrunedAttention)) or _is_bert_style(m)
    }


def _linears(model: nn.Module, name: str, module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear, int, int]:
    """(q, k, v, out projection, heads, head_dim) of a HeadPrunedAttention or BERT-style layer."""
    if isinstance(module, HeadPrunedAttention):
        return module.q_proj, module.k_proj, module.v_proj, module.out_proj, module.num_heads, module.head_dim
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    # Hugging Face keeps the output projection next to the self-attention: BertAttention.output.dense.
    dense = getattr(getattr(parent, "output", None), "dense", None)
    inner = module.num_attention_heads * module.attention_head_size
    if not isinstance(dense, nn.Linear) or dense.in_features != inner:
        raise StepError(f"cannot find the output projection of attention layer {name!r} (expected {parent_name}.output.dense)")
    return module.query, module.key, module.value, dense, module.num_attention_heads, module.attention_head_size


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` of the outputs (dim 0, bias too) or inputs (dim 1), in place."""
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach().index_select(dim, index).clone(), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
        linear.out_features = int(index.numel())
    else:
        linear.in_features = int(index.numel())


def _scores(
    projections: tuple[nn.Linear, ...], heads: int, criterion: str, generator: torch.Generator
) -> tuple[torch.Tensor, str]:
    """One score per head (higher: keep) and the criterion actually used."""
    if criterion == "random":
        return torch.rand(heads, generator=generator), "random"
    q, k, v, out = projections
    # Each head owns a block of q / k / v output rows and of the output projection's input columns.
    blocks = [(lin.weight, lin.weight.grad) for lin in (q, k, v)]
    blocks.append((out.weight.t(), None if out.weight.grad is None else out.weight.grad.t()))
    if criterion == "taylor" and all(grad is not None for _, grad in blocks):
        return sum((w * g).detach().abs().reshape(heads, -1).sum(1).float().cpu() for w, g in blocks), "taylor"
    p = 1 if criterion in {"l1", "bn_scale"} else 2
    total = sum(w.detach().abs().pow(p).reshape(heads, -1).sum(1).float().cpu() for w, _ in blocks)
    return total.pow(1.0 / p), f"l{p}"


def prune_heads(model: nn.Module, amount: float, criterion: str = "l2", *, seed: int = 0) -> dict[str, Any]:
    """Remove floor(amount * heads) of the least important heads of every attention layer, in place
    (at least one head per layer stays). Returns JSON-able details.

    Heads are ranked by the L1 (l1, bn_scale) or L2 (l2, fpgm, activation) norm of their q / k / v
    rows and output-projection columns, by |weight x grad| for 'taylor' when the caller ran a
    backward pass first, or at random (seeded) for 'random'.
    """
    if not 0.0 < amount < 1.0:
        raise StepError("head_amount must be between 0 and 1", {"head_amount": amount})
    layers = attention_layers(model)
    if not layers:
        raise StepError(
            "head_amount needs attention layers (nn.MultiheadAttention or BERT-style self-attention with "
            "query / key / value layers); this model has none",
            {"head_amount": amount},
        )
    for name, module in layers.items():  # refuse before any layer changes
        if isinstance(module, nn.MultiheadAttention) and (module.bias_k is not None or module.add_zero_attn):
            raise StepError(f"attention layer {name!r} uses add_bias_kv / add_zero_attn, which head pruning does not support")
        if _is_bert_style(module):
            _linears(model, name, module)
    generator = torch.Generator().manual_seed(seed)
    params_before = sum(p.numel() for p in model.parameters())
    heads: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    notes: list[str] = []
    replaced = False
    for name, module in layers.items():
        count = module.num_attention_heads if _is_bert_style(module) else module.num_heads
        remove = min(math.floor(amount * count + _FLOOR_TOLERANCE), count - 1)
        if remove <= 0:
            heads[name] = {"before": count, "after": count, "removed": []}
            continue
        if isinstance(module, nn.MultiheadAttention):
            module = HeadPrunedAttention.from_multihead(module)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
            replaced = True
        q, k, v, out, total, head_dim = _linears(model, name, module)
        scores, criterion_used = _scores((q, k, v, out), total, criterion, generator)
        used.add(criterion_used)
        keep = torch.topk(scores, total - remove).indices.sort().values
        index = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten().to(q.weight.device)
        for linear in (q, k, v):
            _slice_linear(linear, index, 0)
        _slice_linear(out, index, 1)
        removed = sorted(set(range(total)) - set(keep.tolist()))
        if isinstance(module, HeadPrunedAttention):
            module.num_heads = len(keep)
        else:
            _update_bert_heads(model, name, module, removed)
        heads[name] = {"before": total, "after": len(keep), "removed": removed}
    if replaced:
        for encoder in model.modules():  # its nested-tensor fast path reads MHA's packed weights
            if isinstance(encoder, nn.TransformerEncoder):
                encoder.use_nested_tensor = False
    if not any(layer["removed"] for layer in heads.values()):
        notes.append(f"head_amount {amount} removes no head: every layer keeps at least one and rounds down")
    if used and criterion not in used:
        why = "no gradients were computed" if criterion == "taylor" else "it has no per-head form here"
        notes.append(f"heads were ranked by {', '.join(sorted(used))} weight norm, not {criterion!r}: {why}")
    details: dict[str, Any] = {
        "head_amount": amount,
        "head_criterion": ", ".join(sorted(used)) or criterion,
        "heads": heads,
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
    }
    if notes:
        details["notes"] = notes
    return details


def _update_bert_heads(model: nn.Module, name: str, module: nn.Module, removed: list[int]) -> None:
    kept = module.num_attention_heads - len(removed)
    module.num_attention_heads = kept
    module.all_head_size = kept * module.attention_head_size
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    pruned = getattr(parent, "pruned_heads", None)
    if isinstance(pruned, set):  # Hugging Face counts pruned heads in the original numbering
        original = [h for h in range(kept + len(removed) + len(pruned)) if h not in pruned]
        pruned.update(original[h] for h in removed)
