"""Checkpoints: safetensors tensors + one JSON file, written atomically.

Layout of a run directory::

    RUN/step_00000100/model.safetensors      weights (tied copies stored once)
    RUN/step_00000100/optimizer.safetensors  optimizer tensors (AdamW moments, step)
    RUN/step_00000100/state.json             configs, step, RNG, data position,
                                             optimizer hyper-parameters, file hashes
    RUN/LATEST                               name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, renamed into place,
and only then named in LATEST (temp file + ``os.replace``). A crash at any point
leaves the previous checkpoint complete and LATEST pointing at it. Loading
checks every file's SHA-256 and every tensor's name and shape before anything
is assigned, so a bad checkpoint raises ``CheckpointError`` and leaves the
model and optimizer untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from moekit.safetensors_write import save_file

FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.safetensors", "state.json", "LATEST")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not fit the model."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # the parsed state.json
    model: dict[str, Tensor]  # full state dict (tied names restored)
    optimizer: dict[str, Tensor]  # flat "state.<i>.<name>" tensors

    @property
    def step(self) -> int:
        return int(self.state["step"])


# -- writing -------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dedupe_tied(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses shared storage: keep the first name, record the aliases."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    unique, aliases = {}, {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state as flat tensors plus the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def write_latest(run_dir: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".LATEST.")
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST)


def save_checkpoint(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``run_dir/step_<step>`` atomically and point LATEST at it.

    ``state`` must hold "step" and "model_config"; it may hold anything JSON-able
    (train config, data position, counters). Returns the checkpoint directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(state['step']):08d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{name}.tmp"))
    try:
        weights, aliases = dedupe_tied(model.state_dict())
        save_file(weights, str(tmp / MODEL_FILE))
        optim_tensors, optim_rest = split_optimizer(optimizer)
        save_file(optim_tensors, str(tmp / OPTIM_FILE))
        full = dict(state, format_version=FORMAT_VERSION, tied=aliases, optimizer=optim_rest,
                    torch_rng=torch.get_rng_state().tolist(),
                    sha256={f: _sha256(tmp / f) for f in (MODEL_FILE, OPTIM_FILE)})
        (tmp / STATE_FILE).write_text(json.dumps(full))
        for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE):
            _fsync(tmp / f)
        final = run_dir / name
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(run_dir, name)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never the LATEST one)."""
    latest = (run_dir / LATEST).read_text().strip()
    done = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


# -- reading -------------------------------------------------------------------


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (follows LATEST)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if (path / LATEST).exists():
        name = (path / LATEST).read_text().strip()
        if (path / name / STATE_FILE).exists():
            return path / name
        raise CheckpointError(f"{path / LATEST} names {name!r}, which is not a complete "
                              "checkpoint directory")
    raise CheckpointError(f"checkpoint={str(path)!r}: no {STATE_FILE} or {LATEST} there; "
                          "pass a run directory or one of its step_* directories")


def _read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable or corrupt: {e}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / STATE_FILE}: format_version must be {FORMAT_VERSION}")
    for key in ("step", "model_config", "sha256", "tied", "optimizer", "torch_rng"):
        if key not in state:
            raise CheckpointError(f"{ckpt / STATE_FILE} lacks the key {key!r}")
    return state


def _read_tensors(ckpt: Path, name: str, expected_sha: str | None) -> dict[str, Tensor]:
    path = ckpt / name
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    if _sha256(path) != expected_sha:
        raise CheckpointError(f"{path} is corrupt or truncated: its SHA-256 does not match "
                              f"the one recorded in {STATE_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; assigns nothing."""
    ckpt = resolve(path)
    state = _read_state(ckpt)
    model = _read_tensors(ckpt, MODEL_FILE, state["sha256"].get(MODEL_FILE))
    optim = _read_tensors(ckpt, OPTIM_FILE, state["sha256"].get(OPTIM_FILE))
    for alias, source in state["tied"].items():
        if source not in model:
            raise CheckpointError(f"{ckpt}: tied weight {alias!r} points at missing {source!r}")
        model[alias] = model[source]
    return Checkpoint(ckpt, state, model, optim)


# -- assigning -----------------------------------------------------------------


def check_model_fits(model: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in own.items() if k in tensors and tensors[k].shape != v.shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {where} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")


def optimizer_state_dict(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> dict:
    """Rebuild ``optimizer.state_dict()`` from the checkpoint, checking every shape."""
    rest = ckpt.state["optimizer"]
    # JSON turned tuples (AdamW betas) into lists; "params" stays a list
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
               for k, v in g.items()} for g in rest["param_groups"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    if len(groups) != len(optimizer.param_groups) or len(ids) != len(params):
        raise CheckpointError(f"checkpoint {ckpt.path}: optimizer has {len(ids)} parameters "
                              f"in {len(groups)} groups, the model needs {len(params)}")
    state: dict[int, dict[str, Any]] = {}
    for key, t in ckpt.optimizer.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, value in rest["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, p in zip(ids, params, strict=True):
        for name, t in state.get(idx, {}).items():
            if isinstance(t, Tensor) and t.dim() and t.shape != p.shape:
                raise CheckpointError(f"checkpoint {ckpt.path}: optimizer {name} of parameter "
                                      f"{idx} is {tuple(t.shape)}, the model's is "
                                      f"{tuple(p.shape)}")
    return {"state": state, "param_groups": groups}


def restore(ckpt: Checkpoint, model: nn.Module,
            optimizer: torch.optim.Optimizer | None = None, rng: bool = True) -> None:
    """Assign a verified checkpoint; everything is checked before the first write."""
    check_model_fits(model, ckpt.model, ckpt.path)
    optim_sd = None if optimizer is None else optimizer_state_dict(optimizer, ckpt)
    rng_state = torch.tensor(ckpt.state["torch_rng"], dtype=torch.uint8)
    model.load_state_dict(ckpt.model, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(optim_sd)
    if rng:
        torch.set_rng_state(rng_state)
