"""Code that runs inside the gloo worker processes of tests/test_distributed.py.

Each ``run_*`` function runs on every rank, performs several checks and returns
a dict check-name -> None (passed) or an error message; the test module
asserts on those. Shape letters: T tokens, D hidden, E experts.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import signal
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.distributed import (
    CollectiveTimeoutError,
    ExpertParallelMoE,
    global_tokens_per_expert,
    init_mesh,
    reduce_gradients,
)
from moekit.distributed.checkpoint import load_checkpoint, save_checkpoint

D, F = 8, 12
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def init(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def full_layer(E: int, ep: int, capacity_factor: float | None, router: str = "softmax",
               seed: int = 0) -> MoE:
    """A layer whose routing is uneven and never picks the last EP rank's experts (expert
    choice: no selection bias, so every rank's experts pick tokens)."""
    token_choice = router != "expert_choice"
    cfg = MoEConfig(dim=D, ffn_dim=F, num_experts=E, top_k=2, router=router,
                    bias_update_rate=0.01 if token_choice else 0.0, aux_loss_coef=0.01,
                    z_loss_coef=0.001,
                    capacity_factor=capacity_factor, num_shared_experts=1, expert_bias=True)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for b in (moe.experts.b_in, moe.experts.b_out):
            b.normal_()
        if token_choice:
            moe.router.expert_bias[E - E // ep:] = -1e4  # the last EP rank gets no token
            moe.router.expert_bias[0] = 0.3  # expert 0 is popular: uneven loads, drops
    return moe


def inputs(world: int, equal_T: bool, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        T = 6 if equal_T else 3 + 2 * r  # odd, different token counts per rank
        out.append((torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)))
    return out


def reference(moe: MoE, data) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Single-process outputs per rank and grads of the mean of the per-rank losses."""
    moe = copy.deepcopy(moe)
    loss, ys = 0.0, []
    for x, g in data:
        y, aux, _ = moe(x)
        ys.append(y.detach())
        loss = loss + (y * g).sum() + aux
    (loss / len(data)).backward()
    return ys, {n: p.grad for n, p in moe.named_parameters()}


def compare(ep_moe: ExpertParallelMoE, data, ref_ys, ref_grads) -> str | None:
    rank = dist.get_rank()
    x, g = data[rank]
    ATOL, RTOL = TOLERANCE[x.dtype]
    out = ep_moe(x)
    ((out.output * g).sum() + out.aux_loss).backward()
    reduce_gradients(ep_moe, ep_moe.mesh)
    if not torch.allclose(out.output, ref_ys[rank], atol=ATOL, rtol=RTOL):
        return f"output differs by {(out.output - ref_ys[rank]).abs().max():.3g}"
    lo, hi = ep_moe.expert_start, ep_moe.expert_start + ep_moe.num_local
    for name, p in ep_moe.named_parameters():
        want = ref_grads[name][lo:hi] if name.startswith("experts.") else ref_grads[name]
        if p.grad is None or not torch.allclose(p.grad, want, atol=ATOL, rtol=RTOL):
            err = "None" if p.grad is None else f"{(p.grad - want).abs().max():.3g}"
            return f"grad of {name} differs by {err}"
    return check_comm(ep_moe, x, out.stats)


def check_comm(ep_moe: ExpertParallelMoE, x: torch.Tensor, stats) -> str | None:
    """Bytes/ideal is exactly 1 for dropless all-to-all; capacity mode's padding is
    the slots to other ranks minus the rows one process keeps for their experts."""
    moved, ideal = float(stats.comm_bytes_moved), float(stats.comm_bytes_ideal)
    cfg, P, El = ep_moe.config, ep_moe.mesh.ep, ep_moe.num_local
    if ep_moe.dispatcher == "all_to_all_dedup":
        return check_dedup_comm(ep_moe, x, stats)
    if ep_moe.dispatcher != "all_to_all" or cfg.router == "expert_choice":
        return None
    one = MoE(cfg)
    one.load_state_dict({k: v for k, v in ep_moe.state_dict().items()
                         if not k.startswith("experts.")}, strict=False)
    assigned_E = one(x.float()).stats.tokens_per_expert  # router math is fp32 anyway
    C = cfg.capacity(x.shape[0]) if cfg.capacity_factor else x.shape[0] * cfg.top_k
    kept_E = assigned_E.clamp_max(C)
    remote = int(kept_E.sum() - kept_E[ep_moe.expert_start:ep_moe.expert_start + El].sum())
    row = D * x.element_size()
    want_ideal = 2 * remote * row
    if ideal != want_ideal:
        return f"ideal bytes {ideal} != {want_ideal}"
    if cfg.capacity_factor is None and moved != ideal:
        return f"dropless bytes moved {moved} != ideal {ideal}"
    if cfg.capacity_factor is not None:
        want_pad = El * C * (P - 1) - remote
        if float(stats.comm_padding_rows) != want_pad or moved != 2 * El * C * (P - 1) * row:
            return f"padding {float(stats.comm_padding_rows)} != {want_pad} or moved {moved}"
    return None


def check_dedup_comm(ep_moe: ExpertParallelMoE, x: torch.Tensor, stats) -> str | None:
    """all_to_all_dedup moves one row per (token, other rank owning any of its experts)
    each way, counted here from the one-process router's choice per token; ideal stays
    the rows per routed (token, expert) pair owned elsewhere. (With ep=2, full_layer's
    rank 1 sends every token's two rows to rank 0's experts: one pair, half the bytes.)"""
    El, me = ep_moe.num_local, ep_moe.mesh.ep_rank
    one = MoE(ep_moe.config)
    one.load_state_dict({k: v for k, v in ep_moe.state_dict().items()
                         if not k.startswith("experts.")}, strict=False)
    plan = one.router(x.float()).plan
    owners = [(int(t), int(e) // El) for t, e in zip(plan.token_S, plan.expert_S, strict=True)]
    pairs = len({(t, p) for t, p in owners if p != me})
    rows = sum(p != me for _, p in owners)
    row = D * x.element_size()
    got = (float(stats.comm_bytes_moved), float(stats.comm_bytes_ideal))
    if got != (2 * pairs * row, 2 * rows * row):
        return f"dedup moved / ideal bytes {got} != {(2 * pairs * row, 2 * rows * row)}"
    return None


def check(results: dict, name: str, fn, *args) -> None:
    try:
        results[name] = fn(*args)
    except Exception:
        results[name] = traceback.format_exc()


def parity(mesh, E, capacity_factor, dispatcher="all_to_all", router="softmax",
           overlap_chunks=1, dtype=torch.float32, equal_T: bool | None = None) -> str | None:
    """equal_T: None gives 6 tokens a rank with a capacity or all_gather, 3 + 2 * rank
    otherwise (tests/test_distributed_uneven.py covers 2 ranks of different T in depth)."""
    full = full_layer(E, mesh.ep, capacity_factor, router)
    for p in full.parameters():  # not .to(dtype): the router's load/bias buffers stay fp32
        p.data = p.data.to(dtype)
    if equal_T is None:
        equal_T = capacity_factor is not None or dispatcher == "all_gather"
    data = inputs(mesh.world_size, equal_T=equal_T)
    data = [(x.to(dtype), g.to(dtype)) for x, g in data]
    ref_ys, ref_grads = reference(full, data)
    ep_moe = ExpertParallelMoE.from_moe(full, mesh, dispatcher=dispatcher,
                                        overlap_chunks=overlap_chunks)
    return compare(ep_moe, data, ref_ys, ref_grads)


def infer_parity(mesh, E, capacity_factor, dispatcher="all_to_all", router="softmax"
                 ) -> str | None:
    """``infer`` (generation) on the expert-parallel layer against the one-process layer's
    eval forward routed as generation routes: a token-choice layer's copy without the
    capacity factor (dropless), an expert-choice layer as it is."""
    full = full_layer(E, mesh.ep, capacity_factor, router).eval()
    dropless = router != "expert_choice" and capacity_factor is not None
    want_cfg = dataclasses.replace(full.config, capacity_factor=None) if dropless else full.config
    want_moe = MoE(want_cfg)
    want_moe.load_state_dict(full.state_dict())
    want_moe.eval()
    x, _ = inputs(mesh.world_size, equal_T=True)[dist.get_rank()]
    ep_moe = ExpertParallelMoE.from_moe(full, mesh, dispatcher=dispatcher).eval()
    with torch.no_grad():
        got, want, dropped = ep_moe.infer(x), want_moe(x).output, full(x).output
    if dropless and torch.allclose(dropped, want, atol=1e-5, rtol=1e-4):
        return "the capacity drops nothing here: the check would pass either way"
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
        return f"infer differs from the one-process layer by {(got - want).abs().max():.3g}"
    return None


def run_world2(rank: int, world: int, port: int, ckpt: str) -> dict:
    init(rank, world, port)
    res: dict = {}
    mesh = init_mesh(dp=1, ep=2)
    check(res, "ep2_dropless", parity, mesh, 6, None)
    check(res, "ep2_capacity", parity, mesh, 6, 1.0)
    check(res, "ep2_sigmoid_dropless", parity, mesh, 6, None, "all_to_all", "sigmoid")
    check(res, "ep2_expert_choice", parity, mesh, 4, 1.0, "all_to_all", "expert_choice")
    check(res, "ep2_dropless_bf16", parity, mesh, 6, None, "all_to_all", "softmax", 1,
          torch.bfloat16)
    check(res, "ep2_capacity_bf16", parity, mesh, 6, 1.0, "all_to_all", "softmax", 1,
          torch.bfloat16)
    check(res, "ep2_allgather_dropless", parity, mesh, 6, None, "all_gather")
    check(res, "ep2_allgather_capacity", parity, mesh, 6, 1.0, "all_gather")
    check(res, "ep2_overlap_dropless", parity, mesh, 6, None, "all_to_all", "softmax", 3)
    check(res, "ep2_dedup_dropless", parity, mesh, 6, None, "all_to_all_dedup")
    check(res, "ep2_dedup_sigmoid", parity, mesh, 6, None, "all_to_all_dedup", "sigmoid")
    check(res, "ep2_dedup_expert_choice", parity, mesh, 4, None, "all_to_all_dedup",
          "expert_choice")
    check(res, "ep2_dedup_bf16", parity, mesh, 6, None, "all_to_all_dedup", "softmax", 1,
          torch.bfloat16)
    check(res, "ep2_infer_capacity", infer_parity, mesh, 6, 1.0)
    check(res, "ep2_infer_sigmoid_capacity", infer_parity, mesh, 6, 1.0, "all_to_all",
          "sigmoid")
    check(res, "ep2_infer_allgather_capacity", infer_parity, mesh, 6, 1.0, "all_gather")
    check(res, "ep2_infer_expert_choice", infer_parity, mesh, 4, 1.0, "all_to_all",
          "expert_choice")
    check(res, "ep2_infer_dedup", infer_parity, mesh, 6, None, "all_to_all_dedup")
    check(res, "ep2_bias_update", bias_update_agrees, mesh)
    check(res, "ep2_bad_ep", bad_ep, mesh)
    check(res, "ep2_bad_dedup", bad_dedup, mesh)
    check(res, "ckpt_save_ep2", save_ep2, mesh, ckpt)
    check(res, "train_ep2_matches_one_process", train_matches, mesh, ckpt)
    check(res, "resume_newest_complete_runs_no_code", resume_guarded, mesh, ckpt)
    check(res, "train_ep2_consolidated", consolidated_matches, mesh, ckpt)
    check(res, "resume_newer_one_process_checkpoint", resume_newer_one_process, mesh, ckpt)
    check(res, "resume_keeps_load_since_validation", resume_keeps_load, mesh, ckpt)
    check(res, "val_under_grad_accum_as_one_process", val_under_grad_accum, mesh, ckpt)
    check(res, "resume_keeps_collapse_patience", resume_keeps_collapse, mesh, ckpt)
    dist.destroy_process_group()
    return res


def run_world4(rank: int, world: int, port: int, ckpt: str) -> dict:
    init(rank, world, port)
    res: dict = {}
    mesh4 = init_mesh(dp=1, ep=4)
    check(res, "ep4_dropless", parity, mesh4, 8, None)
    check(res, "ep4_capacity", parity, mesh4, 8, 1.0)
    mesh22 = init_mesh(dp=2, ep=2)
    check(res, "dp2ep2_dropless", parity, mesh22, 6, None)
    check(res, "dp2ep2_capacity", parity, mesh22, 6, 1.0)
    check(res, "dp2ep2_allgather", parity, mesh22, 6, None, "all_gather")
    check(res, "ep4_dedup_dropless", parity, mesh4, 8, None, "all_to_all_dedup")
    # T = 3, 5, 7, 9: four capacities; all_gather pads each ep pair to its larger T
    check(res, "ep4_capacity_uneven_T", parity, mesh4, 8, 1.0, "all_to_all", "softmax", 1,
          torch.float32, False)
    check(res, "dp2ep2_allgather_uneven_T", parity, mesh22, 6, 1.0, "all_gather", "softmax",
          1, torch.float32, False)
    check(res, "dp2ep2_infer_capacity", infer_parity, mesh22, 6, 1.0)
    check(res, "dp2ep2_dedup", parity, mesh22, 6, None, "all_to_all_dedup")
    check(res, "ckpt_load_ep4", load_reshard, mesh4, ckpt)
    check(res, "train_resume_ep4", train_resume_ep4, mesh4, ckpt)
    dist.destroy_process_group()
    return res


def bias_update_agrees(mesh) -> str | None:
    full = full_layer(4, mesh.ep, None)
    ep_moe = ExpertParallelMoE.from_moe(full, mesh)
    x, _ = inputs(mesh.world_size, equal_T=False)[dist.get_rank()]
    ep_moe(x)
    ep_moe.update_bias()
    for x_r, _ in inputs(mesh.world_size, equal_T=False):  # one process, all ranks' tokens
        full(x_r)
    full.update_bias()
    if not torch.equal(ep_moe.router.expert_bias, full.router.expert_bias):
        return f"bias {ep_moe.router.expert_bias} != {full.router.expert_bias}"
    ep_moe.eval()
    full.eval()
    load_E = global_tokens_per_expert(ep_moe(x).stats, mesh)
    want_E = sum(full(x_r)[2].tokens_per_expert for x_r, _ in inputs(mesh.world_size, False))
    if not torch.equal(load_E, want_E):
        return f"global load {load_E} != one process {want_E}"
    return None


def bad_ep(mesh) -> str | None:
    cfg = MoEConfig(dim=D, ffn_dim=F, num_experts=3, top_k=1)
    try:
        ExpertParallelMoE(cfg, mesh)
    except ValueError as e:
        return None if "ep=2" in str(e) and "num_experts=3" in str(e) else str(e)
    return "no ValueError for num_experts=3, ep=2"


def bad_dedup(mesh) -> str | None:
    """all_to_all_dedup is dropless and unchunked: capacity mode and overlap are refused."""
    for kwargs, words in [(dict(capacity_factor=1.25), "capacity_factor=1.25"),
                          (dict(overlap_chunks=2), "overlap_chunks=2")]:
        cf = kwargs.get("capacity_factor")
        cfg = MoEConfig(dim=D, ffn_dim=F, num_experts=4, top_k=2, capacity_factor=cf)
        try:
            ExpertParallelMoE(cfg, mesh, dispatcher="all_to_all_dedup",
                              overlap_chunks=kwargs.get("overlap_chunks", 1))
        except ValueError as e:
            if "dispatcher='all_to_all_dedup'" not in str(e) or words not in str(e):
                return str(e)
        else:
            return f"no ValueError for all_to_all_dedup with {words}"
    return None


def save_ep2(mesh, ckpt: str) -> str | None:
    ep_moe = ExpertParallelMoE.from_moe(full_layer(4, 4, None, seed=7), mesh)
    save_checkpoint(ckpt, ep_moe)
    return None


def load_reshard(mesh, ckpt: str) -> str | None:
    want = full_layer(4, 4, None, seed=7)  # what was saved at ep=2
    ep_moe = ExpertParallelMoE.from_moe(full_layer(4, 4, None, seed=99), mesh)
    load_checkpoint(ckpt, ep_moe)
    lo, hi = ep_moe.expert_start, ep_moe.expert_start + ep_moe.num_local
    for name, t in ep_moe.state_dict().items():
        ref = want.state_dict()[name]
        ref = ref[lo:hi] if name.startswith("experts.") else ref
        if not torch.equal(t, ref):
            return f"{name} differs after ep=2 -> ep=4 load"
    save_checkpoint(ckpt + "_then_ep4", ep_moe)  # the parent loads it back at ep=1
    return None


def run_kill(rank: int, world: int, port: int, timeout_s: float, how: str) -> dict:
    """Rank 1 dies (SIGKILL) or freezes (SIGSTOP) after one step; rank 0 must raise
    CollectiveTimeoutError in time."""
    init(rank, world, port, timeout_s)
    mesh = init_mesh(dp=1, ep=2)
    ep_moe = ExpertParallelMoE.from_moe(full_layer(4, 2, None), mesh)
    x = torch.randn(4, D)
    ep_moe(x)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    start = time.monotonic()
    try:
        for _ in range(100):
            ep_moe(x)
            time.sleep(0.05)
    except CollectiveTimeoutError as e:
        return {"error": str(e), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def run_kill_before_bias_update(rank: int, world: int, port: int, timeout_s: float) -> dict:
    """Rank 1 dies (SIGKILL) after a forward; rank 0's aux-loss-free bias update (the
    all-reduce of the loads) must raise CollectiveTimeoutError naming that collective."""
    init(rank, world, port, timeout_s)
    mesh = init_mesh(dp=1, ep=2)
    ep_moe = ExpertParallelMoE.from_moe(full_layer(4, 2, None), mesh)
    ep_moe(torch.randn(4, D))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        ep_moe.update_bias()
    except CollectiveTimeoutError as e:
        return {"error": str(e), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def run_kill_in_save(rank: int, world: int, port: int, timeout_s: float, ckpt: str) -> dict:
    """Rank 1 dies (SIGKILL) while DCP writes its shard; rank 0 must raise a named error."""
    from torch.distributed.checkpoint import FileSystemWriter

    init(rank, world, port, timeout_s)
    mesh = init_mesh(dp=1, ep=2)
    ep_moe = ExpertParallelMoE.from_moe(full_layer(4, 2, None), mesh)
    if rank == 1:
        FileSystemWriter.write_data = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        save_checkpoint(ckpt, ep_moe)
    except BaseException as e:  # noqa: BLE001 - the test asserts on the type's name
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


# -- training the tiny LM -------------------------------------------------------


def run_interrupt_after_save(rank: int, world: int, port: int, out: str) -> dict:
    """SIGTERM arrives during the save at step 2 of 4: fit stops at that step boundary
    without writing dcp_step_00000002 a second time (the check had compared the
    dcp_step_* name with step_*)."""
    from moekit.train.distributed import DistributedTrainer
    from moekit.train.interrupt import Interrupted

    init(rank, world, port)
    mesh = init_mesh(dp=1, ep=2)
    mcfg, tcfg, corpus = lm_setup()
    tcfg = dataclasses.replace(tcfg, steps=4, save_every=2, eval_every=4, eval_batches=1)
    trainer = DistributedTrainer(mcfg, tcfg, corpus, out, mesh, progress=False)
    saves: list[int] = []
    real_save = trainer.save

    def save_then_signal() -> Path:
        path = real_save()
        saves.append(trainer.step)
        if saves == [2]:  # every rank, as torchrun forwards the signal to each
            os.kill(os.getpid(), signal.SIGTERM)
        return path
    trainer.save = save_then_signal
    try:
        trainer.fit()
        error = "fit was not interrupted"
    except Interrupted as e:
        error = None if e.signum == signal.SIGTERM else f"signal {e.signum}"
    dist.barrier()
    dist.destroy_process_group()
    return {"error": error, "saves": saves, "step": trainer.step,
            "last": str(trainer.last_checkpoint)}


def run_signal_one_rank(rank: int, world: int, port: int, out: str) -> dict:
    """SIGTERM reaches rank 1 alone, inside step 2 of 4 (``kill`` of one pid). Each rank
    had checked its own flag: rank 1 stopped and waited in the save's barrier while rank 0
    entered step 3's all-to-all, both until the collective timeout, saving nothing. Now
    every rank stops after step 2 with one checkpoint, and the run resumed from it ends
    with the weights of a run never stopped."""
    from moekit.train.distributed import DistributedTrainer
    from moekit.train.interrupt import StopAtBoundary

    init(rank, world, port, timeout_s=20.0)
    mesh = init_mesh(dp=1, ep=2)
    mcfg, tcfg, corpus = lm_setup()
    tcfg = dataclasses.replace(tcfg, steps=4, save_every=100, eval_every=100, eval_batches=1)
    trainer = DistributedTrainer(mcfg, tcfg, corpus, out, mesh, progress=False)
    real_step = trainer.step_once

    def step_once():
        res = real_step()
        if rank == 1 and trainer.step == 1:  # step 2 (the counter moves after it)
            os.kill(os.getpid(), signal.SIGTERM)
        return res
    trainer.step_once = step_once
    start = time.monotonic()
    try:
        trainer.fit()
        error = "fit was not interrupted"
    except StopAtBoundary as e:
        error = None if e.signum == signal.SIGTERM else f"signal {e.signum}"
    except BaseException as e:  # noqa: BLE001 - the test reports it
        error = f"{type(e).__name__}: {e}"
    res = {"error": error, "elapsed": time.monotonic() - start, "step": trainer.step,
           "last": str(trainer.last_checkpoint)}
    if error is None:
        resumed = DistributedTrainer.resume_distributed(out, corpus, mesh, progress=False)
        res["resumed_at"], res["resumed_wall_s"] = resumed.step, resumed.wall_s
        resumed.fit()
        whole = DistributedTrainer(mcfg, tcfg, corpus, f"{out}_whole", mesh, progress=False)
        whole.fit()
        got, want = resumed.model.state_dict(), whole.model.state_dict()
        res["differ"] = [k for k in want if not torch.equal(got[k], want[k])]
    dist.barrier()
    dist.destroy_process_group()
    return res


def lm_setup():
    from moekit.models.config import preset
    from moekit.train.data import Corpus, encode
    from moekit.train.trainer import TrainConfig

    text = (Path(__file__).parent.parent / "src/moekit/layer.py").read_text()
    data = encode(text * 2)
    corpus = Corpus(data[: len(data) * 9 // 10], data[len(data) * 9 // 10:], "layer.py", 1, 1)
    # aux_loss_coef=0: the switch aux loss is nonlinear in the batch, so it is per rank
    # under EP (as in Megatron-Core); z-loss and bias balancing are exact.
    mcfg = preset("tiny", aux_loss_coef=0.0, z_loss_coef=1e-3, bias_update_rate=0.01)
    tcfg = TrainConfig(steps=20, batch_size=4, seq_len=32, warmup_steps=3, lr=3e-3,
                       grad_clip=0.5)
    return mcfg, tcfg, corpus


def one_process_losses(mcfg, tcfg, corpus, out: Path) -> list[tuple[float, float]]:
    from moekit.train.trainer import Trainer

    trainer = Trainer(mcfg, tcfg, corpus, out, progress=False)
    losses = []
    for _ in range(tcfg.steps):
        res = trainer.step_once()
        losses.append((res.loss, res.grad_norm))
        trainer.step += 1
    return losses


def train_matches(mesh, ckpt: str) -> str | None:
    from moekit.train.distributed import DistributedTrainer

    mcfg, tcfg, corpus = lm_setup()
    tmp = Path(ckpt).parent / f"lm_rank{dist.get_rank()}"
    want = one_process_losses(mcfg, tcfg, corpus, tmp / "one")
    trainer = DistributedTrainer(mcfg, tcfg, corpus, Path(ckpt).parent / "lm", mesh,
                                 progress=False)
    got = []
    for _ in range(tcfg.steps):
        res = trainer.step_once()
        trainer.step += 1
        got.append((res.loss, res.grad_norm))
    trainer.save()
    # Adam hides a wrong clipping scale in the loss; the grad norms (before clipping) do not.
    if not torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-4):
        return f"(loss, grad norm) differ: ep=2 {got} vs one process {want}"
    if not got[-1][0] < got[0][0] - 0.1:
        return f"the loss did not go down: {got}"
    return None


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def resume_guarded(mesh, ckpt: str) -> str | None:
    """--resume RUN takes the newest complete dcp_step_*; a crafted .metadata (with a
    matching manifest) raises CheckpointError on every rank and runs nothing."""
    import pickle
    import shutil

    from moekit.errors import CheckpointError
    from moekit.train import rundir
    from moekit.train.distributed import DistributedTrainer

    _, _, corpus = lm_setup()
    src = Path(ckpt).parent / "lm" / "dcp_step_00000020"
    run, evil, marker = (Path(ckpt).parent / n for n in ("guarded", "evil", "PWNED"))
    if dist.get_rank() == 0:
        shutil.copytree(src, run / src.name)
        (run / "dcp_step_00000030").mkdir()  # a killed save: no manifest
        shutil.copytree(src, evil / src.name)
        (evil / src.name / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
        rundir.write_manifest(evil / src.name, rundir.verify_manifest(src))
    dist.barrier()
    trainer = DistributedTrainer.resume_distributed(run, corpus, mesh, progress=False)
    if trainer.step != 20:
        return f"resumed at step {trainer.step}, not at the newest complete checkpoint 20"
    try:
        DistributedTrainer.resume_distributed(evil, corpus, mesh, progress=False)
        return "the crafted .metadata was accepted"
    except CheckpointError as e:
        if ".metadata" not in str(e):
            return f"CheckpointError does not name the file: {e}"
    dist.barrier()
    return "the crafted .metadata ran a command" if marker.exists() else None


def consolidated_matches(mesh, ckpt: str) -> str | None:
    """The ep=2 run's single-process step_* checkpoint (written beside dcp_step_*) holds
    what one process training the same 20 steps holds: weights and AdamW moments."""
    from moekit.train.trainer import Trainer

    if dist.get_rank() != 0:
        return None
    mcfg, tcfg, corpus = lm_setup()
    ref = Trainer(mcfg, tcfg, corpus, Path(ckpt).parent / "one_ref", progress=False)
    for _ in range(tcfg.steps):
        ref.step_once()
        ref.step += 1
    run = Path(ckpt).parent / "lm"
    got = Trainer.resume(run, corpus, out_dir=Path(ckpt).parent / "resumed", progress=False)
    if got.step != 20 or got.last_checkpoint.name != "step_00000020":
        return f"resumed {got.last_checkpoint} at step {got.step}, not step_00000020"
    # fp32, 20 AdamW steps; the losses agree to 1e-5 (train_ep2_matches_one_process)
    for (name, want), have in zip(ref.model.state_dict().items(),
                                  got.model.state_dict().values(), strict=True):
        if not torch.allclose(have, want, atol=1e-5, rtol=1e-4):
            return f"{name}: consolidated {have.flatten()[:4]} vs one process {want.flatten()[:4]}"
    for p_ref, p_got in zip(ref.model.parameters(), got.model.parameters(), strict=True):
        s_ref, s_got = ref.optimizer.state[p_ref], got.optimizer.state[p_got]
        if float(s_got["step"]) != 20:
            return f"optimizer step {float(s_got['step'])}, not 20"
        for key in ("exp_avg", "exp_avg_sq"):
            if not torch.allclose(s_got[key], s_ref[key], atol=1e-6, rtol=1e-3):
                return f"optimizer {key} of a {tuple(p_ref.shape)} parameter differs"
    return None


def resume_newer_one_process(mesh, ckpt: str) -> str | None:
    """A one-process --resume of the ep=2 run goes on to step 22 and writes step_* only;
    an ep=2 --resume of the run directory continues from that step_00000022, each rank
    with its experts' rows of the weights and AdamW moments (it had taken the older
    dcp_step_00000020, and its saves then pruned the one-process steps)."""
    import shutil

    from moekit.train.distributed import DistributedTrainer
    from moekit.train.trainer import Trainer

    _, _, corpus = lm_setup()
    run = Path(ckpt).parent / "mixed"
    if dist.get_rank() == 0:
        shutil.copytree(Path(ckpt).parent / "lm", run)
        one = Trainer.resume(run, corpus, progress=False, steps=22)
        for _ in range(2):
            one.step_once()
            one.step += 1
        one.save()
    dist.barrier()
    trainer = DistributedTrainer.resume_distributed(run, corpus, mesh, progress=False,
                                                    steps=24)
    if trainer.step != 22:
        return f"resumed at step {trainer.step}, not at the one-process step_00000022"
    ref = Trainer.resume(run / "step_00000022", corpus, progress=False,
                         out_dir=Path(ckpt).parent / f"mixed_ref{dist.get_rank()}")
    ref_params = dict(ref.model.named_parameters())
    ref_sd = ref.model.state_dict()
    for name, t in trainer.model.state_dict().items():
        want = ref_sd[name]
        if ".experts." in name:
            want = want[mesh.ep_rank * t.shape[0]:(mesh.ep_rank + 1) * t.shape[0]]
        if not torch.equal(t, want):
            return f"{name} differs from the one-process checkpoint's"
    for name, p in trainer.model.named_parameters():
        have, want = trainer.optimizer.state[p], ref.optimizer.state[ref_params[name]]
        if float(have["step"]) != 22:
            return f"optimizer step of {name} is {float(have['step'])}, not 22"
        for key in ("exp_avg", "exp_avg_sq"):
            w = want[key]
            if ".experts." in name:
                n = have[key].shape[0]
                w = w[mesh.ep_rank * n:(mesh.ep_rank + 1) * n]
            if not torch.equal(have[key], w):
                return f"optimizer {key} of {name} differs from the one-process checkpoint's"
    return None


def _whole_and_resumed(mesh, ckpt: str, name: str, **train):
    """A 4-step run saved at step 2 (``train`` on top), and a run resumed from that save:
    (resumed, uninterrupted) trainers, both fitted."""
    from moekit.train.distributed import DistributedTrainer

    mcfg, tcfg, corpus = lm_setup()
    tcfg = dataclasses.replace(tcfg, steps=4, save_every=2, eval_every=4, eval_batches=1,
                               keep_checkpoints=5, **train)
    root = Path(ckpt).parent / name
    whole = DistributedTrainer(mcfg, tcfg, corpus, root / "whole", mesh, progress=False)
    whole.fit()
    again = DistributedTrainer.resume_distributed(
        root / "whole" / "dcp_step_00000002", corpus, mesh, out_dir=root / "again",
        progress=False)
    again.fit()
    return again, whole


def resume_keeps_load(mesh, ckpt: str) -> str | None:
    """Resumed from the save between two validations, the next val record's expert_load
    still covers every step since the last validation (trainer.json carries the load)."""
    runs = _whole_and_resumed(mesh, ckpt, "load_resume")
    vals = [[r["expert_load"] for r in t.history if r["kind"] == "val" and r["step"] == 4]
            for t in runs]
    return None if vals[0] == vals[1] and vals[1] else \
        f"step 4's expert_load after the resume {vals[0]} != uninterrupted {vals[1]}"


def resume_keeps_collapse(mesh, ckpt: str) -> str | None:
    """Resumed from the save at step 2, the collapse warning (every expert with a token is
    hot at collapse_fraction=0; patience 3) comes at step 3 as in the uninterrupted run:
    trainer.json carries the monitor's streaks (the patience had restarted: step 5)."""
    runs = _whole_and_resumed(mesh, ckpt, "collapse_resume", collapse_fraction=0.0,
                              collapse_patience=3)
    got, want = ([(r["step"], r["message"]) for r in t.history if r["kind"] == "collapse"]
                 for t in runs)
    return None if got == want and [s for s, _ in want] == [3, 3] else \
        f"collapse warnings after the resume {got} != uninterrupted {want}"


def val_under_grad_accum(mesh, ckpt: str) -> str | None:
    """An --nproc run validates as one process does: batches of batch_size * grad_accum
    windows (batch_size is the global batch), checked against the hand-written loss of
    the same model on all 8 windows in one forward (it had validated on 4)."""
    from types import SimpleNamespace

    from moekit.models.transformer import MoETransformer
    from moekit.train.distributed import DistributedTrainer
    from tests.reference import ref_val_loss

    mcfg, tcfg, corpus = lm_setup()
    tcfg = dataclasses.replace(tcfg, batch_size=4, grad_accum=2, eval_batches=2)
    trainer = DistributedTrainer(mcfg, tcfg, corpus, Path(ckpt).parent / "val_accum", mesh,
                                 progress=False)
    got = trainer.validate(SimpleNamespace(write=lambda record: None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)  # the trainer's model: built from the run's seed
        want = ref_val_loss(MoETransformer(mcfg), corpus.val, 8, tcfg.seq_len, 2)
    return None if abs(got - want) <= 1e-5 * want else \
        f"val loss {got} at ep=2 with grad_accum=2, want {want} (8 windows a batch)"


def train_resume_ep4(mesh, ckpt: str) -> str | None:
    """The ep=2 trainer's DCP checkpoint resumes at ep=4 with the same weights as ep=1."""
    from moekit.models.transformer import MoETransformer
    from moekit.train.distributed import DistributedTrainer

    mcfg, tcfg, corpus = lm_setup()
    path = Path(ckpt).parent / "lm" / "dcp_step_00000020"
    trainer = DistributedTrainer.resume_distributed(path, corpus, mesh, progress=False)
    plain = MoETransformer(mcfg)
    load_checkpoint(path, plain)
    if trainer.step != 20:
        return f"resumed at step {trainer.step}, not 20"
    full = plain.state_dict()
    for name, t in trainer.model.state_dict().items():
        ref = full[name]
        if ".experts." in name:
            lo = dist.get_rank() * t.shape[0]
            ref = ref[lo:lo + t.shape[0]]
        if not torch.equal(t, ref):
            return f"{name} differs between the ep=4 resume and the ep=1 load"
    state = trainer.optimizer.state
    if not all(float(s["step"]) == 20 for s in state.values()):
        return "optimizer state was not restored"
    return None
