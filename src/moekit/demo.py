"""`moekit demo`: build an MoE layer, run forward and backward, print routing stats."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moekit.config import (
    MAX_SEED,
    ROUTERS,
    MoEConfig,
    check_int_range,
    check_positive_int,
    flag_message,
)
from moekit.layer import MoE

# config field -> the flag that sets it, so an error names what the user typed
FIELD_FLAGS = {"dim": "--dim", "ffn_dim": "--ffn-dim", "num_experts": "--experts",
               "top_k": "--top-k", "capacity_factor": "--capacity-factor"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=256, help="D, model hidden size")
    p.add_argument("--ffn-dim", type=int, default=512, help="F, expert hidden size")
    p.add_argument("--experts", type=int, default=8, help="E, number of experts")
    p.add_argument("--top-k", type=int, default=2, help="K, experts per token")
    p.add_argument("--router", choices=ROUTERS, default="softmax")
    p.add_argument("--tokens", type=int, default=2048, help="T, tokens per batch")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> MoEConfig:
    """The layer's config; ValueError naming the bad flag, before anything is built."""
    check_positive_int("--tokens", args.tokens)
    check_int_range("--seed", args.seed, 0, MAX_SEED)
    return MoEConfig(dim=args.dim, ffn_dim=args.ffn_dim, num_experts=args.experts,
                     top_k=args.top_k, router=args.router, aux_loss_coef=0.01,
                     z_loss_coef=1e-3, capacity_factor=args.capacity_factor,
                     hash_vocab_size=1000 if args.router == "hash" else None)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"moekit demo: error: {flag_message(e, FIELD_FLAGS)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    moe = MoE(cfg)
    x = torch.randn(args.tokens, args.dim, requires_grad=True)
    ids = torch.randint(1000, (args.tokens,)) if args.router == "hash" else None
    start = time.perf_counter()
    y, aux, stats = moe(x, token_ids=ids)
    (y.square().mean() + aux).backward()
    ms = (time.perf_counter() - start) * 1e3
    n_params = sum(p.numel() for p in moe.parameters())
    print(f"moekit demo: {cfg.router} router, E={cfg.num_experts} K={cfg.top_k} "
          f"D={cfg.dim} F={cfg.ffn_dim}, {n_params:,} parameters, T={args.tokens}")
    print(f"forward+backward: {ms:.1f} ms (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    for k, v in stats.to_dict().items():
        print(f"  {k:20s} {v if isinstance(v, list) else round(v, 4)}")
    return 0
