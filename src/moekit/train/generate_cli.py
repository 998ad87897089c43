"""`moekit generate`: sample text from a trained checkpoint (KV cache, temperature,
top-k, top-p)."""

from __future__ import annotations

import argparse
import sys

import torch

from moekit.models.config import LMConfig
from moekit.models.generate import check_sampling, generate
from moekit.models.transformer import MoETransformer
from moekit.offload import load_offloaded
from moekit.train.checkpoint import CheckpointError, load_checkpoint, restore
from moekit.train.data import decode, encode


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run directory (uses its LATEST) or a step_* directory")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every token")
    p.add_argument("--expert-memory", default=None, metavar="BYTES",
                   help="keep experts on disk, cache at most BYTES of them (e.g. 512MiB)")
    p.add_argument("--expert-policy", choices=("lru", "lfu"), default="lru")
    p.add_argument("--no-prefetch", action="store_true",
                   help="with --expert-memory: do not read the next layer's experts ahead")


def load_model(path: str) -> MoETransformer:
    """A model built from the checkpoint's own config, weights verified and loaded."""
    ck = load_checkpoint(path)
    model = MoETransformer(LMConfig.from_dict(ck.state["model_config"]))
    restore(ck, model, rng=False)
    return model.eval()


def run(args: argparse.Namespace) -> int:
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
        model = (load_model(args.checkpoint) if args.expert_memory is None else
                 load_offloaded(args.checkpoint, args.expert_memory, args.expert_policy,
                                prefetch=not args.no_prefetch))
        ids = encode(args.prompt)
        if ids.numel() == 0:
            raise ValueError("prompt='' is not allowed: it must hold at least one byte")
        room = model.config.max_seq_len - ids.numel()
        if room < 1:
            raise ValueError(f"prompt of {ids.numel()} bytes is not allowed: it must be "
                             f"shorter than max_seq_len={model.config.max_seq_len}")
    except (ValueError, CheckpointError) as e:
        print(f"moekit generate: error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.samples):
        out = generate(model, ids[None], min(args.max_new_tokens, room), args.temperature,
                       args.top_k, args.top_p, use_cache=not args.no_cache, generator=gen)
        if args.samples > 1:
            print(f"--- sample {i + 1}")
        print(decode(out[0]))
    if args.expert_memory is not None:
        print(model.expert_offload.stats.summary(), file=sys.stderr)
        model.expert_offload.close()
    return 0
