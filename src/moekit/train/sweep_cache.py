"""The run cache of `moekit compare` and `moekit scaling`: what a sweep leaves in --out.

Each (variant, seed) run has its directory ``<out>/<variant>-seed<seed>``: a finished
run's ``result.json`` (written whole or not at all), or the checkpoints and metrics of
an interrupted one. This module reads, writes and checks them: a cached result or an
interrupted run's checkpoint made with other settings or on another corpus than this
sweep's is refused (runs are keyed by directory), an interrupted run without a
checkpoint forgets its metrics, and it says which runs are still to train. Training
and resuming a run (the Trainer) stay in ``compare``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moekit.models.config import LMConfig
from moekit.train import checkpoint as ckpt_io
from moekit.train.checkpoint import LATEST, CheckpointError
from moekit.train.rundir import STEP_DIR, checkpoint_dirs, write_whole
from moekit.train.trainer import TrainConfig

RESULT = "result.json"
METRICS = "metrics.jsonl"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A run killed mid-write had left broken JSON that every later sweep into the same
    --out failed to read: written whole or not at all."""
    write_whole(path, json.dumps(result))


def check_same_settings(run_dir: Path, then: dict[str, Any], mcfg: LMConfig,
                        tcfg: TrainConfig, corpus, done: str = "trained") -> None:
    """ValueError when the run in ``run_dir`` (its result, or the checkpoint of an
    interrupted one: ``then``) was ``done`` with other settings or on another corpus
    than this sweep's (runs are keyed by directory, so a changed flag must not reuse
    one). A key absent from ``then`` (results written before it was recorded) passes."""
    was = then.get("corpus")
    if was is not None and was != corpus.location():
        # a new --data had reported the old corpus's runs beside the new one's
        raise ValueError(
            f"data={corpus.source!r} is not allowed with out={str(run_dir.parent)!r}: "
            f"{run_dir.name} was {done} on {was!r}; pass that --data, or pick a new --out")
    for key, now in (("model_config", mcfg.to_dict()), ("train_config", tcfg.to_dict())):
        was = then.get(key)
        changed = sorted(k for k in now if was is not None and was.get(k) != now[k])
        if changed:
            raise ValueError(
                f"out={str(run_dir.parent)!r} is not allowed: {run_dir.name} was {done} with "
                f"{', '.join(f'{k}={was.get(k)!r}' for k in changed)}, not "
                f"{', '.join(f'{k}={now[k]!r}' for k in changed)}; pick a new --out")


def cached_result(run_dir: Path, mcfg: LMConfig, tcfg: TrainConfig, corpus) -> dict[str, Any]:
    """A run's cached result; ValueError when it was trained with other settings."""
    try:
        result = json.loads((run_dir / RESULT).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{run_dir / RESULT} is not readable JSON ({e}): delete it to "
                         "train that run again") from None
    check_same_settings(run_dir, result, mcfg, tcfg, corpus)
    return result


def check_interrupted(run_dir: Path, ckpt: Path, mcfg: LMConfig, tcfg: TrainConfig,
                      corpus) -> None:
    """ValueError when the interrupted run's checkpoint ``ckpt`` is unreadable or was
    made with other settings than this sweep's."""
    try:
        state = json.loads((ckpt_io.resolve(ckpt) / ckpt_io.STATE_FILE).read_text())
        then = {"corpus": state["data"]["corpus"], "model_config": state["model_config"],
                "train_config": state["train_config"]}
        step = state["step"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            CheckpointError) as e:
        raise unresumable(run_dir, ckpt, e) from None
    check_same_settings(run_dir, then, mcfg, tcfg, corpus,
                        done=f"started (interrupted at step {step})")


def unresumable(run_dir: Path, ckpt: Path, e: Exception) -> ValueError:
    return ValueError(f"{run_dir.name} was interrupted and its checkpoint {ckpt} cannot "
                      f"be resumed ({e}); delete {run_dir} to train that run again")


def check_cache(configs: dict[str, LMConfig], wanted: list[str], seeds: list[int],
                tcfg: TrainConfig, corpus, out: Path) -> None:
    """ValueError, before anything runs, when a run in ``out`` that collect would read
    (a cached result, or an interrupted run it would resume) was made with other settings
    than this sweep's: the plan had counted such runs as cached, then the sweep refused
    them (and a later seed's had been refused after the earlier ones trained)."""
    for seed in seeds:
        for name, mcfg in configs.items():
            run_dir, seeded = out / f"{name}-seed{seed}", tcfg.replace(seed=seed)
            if (run_dir / RESULT).exists():
                cached_result(run_dir, mcfg, seeded, corpus)
            elif name in wanted and (ckpt := last_checkpoint(run_dir)) is not None:
                check_interrupted(run_dir, ckpt, mcfg, seeded, corpus)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run directory when LATEST names a checkpoint; else its newest step_* directory
    (a run killed between renaming its first checkpoint into place and writing LATEST);
    None when it holds none."""
    if (run_dir / LATEST).is_file():
        return run_dir
    steps = checkpoint_dirs(run_dir, STEP_DIR)
    return steps[-1] if steps else None


def forget_metrics(run_dir: Path) -> None:
    """An interrupted run that left no checkpoint starts over: what it logged goes."""
    gone = [p for p in (run_dir / METRICS, run_dir / "tensorboard") if p.exists()]
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if gone:
        print(f"{run_dir}: the interrupted run left no checkpoint: it starts over (removed "
              f"its {' and '.join(p.name for p in gone)})", flush=True)


def runs_to_train(configs: dict[str, LMConfig], wanted: list[str], seeds: list[int],
                  out: Path) -> list[tuple[str, int]]:
    """The (variant, seed) runs this sweep trains: wanted and not cached in ``out``."""
    return [(n, s) for s in seeds for n in configs
            if n in wanted and not (out / f"{n}-seed{s}" / RESULT).exists()]


def finished_note(configs: dict[str, LMConfig], seeds: list[int], out: Path) -> str:
    """Where a stopped sweep's finished runs are: it had said they were cached in ``out``
    when the first run's first write failed and none was."""
    if any((out / f"{n}-seed{s}" / RESULT).exists() for s in seeds for n in configs):
        return f"the runs that finished are cached in {out}"
    return f"no run has finished in {out} yet"
