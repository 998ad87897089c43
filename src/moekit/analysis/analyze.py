"""Run a model over text and gather its routing: the engine behind `moekit analyze`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis.collect import RoutingCollector
from moekit.analysis.stats import summarise
from moekit.config import check_positive_int, reject

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def windows(data_N: Tensor, tokens: int, seq_len: int) -> Tensor:
    """Consecutive, non-overlapping sequences from the start of ``data_N``: [B, L]."""
    check_positive_int("tokens", tokens)
    check_positive_int("seq_len", seq_len)
    if tokens < seq_len:  # was blamed on the text ("the text has 1201 tokens")
        reject("tokens", tokens, f"it must be >= seq_len={seq_len}, one whole sequence")
    n = min(tokens, data_N.numel()) // seq_len
    if n < 1:
        raise ValueError(f"the text has {data_N.numel()} tokens, which is not allowed: it "
                         f"needs at least seq_len={seq_len}")
    return data_N[: n * seq_len].long().view(n, seq_len)


@torch.no_grad()
def analyze_model(model: nn.Module, ids_BL: Tensor, vocab_size: int, batch_size: int = 16,
                  top: int = 5, min_count: int = 5) -> list[dict[str, Any]]:
    """Per-layer routing summaries of ``model`` over the sequences ``ids_BL``."""
    for name, v in (("top", top), ("min_count", min_count)):  # (the rest: collect_routing)
        check_positive_int(name, v)
    rc = collect_routing(model, ids_BL, vocab_size, batch_size)
    return summarise_all(rc, top, min_count)


def summarise_all(rc: RoutingCollector, top: int = 5, min_count: int = 5,
                  label: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
    """``summarise`` of each layer; ``label``: a token id's text (a tokenizer's)."""
    base_CC = rc.base_CC if rc.classes is not None else None
    return [summarise(layer, rc.base_V, base_CC, top, min_count, label)
            for layer in rc.layers]


@torch.no_grad()
def collect_routing(model: nn.Module, ids_BL: Tensor, vocab_size: int, batch_size: int = 16,
                    decisions: bool = False) -> RoutingCollector:
    """Route ``ids_BL`` through ``model`` ``batch_size`` sequences a pass; the counts (and
    with ``decisions`` every token's experts) in a RoutingCollector."""
    for name, v in (("vocab_size", vocab_size), ("batch_size", batch_size)):
        check_positive_int(name, v)
    if not isinstance(ids_BL, Tensor) or ids_BL.dim() != 2 or ids_BL.numel() == 0 \
            or ids_BL.dtype not in INT_DTYPES:
        what = (f"shape {tuple(ids_BL.shape)}, {ids_BL.dtype}" if isinstance(ids_BL, Tensor)
                else type(ids_BL).__name__)
        raise ValueError(f"ids_BL ({what}) is not allowed: it must be a non-empty [B, L] "
                         "integer tensor of token ids")
    rc = RoutingCollector(model, vocab_size, decisions)  # checks the model before use
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with rc:
            for start in range(0, ids_BL.shape[0], batch_size):
                chunk = ids_BL[start:start + batch_size]
                rc.set_tokens(chunk)
                # int64: the ids may be any integer dtype (uint8 bytes), an embedding
                # takes int64 / int32 only
                model(chunk.to(device=device, dtype=torch.long))
    finally:
        model.train(was_training)
    return rc
