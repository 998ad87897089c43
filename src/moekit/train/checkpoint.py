"""Checkpoints: safetensors tensors + one JSON file + a manifest, written atomically.

Layout of a run directory::

    RUN/step_00000100/model.safetensors      weights (tied copies stored once)
    RUN/step_00000100/optimizer.safetensors  optimizer tensors (AdamW moments, step)
    RUN/step_00000100/state.json             configs, step, RNG, data position,
                                             optimizer hyper-parameters
    RUN/step_00000100/manifest.json          SHA-256 of each of the three files
    RUN/LATEST                               name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, renamed into place,
and only then named in LATEST (temp file + ``os.replace``). Re-saving the step
LATEST names moves the old directory aside first and deletes it only after
LATEST is rewritten (``rundir.swap_in``). A crash at any point leaves a complete
checkpoint that LATEST names. Loading checks every file against the manifest,
every field of state.json for type and range, and every tensor's name and shape
before anything is assigned, so a bad checkpoint raises ``CheckpointError`` and
leaves the model, optimizer and RNG untouched.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from moekit.errors import CheckpointError
from moekit.quant.layout import raw_state_dicts
from moekit.safetensors_write import save_file, save_stream
from moekit.train import rundir
from moekit.train.checkpoint_state import check_optimizer_groups, check_state, rng_state
from moekit.train.rundir import LATEST, MANIFEST, STEP_DIR

__all__ = ["Checkpoint", "CheckpointError", "LATEST", "MANIFEST", "load_checkpoint",
           "restore", "save_checkpoint"]

FORMAT_VERSION = 2  # 2: manifest.json covers state.json too
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
FILES = (MODEL_FILE, OPTIM_FILE, STATE_FILE)


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # the parsed and validated state.json
    model: dict[str, Tensor]  # full state dict (tied names restored)
    optimizer: dict[str, Tensor] | None  # flat "state.<i>.<name>" tensors; None: not read

    @property
    def step(self) -> int:
        return int(self.state["step"])


# -- writing -------------------------------------------------------------------


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


write_latest = rundir.write_latest


@dataclass(frozen=True)
class StreamedWeights:
    """A model's weights made one at a time while they are written (``save_checkpoint``'s
    ``weights``): ``layout`` name -> a tensor of the dtype and shape (meta will do),
    ``tensors()`` yields (name, tensor) in that order, ``aliases`` the tied names."""

    layout: dict[str, Tensor]
    tensors: Callable[[], Iterable[tuple[str, Tensor]]]
    aliases: dict[str, str]


def save_checkpoint(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2,
                    weights: StreamedWeights | None = None) -> Path:
    """Write ``run_dir/step_<step>`` atomically and point LATEST at it.

    ``state`` must hold "step" and "model_config"; it may hold anything JSON-able
    (train config, data position, counters). A state that ``load_checkpoint``
    would refuse raises ``CheckpointError`` before anything is written. Returns
    the checkpoint directory. ``weights``: the model's tensors as they are made (the
    model itself then only lends its optimizer's parameters: it may be on the meta
    device).
    """
    run_dir = Path(run_dir)
    if weights is None:
        tensors, aliases = dedupe_tied(model.state_dict())
    else:
        aliases = dict(weights.aliases)
    optim_tensors, optim_rest = split_optimizer(optimizer)
    text = json.dumps(dict(state, format_version=FORMAT_VERSION, tied=aliases,
                           optimizer=optim_rest, torch_rng=torch.get_rng_state().tolist()))
    # what load_checkpoint would refuse is refused here, before LATEST moves or prune runs
    check_state(json.loads(text), Path("state"))
    name = f"step_{state['step']:08d}"

    def fill(tmp: Path) -> None:
        if weights is None:
            save_file(tensors, str(tmp / MODEL_FILE))
        else:
            save_stream(weights.layout, weights.tensors(), tmp / MODEL_FILE)
        save_file(optim_tensors, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(text)
        rundir.write_manifest(tmp, list(FILES))

    # the directory replaced (a re-save of LATEST's step) is deleted once LATEST is written
    rundir.write_dir(run_dir / name, fill, then=lambda: rundir.write_latest(run_dir, name))
    prune(run_dir, keep)
    return run_dir / name


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never the LATEST one)."""
    latest = rundir.read_latest(run_dir)
    done = rundir.checkpoint_dirs(run_dir, STEP_DIR)
    for old in done[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


# -- reading -------------------------------------------------------------------


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (follows LATEST, checked)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if (path / LATEST).exists():
        name = rundir.read_latest(path)
        for candidate in (path / name, rundir.aside_of(path / name)):  # see swap_in
            if (candidate / STATE_FILE).exists():
                return candidate
        raise CheckpointError(f"{path / LATEST} names {name!r}, which is not a complete "
                              "checkpoint directory")
    raise CheckpointError(not_a_checkpoint(path))


def not_a_checkpoint(path: Path) -> str:
    """Why ``path`` is no training checkpoint, naming what to pass instead: a
    ``dcp_step_*`` or ``moekit quantize`` directory had read "no state.json or LATEST
    there", the same as an empty one."""
    from moekit.quant.io import META_FILE  # here: moekit.quant.io imports this module

    where = f"checkpoint={str(path)!r}"
    if rundir.DCP_DIR.fullmatch(path.name) or (
            (path / MANIFEST).is_file() and (path / ".metadata").is_file()):
        step = path.parent / path.name.removeprefix("dcp_")
        other = (f" or {str(step)!r} (the same step, written beside it as one file set)"
                 if (step / STATE_FILE).is_file() else "")
        return (f"{where} is a `moekit train --nproc` checkpoint (sharded, read by "
                f"`moekit train --resume` only): pass its run directory "
                f"{str(path.parent)!r}{other}")
    if (path / META_FILE).is_file():
        return (f"{where} is a `moekit quantize` output, not a training checkpoint: pass "
                "the float run directory or step_* directory it was quantized from")
    if (path / "config.json").is_file():  # a new user's first try: said only "no state.json"
        return (f"{where} is a transformers checkpoint (config.json{_model_type(path)}): "
                f"convert it first, `moekit convert {path} RUN` (Mixtral, Qwen2-MoE, "
                "Qwen3-MoE, OLMoE), and pass RUN")
    return (f"{where}: no {STATE_FILE} or {LATEST} there; pass a run directory or one of "
            "its step_* directories")


def _model_type(path: Path) -> str:
    """", model_type 'x'" of a transformers config.json, or "" where it names none."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return ""
    kind = config.get("model_type") if isinstance(config, dict) else None
    return f", model_type {kind!r}" if isinstance(kind, str) else ""


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable or corrupt: {e}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / STATE_FILE}: format_version must be {FORMAT_VERSION}")
    check_state(state, ckpt / STATE_FILE)
    return state


def _read_tensors(ckpt: Path, name: str) -> dict[str, Tensor]:
    path = ckpt / name
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def load_checkpoint(path: str | Path, optimizer: bool = True) -> Checkpoint:
    """Read and verify a checkpoint; assigns nothing. ``optimizer=False`` (a model to run,
    not to train on): optimizer.safetensors is neither opened nor hashed, and
    ``Checkpoint.optimizer`` is None. Every load had read it whole for its SHA-256 and
    mapped it, twice the model's bytes under AdamW, which generation never used."""
    ckpt = resolve(path)
    rundir.verify_manifest(ckpt, required=FILES,
                           read=None if optimizer else (MODEL_FILE, STATE_FILE))
    state = read_state(ckpt)
    model = _read_tensors(ckpt, MODEL_FILE)
    optim = _read_tensors(ckpt, OPTIM_FILE) if optimizer else None
    for alias, source in state["tied"].items():
        if source not in model:
            raise CheckpointError(f"{ckpt}: tied weight {alias!r} points at missing {source!r}")
        model[alias] = model[source]
    return Checkpoint(ckpt, state, model, optim)


# -- assigning -----------------------------------------------------------------


def check_model_fits(model: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    with raw_state_dicts():  # names and shapes only: no NK copies of o16 experts
        own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in own.items() if k in tensors and tensors[k].shape != v.shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {where} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")


_OPTIM_KEY = re.compile(r"state\.(\d{1,9})\.([A-Za-z_]\w{0,63})")


def optimizer_state_dict(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> dict:
    """Rebuild ``optimizer.state_dict()`` from the checkpoint, checking every shape."""
    rest = ckpt.state["optimizer"]
    groups = check_optimizer_groups(rest["param_groups"], optimizer.param_groups, ckpt.path)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, t in (ckpt.optimizer or {}).items():
        m = _OPTIM_KEY.fullmatch(key)
        if m is None or int(m[1]) not in ids or not t.is_floating_point():
            raise CheckpointError(f"checkpoint {ckpt.path}: optimizer tensor {key!r} "
                                  f"({t.dtype}) is not a floating state of a parameter")
        state.setdefault(int(m[1]), {})[m[2]] = t
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
    """Assign a verified checkpoint; everything is checked and converted before the
    first write, so an error leaves model, optimizer and RNG as they were."""
    check_model_fits(model, ckpt.model, ckpt.path)
    if optimizer is not None and ckpt.optimizer is None:
        raise ValueError(f"optimizer={type(optimizer).__name__} is not allowed: checkpoint "
                         f"{ckpt.path} was loaded without its optimizer state "
                         "(load_checkpoint(optimizer=False)); load it with optimizer=True "
                         "to restore an optimizer")
    optim_sd = None if optimizer is None else optimizer_state_dict(optimizer, ckpt)
    rng_bytes = rng_state(ckpt.state["torch_rng"], ckpt.path) if rng else None
    model.load_state_dict(ckpt.model, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(optim_sd)
    if rng_bytes is not None:
        torch.set_rng_state(rng_bytes)
