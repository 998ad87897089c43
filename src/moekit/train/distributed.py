"""Expert-parallel training: the Trainer on a (dp, ep) mesh, launched by torchrun.

Every rank builds the full model from the same seed, then keeps only its
experts (``moekit.distributed.parallelize``). Each optimizer step's global
batch is the single-process batch, split by rows over the ranks, so with a
dropless router the losses and updates equal one process training on the
whole batch (up to fp32 rounding). Losses whose value is nonlinear in the
batch (switch and sequence aux losses, capacity) are computed per rank, as in
Megatron-Core; they then differ slightly from one process.

Shape letters: B batch, L sequence, E experts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moekit.distributed import (
    ExpertParallelMesh,
    is_expert_parameter,
    parallelize,
    reduce_gradients,
)
from moekit.distributed.checkpoint import load_checkpoint, model_state_dict, save_checkpoint
from moekit.errors import CheckpointError
from moekit.models.config import LMConfig
from moekit.models.transformer import MoETransformer
from moekit.train import checkpoint as ckpt_io
from moekit.train import rundir
from moekit.train.checkpoint_state import check_state_dcp
from moekit.train.data import Corpus
from moekit.train.step import micro_batch_loss, validation_micro_batches
from moekit.train.trainer import (
    StepResult,
    TrainConfig,
    Trainer,
    accumulate_gradients,
    finish_step,
    lr_at,
    make_optimizer,
)

DCP_PREFIX = "dcp_step_"
TRAINER_FILE = "trainer.json"


def find_resumable(run_dir: str | Path) -> Path:
    """The newest complete ``dcp_step_*`` checkpoint of a run directory.

    A DCP checkpoint is complete once rank 0 has written its manifest.json, after
    every rank finished writing; a rank killed while saving leaves none (and since
    saves go to a temporary directory first, no ``dcp_step_*`` at all)."""
    run_dir = Path(run_dir)
    dirs = rundir.checkpoint_dirs(run_dir, rundir.DCP_DIR)
    complete = [d for d in dirs if (d / rundir.MANIFEST).is_file()]
    if not complete:
        raise CheckpointError(
            f"resume={str(run_dir)!r} holds no complete {DCP_PREFIX}NNNNNNNN checkpoint"
            + (f" (incomplete: {[d.name for d in dirs]})" if dirs else ""))
    return complete[-1]


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def newest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run directory an ``--nproc`` run can resume: its newest
    complete ``dcp_step_*``, or the ``step_*`` that LATEST names where that one is newer.

    A one-process ``--resume`` of an ``--nproc`` run writes ``step_*`` only; taking the
    newest ``dcp_step_*`` alone had gone back to the older state without a word, and the
    saves of that session then pruned the one-process steps."""
    run_dir = Path(run_dir)
    try:
        dcp: Path | None = find_resumable(run_dir)
    except CheckpointError:
        dcp = None
    try:
        one = ckpt_io.resolve(run_dir) if (run_dir / ckpt_io.LATEST).is_file() else None
    except CheckpointError as e:  # a damaged LATEST: say which checkpoint is there instead
        if dcp is None:
            raise
        raise CheckpointError(f"{e}; to resume from {dcp} (it may be older than what "
                              "LATEST named), pass that directory to --resume") from e
    if one is not None and (dcp is None or _step_of(one) > _step_of(dcp)):
        return one
    return dcp if dcp is not None else find_resumable(run_dir)  # raises, naming the run


def is_one_process_checkpoint(path: Path) -> bool:
    return rundir.STEP_DIR.fullmatch(path.name) is not None


def resume_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint ``resumable_checkpoint`` returned: trainer.json of
    a ``dcp_step_*``, state.json of a one-process ``step_*`` (both checked)."""
    return _resume_source(path)[0]


def _resume_source(path: Path) -> tuple[dict[str, Any], ckpt_io.Checkpoint | None]:
    """``resume_state``, and the one-process checkpoint it came from (None for a
    ``dcp_step_*``), whose full tensors ``_load_one_process`` shards."""
    if not is_one_process_checkpoint(path):
        return read_trainer_state(path), None
    ck = _training_checkpoint(path)
    return ck.state, ck


def resume_candidate(path: str | Path) -> Path:
    """The checkpoint ``resumable_checkpoint`` will pick for ``path``, found without a
    process group and without cleaning anything (for the checks before torchrun starts)."""
    path = Path(path)
    if rundir.DCP_DIR.fullmatch(path.name) or is_one_process_checkpoint(path):
        return path
    return newest_checkpoint(path)


def _training_checkpoint(path: Path) -> ckpt_io.Checkpoint:
    ck = ckpt_io.load_checkpoint(path)
    missing = [k for k in ("train_config", "counters") if k not in ck.state]
    if missing:  # e.g. written by `moekit convert --to moekit`: weights only
        raise CheckpointError(f"checkpoint {ck.path} holds no training state (its "
                              f"{ckpt_io.STATE_FILE} has no {' or '.join(missing)}): it "
                              "cannot be resumed")
    return ck


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer.json of a complete, intact DCP checkpoint, every field checked."""
    rundir.verify_manifest(path, required=(TRAINER_FILE, ".metadata"))
    try:
        state = json.loads((path / TRAINER_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / TRAINER_FILE} is unreadable or corrupt: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / TRAINER_FILE} must hold a JSON object")
    check_state_dcp(state, path / TRAINER_FILE)
    return state


@torch.no_grad()
def global_grad_norm(model: nn.Module, mesh: ExpertParallelMesh) -> Tensor:
    """L2 norm of the whole model's gradient after ``reduce_gradients``.

    Dense gradients are identical on every rank; expert gradients are split over
    the EP ranks, so their squares are summed over the "ep" group.
    """
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            sq = p.grad.detach().double().square().sum().cpu()
            if is_expert_parameter(p):
                expert += sq
            else:
                dense += sq
    mesh.ep_comm.run("all_reduce of the gradient norm", dist.all_reduce, expert,
                     group=mesh.ep_comm.group)
    return (dense + expert).sqrt()


def _mean_over_ranks(values: list[float], mesh: ExpertParallelMesh) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    mesh.world.run("all_reduce of the step's losses", dist.all_reduce, t,
                   group=mesh.world.group)
    return (t / mesh.world_size).tolist()


def _global_loads(loads: list[Tensor], mesh: ExpertParallelMesh) -> Tensor:
    load_LE = torch.stack(loads).sum(0) if loads else torch.zeros(0, 0, dtype=torch.long)
    if load_LE.numel():
        mesh.world.run("all_reduce of expert loads", dist.all_reduce, load_LE,
                       group=mesh.world.group)
    return load_LE


def distributed_train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                           batches: list[tuple[Tensor, Tensor]], cfg: TrainConfig, lr: float,
                           mesh: ExpertParallelMesh, forward: nn.Module | None = None
                           ) -> StepResult:
    """``moekit.train.train_step`` on this rank's rows, with gradients, the gradient
    norm, losses and loads reduced over the mesh. Every rank returns the same result."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, aux, loads, tokens = accumulate_gradients(forward or model, batches, cfg)
    reduce_gradients(model, mesh)
    norm = global_grad_norm(model, mesh)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    params = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(params, clip, norm.float())
    loss, aux = _mean_over_ranks([loss, aux], mesh)
    # ExpertParallelMoE sums the bias-update loads over all ranks itself
    return finish_step(model, optimizer, loss, aux, float(norm), _global_loads(loads, mesh),
                       tokens * mesh.world_size)


@torch.no_grad()
def distributed_evaluate(model: nn.Module, data_N: Tensor, cfg: TrainConfig,
                         mesh: ExpertParallelMesh) -> float:
    """``evaluate``'s loss with the micro-batches shared out: rank r runs r, r + world, ...
    and the loss sums and target counts are all-reduced (fp64), so every rank returns the
    mean over all of them (the same number as one process, to fp32 rounding of each
    micro-batch's loss and fp64 rounding of the sum's order). Every rank had run every
    micro-batch. Whole micro-batches, not windows: a capacity or expert-choice routing
    depends on the tokens of a call, and each micro-batch keeps the T one process gives it.
    Where the count does not divide (eval_batches * grad_accum % world), the ranks left
    short run one more forward, uncounted, under ep > 1: the expert exchange pairs every
    rank's calls."""
    batches, rank, world = validation_micro_batches(data_N, cfg), dist.get_rank(), mesh.world_size
    mine = batches[rank::world]
    calls = -(-len(batches) // world) if mesh.ep > 1 else len(mine)
    was_training = model.training
    model.eval()
    nats = targets = 0.0  # Python floats: fp64
    for ids_BL, tgt_BL in mine:
        nats += micro_batch_loss(model, ids_BL, tgt_BL, cfg) * tgt_BL.numel()
        targets += tgt_BL.numel()
    for _ in range(calls - len(mine)):
        micro_batch_loss(model, *batches[0], cfg)
    model.train(was_training)
    sums = torch.tensor([nats, targets], dtype=torch.float64, device=cfg.device)
    mesh.world.run("all_reduce of the validation loss", dist.all_reduce, sums,
                   group=mesh.world.group)
    return float(sums[0] / sums[1])


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """AdamW state keyed by parameter name; expert moments as global-shaped DTensors."""
    if not optimizer.state:  # before the first step: create it so DCP can load in place
        for p in model.parameters():
            optimizer.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    views = model_state_dict(model)
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        view = views.get(name)
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(view, DTensor) and value.shape == p.shape:
                value = DTensor.from_local(value, view.device_mesh, view.placements,
                                           run_check=False, shape=view.shape,
                                           stride=view.stride())
            out[f"{name}.{key}"] = value
    return out


def _gathered(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Expert shards all-gathered into full [E, ...] tensors (every rank must call this)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def save_single_process(run_dir: Path, mcfg: LMConfig, tcfg: TrainConfig,
                        model_sd: dict[str, Tensor], optim_by_name: dict[str, Tensor],
                        state: dict[str, Any]) -> Path:
    """Write full tensors as the one-process trainer's checkpoint (``step_*`` + LATEST).

    A one-process model and AdamW are given the tensors, so the files are exactly
    what ``Trainer.save`` writes for that model (tied weights stay tied: copied,
    not assigned). Building it must not move this rank's RNG, which the other
    ranks' streams must keep matching.
    """
    with torch.random.fork_rng(devices=[]):
        model = MoETransformer(mcfg)
    model.load_state_dict({k: v.detach().cpu() for k, v in model_sd.items()}, strict=True)
    optimizer = make_optimizer(model, tcfg)
    for name, p in model.named_parameters():
        keys = ("step", "exp_avg", "exp_avg_sq")
        if all(f"{name}.{k}" in optim_by_name for k in keys):
            optimizer.state[p] = {k: optim_by_name[f"{name}.{k}"].detach().cpu().clone()
                                  for k in keys}
    return ckpt_io.save_checkpoint(run_dir, model, optimizer, state, tcfg.keep_checkpoints)


class DistributedTrainer(Trainer):
    """The Trainer with expert parallelism and data parallelism over ``mesh``.

    ``train_config.batch_size`` is the global batch; each rank takes
    ``batch_size / world_size`` of its rows, and validates 1/world of the validation
    micro-batches (``distributed_evaluate``). Rank 0 writes the metrics;
    checkpoints are DCP directories ``dcp_step_<step>`` that load at any ep.
    """

    CHECKPOINT_PREFIX = DCP_PREFIX

    def __init__(self, model_config: LMConfig, train_config: TrainConfig, corpus: Corpus,
                 out_dir: str | Path, mesh: ExpertParallelMesh, progress: bool = True,
                 **ep_kwargs: Any) -> None:
        if train_config.batch_size % mesh.world_size:
            raise ValueError(f"batch_size={train_config.batch_size} is not allowed with "
                             f"{mesh.world_size} ranks: it must be a multiple of the world size")
        super().__init__(model_config, train_config, corpus, out_dir,
                         progress and dist.get_rank() == 0)
        self.mesh = mesh
        # every rank's micro-batches (training and validation) hold the same T, so the
        # capacity exchange is skipped (ExpertParallelMoE: equal_tokens_per_rank)
        self.model = parallelize(self.model, mesh, **{"equal_tokens_per_rank": True,
                                                       **ep_kwargs})
        self.optimizer = make_optimizer(self.model, train_config)
        self.forward = torch.compile(self.model) if train_config.compile else self.model

    def batches(self, step: int) -> list[tuple[Tensor, Tensor]]:
        rank, world = dist.get_rank(), self.mesh.world_size
        rows = self.cfg.batch_size // world
        return [(ids[rank * rows:(rank + 1) * rows], tgt[rank * rows:(rank + 1) * rows])
                for ids, tgt in super().batches(step)]

    def val_loss(self) -> float:
        return distributed_evaluate(self.model, self.corpus.val, self.cfg, self.mesh)

    def step_once(self) -> StepResult:
        return distributed_train_step(self.model, self.optimizer, self.batches(self.step),
                                      self.cfg, lr_at(self.step, self.cfg), self.mesh,
                                      self.forward)

    def _log(self, log, record: dict[str, Any]) -> None:
        self.history.append(record)
        if dist.get_rank() == 0:
            log.write(record)

    def _announce(self, line: str) -> None:
        if dist.get_rank() == 0:
            super()._announce(line)

    def agreed_stop(self, signum: int | None) -> int | None:
        """The largest stop signal any rank received (SIGTERM over SIGINT), None when none
        did: every rank stops after the same step, saves one checkpoint and exits alike.
        Each rank had checked its own flag: a signal that reached one rank (``kill`` of
        one pid), or reached them a step apart, had one rank saving while the other
        entered the next step's collectives, both then waiting out the collective timeout
        (300 s) with no checkpoint. One all_reduce of one int a step, on gloo here with the
        2 cores busy (benchmarks/stop_flag.py, 3 runs, 2026-12-07): 0.5-0.8 ms, 0.16-0.18%
        of a step of the small preset at the default batch (290-390 ms), 2.1-2.3% of one of
        the tiny preset (31-37 ms); alternated steps with and without it differ by less
        than their noise."""
        flag = torch.tensor([signum or 0], dtype=torch.int32)
        self.mesh.world.run("all_reduce of the stop flag", dist.all_reduce, flag,
                            op=dist.ReduceOp.MAX, group=self.mesh.world.group)
        return int(flag[0]) or None

    def _clean_run_dir(self) -> None:
        if dist.get_rank() == 0:  # no other rank touches these names before the next save
            super()._clean_run_dir()

    def _barrier(self, what: str) -> None:
        self.mesh.world.run(what, dist.barrier, self.mesh.world.group)

    def save(self) -> Path:
        """Every rank writes into ``.dcp_step_N.tmp`` (reshardable, for --nproc resumes);
        after a barrier rank 0 adds trainer.json and, last, manifest.json (the completeness
        mark), then renames the directory into place (``rundir.swap_in``) and prunes old
        checkpoints. Rank 0 also writes the same state consolidated as a single-process
        ``step_<step>`` + LATEST, which ``generate``, ``analyze``, ``plan`` and a
        one-process ``--resume`` read."""
        path = self.out_dir / f"{self.CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = self.out_dir / f".{path.name}.tmp"
        rank0 = dist.get_rank() == 0
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._barrier("barrier before a checkpoint")
        optim = _optimizer_state(self.model, self.optimizer)
        save_checkpoint(tmp, self.model, optim)
        self._barrier("barrier after every rank wrote its checkpoint shards")
        full_model = _gathered(model_state_dict(self.model))  # collectives: every rank
        full_optim = _gathered(optim)
        if rank0:
            self._finish_save(tmp, path)
            save_single_process(self.out_dir, self.mcfg, self.cfg, full_model, full_optim,
                                self.checkpoint_state())
        self._barrier("barrier after the checkpoint was completed")
        self.last_checkpoint = path
        return path

    def _finish_save(self, tmp: Path, path: Path) -> None:
        # the one-process state.json's fields (a field added there reaches trainer.json
        # too: the load since the last validation had been written to one, not the other),
        # with the data as trainer.json has always recorded it (the corpus alone)
        state = {**self.checkpoint_state(), "data": {"corpus": self.corpus.location()}}

        def fill(tmp: Path) -> None:
            (tmp / TRAINER_FILE).write_text(json.dumps(state))
            rundir.write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))

        rundir.write_dir(path, fill, tmp=tmp)  # tmp: the ranks' shards, already in it
        complete = [d for d in rundir.checkpoint_dirs(self.out_dir, rundir.DCP_DIR)
                    if (d / rundir.MANIFEST).is_file()]
        for old in complete[:-self.cfg.keep_checkpoints]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def resume_distributed(cls, path: str | Path, corpus: Corpus, mesh: ExpertParallelMesh,
                           out_dir: str | Path | None = None, progress: bool = True,
                           ep_kwargs: dict[str, Any] | None = None,
                           **overrides: Any) -> DistributedTrainer:
        """Continue a run saved by ``save`` at any (dp, ep) with the same world batch.

        ``path`` is a ``dcp_step_*`` or one-process ``step_*`` directory, or a run
        directory (then its newest checkpoint: ``resumable_checkpoint``). ``ep_kwargs`` go to
        ``parallelize`` (dispatcher, overlap_chunks: how this session runs, not
        saved), ``overrides`` to the saved TrainConfig."""
        path = resumable_checkpoint(path, mesh)
        state, one = _resume_source(path)
        mcfg = LMConfig.from_dict(state["model_config"])
        tcfg = TrainConfig.from_dict(state["train_config"]).replace(**overrides)
        trainer = cls(mcfg, tcfg, corpus, out_dir or path.parent, mesh, progress,
                      **(ep_kwargs or {}))
        optim = _optimizer_state(trainer.model, trainer.optimizer)
        if one is None:
            load_checkpoint(path, trainer.model, optim)
        else:
            _load_one_process(one, trainer)
        trainer.restore_progress(state)
        trainer.last_checkpoint = path
        return trainer


@torch.no_grad()
def _load_one_process(ck: ckpt_io.Checkpoint, trainer: DistributedTrainer) -> None:
    """Assign a one-process checkpoint (full tensors) to the expert-parallel trainer: each
    rank keeps the rows of its experts, of the weights and of their AdamW moments. Built
    and checked on a one-process model first, so a bad checkpoint assigns nothing."""
    with torch.random.fork_rng(devices=[]):  # the ranks' RNG streams must keep matching
        full = MoETransformer(trainer.mcfg)
    optimizer = make_optimizer(full, trainer.cfg)
    ckpt_io.restore(ck, full, optimizer, rng=False)
    rank, views = trainer.mesh.ep_rank, model_state_dict(trainer.model)
    full_sd = full.state_dict()

    def shard(t: Tensor, rows: int) -> Tensor:  # this ep rank's experts: Shard(0) over ep
        return t[rank * rows:(rank + 1) * rows]

    for key, t in trainer.model.state_dict().items():
        t.copy_(shard(full_sd[key], t.shape[0]) if isinstance(views[key], DTensor)
                else full_sd[key])
    full_params = dict(full.named_parameters())
    for name, p in trainer.model.named_parameters():
        saved = optimizer.state.get(full_params[name], {})
        for key, value in trainer.optimizer.state[p].items():
            if key in saved:
                src = saved[key]
                value.copy_(shard(src, value.shape[0]) if is_expert_parameter(p)
                            and value.dim() else src)


def resumable_checkpoint(path: str | Path, mesh: ExpertParallelMesh) -> Path:
    """``path`` if it is a ``dcp_step_*`` or ``step_*`` directory, else the newest
    checkpoint of the run directory ``path`` (``newest_checkpoint``), after rank 0 cleaned
    up what killed saves left (restoring a checkpoint a killed save had moved aside).
    Collective."""
    path = Path(path)
    if rundir.DCP_DIR.fullmatch(path.name) or is_one_process_checkpoint(path):
        return path
    _on_rank0_then_barrier(lambda: rundir.clean_run_dir(path), mesh)
    return newest_checkpoint(path)


def _on_rank0_then_barrier(fn: Callable[[], Any], mesh: ExpertParallelMesh) -> None:
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            fn()
        except OSError as e:  # still reach the barrier: the other ranks wait in it
            error = e
    mesh.world.run("barrier after cleaning the run directory", dist.barrier,
                   group=mesh.world.group)
    if error is not None:
        raise error

