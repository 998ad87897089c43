"""analysis.compare.check_comparable: two checkpoints whose MoE layers differ are refused
in one line naming both and the difference. Only the "experts" difference had a test
(tests/test_analysis.py); the vocabulary, layer-count and top-k branches had 0 hits."""

from __future__ import annotations

import pytest

from moekit.analysis.compare import check_comparable
from moekit.models import LMConfig, MoETransformer

BASE = dict(dim=16, num_layers=2, num_heads=2, ffn_dim=8, num_experts=4, top_k=2,
            max_seq_len=16)


def _model(**change) -> MoETransformer:
    return MoETransformer(LMConfig(**{**BASE, **change}))


@pytest.mark.parametrize("change,vocab,what", [
    ({}, (256, 300), "vocabulary 256 vs 300 tokens"),
    (dict(num_layers=3), (256, 256), "2 vs 3 MoE layers"),
    (dict(moe_every=2), (256, 256), "2 vs 1 MoE layers"),
    (dict(num_experts=6), (256, 256), "layer blocks.0.ffn: 4 vs 6 experts"),
    (dict(top_k=3), (256, 256), "layer blocks.0.ffn: top-2 vs top-3"),
])
def test_checkpoints_that_differ_are_refused_naming_both(change, vocab, what):
    with pytest.raises(ValueError) as e:
        check_comparable(_model(), _model(**change), "runs/a", "runs/b", vocab)
    msg = str(e.value)
    assert msg == (f"checkpoints 'runs/a' and 'runs/b' cannot be compared: {what} (compare "
                   "two checkpoints of one training run)")


def test_checkpoints_of_one_shape_are_comparable():
    """Whatever else differs (weights, dim, attention)."""
    check_comparable(_model(), _model(dim=32, num_heads=4), "a", "b", (256, 256))
