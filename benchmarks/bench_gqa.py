"""Grouped-query attention against the same model with its key/value heads repeated.

A language model of H query heads and J key/value heads (``LMConfig.num_kv_heads``) and
its twin with one key/value head per query head (each of the J heads repeated H / J
times: the same function, what ``moekit convert`` made of a grouped-query Mixtral before
moekit had grouped-query attention). Same process, same weights, alternating (bench_decode's
``paired``, the generation engine's decode steps; a 512 / 1024-token prefill), median of
the per-pair ratios: below 1, grouped-query attention took less time. Also the KV cache's
bytes and whether both generated the same greedy tokens.

    python benchmarks/bench_gqa.py [--heads 16] [--kv-heads 4] [--reps 7] [--out FILE]

The model is bench_decode's Mixtral-like shape (D=1024, 4 layers, 8 experts top-2,
F=2048) with ``--heads`` query heads; fp32, then int4 (g64) weights. Shape letters: B
sequences, L prompt tokens, H query heads, J key/value heads, Dh head size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import moekit  # noqa: E402
from harness import pairs_main  # noqa: E402
from moekit.models import LMConfig, MoETransformer  # noqa: E402
from moekit.models.transformer import StaticKVCache  # noqa: E402

CASES = [(1, 32), (1, 900), (8, 900)]  # (B, L): decode after prompts of L tokens
PREFILLS = [512, 1024]


def repeated_heads(model: MoETransformer) -> MoETransformer:
    """The model with each key/value head repeated H / J times (query head h reads head
    h // (H / J), as transformers' repeat_kv): one key/value head per query head."""
    cfg = model.config
    H, J, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_size
    twin = MoETransformer(cfg.replace(num_kv_heads=None))
    state = model.state_dict()
    for i in range(cfg.num_layers):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([H * Dh, J * Dh, J * Dh])
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [q, *(w.view(J, Dh, -1).repeat_interleave(H // J, 0).flatten(0, 1) for w in (k, v))])
    twin.load_state_dict(state)
    return twin.eval()


def cache_mib(model: MoETransformer, B: int) -> float:
    cache = StaticKVCache.for_model(model, B)
    return sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v)) / 2**20


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    shape = dict(bd.SHAPES["mixtral"], num_heads=args.heads)
    gqa = MoETransformer(LMConfig(**bd.COMMON, **shape, num_kv_heads=args.kv_heads)).eval()
    twin = repeated_heads(gqa)
    rows = []
    for variant in ("fp32", "int4"):
        if variant == "int4":
            gqa, twin = (moekit.quantize(m, bits=4, group_size=64) for m in (gqa, twin))
        for B, L in CASES:
            ids = bd.prompts(B, L)
            a, b = bd.Runner(twin, ids, args.new_tokens), bd.Runner(gqa, ids, args.new_tokens)
            r = bd.paired(a, b, args.reps)
            rows.append({"kind": "decode", "variant": variant, "B": B, "prompt": L,
                         "repeated_ms": r["anchor_ms"], "gqa_ms": r["ms"], "ratio": r["ratio"],
                         "same_tokens": a.tokens == b.tokens,
                         "cache_mib": cache_mib(gqa, B), "repeated_cache_mib": cache_mib(twin, B)})
            print(json.dumps(rows[-1]), flush=True)
        if variant == "fp32":
            for L in PREFILLS:
                r = bd.paired(bd.prefill_runner(twin, L), bd.prefill_runner(gqa, L), args.reps)
                rows.append({"kind": "prefill", "variant": variant, "prompt": L,
                             "repeated_ms": r["anchor_ms"], "gqa_ms": r["ms"],
                             "ratio": r["ratio"]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--heads", type=int, default=16, help="H, query heads (D=1024)")
        p.add_argument("--kv-heads", type=int, default=4, help="J, key/value heads")

    def check(args: argparse.Namespace) -> None:
        LMConfig(**bd.COMMON, **dict(bd.SHAPES["mixtral"], num_heads=args.heads),
                 num_kv_heads=args.kv_heads)

    return pairs_main(argv, __doc__, "bench_gqa", 7, run, add, check)


if __name__ == "__main__":
    sys.exit(main())
