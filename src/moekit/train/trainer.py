"""The training loop: the ``Trainer`` that owns one run's model, optimizer, data and run
directory, steps it (health checks, router-collapse monitor, throughput), validates,
checkpoints and resumes it, and stops cleanly on a signal.

The configuration lives in ``train_config.py`` and one optimizer step (schedule, AdamW,
accumulation, clipping, the skip of a non-finite step, validation loss) in ``step.py``;
their names stay importable from here. Shape letters: B batch, L sequence, E experts.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from moekit.config import reject
from moekit.models.config import LMConfig
from moekit.models.transformer import MoETransformer
from moekit.train import checkpoint as ckpt_io
from moekit.train.data import Corpus, batch_seed, sample_windows
from moekit.train.interrupt import (
    InterruptFlag,
    StopAtBoundary,
    signal_label,
    signum_of,
)
from moekit.train.monitor import CollapseMonitor, MetricsLog
from moekit.train.rundir import ASIDE, check_no_newer_sharded, clean_run_dir
from moekit.train.step import (
    SHORT_SCHEDULE,
    VAL_SEED,
    StepResult,
    accumulate_gradients,
    evaluate,
    finish_step,
    lr_at,
    make_optimizer,
    train_step,
    warn_short_schedule,
)
from moekit.train.train_config import (
    MAX_LR,
    MAX_WEIGHT_DECAY,
    TrainConfig,
    check_device,
    check_device_available,
    devices_here,
)

# the names moved to step.py and train_config.py, importable from here as before
__all__ = [
    "MAX_LR", "MAX_WEIGHT_DECAY", "SHORT_SCHEDULE", "VAL_SEED", "NonFiniteError", "StepResult",
    "TrainConfig", "Trainer", "accumulate_gradients", "check_corpus", "check_device",
    "check_device_available", "devices_here", "evaluate", "finish_step", "lr_at",
    "make_optimizer", "train_step", "warn_short_schedule",
]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def check_corpus(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold one window of seq_len + 1 bytes (an empty file held 1 byte)."""
    for split in ("train", "val"):
        n = getattr(corpus, split).numel()
        if n < seq_len + 2:
            reject("data", corpus.source, f"its {split} split has {n} bytes; it needs at "
                   f"least seq_len + 2 = {seq_len + 2}")


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
                                  cfg.seq_len, batch_seed(cfg.seed, step))
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
            self.add_load(res.load_LE)
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
                "collapse_monitor": self.monitor.state(),
                "data": {"corpus": self.corpus.location(), "position": "step",
                         "next_batch_seed": batch_seed(self.cfg.seed, self.step)}}

    def restore_progress(self, state: dict[str, Any]) -> None:
        """The step, counters, wall time, load since the last validation and collapse
        monitor of a checked state.json / trainer.json (all but the step and counters are
        absent from older ones: no time, no load, a fresh patience)."""
        self.step = state["step"]
        self.counters.update(state["counters"])
        self.wall_s = float(state.get("wall_s", 0.0))
        load = state.get("load_since_eval")
        self.load_since_eval = None if load is None else torch.tensor(load)
        self.monitor.load_state(state.get("collapse_monitor"))

    def add_load(self, load_LE: Tensor) -> None:
        """A step's tokens per expert into the load since the last validation. A resumed
        load is a CPU tensor (restore_progress): moved to the step's device, where a CUDA
        run's first step after the resume had failed on tensors on two devices."""
        have = self.load_since_eval
        self.load_since_eval = load_LE if have is None else have.to(load_LE.device) + load_LE

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

    def val_loss(self) -> float:
        """The validation loss of the model now (the distributed trainer shares the work)."""
        return evaluate(self.model, self.corpus.val, self.cfg)

    def validate(self, log: MetricsLog) -> float:
        val = self.val_loss()
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
