"""Validation under ``--nproc``, shared out over the ranks: code that runs inside the gloo
workers of tests/test_distributed_validation.py.

Every rank had validated every micro-batch; now rank r runs micro-batches r, r + world,
... and the loss sums are all-reduced. Each check compares the validation loss with the
single-process loss of the same windows written out by hand (tests/reference.py's
``ref_val_loss``: fp64 cross-entropy, one forward per batch) and with moekit's
one-process ``evaluate`` (what every rank computed before), and counts the model calls
and windows each rank ran. Shape letters: B windows, L sequence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from moekit.distributed import init_mesh
from tests import dist_workers as W

# name: (dp, ep, grad_accum, eval_batches, capacity_factor)
CASES = {
    "dp2_dropless": (2, 1, 2, 2, None),  # 4 micro-batches: 2 a rank
    "dp2_odd_count": (2, 1, 1, 3, None),  # 3: rank 1 runs 1, nothing more (no exchange)
    "ep2_capacity_odd_count": (1, 2, 1, 3, 1.0),  # 3: rank 1 runs 1 + 1 uncounted forward
}


class CallCounter:
    """Counts the model's calls and the windows in them (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.windows = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.calls += 1
        self.windows += args[0].shape[0]


def one_process_model(mcfg, seed: int):
    from moekit.models.transformer import MoETransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the trainer's model: built from the run's seed
        return MoETransformer(mcfg)


def references(mcfg, tcfg, corpus) -> tuple[float, float]:
    """(hand-written fp64 loss, moekit's one-process evaluate) of the trainer's model."""
    from moekit.train.step import evaluate
    from tests.reference import ref_val_loss

    model = one_process_model(mcfg, tcfg.seed)
    windows = tcfg.batch_size * tcfg.grad_accum
    return (ref_val_loss(model, corpus.val, windows, tcfg.seq_len, tcfg.eval_batches),
            evaluate(model, corpus.val, tcfg))


def split_matters(mcfg, tcfg, corpus) -> str | None:
    """With a capacity the loss of a micro-batch is not the mean of its halves' losses, so
    sharing out windows (not whole micro-batches) would have changed the number."""
    from moekit.train.step import validation_micro_batches

    model = one_process_model(mcfg, tcfg.seed).eval()
    ids, tgt = validation_micro_batches(corpus.val, tcfg)[0]
    h = ids.shape[0] // 2
    with torch.no_grad():
        whole = float(model(ids, tgt).loss)
        halves = (float(model(ids[:h], tgt[:h]).loss) + float(model(ids[h:], tgt[h:]).loss)) / 2
    return None if abs(whole - halves) > 1e-4 * whole else \
        f"capacity: a micro-batch's loss {whole} equals its halves' {halves}: the check is weak"


def shared_validation(name: str, out: str) -> dict:
    from moekit.train.distributed import DistributedTrainer

    dp, ep, accum, batches, cf = CASES[name]
    mesh = init_mesh(dp=dp, ep=ep)
    mcfg, tcfg, corpus = W.lm_setup()
    # init_std 0.1, not 0.02: the experts' outputs then move the loss (a capacity of 1.0
    # changes a micro-batch's by 0.2%, not 6e-6), so a wrong split is seen
    mcfg = dataclasses.replace(mcfg, capacity_factor=cf, init_std=0.1)
    tcfg = dataclasses.replace(tcfg, grad_accum=accum, eval_batches=batches)
    trainer = DistributedTrainer(mcfg, tcfg, corpus, Path(out) / name, mesh, progress=False)
    counter = CallCounter(trainer.model)
    got = trainer.validate(SimpleNamespace(write=lambda record: None))
    counter.handle.remove()
    ref, one = references(mcfg, tcfg, corpus)
    rank, world, total = dist.get_rank(), mesh.world_size, accum * batches
    counted = len(range(rank, total, world))
    calls = -(-total // world) if ep > 1 else counted
    error = None
    if abs(got - ref) > 1e-5 * ref:  # fp32 model, fp64 reference cross-entropy
        error = f"val loss {got}, hand-written one-process {ref}"
    elif (counter.calls, counter.windows) != (calls, calls * tcfg.batch_size):
        error = f"{counter.calls} calls, {counter.windows} windows; want {calls} calls " \
                f"of {tcfg.batch_size} windows ({total} micro-batches over {world} ranks)"
    elif cf is not None:
        error = split_matters(mcfg, tcfg, corpus)
    return {"error": error, "val": got, "one_process": one}


def run(rank: int, world: int, port: int, out: str) -> dict:
    W.init(rank, world, port)
    res: dict = {}
    for name in CASES:
        try:
            res[name] = shared_validation(name, out)
        except Exception:  # noqa: BLE001 - the test reports it
            import traceback
            res[name] = {"error": traceback.format_exc()}
    dist.destroy_process_group()
    return res
