"""Type and range checks for every field of a checkpoint's state.json.

The manifest catches accidental damage; these checks make sure that what is
about to be assigned (step, configs, counters, optimizer hyper-parameters, RNG
state) is what a moekit save can have written, before anything is assigned.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import CheckpointError

MAX_STEP = 99_999_999  # checkpoint directories are named step_NNNNNNNN
_RNG_BYTES = torch.get_rng_state().numel()  # 5056 on torch 2.13 (CPU mt19937 + normal cache)


def _fail(where: Path, field: str, value: Any, allowed: str) -> None:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    raise CheckpointError(f"{where}: {field}={text} is not allowed: {allowed}")


def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_state(state: dict[str, Any], where: Path) -> None:
    """Raise CheckpointError for a missing field or one of the wrong type or range."""
    _check_common(state, where, ("step", "model_config", "tied", "optimizer", "torch_rng"))
    _check_data(state, where)
    tied = state["tied"]
    if not isinstance(tied, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        _fail(where, "tied", tied, "it must map parameter names to parameter names")
    _check_optimizer(state["optimizer"], where)
    rng = state["torch_rng"]
    if not isinstance(rng, list) or len(rng) != _RNG_BYTES or not all(
            _is_int(b, 0, 255) for b in rng):
        _fail(where, "torch_rng", rng, f"it must be a list of {_RNG_BYTES} ints in [0, 255]")


def _check_load(load: Any, where: Path) -> None:
    """None, or tokens per expert per MoE layer: equal-length lists of ints >= 0."""
    if load is None:
        return
    if not (isinstance(load, list) and load and all(isinstance(r, list) for r in load)
            and len({len(r) for r in load}) == 1
            and all(_is_int(v) for r in load for v in r)):
        _fail(where, "load_since_eval", load, "it must be null or a list of equal-length "
              "lists of ints >= 0 (tokens per expert per MoE layer)")


def _check_collapse(monitor: Any, model_config: Any, where: Path) -> None:
    """None, or ``CollapseMonitor.state()``: streaks [layer, expert, steps >= 1] and
    warnings [kind, layer, expert], each layer one of the model's MoE layers and each
    expert one of its experts (a streak past them would fail the next step's update)."""
    if monitor is None:
        return
    layers, experts = _moe_shape(model_config)
    if not _collapse_ok(monitor, layers, experts):
        _fail(where, "collapse_monitor", monitor, "it must be null or hold hot and cold "
              "lists of [layer, expert, steps >= 1] and a warned list of [\"hot\" or "
              f"\"cold\", layer, expert], with layer < {layers} (the MoE layers) and "
              f"expert < {experts}")


def _collapse_ok(monitor: Any, layers: int, experts: int) -> bool:
    if not (isinstance(monitor, dict) and set(monitor) == {"hot", "cold", "warned"}
            and all(isinstance(v, list) for v in monitor.values())):
        return False
    return all(_at(r, 0, layers, experts) and _is_int(r[2], 1)
               for r in monitor["hot"] + monitor["cold"]) and all(
        _at(w, 1, layers, experts) and w[0] in ("hot", "cold") for w in monitor["warned"])


def _at(row: Any, first: int, layers: int, experts: int) -> bool:
    """A list of three whose items ``first`` and ``first + 1`` are a layer and expert."""
    return (isinstance(row, list) and len(row) == 3 and _is_int(row[first], 0, layers - 1)
            and _is_int(row[first + 1], 0, experts - 1))


def _moe_shape(model_config: Any) -> tuple[int, int]:
    """(MoE layers, experts per layer) of a checked model_config; (0, 0) without one."""
    from moekit.models.config import LMConfig

    if not isinstance(model_config, dict):
        return 0, 0
    cfg = LMConfig.from_dict(model_config)
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)), cfg.num_experts


def check_state_dcp(state: dict[str, Any], where: Path) -> None:
    """The same for trainer.json of an expert-parallel (DCP) checkpoint."""
    _check_common(state, where, ("step", "model_config", "train_config", "counters"))
    _check_data(state, where)


def _check_data(state: dict[str, Any], where: Path) -> None:
    data = state.get("data", {})
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k, ""), str) for k in ("corpus", "position")) or not \
            _is_int(data.get("next_batch_seed", 0)):
        _fail(where, "data", data, "it must hold corpus and position strings and "
              "next_batch_seed, an int >= 0")


def _check_common(state: dict[str, Any], where: Path, required: tuple[str, ...]) -> None:
    for key in required:
        if key not in state:
            raise CheckpointError(f"{where} lacks the key {key!r}")
    if not _is_int(state["step"], 0, MAX_STEP):
        _fail(where, "step", state["step"], f"it must be an int in [0, {MAX_STEP}]")
    _check_configs(state, where)
    _check_load(state.get("load_since_eval"), where)
    _check_collapse(state.get("collapse_monitor"), state.get("model_config"), where)
    counters = state.get("counters", {})
    if not isinstance(counters, dict) or not all(
            isinstance(k, str) and _is_int(v) for k, v in counters.items()):
        _fail(where, "counters", counters, "it must map names to ints >= 0")
    wall = state.get("wall_s", 0.0)  # absent from checkpoints saved before it was recorded
    if not (_is_number(wall) and wall >= 0):
        _fail(where, "wall_s", wall, "it must be a finite number of seconds >= 0")


def _check_configs(state: dict[str, Any], where: Path) -> None:
    from moekit.models.config import LMConfig
    from moekit.train.trainer import TrainConfig  # the trainer imports this module

    for key, cls in (("model_config", LMConfig), ("train_config", TrainConfig)):
        if key not in state:
            continue
        if not isinstance(state[key], dict):
            _fail(where, key, state[key], "it must be a JSON object")
        try:
            cls.from_dict(state[key])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: {key} is not a valid {cls.__name__}: {e}") from e


_GROUP_RANGES = {  # AdamW's hyper-parameters: (check, what is allowed)
    "lr": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "betas": (lambda v: isinstance(v, list) and len(v) == 2 and all(
        _is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
}


def _plain_value(v: Any) -> bool:
    return v is None or type(v) in (bool, str) or _is_number(v) or (
        isinstance(v, list) and all(_is_number(x) for x in v))


def _check_optimizer(opt: Any, where: Path) -> None:
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list) or \
            not isinstance(opt.get("scalars"), dict):
        _fail(where, "optimizer", opt, "it must hold a param_groups list and a scalars dict")
    seen: set[int] = set()
    for i, group in enumerate(opt["param_groups"]):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(_is_int(p) for p in params) or \
                seen & set(params) or len(set(params)) != len(params):
            _fail(where, f"optimizer.param_groups[{i}].params", params,
                  "it must be a list of distinct ints >= 0, none in another group")
        seen |= set(params)
        for key, value in group.items():
            check, allowed = _GROUP_RANGES.get(key, (_plain_value, "a plain JSON value"))
            if key != "params" and not check(value):
                _fail(where, f"optimizer.param_groups[{i}].{key}", value, f"it must be {allowed}")
    for key, value in opt["scalars"].items():
        idx, _, name = key.partition(".")
        if not (idx.isdigit() and int(idx) in seen and name) or not _plain_value(value):
            _fail(where, f"optimizer.scalars[{key!r}]", value,
                  "keys must be <parameter index>.<name> and values plain numbers")


def check_optimizer_groups(saved: list[dict[str, Any]], current: list[dict[str, Any]],
                           where: Path) -> list[dict[str, Any]]:
    """The saved param groups, with JSON lists turned back into tuples (AdamW betas),
    if they have the current optimizer's layout: group count, parameters per
    group, keys, and the type of every value."""
    if len(saved) != len(current):
        raise CheckpointError(f"checkpoint {where}: the optimizer has {len(saved)} parameter "
                              f"groups, the model needs {len(current)}")
    out = []
    for i, (g, cur) in enumerate(zip(saved, current, strict=True)):
        if len(g["params"]) != len(cur["params"]) or set(g) != set(cur):
            raise CheckpointError(
                f"checkpoint {where}: optimizer group {i} has {len(g['params'])} parameters "
                f"and keys {sorted(g)}; the model's has {len(cur['params'])} and "
                f"{sorted(cur)}")
        fixed = {k: tuple(v) if isinstance(v, list) and k != "params" else v
                 for k, v in g.items()}
        for k, v in fixed.items():
            if k != "params" and not _same_kind(v, cur[k]):
                _fail(where, f"optimizer.param_groups[{i}].{k}", v,
                      f"it must be of the optimizer's kind, like {cur[k]!r}")
        out.append(fixed)
    return out


def _same_kind(saved: Any, current: Any) -> bool:
    if type(current) is bool or current is None:  # flags; None = "the default"
        return saved is None or type(saved) is bool
    if type(current) is str:
        return type(saved) is str
    if isinstance(current, tuple):
        return isinstance(saved, tuple) and len(saved) == len(current)
    return type(saved) in (int, float)  # numbers (lr may be saved as an int)


def rng_state(values: list[int], where: Path) -> Tensor:
    """The saved CPU RNG state as a uint8 tensor, checked by loading it into a scratch
    generator (the global one is only set once everything else has been assigned)."""
    state = torch.tensor(values, dtype=torch.uint8)
    try:
        torch.Generator().set_state(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: torch_rng is not a valid CPU RNG state: {e}") from e
    return state
