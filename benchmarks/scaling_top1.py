"""Why does Switch top-1 trail at small budgets? Controlled single-change runs.

Each run is `moekit scaling`'s top-1 variant at one of the study budgets with
ONE change, on the same tokens as the study's seed. It reports the final
validation loss and the mean top-1 gate value (the Switch router probability
that multiplies the expert's output) on the validation batches, at the start
and the end.

Budgets (``--budget``): ``d64`` the first study (D=64, 4 layers, A=256, 300
steps of 16 x 128 bytes, lr 3e-3, 30 warm-up steps); ``b64`` the second (the
`small` preset: D=128, 4 layers, A=512, steps of 64 x 128 bytes, lr 3e-3, 50
warm-up steps, evaluation every 50 steps on 8 batches), 500 steps unless
``--steps`` says otherwise (the cosine schedule ends at ``--steps``).

    PYTHONPATH=src nice -n 15 python benchmarks/scaling_top1.py --experts 8 \
        --changes baseline st_gate gate_x_e router_init_switch capacity_1.25 \
        --seed 0 --out /work/scaling-runs/top1-probe
    PYTHONPATH=src python benchmarks/scaling_top1.py --budget b64 --steps 250 --experts 16 \
        --changes baseline hash no_balance dense top2 --seed 0 --out /work/top1-b64

Changes:
  baseline            the study's top-1 (Switch: gate = router probability p)
  st_gate             gate value 1 with the router still learning: p / p.detach()
  gate_x_e            gate = E * p (routed_scaling_factor = E): ~1 at init
  router_init_switch  router init N(0, 0.1 / D) as in the Switch paper (ours: 1 / D)
  capacity_1.25       capacity factor 1.25 (tokens over it are dropped; ours is dropless)
  lr_6e-3 / lr_1.5e-3 learning rate x2 / x0.5
  no_z_loss           z-loss coefficient 0 (ours: 1e-3)
  no_balance          z-loss and Switch balance loss both 0
  gate_x2             gate = 2 * p (routed_scaling_factor = 2)
  sigmoid             gate = sigmoid(logit) of the chosen expert (not renormalised)
  hash                fixed routing by the input byte (Roller et al.'s hash layer),
                      gate 1, no router to learn and no router losses
  freeze_router       the router's weights stay at their initialisation (gate p)
  dense / top2        the references: the dense SwiGLU of hidden A; top-2 with E
                      experts of hidden A / 2 (renormalised softmax)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

import moekit.routing.router as router_mod
from moekit.models.config import preset
from moekit.train.compare import dense_variant, moe_variant
from moekit.train.data import load_corpus, sample_windows
from moekit.train.trainer import VAL_SEED, TrainConfig, Trainer

# budget -> (base model, active FFN width A, training config)
BUDGETS = {
    "d64": (preset("small", dim=64, num_layers=4, num_heads=2, max_seq_len=128), 256,
            TrainConfig(steps=300, batch_size=16, seq_len=128, eval_every=25, eval_batches=6,
                        warmup_steps=30, lr=3e-3, save_every=10_000)),
    "b64": (preset("small"), 512,
            TrainConfig(steps=500, batch_size=64, seq_len=128, eval_every=50, eval_batches=8,
                        warmup_steps=50, lr=3e-3, save_every=10_000)),
}


def straight_through(fn):
    """Switch top-1 gate with value 1 and the router gradient of p (p / p.detach())."""
    def wrapped(logits_TE, top_k, **kw):
        experts_TK, weights_TK, probs_TE = fn(logits_TE, top_k, **kw)
        return experts_TK, weights_TK / weights_TK.detach(), probs_TE
    return wrapped


def build(change: str, experts: int, seed: int, corpus, out: Path, budget: str = "d64",
          steps: int | None = None) -> Trainer:
    """``change``: one name from the list above, or several joined by "+"
    (e.g. "dense+lr_6e-3": the dense baseline at another learning rate)."""
    parts = change.split("+")
    base, active, train = BUDGETS[budget]
    if "dense" in parts:
        mcfg = dense_variant(base, active)
    else:
        mcfg = moe_variant(base, active, 2 if "top2" in parts else 1, experts)
    tcfg = train.replace(seed=seed, steps=steps or train.steps)
    for part in parts:
        if part.startswith("lr_"):
            tcfg = tcfg.replace(lr=float(part[3:]))
        if part == "capacity_1.25":
            mcfg = mcfg.replace(capacity_factor=1.25)
        if part == "no_z_loss":
            mcfg = mcfg.replace(z_loss_coef=0.0)
        if part == "no_balance":
            mcfg = mcfg.replace(z_loss_coef=0.0, aux_loss_coef=0.0)
        if part in ("hash", "sigmoid"):
            mcfg = mcfg.replace(router=part)
    trainer = Trainer(mcfg, tcfg, corpus, out / f"{budget}-s{tcfg.steps}-{change}-e{experts}"
                      f"-seed{seed}", False)
    for moe in trainer.model.moe_layers():
        if "gate_x2" in parts:
            moe.router.cfg = dataclasses.replace(moe.router.cfg, routed_scaling_factor=2.0)
        if "sigmoid" in parts:
            moe.router.cfg = dataclasses.replace(moe.router.cfg, renormalize=False)
        if "freeze_router" in parts:
            moe.router.weight.requires_grad_(False)
        if "gate_x_e" in parts:
            moe.router.cfg = dataclasses.replace(moe.router.cfg,
                                                 routed_scaling_factor=float(experts))
        if "router_init_switch" in parts:
            torch.manual_seed(seed + 1)
            torch.nn.init.normal_(moe.router.weight, std=math.sqrt(0.1 / base.dim))
    return trainer


@torch.no_grad()
def mean_gate(trainer: Trainer) -> dict[str, float]:
    """Mean router probability p of the chosen expert and mean combine weight
    over the validation batches (all MoE layers)."""
    seen: list[tuple[float, float]] = []

    def hook(mod, inputs, o) -> None:
        p = o.plan.probs_TE.gather(1, o.plan.expert_S.view(o.plan.probs_TE.shape[0], -1))
        seen.append((float(p.mean()), float(o.plan.weight_S.mean())))

    hooks = [moe.router.register_forward_hook(hook) for moe in trainer.model.moe_layers()]
    trainer.model.eval()
    cfg = trainer.cfg
    for i in range(cfg.eval_batches):
        ids, tgt = sample_windows(trainer.corpus.val, cfg.batch_size, cfg.seq_len, VAL_SEED + i)
        trainer.model(ids, tgt)
    trainer.model.train()
    for h in hooks:
        h.remove()
    n = max(len(seen), 1)
    return {"p": sum(a for a, _ in seen) / n, "weight": sum(b for _, b in seen) / n}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--changes", nargs="+", default=["baseline"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/scaling-top1")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="d64")
    p.add_argument("--steps", type=int, help="train steps (default: the budget's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    corpus, out = load_corpus(None), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for change in args.changes:
        steps = f"-s{args.steps}" if args.steps else ""
        path = out / f"{args.budget}{steps}-{change}-e{args.experts}-seed{args.seed}.json"
        if path.exists():
            print(path.read_text())
            continue
        original = router_mod.softmax_topk
        if "st_gate" in change.split("+"):
            router_mod.softmax_topk = straight_through(original)
        try:
            trainer = build(change, args.experts, args.seed, corpus, out, args.budget,
                            args.steps)
            moe = bool(trainer.model.moe_layers())
            start_gate = mean_gate(trainer) if moe else None
            t0 = time.perf_counter()
            summary = trainer.fit()
            end_gate = mean_gate(trainer) if moe else None
        finally:
            router_mod.softmax_topk = original
        row = {"change": change, "experts": args.experts, "seed": args.seed,
               "budget": args.budget, "steps": trainer.cfg.steps,
               "val_loss": summary["val_loss"],
               "curve": [(r["step"], r["val_loss"]) for r in trainer.history
                         if r["kind"] == "val"],
               "gate_start": start_gate,
               "gate_end": end_gate,
               "wall_s": time.perf_counter() - t0, "load_avg_1m": os.getloadavg()[0]}
        # whole or not at all: a file that exists is taken as done (skipped above)
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(path, row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    main()
