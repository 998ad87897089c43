"""analyze_model / RoutingCollector called from Python with bad input: a ValueError naming
the argument, before the model is switched to eval or hooked, instead of range() errors,
torch errors or a silently empty or truncated analysis."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import moekit
from moekit.analysis import RoutingCollector, analyze_model


class EmbedMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 8)
        self.moe = moekit.MoE(moekit.MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=2))

    def forward(self, ids_BL):
        return self.moe(self.embed(ids_BL), token_ids=ids_BL)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EmbedMoE().train()


IDS = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(0))


def untouched(model: EmbedMoE) -> bool:
    return model.training and not model.moe._forward_hooks \
        and not model.moe.router._forward_hooks


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(batch_size=0), "batch_size=0"),  # was: range() arg 3 must not be zero
    (dict(batch_size=-1), "batch_size=-1"),  # was: an analysis of 0 tokens
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(top=-1), "top=-1"),  # was: every listed item but the last
    (dict(top=0), "top=0"),
    (dict(min_count=math.nan), "min_count=nan"),
    (dict(min_count=-1), "min_count=-1"),
    (dict(vocab_size=-1), "vocab_size=-1"),  # was: torch RuntimeError from zeros()
    (dict(vocab_size=2.5), "vocab_size=2.5"),
    (dict(vocab_size=None), "vocab_size=None"),
])
def test_analyze_model_checks_its_numbers(model, kwargs, words):
    args = dict(vocab_size=256) | kwargs
    with pytest.raises(ValueError, match=re.escape(f"{words} is not allowed")):
        analyze_model(model, IDS, **args)
    assert untouched(model)


@pytest.mark.parametrize(("ids", "words"), [
    (torch.zeros(0, 6, dtype=torch.long), "shape (0, 6)"),  # was: a report of 0 tokens
    (IDS.float() + 0.5, "torch.float32"),  # was: truncated ids, then a torch error
    (IDS[0], "shape (6,)"),
    (IDS.tolist(), "list"),
])
def test_analyze_model_checks_the_ids(model, ids, words):
    with pytest.raises(ValueError, match=re.escape(words) + r".* is not allowed: it must be"
                       " a non-empty \\[B, L\\] integer tensor"):
        analyze_model(model, ids, 256)
    assert untouched(model)


def test_analyze_model_without_moe_layers_names_it():
    """A model without parameters raised StopIteration."""
    with pytest.raises(ValueError, match="no moekit.MoE layers"):
        analyze_model(nn.Sequential(), IDS, 256)


@pytest.mark.parametrize("vocab_size", [0, -1, 2.5, True, "256"])
def test_collector_checks_vocab_size(model, vocab_size):
    with pytest.raises(ValueError, match=re.escape(f"vocab_size={vocab_size!r} is not "
                                                   "allowed")):
        RoutingCollector(model, vocab_size)
    with pytest.raises(ValueError, match="model=None is not allowed"):
        RoutingCollector(None, 256)  # type: ignore[arg-type]


def test_good_input_still_analyses(model):
    layers = analyze_model(model, IDS, 256, batch_size=3, top=2, min_count=1)
    assert layers[0]["tokens"] == IDS.numel() and model.training
    assert all(len(e["tokens"]) <= 2 for e in layers[0]["specialisation"]["experts"])
