"""``ExpertParallelMoE(equal_tokens_per_rank=True)``: code that runs inside the gloo
workers of tests/test_distributed_equal_tokens.py.

The promise (the same T on every rank) lets capacity mode skip the all-gather of every
rank's capacity. Same T, same capacities, same collectives of the same sizes: the layer
must give bitwise the outputs, aux loss, statistics and gradients of the layer that
exchanges them (torch.equal, no tolerance), which itself matches one process (checked
here too, to W.TOLERANCE, against ``moekit.MoE`` on each rank's tokens). Shape letters:
T tokens, D hidden, E experts.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import torch
import torch.distributed as dist

from moekit.distributed import ExpertParallelMoE, init_mesh, reduce_gradients
from moekit.distributed import dispatcher as dsp
from tests import dist_workers as W

# name: (E, capacity_factor, router, dispatcher, overlap_chunks, dtype)
CASES = {
    "capacity": (6, 1.0, "softmax", "all_to_all", 1, torch.float32),
    "capacity_sigmoid": (6, 1.0, "sigmoid", "all_to_all", 1, torch.float32),
    "expert_choice": (4, 1.0, "expert_choice", "all_to_all", 1, torch.float32),
    "capacity_overlap": (6, 0.75, "softmax", "all_to_all", 2, torch.float32),
    "capacity_bf16": (6, 1.0, "softmax", "all_to_all", 1, torch.bfloat16),
}
T_CALLS = (6, 10)  # two calls, each with this T on every rank: the promise is per call


class CountExchanges:
    """Counts ``dispatcher.exchange_sizes`` calls (each one all-gather + one host sync)."""

    def __init__(self) -> None:
        self.calls, self.real = 0, dsp.exchange_sizes

    def __enter__(self) -> CountExchanges:
        def counted(*args, **kwargs):
            self.calls += 1
            return self.real(*args, **kwargs)
        dsp.exchange_sizes = counted
        return self

    def __exit__(self, *exc) -> None:
        dsp.exchange_sizes = self.real


def _layer(name: str):
    E, cf, router, _, _, dtype = CASES[name]
    full = W.full_layer(E, 2, cf, router)
    for p in full.parameters():  # not .to(dtype): the router's buffers stay fp32
        p.data = p.data.to(dtype)
    return full


def _data(T: int, world: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, W.D, generator=g).to(dtype), torch.randn(T, W.D, generator=g).to(dtype))
            for _ in range(world)]


def _run(ep_moe: ExpertParallelMoE, x: torch.Tensor, g: torch.Tensor):
    """One call, forward and backward; everything the caller sees, detached."""
    ep_moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = ep_moe(x)
    ((out.output * g).sum() + out.aux_loss).backward()
    reduce_gradients(ep_moe, ep_moe.mesh)
    stats = {f: getattr(out.stats, f) for f in out.stats.__dataclass_fields__}
    grads = {n: p.grad.clone() for n, p in ep_moe.named_parameters()}
    return out.output.detach(), out.aux_loss.detach(), stats, {**grads, "x": x.grad}


def _differences(a, b) -> list[str]:
    (ya, auxa, sa, ga), (yb, auxb, sb, gb) = a, b
    bad = [] if torch.equal(ya, yb) and torch.equal(auxa, auxb) else ["output or aux loss"]
    bad += [f"stats.{k}" for k in sa if not torch.equal(torch.as_tensor(sa[k]),
                                                         torch.as_tensor(sb[k]))]
    return bad + [f"grad of {k}" for k in ga if not torch.equal(ga[k], gb[k])]


def matches_exchange(mesh, name: str) -> str | None:
    """Two calls (T=6 then T=10 on every rank): bitwise equal to the exchanging layer, the
    first call exchanging [T, C] once (the promise's check), the second nothing."""
    _, _, _, dispatcher, chunks, dtype = CASES[name]
    rank, full = dist.get_rank(), _layer(name)
    kw = dict(dispatcher=dispatcher, overlap_chunks=chunks)
    promised = ExpertParallelMoE.from_moe(copy.deepcopy(full), mesh, equal_tokens_per_rank=True,
                                          **kw)
    exchanging = ExpertParallelMoE.from_moe(copy.deepcopy(full), mesh, **kw)
    for call, T in enumerate(T_CALLS):
        data = _data(T, mesh.world_size, dtype, seed=call)
        with CountExchanges() as n_promised:
            got = _run(promised, *data[rank])
        with CountExchanges() as n_exchanging:
            want = _run(exchanging, *data[rank])
        if (n_promised.calls, n_exchanging.calls) != (1 - call, 1):
            return f"call {call}: {n_promised.calls} exchanges with the promise, " \
                   f"{n_exchanging.calls} without"
        if bad := _differences(got, want):
            return f"call {call} (T={T}): {', '.join(bad)} differ from the exchanging layer"
        ref_ys, _ = W.reference(full, data)
        atol, rtol = W.TOLERANCE[dtype]
        if not torch.allclose(got[0], ref_ys[rank], atol=atol, rtol=rtol):
            return f"call {call}: output differs from one process's by " \
                   f"{(got[0] - ref_ys[rank]).abs().max():.3g}"
    return None


def broken_promise(mesh) -> str | None:
    """T = 5 and 9 at the first call: a ValueError on every rank naming the promise and
    the ranks' T, before any exchange of rows; the process group still works after it."""
    layer = ExpertParallelMoE.from_moe(_layer("capacity"), mesh, equal_tokens_per_rank=True)
    x = torch.randn(5 + 4 * dist.get_rank(), W.D)
    try:
        layer(x)
        return "no error for T=5 and T=9 under equal_tokens_per_rank=True"
    except ValueError as e:
        if "equal_tokens_per_rank=True" not in str(e) or "T=[5, 9]" not in str(e):
            return f"the error does not name the promise and both T: {e}"
    flag = torch.ones(1)
    dist.all_reduce(flag)  # both ranks raised, neither waits in a collective
    return None if float(flag) == 2 else f"all_reduce after the error gave {float(flag)}"


def dropless_ignores_promise(mesh) -> str | None:
    """Dropless calls exchange their counts either way: T = 3 and 5 under the promise match
    one process (the promise concerns capacity mode only)."""
    full = W.full_layer(6, 2, None)
    data = W.inputs(mesh.world_size, equal_T=False)
    ref_ys, ref_grads = W.reference(full, data)
    layer = ExpertParallelMoE.from_moe(full, mesh, equal_tokens_per_rank=True)
    return W.compare(layer, data, ref_ys, ref_grads)


def bad_flag(mesh) -> str | None:
    try:
        ExpertParallelMoE(_layer("capacity").config, mesh, equal_tokens_per_rank=1)
    except ValueError as e:
        return None if "equal_tokens_per_rank=1" in str(e) else str(e)
    return "no ValueError for equal_tokens_per_rank=1"


def trainer_uses_promise(mesh, out: str) -> str | None:
    """The --nproc trainer's layers make the promise (its micro-batches hold the same T on
    every rank); a capacity-mode run of 3 steps and a validation gives bitwise the losses,
    gradient norms and weights of the same run with the exchange (ep_kwargs turn it off)."""
    from moekit.distributed import ExpertParallelMoE
    from moekit.train.distributed import DistributedTrainer

    mcfg, tcfg, corpus = W.lm_setup()
    mcfg = dataclasses.replace(mcfg, capacity_factor=1.0)
    tcfg = dataclasses.replace(tcfg, steps=3, eval_batches=2)
    runs = {}
    for promise in (True, False):
        kw = {} if promise else {"equal_tokens_per_rank": False}
        trainer = DistributedTrainer(mcfg, tcfg, corpus, f"{out}/{promise}", mesh,
                                     progress=False, **kw)
        flags = {m.equal_tokens_per_rank for m in trainer.model.modules()
                 if isinstance(m, ExpertParallelMoE)}
        if flags != {promise}:
            return f"the trainer's layers do not have equal_tokens_per_rank={promise}"
        results = [trainer.step_once() for _ in range(tcfg.steps)]
        val = trainer.validate(SimpleNamespace(write=lambda record: None))
        runs[promise] = ([(r.loss, r.grad_norm) for r in results], val,
                         trainer.model.state_dict())
    (steps, val, sd), (steps0, val0, sd0) = runs[True], runs[False]
    if steps != steps0 or val != val0:
        return f"(loss, grad norm), val loss {steps}, {val} != {steps0}, {val0} with the exchange"
    differ = [k for k in sd if not torch.equal(sd[k], sd0[k])]
    return f"weights differ: {differ}" if differ else None


def run(rank: int, world: int, port: int, out: str) -> dict:
    W.init(rank, world, port)
    res: dict = {}
    mesh = init_mesh(dp=1, ep=2)
    for name in CASES:
        W.check(res, name, matches_exchange, mesh, name)
    W.check(res, "broken_promise", broken_promise, mesh)
    W.check(res, "dropless_ignores_promise", dropless_ignores_promise, mesh)
    W.check(res, "bad_flag", bad_flag, mesh)
    W.check(res, "trainer_uses_promise", trainer_uses_promise, mesh, out)
    dist.destroy_process_group()
    return res
