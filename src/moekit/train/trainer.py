"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, health checks.

``train_step`` is a plain function of (model, optimizer, micro-batches, config,
lr) so a distributed wrapper can call it inside its own loop. Shape letters:
B batch, L sequence, E experts.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from moekit.config import (
    MAX_SEED,
    FrozenConfig,
    check_bool,
    check_int_range,
    check_non_negative,
    check_number,
    reject,
)
from moekit.layer import update_all_biases
from moekit.models.config import LMConfig
from moekit.models.transformer import MoETransformer
from moekit.train import checkpoint as ckpt_io
from moekit.train.checkpoint_state import MAX_STEP
from moekit.train.data import Corpus, batch_seed, sample_windows
from moekit.train.interrupt import (
    InterruptFlag,
    StopAtBoundary,
    signal_label,
    signum_of,
)
from moekit.train.monitor import CollapseMonitor, MetricsLog
from moekit.train.rundir import ASIDE, check_no_newer_sharded, clean_run_dir

VAL_SEED = 999_983  # validation windows are drawn from seeds VAL_SEED + i, fixed per run
# Upper bounds that only an error reaches (AdamW's lr is ~1e-4..1e-2, weight decay ~0..0.1):
# --lr 1e39 was a RuntimeError traceback from inside AdamW's step (the float32 parameters
# cannot take the update), and weight_decay=1e300 turned the weights into NaN and saved them.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 100.0


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""




@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig(FrozenConfig):
    # defaults = `moekit train`: 1500 steps (3.1M tokens) of the "small" preset took
    # 5 min 03 s on the idle 2-core dev box (10.3k tokens/s), leaving room for slower machines
    steps: int = 1500
    batch_size: int = 16  # B, sequences per micro-batch
    seq_len: int = 128  # L
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 150
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    collapse_fraction: float = 0.9  # one expert above this share of tokens = collapse
    collapse_patience: int = 50  # ... for this many steps in a row
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                     "eval_batches", "save_every", "log_every", "max_bad_steps",
                     "collapse_patience", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                reject(name, v, "it must be a positive int")
        if self.steps > MAX_STEP:  # the save at step 10**8 had raised CheckpointError
            reject("steps", self.steps, f"it must be between 1 and {MAX_STEP:,} (checkpoints "
                   "are named step_NNNNNNNN)")
        if self.grad_accum > 64:
            reject("grad_accum", self.grad_accum, "it must be between 1 and 64")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            reject("warmup_steps", self.warmup_steps, "it must be an int >= 0")
        check_number("lr", self.lr, 0, MAX_LR)
        check_number("weight_decay", self.weight_decay, 0, MAX_WEIGHT_DECAY)
        check_non_negative("grad_clip", self.grad_clip)
        for name in ("min_lr_ratio", "collapse_fraction"):
            check_number(name, getattr(self, name), 0, 1)
        for name in ("beta1", "beta2"):  # AdamW refuses 1.0 (its bias correction divides by 0)
            check_number(name, getattr(self, name), 0, 1, high_open=True)
        check_int_range("seed", self.seed, 0, MAX_SEED)
        for name in ("bf16", "compile"):
            check_bool(name, getattr(self, name))
        check_device("device", self.device)


def check_device(name: str, value: object) -> None:
    """A device torch can parse and allocate on ("cpu", "cuda", "cuda:1", ...), not meta.

    Whether the device exists on this machine is checked when the trainer starts
    (a config saved on a GPU machine must still load on a CPU one).
    """
    try:
        device = torch.device(value) if isinstance(value, str) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type == "meta":
        reject(name, value, "it must be a torch device such as cpu, cuda or cuda:1 "
               "(meta holds no data to train)")



def devices_here() -> list[str]:
    """The device strings naming a device this machine has: cpu (index 0 or none), and
    cuda / mps with each index torch counts. Asks the driver nothing beyond the count."""
    here = ["cpu", "cpu:0"]
    if torch.cuda.is_available():
        here += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        here += ["mps", "mps:0"]
    return here


def check_device_available(device: str, name: str = "device") -> None:
    """Fail before anything is built (or a run directory made) when the device is not on
    this machine, naming the ones that are. torch ignores a CPU index, so ``cpu:3`` had
    trained on the CPU and recorded ``cpu:3`` in the checkpoint; a cuda index past the
    device count failed only once the model was moved."""
    check_device(name, device)
    kind = torch.device(device).type
    if kind in ("cpu", "cuda", "mps"):
        here = devices_here()
        if str(torch.device(device)) not in here:
            reject(name, device, f"no such device on this machine; it must be one of "
                   f"{', '.join(here)}")
        return
    try:  # another backend (xpu, hpu, ...): ask torch for a tensor there
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # CPU-only torch: AssertionError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reject(name, device, f"it is not available on this machine ({reason}); devices "
               f"here: {', '.join(devices_here())}")


def check_corpus(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold one window of seq_len + 1 bytes (an empty file held 1 byte)."""
    for split in ("train", "val"):
        n = getattr(corpus, split).numel()
        if n < seq_len + 2:
            reject("data", corpus.source, f"its {split} split has {n} bytes; it needs at "
                   f"least seq_len + 2 = {seq_len + 2}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# the start of warn_short_schedule's message, for a filter that silences it (a sweep
# warns once, not once per run)
SHORT_SCHEDULE = r"warmup_steps=\d+ is longer than steps=\d+"


def warn_short_schedule(cfg: TrainConfig) -> None:
    """Warn when the warm-up outlasts the run: the learning rate never reaches cfg.lr.

    A warning, not an error: short runs with the default warm-up (the CI smoke,
    `--steps 20`) are legitimate. Called by the Trainer, not by TrainConfig, which is
    also built for resume, comparisons and tests."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one line per run, not one per rank
    if cfg.warmup_steps > cfg.steps:
        peak = lr_at(cfg.steps - 1, cfg)  # the warm-up is still rising at the last step
        warnings.warn(
            f"warmup_steps={cfg.warmup_steps} is longer than steps={cfg.steps}: the "
            f"learning rate peaks at {peak:.3g} (lr={cfg.lr:g} x {cfg.steps}/"
            f"{cfg.warmup_steps}) on the last step, never reaching lr, and the cosine decay "
            f"never starts; set warmup_steps (--warmup) <= steps", stacklevel=3)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms, not 1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class StepResult(NamedTuple):
    loss: float  # mean LM loss over the micro-batches (nats)
    aux_loss: float
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient: no update was made
    load_LE: Tensor  # noqa: N815 - tokens per expert per MoE layer, summed over micro-batches
    tokens: int


def _reset_router_loads(model: nn.Module) -> None:
    for m in model.modules():
        load = getattr(getattr(m, "router", None), "load", None)
        if isinstance(load, Tensor):
            load.zero_()


def accumulate_gradients(forward: nn.Module, batches: list[tuple[Tensor, Tensor]],
                         cfg: TrainConfig) -> tuple[float, float, list[Tensor], int]:
    """Forward and backward over the micro-batches (gradient accumulation).

    Returns (mean LM loss, mean aux loss, per-micro-batch expert loads [L, E], tokens).
    """
    loss_sum = aux_sum = 0.0
    loads, tokens = [], 0
    for ids_BL, targets_BL in batches:
        with torch.autocast(ids_BL.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = forward(ids_BL, targets_BL)
        ((out.loss + out.aux_loss) / len(batches)).backward()
        loss_sum += float(out.loss.detach())
        aux_sum += float(out.aux_loss.detach())
        if out.stats:
            loads.append(torch.stack([s.tokens_per_expert for s in out.stats]))
        tokens += ids_BL.numel()
    return loss_sum / len(batches), aux_sum / len(batches), loads, tokens


def finish_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: float, aux: float,
                grad_norm: float, load_LE: Tensor, tokens: int) -> StepResult:
    """Step, then the aux-loss-free bias update; or skip it all when anything is not finite."""
    if not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        _reset_router_loads(model)  # the bad batch must not steer the balancing bias
        return StepResult(loss, aux, grad_norm, True, load_LE, tokens)
    optimizer.step()
    update_all_biases(model)
    return StepResult(loss, aux, grad_norm, False, load_LE, tokens)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[tuple[Tensor, Tensor]], cfg: TrainConfig, lr: float,
               forward: nn.Module | None = None) -> StepResult:
    """One optimizer step over ``batches`` (gradient accumulation), skipped when
    the loss or the gradient norm is not finite. ``forward`` may be a compiled
    wrapper of ``model``. The aux-loss-free bias update runs after the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, aux, loads, tokens = accumulate_gradients(
        model if forward is None else forward, batches, cfg)
    params = [p for p in model.parameters() if p.grad is not None]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    load_LE = torch.stack(loads).sum(0) if loads else torch.zeros(0, 0, dtype=torch.long)
    return finish_step(model, optimizer, loss, aux, grad_norm, load_LE, tokens)


@torch.no_grad()
def evaluate(model: nn.Module, data_N: Tensor, cfg: TrainConfig) -> float:
    """Mean LM loss over cfg.eval_batches fixed validation batches."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        ids, tgt = sample_windows(data_N, cfg.batch_size, cfg.seq_len, VAL_SEED + i)
        autocast = (torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16)
                    if cfg.bf16 else contextlib.nullcontext())
        with autocast:
            losses.append(float(model(ids.to(cfg.device), tgt.to(cfg.device)).loss))
    model.train(was_training)
    return sum(losses) / len(losses)


class _Throughput:
    """Training tokens per second in one ``fit``: the time of its steps only (not
    validation or checkpoints), and without its first step once a later one has run.
    The first step builds the C++ kernels on a fresh machine (35-45 s) and warms the
    allocator: with the whole wall time counted, a 30-step run with an empty
    TORCH_EXTENSIONS_DIR reported 1,169 tokens/s while its steps ran at about 20,000."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if self.first is None:
            self.first = (tokens, seconds)
        else:
            self.tokens += tokens
            self.seconds += seconds

    @property
    def rate(self) -> float:
        tokens, seconds = (self.tokens, self.seconds) if self.seconds > 0 else \
            (self.first or (0, 0.0))
        return tokens / seconds if seconds > 0 else 0.0


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run."""

    CHECKPOINT_PREFIX = "step_"  # save() writes <prefix><step:08d>

    def __init__(self, model_config: LMConfig, train_config: TrainConfig, corpus: Corpus,
                 out_dir: str | Path, progress: bool = True, *, clean_dir: bool = True) -> None:
        """``clean_dir=False`` leaves ``out_dir`` alone (``resume`` cleans it only once
        the checkpoint is restored)."""
        if train_config.seq_len > model_config.max_seq_len:
            reject("seq_len", train_config.seq_len,
                  f"it must be <= the model's max_seq_len={model_config.max_seq_len}")
        check_device_available(train_config.device)
        check_corpus(corpus, train_config.seq_len)
        warn_short_schedule(train_config)
        self.mcfg, self.cfg, self.corpus = model_config, train_config, corpus
        self.out_dir = Path(out_dir)
        self.progress = progress
        torch.manual_seed(train_config.seed)
        self.model = MoETransformer(model_config).to(train_config.device)
        self.optimizer = make_optimizer(self.model, train_config)
        self.forward = torch.compile(self.model) if train_config.compile else self.model
        self.step = 0
        self.counters = {"tokens": 0, "skipped_steps": 0, "bad_in_row": 0}
        self.history: list[dict[str, Any]] = []  # what was logged this session
        self.monitor = CollapseMonitor(train_config.collapse_fraction,
                                       train_config.collapse_patience, model_config.top_k)
        self.load_since_eval: Tensor | None = None
        self.last_checkpoint: Path | None = None
        # appended to the line an interrupt prints ("moekit train --resume DIR"); the
        # one-process CLI prints its own line instead
        self.resume_hint: str | None = None
        # seconds this run spent in fit before the fit now running (the sessions before a
        # resume: the checkpoint's wall_s); _fit_start: when that one started
        self.wall_s = 0.0
        self._fit_start: float | None = None
        if clean_dir:
            self._clean_run_dir()

    def _clean_run_dir(self) -> None:
        """Leftovers of killed saves: temp files go, checkpoints moved aside come back."""
        for line in clean_run_dir(self.out_dir):
            tqdm.write(f"{self.out_dir}: {line}")

    @classmethod
    def resume(cls, path: str | Path, corpus: Corpus, out_dir: str | Path | None = None,
               progress: bool = True, **overrides: Any) -> Trainer:
        """Continue a run exactly where its checkpoint left it (``overrides`` e.g. steps).

        Changing ``steps`` changes the cosine learning-rate schedule from here on
        (``lr_at`` decays to the new last step), so the run differs from one
        started with the new value.

        Everything is read and checked, and the checkpoint assigned, before the run
        directory is cleaned; a checkpoint that cannot be resumed raises
        ``CheckpointError`` (a ``ValueError``) with the global RNG and the run directory
        as they were."""
        ck = ckpt_io.load_checkpoint(path)
        missing = [k for k in ("train_config", "counters") if k not in ck.state]
        if missing:  # e.g. written by `moekit convert --to moekit`: weights only
            raise ckpt_io.CheckpointError(
                f"checkpoint {ck.path} holds no training state (its {ckpt_io.STATE_FILE} has "
                f"no {' or '.join(missing)}, like one written by `moekit convert`): it can be "
                "used with `moekit generate`, but not resumed")
        if (Path(path) / ckpt_io.LATEST).is_file():
            check_no_newer_sharded(Path(path), ck.step)
        mcfg = LMConfig.from_dict(ck.state["model_config"])
        tcfg = TrainConfig.from_dict(ck.state["train_config"]).replace(**overrides)
        run_dir = Path(out_dir) if out_dir is not None else ck.path.parent
        rng = torch.get_rng_state()
        try:  # the constructor reseeds the global RNG; restore sets the saved one
            trainer = cls(mcfg, tcfg, corpus, run_dir, progress, clean_dir=False)
            ckpt_io.restore(ck, trainer.model, trainer.optimizer)
        except BaseException:
            torch.set_rng_state(rng)
            raise
        if (Path(path) / ckpt_io.LATEST).is_file():  # a run directory we are taking over
            clean_run_dir(Path(path))
        trainer._clean_run_dir()
        trainer.restore_progress(ck.state)
        # a checkpoint read from where a killed save moved it aside is back in place now
        trainer.last_checkpoint = ck.path if ck.path.exists() else \
            ck.path.parent / ck.path.name[1:-len(ASIDE)]
        return trainer

    # -- one step -------------------------------------------------------------

    def batches(self, step: int) -> list[tuple[Tensor, Tensor]]:
        """The step's batch_size * grad_accum windows, drawn at once and cut into
        grad_accum micro-batches: --grad-accum 2 --batch-size 4 trains on the 8 windows
        --batch-size 8 does (each micro-batch had drawn its own seed, so the two took
        different data and could not take the same step)."""
        cfg = self.cfg
        ids, tgt = sample_windows(self.corpus.train, cfg.batch_size * cfg.grad_accum,
                                  cfg.seq_len, batch_seed(cfg.seed, step, 0))
        return [(i.to(cfg.device), t.to(cfg.device))
                for i, t in zip(ids.split(cfg.batch_size), tgt.split(cfg.batch_size),
                                strict=True)]

    def step_once(self) -> StepResult:
        """The optimizer step itself (the distributed trainer overrides this)."""
        return train_step(self.model, self.optimizer, self.batches(self.step), self.cfg,
                          lr_at(self.step, self.cfg), self.forward)

    def run_step(self, log: MetricsLog) -> StepResult:
        res = self.step_once()
        self.step += 1
        self.counters["tokens"] += res.tokens
        if res.skipped:
            self.counters["skipped_steps"] += 1
            self.counters["bad_in_row"] += 1
            self._log(log, {"kind": "skip", "step": self.step, "loss": res.loss,
                            "grad_norm": res.grad_norm,
                            "skipped_steps": self.counters["skipped_steps"]})
            tqdm.write(f"step {self.step}: non-finite loss {res.loss} or grad norm "
                       f"{res.grad_norm}; update skipped "
                       f"({self.counters['bad_in_row']} in a row)")
            if self.counters["bad_in_row"] >= self.cfg.max_bad_steps:
                raise NonFiniteError(
                    f"{self.counters['bad_in_row']} consecutive steps had a non-finite loss "
                    f"or gradient (last at step {self.step}; max_bad_steps="
                    f"{self.cfg.max_bad_steps}). Lower the learning rate or check the data; "
                    f"{self.last_good_note()}")
            return res
        self.counters["bad_in_row"] = 0
        if res.load_LE.numel():
            self.load_since_eval = res.load_LE if self.load_since_eval is None \
                else self.load_since_eval + res.load_LE
            for msg in self.monitor.update(res.load_LE, res.tokens):
                self._log(log, {"kind": "collapse", "step": self.step, "message": msg})
        return res

    # -- the loop -------------------------------------------------------------

    def _log(self, log: MetricsLog, record: dict[str, Any]) -> None:
        self.history.append(record)
        log.write(record)

    def _announce(self, line: str) -> None:
        """A line for the user, above the progress bar (the distributed trainer: rank 0's)."""
        tqdm.write(line)

    def agreed_stop(self, signum: int | None) -> int | None:
        """The signal to stop on at this step boundary, None to go on: this process's own
        (the distributed trainer combines every rank's, so that all stop at one step)."""
        return signum

    def elapsed_s(self) -> float:
        """Seconds this run has spent in ``fit``, over all its sessions: what a checkpoint
        records as wall_s and a resume starts from (the time after a session's last save
        is not in it: the steps it trained are trained again)."""
        now = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        return self.wall_s + now

    def checkpoint_state(self) -> dict[str, Any]:
        """What state.json records besides tensors (also written by --nproc runs)."""
        return {"step": self.step, "model_config": self.mcfg.to_dict(),
                "train_config": self.cfg.to_dict(), "counters": dict(self.counters),
                "wall_s": self.elapsed_s(), "load_since_eval": self._load_since_eval(),
                "data": {"corpus": self.corpus.location(), "position": "step",
                         "next_batch_seed": batch_seed(self.cfg.seed, self.step, 0)}}

    def restore_progress(self, state: dict[str, Any]) -> None:
        """The step, counters, wall time and load since the last validation of a checked
        state.json / trainer.json (wall_s and the load are absent from older ones)."""
        self.step = state["step"]
        self.counters.update(state["counters"])
        self.wall_s = float(state.get("wall_s", 0.0))
        load = state.get("load_since_eval")
        self.load_since_eval = None if load is None else torch.tensor(load)

    def _load_since_eval(self) -> list[list[int]] | None:
        """Tokens per expert since the last validation, which the next ``val`` record's
        expert_load reports: saved, so that a run resumed between two validations reports
        the steps before the resume too (it had reported only the steps after it)."""
        load = self.load_since_eval
        return None if load is None else load.long().tolist()

    def saved_this_step(self) -> bool:
        """Whether the last checkpoint is this step's, as ``save`` names it: an interrupt
        right after a save does not write it again."""
        return (self.last_checkpoint is not None and self.last_checkpoint.name
                == f"{self.CHECKPOINT_PREFIX}{self.step:08d}")

    def last_good_note(self) -> str:
        """Where a run stopped for NaN or inf goes on from: its last good checkpoint, or,
        before the first save, a start over (it had read "the last good checkpoint is
        None", and ``--resume`` there fails: no checkpoint to resume)."""
        if self.last_checkpoint is None:
            return ("no checkpoint was written yet: run the command again, with that "
                    "change, to start over")
        return f"the last good checkpoint is {self.last_checkpoint}"

    def save(self) -> Path:
        """Write a checkpoint and point LATEST at it; weights holding NaN or inf are never
        saved (NonFiniteError): LATEST keeps naming the last good checkpoint."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"step {self.step}: {len(bad)} parameter(s) hold NaN or inf ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}), so they were not saved. Lower the learning "
                f"rate (lr={self.cfg.lr}) or weight_decay={self.cfg.weight_decay}; "
                f"{self.last_good_note()}")
        self.last_checkpoint = ckpt_io.save_checkpoint(
            self.out_dir, self.model, self.optimizer, self.checkpoint_state(),
            self.cfg.keep_checkpoints)
        return self.last_checkpoint

    def validate(self, log: MetricsLog) -> float:
        val = evaluate(self.model, self.corpus.val, self.cfg)
        record: dict[str, Any] = {"kind": "val", "step": self.step, "val_loss": val,
                                  "tokens": self.counters["tokens"]}
        if self.load_since_eval is not None:
            share = self.load_since_eval.float()
            record["expert_load"] = (share / share.sum(-1, keepdim=True)).tolist()
            self.load_since_eval = None
        self._log(log, record)
        return val

    def fit(self, interrupt: InterruptFlag | None = None) -> dict[str, Any]:
        """Train to cfg.steps; returns a summary. A first Ctrl-C or SIGTERM finishes the
        step in flight, saves and raises ``StopAtBoundary`` (an ``Interrupted``, a
        KeyboardInterrupt whose ``signum`` says which); a second one stops at once, saves
        nothing and raises ``Interrupted``. ``interrupt``: a flag the caller entered
        already (one that got a signal before fit stops it at the first step boundary);
        by default fit installs its own."""
        cfg = self.cfg
        log = MetricsLog(self.out_dir)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress,
                   dynamic_ncols=True, desc="train")
        start = self._fit_start = time.perf_counter()
        speed = _Throughput()
        val = math.nan
        mine = InterruptFlag() if interrupt is None else contextlib.nullcontext(interrupt)
        try:
            with mine as flag:
                if self.step == 0:
                    val = self.validate(log)
                else:  # read_metrics drops what an earlier session logged after this step
                    self._log(log, {"kind": "resume", "step": self.step})
                while self.step < cfg.steps:
                    t0, tokens0 = time.perf_counter(), self.counters["tokens"]
                    res = self.run_step(log)
                    speed.add(self.counters["tokens"] - tokens0, time.perf_counter() - t0)
                    self._after_step(log, bar, res, speed.rate)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                        val = self.validate(log)
                        bar.set_description(f"train (val {val:.3f})")
                    at_save = self.step % cfg.save_every == 0 or self.step == cfg.steps
                    # only states after a good update; and the final state (a skipped step
                    # changed nothing; save() refuses NaN or inf weights)
                    if at_save and (not res.skipped or self.step == cfg.steps):
                        self.save()
                    signum = self.agreed_stop(flag.signum)
                    if signum is not None:
                        raise StopAtBoundary(signum)
        except StopAtBoundary as stop:
            if not self.saved_this_step():
                self.save()
            hint = f"; resume with: {self.resume_hint}" if self.resume_hint else ""
            self._announce(f"interrupted at step {self.step} ({signal_label(stop.signum)}): "
                           f"saved {self.last_checkpoint}{hint}")
            raise StopAtBoundary(stop.signum) from None
        except KeyboardInterrupt as e:  # a second signal, anywhere in a step: nothing saved
            self._announce(f"second {signal_label(signum_of(e))}: stopped without "
                           f"saving (the model may hold part of step {self.step + 1}); last "
                           f"checkpoint: {self.last_checkpoint}")
            raise
        finally:
            bar.close()
            log.close()
            self.wall_s, self._fit_start = self.elapsed_s(), None
        return {"step": self.step, "val_loss": val, "seconds": time.perf_counter() - start,
                "wall_s": self.wall_s, "tokens_per_s": speed.rate,
                "checkpoint": str(self.last_checkpoint), **self.counters}

    def _after_step(self, log: MetricsLog, bar: tqdm, res: StepResult, rate: float) -> None:
        bar.update(1)
        if res.skipped:
            return
        imbalance = 0.0
        if res.load_LE.numel():
            load = res.load_LE.float()
            imbalance = float((load.max(-1).values / load.mean(-1).clamp_min(1e-9)).mean())
        bar.set_postfix(loss=f"{res.loss:.3f}", aux=f"{res.aux_loss:.4f}",
                        imb=f"{imbalance:.2f}", tok_s=f"{rate:.0f}", refresh=False)
        if self.step % self.cfg.log_every == 0 or self.step == 1:
            self._log(log, {"kind": "train", "step": self.step, "loss": res.loss,
                            "aux_loss": res.aux_loss, "grad_norm": res.grad_norm,
                            "lr": lr_at(self.step - 1, self.cfg), "load_imbalance": imbalance,
                            "tokens_per_s": rate, "tokens": self.counters["tokens"]})
