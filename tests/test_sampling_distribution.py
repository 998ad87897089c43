"""The sampler's empirical distribution against the softmax computed here, by hand.

test_engine checks the C++ sampler against ``sample_torch``; both could share a mistake
(a temperature applied twice, top-p keeping one token too few). Here each setting draws
N tokens from one row of logits and a chi-square test compares the counts with
probabilities computed independently: softmax(logits / T) in float64 with Python's
math, top-k by rank, top-p as the smallest most-likely-first set whose mass reaches p.
Each test also shows it has the power to catch the mistakes it is for: the same counts
against a reference 10% off in temperature, or with top-p one token short, fail.

Shape letters: N draws, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2

from moekit.models.generate import _sampler, sample_next, sample_torch

N = 60_000
ALPHA = 1e-6  # a correct sampler fails one run in a million


def _reference(logits: list[float], temperature: float, top_k: int | None,
               top_p: float | None, short_p: bool = False) -> list[float]:
    """Each token's probability; ``short_p`` drops the token that reaches top_p (the
    off-by-one the test must catch)."""
    top = max(logits)
    w = [math.exp((x - top) / temperature) for x in logits]
    order = sorted(range(len(w)), key=lambda v: (-w[v], v))  # ties in token order
    keep = set(order if top_k is None else order[:top_k])
    w = [x if v in keep else 0.0 for v, x in enumerate(w)]
    if top_p is not None:
        total, mass, kept = sum(w), 0.0, set()
        for v in order:
            if w[v] == 0 or mass >= top_p:
                break
            mass += w[v] / total
            if not (short_p and mass >= top_p):
                kept.add(v)
        w = [x if v in kept else 0.0 for v, x in enumerate(w)]
    total = sum(w)
    return [x / total for x in w]


def _p_value(counts: list[int], probs: list[float]) -> float:
    """Pearson's chi-square over the tokens of probability > 0; a draw outside them is 0."""
    if any(c and p == 0 for c, p in zip(counts, probs, strict=True)):
        return 0.0
    cells = [(c, p * N) for c, p in zip(counts, probs, strict=True) if p > 0]
    stat = sum((c - e) ** 2 / e for c, e in cells)
    return float(chi2.sf(stat, len(cells) - 1)) if len(cells) > 1 else 1.0


# Logits with a few likely tokens and a tail: every setting keeps several tokens, each
# expected hundreds of times in N draws. Probabilities at T=1: ~0.41, 0.25, 0.15, 0.09...
LOGITS = [3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0]
SETTINGS = [(1.0, None, None), (0.7, None, None), (1.8, None, None), (1.0, 4, None),
            (0.9, None, 0.6), (1.3, None, 0.9), (1.2, 5, 0.8), (0.6, None, 0.7)]


def _counts(fn, temperature, top_k, top_p, dtype=torch.float32) -> list[int]:
    logits_NV = torch.tensor([LOGITS], dtype=dtype).expand(N, -1).contiguous()
    g = torch.Generator().manual_seed(1)
    tokens_N = fn(logits_NV, temperature, top_k, top_p, g)
    return torch.bincount(tokens_N, minlength=len(LOGITS)).tolist()


@pytest.mark.parametrize("which", ["sample_next", "sample_torch"])
@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_draws_follow_the_hand_computed_distribution(which, temperature, top_k, top_p):
    if which == "sample_next" and _sampler(torch.zeros(1, 1)) is None:
        pytest.skip("decode kernels not built")
    fn = sample_next if which == "sample_next" else sample_torch
    counts = _counts(fn, temperature, top_k, top_p)
    assert _p_value(counts, _reference(LOGITS, temperature, top_k, top_p)) > ALPHA, counts
    # the power to see the mistakes: a temperature 10% off, top-p one token short
    wrong_t = _reference(LOGITS, temperature * 1.1, top_k, top_p)
    assert _p_value(counts, wrong_t) < ALPHA, counts
    want = _reference(LOGITS, temperature, top_k, top_p)
    if top_p is not None and sum(p > 0 for p in want) > 1:  # one token short leaves some
        assert _p_value(counts, _reference(LOGITS, temperature, top_k, top_p,
                                           short_p=True)) < ALPHA, counts


def test_the_reference_keeps_the_token_that_reaches_top_p():
    """The reference itself, by hand: probabilities 0.4/0.3/0.2/0.1 and top_p 0.6 keep the
    first two (0.4 < 0.6 <= 0.7), renormalized; top_p 0.7 keeps the same two."""
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    for top_p in (0.6, 0.65):
        got = _reference(logits, 1.0, None, top_p)
        assert got == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0], abs=1e-12)
    assert _reference(logits, 1.0, None, 0.6, short_p=True) == pytest.approx([1, 0, 0, 0])
    assert _reference(logits, 1.0, 2, None) == pytest.approx([4 / 7, 3 / 7, 0, 0])


def test_a_seed_reproduces_its_draws_and_another_seed_does_not():
    logits_NV = torch.tensor([LOGITS]).expand(64, -1).contiguous()
    draws = [sample_next(logits_NV, 1.0, None, 0.9, torch.Generator().manual_seed(s))
             for s in (3, 3, 4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
