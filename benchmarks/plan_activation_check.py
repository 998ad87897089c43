"""Planner activation memory vs the bytes autograd really saves for the moekit LM.

For each config: run one forward of the moekit LM in fp32 under
``torch.autograd.graph.saved_tensors_hooks`` and add up the distinct storages saved
for backward (each storage once); compare with the planner's estimate for the same
spec and tokens (layer activations + logits, no recomputation, one GPU).

    PYTHONPATH=src python benchmarks/plan_activation_check.py
"""

from __future__ import annotations

import argparse
import platform

import torch

from moekit.models import MoETransformer, preset
from moekit.plan.cluster import PRECISIONS, Layout, TrainSetup
from moekit.plan.cost import memory
from moekit.plan.hf import from_lm_config
from moekit.plan.params import count_params


def measured_saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and t.requires_grad is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, ids)
    del out
    return sum(n for ptr, n in seen.items() if ptr not in params)


def main(argv: list[str] | None = None) -> None:
    # no options: the parser is there so --help describes the script instead of running it
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(0)
    print(f"plan activation check  torch {torch.__version__}  {platform.machine()}  fp32")
    print(f"{'config':44s}{'tokens':>8s}{'planner MiB':>13s}{'measured MiB':>14s}"
          f"{'ratio':>7s}")
    for name, kw, B, L in [("tiny", {}, 4, 64), ("small", {}, 2, 256),
                           ("small top-4 E16", {"top_k": 4, "num_experts": 16}, 2, 256),
                           ("small moe_every=2", {"moe_every": 2}, 2, 256)]:
        base = "tiny" if name == "tiny" else "small"
        cfg = preset(base, **kw)
        model = MoETransformer(cfg)
        ids = torch.randint(0, cfg.vocab_size, (B, L))
        got = measured_saved_bytes(model, ids)
        spec = from_lm_config(cfg)
        setup = TrainSetup(seq_len=L, global_batch=B, precision=PRECISIONS["fp32"])
        mem = memory(spec, count_params(spec), setup, Layout(micro_batch=B))
        est = mem.activations + mem.logits
        print(f"{name:44s}{B * L:8d}{est / 2**20:13.2f}{got / 2**20:14.2f}{est / got:7.2f}")


if __name__ == "__main__":
    main()
