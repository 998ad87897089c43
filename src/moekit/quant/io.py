"""Quantized language-model checkpoints: ``model.safetensors`` + ``quantized.json``.

    DIR/model.safetensors   every tensor of the quantized model (experts as
                            ``...w_in.data`` / ``.scales`` / ``.zeros``; tied copies once)
    DIR/quantized.json      format version, the model config, bits, group size,
                            scope ("all" or "experts"; version 1 files: experts),
                            activations ("float" or "int8"; absent: float),
                            embeddings (whether an untied embedding table is
                            quantized; versions 1 and 2: never),
                            tied aliases, the SHA-256 of model.safetensors,
                            source (written by quantize_checkpoint, optional: the
                            float checkpoint's path, step, corpus and train config)

``load_quantized`` rebuilds the model from the config, puts empty quantized
tensors where the experts go and checks every name, shape and dtype before
assigning anything: a file whose scales are missing or misshaped raises
``CheckpointError`` naming them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from moekit.config import reject
from moekit.errors import NonFiniteScalesError
from moekit.inference.text import copy_tokenizer, find_tokenizer
from moekit.meta import meta_device
from moekit.models.config import LMConfig
from moekit.models.transformer import MoETransformer, rotary_table
from moekit.quant.layout import from_o16, raw_state_dicts
from moekit.quant.model import (
    SCOPES,
    Target,
    check_scope,
    checked_targets,
    is_quantized,
    quantize_like,
    quantized_embeddings,
    quantized_scope,
    set_expert_layout,
)
from moekit.quant.tensor import (
    QuantizationError,
    QuantizedTensor,
    check_activations,
    check_bits,
    quantize_tensor,
)
from moekit.routing.hashing import is_integer
from moekit.safetensors_write import save_file, save_stream
from moekit.train.checkpoint import (
    CheckpointError,
    check_model_fits,
    dedupe_tied,
    load_checkpoint,
)
from moekit.train.rundir import aside_of, write_dir
from moekit.train.rundir import sha256 as _sha256

FORMAT_VERSION = 3  # 3 added "embeddings", 2 "scope"; 1 (experts only) and 2 still load
MODEL_FILE, META_FILE = "model.safetensors", "quantized.json"


def _check_path(name: str, value: object) -> Path:
    """``value`` as a Path; a ValueError naming ``name`` when it is not a path (None was
    Path's TypeError "expected str, bytes or os.PathLike object", naming no argument)."""
    if not isinstance(value, str | os.PathLike):
        reject(name, value, "it must be a directory path (a str or os.PathLike)")
    return Path(value)


def located(path: str | Path) -> Path:
    """``path``, or where a save killed between its two renames left the previous output
    (``.<name>.old``, ``rundir.swap_in``) while ``path`` is missing: readers use that."""
    path = _check_path("path", path)
    aside = aside_of(path)
    if not path.exists() and (aside / META_FILE).exists():
        return aside
    return path


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``save_quantized``."""
    return (located(path) / META_FILE).exists()


def _check_replaceable(out: Path, overwrite: bool = True) -> None:
    """``out`` may only be replaced if it is empty, or an earlier quantized checkpoint
    and ``overwrite`` (as `moekit convert` refuses a destination holding a checkpoint,
    `moekit quantize` refuses one holding its output unless given --overwrite)."""
    if is_quantized_checkpoint(out):  # out, or the one a killed save left aside of it
        if not overwrite:
            raise ValueError(f"out={str(out)!r} is not allowed: it already holds a quantized "
                             f"checkpoint ({META_FILE}); pick a new or empty directory, or "
                             "replace it whole with overwrite=True (moekit quantize "
                             "--overwrite)")
    elif out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"out={str(out)!r} exists and is not a quantized checkpoint: "
                         "refusing to overwrite it; pass a new or empty directory")


def save_quantized(model: MoETransformer, out: str | Path) -> Path:
    """Write a quantized ``MoETransformer`` to the directory ``out`` (atomically).

    The files go to a temporary directory, removed if anything fails. An existing
    ``out`` is renamed aside before the new one is renamed into place and deleted
    only after that (``rundir.swap_in``), so one complete output is always on disk.
    """
    if not isinstance(model, MoETransformer):  # was AttributeError, after out's parent made
        raise QuantizationError(f"model={type(model).__name__} is not allowed: it must be a "
                                "moekit MoETransformer quantized with moekit.quantize")
    qts = [m for m in model.modules() if isinstance(m, QuantizedTensor)]
    if not qts:
        raise ValueError("model is not quantized: call moekit.quantize(model, bits=...) first")
    with raw_state_dicts():  # o16 buffers as they are: converted one at a time below
        weights, aliases = dedupe_tied(model.state_dict())
    meta = {"format_version": FORMAT_VERSION, "model_config": model.config.to_dict(),
            "bits": qts[0].bits, "group_size": qts[0].group_size,
            "activations": qts[0].activations, "scope": quantized_scope(model),
            "embeddings": quantized_embeddings(model), "tied": aliases}
    o16 = {f"{name}.{part}" for name, m in model.named_modules()
           if isinstance(m, QuantizedTensor) and m.layout == "o16"
           for part in ("data", "scales", "zeros")}
    if not o16.intersection(weights):
        return _write(out, lambda f: save_file(weights, str(f)), meta)
    nk = ((k, from_o16(t) if k in o16 else t) for k, t in weights.items())
    return _write(out, lambda f: save_stream(weights, nk, str(f)), meta)


def _remove_unmarked_writes(out: Path) -> None:
    """Delete the temporary directories killed saves to ``out`` left before the writer
    was in the name (``.<name>.tmp`` + mkdtemp's 8 characters), as the moekit that wrote
    them did: each held a whole model, and every killed save had left one more beside
    ``out``. Marked ones go only where their writer is surely dead (``rundir.write_dir``,
    ``temps.remove_dead_temps``): all ``.<name>.tmp*`` had gone, a save running beside
    this one included, whose rename then failed."""
    pattern = re.compile(re.escape(f".{out.name}.tmp") + r"[a-z0-9_]{8}")
    for p in out.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _write(out: str | Path, write_model: Callable[[Path], None], meta: dict,
           tokenizer: Path | None = None, overwrite: bool = True) -> Path:
    """``out`` holding the model file ``write_model`` writes and quantized.json (``meta``
    and the file's SHA-256), and a copy of the ``tokenizer`` directory where one is
    given, written to a temporary directory and swapped into place (an earlier output
    there replaced whole only with ``overwrite``)."""
    out = _check_path("out", out)
    _check_replaceable(out, overwrite)  # raises before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_unmarked_writes(out)

    def fill(tmp: Path) -> None:
        write_model(tmp / MODEL_FILE)
        (tmp / META_FILE).write_text(json.dumps(
            {**meta, "sha256": _sha256(tmp / MODEL_FILE)}, indent=1))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)

    # checked again before the swap: out may have changed while the files were written
    return write_dir(out, fill, check=lambda o: _check_replaceable(o, overwrite))


def _check_layout(meta: Any, where: Path) -> None:
    """The keys and container types ``read_meta`` relies on: a JSON value of another
    shape (a number, ``"tied": []``, ``"model_config": []``) raised TypeError or
    AttributeError where ``moekit generate`` names a CheckpointError in one line."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} must hold a JSON object, not a {type(meta).__name__}")
    for key in ("format_version", "model_config", "bits", "group_size", "tied", "sha256"):
        if key not in meta:
            raise CheckpointError(f"{where} lacks the key {key!r}")
    if not isinstance(meta["model_config"], dict):
        raise CheckpointError(f"{where}: model_config must be a JSON object, got a "
                              f"{type(meta['model_config']).__name__}")
    tied = meta["tied"]
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise CheckpointError(f"{where}: tied must map tensor names to tensor names")


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path / META_FILE} is unreadable or corrupt: {e}") from e
    _check_layout(meta, path / META_FILE)
    if meta["format_version"] not in (1, 2, FORMAT_VERSION):
        raise CheckpointError(f"{path / META_FILE}: format_version must be 1, 2 or "
                              f"{FORMAT_VERSION}, got {meta['format_version']!r}")
    if meta["format_version"] == FORMAT_VERSION and not isinstance(meta.get("embeddings"), bool):
        raise CheckpointError(f"{path / META_FILE}: embeddings must be true or false, got "
                              f"{meta.get('embeddings', 'nothing')!r}")
    meta.setdefault("scope", "experts")
    meta.setdefault("embeddings", False)  # before version 3 embedding tables stayed float
    meta.setdefault("activations", "float")  # written since the int8-activation kernels
    try:
        check_activations(meta["activations"])
    except QuantizationError as e:
        raise CheckpointError(f"{path / META_FILE}: {e}") from e
    if meta["scope"] not in SCOPES:
        raise CheckpointError(f"{path / META_FILE}: scope={meta['scope']!r} must be one of "
                              f"{SCOPES}")
    return meta


def _file_sha256(file: Path) -> str:
    """``file``'s SHA-256; a CheckpointError naming it where it is missing or unreadable
    (was sha256's FileNotFoundError, a traceback where a float checkpoint names the file)."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (or not a plain file in {file.parent}): a "
                              f"quantized checkpoint holds {MODEL_FILE} beside {META_FILE}")
    try:
        return _sha256(file)
    except OSError as e:
        raise CheckpointError(f"{file} is unreadable: {e}") from e


def _check_dtypes(model: nn.Module, tensors: dict, where: Path) -> None:
    wrong = sorted(f"{k}: checkpoint {tensors[k].dtype} vs model {v.dtype}"
                   for k, v in model.state_dict().items() if tensors[k].dtype != v.dtype)
    if wrong:
        raise CheckpointError(f"checkpoint {where} does not match the model: dtype "
                              f"mismatches {wrong[:5]}")


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> MoETransformer:
    """The quantized model saved in ``path``, verified before anything is assigned; its
    float weights in ``dtype`` (None: as saved; packed weights and scales stay as saved)."""
    path = located(path)
    meta = read_meta(path)
    if _file_sha256(path / MODEL_FILE) != meta["sha256"]:
        raise CheckpointError(f"{path / MODEL_FILE} is corrupt or truncated: its SHA-256 does "
                              f"not match the one recorded in {META_FILE}")
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / MODEL_FILE} is not a readable safetensors file: {e}") from e
    for alias, source in meta["tied"].items():
        if source in tensors:
            tensors[alias] = tensors[source]
    quant = (meta["bits"], meta["group_size"], meta["scope"], meta["activations"],
             meta["embeddings"])
    return assemble(LMConfig.from_dict(meta["model_config"]), tensors, path, quant, dtype)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assemble(config: LMConfig, tensors: dict, where: Path, quant: tuple | None = None,
             dtype: torch.dtype | None = None) -> MoETransformer:
    """The model of ``config`` holding ``tensors`` themselves (built on the meta device,
    then each tensor assigned: no second copy of the weights, which a model built first
    and then loaded needed, in fp32 whatever the checkpoint's dtype). ``quant``: (bits,
    group_size, scope, activations, embeddings) of a quantized checkpoint, whose dtypes must be the
    model's; a training checkpoint's float weights keep their dtype. ``dtype``: the
    model then ``.to(dtype)``, each tensor that changes dtype converted as it is read
    (``tensors`` as ``load_file`` mapped them from ``where``'s model file, see
    ``_converted``). Checked before anything is built."""
    with meta_device():
        model = MoETransformer(config)
        if quant is not None:
            quantize_like(model, *quant)
    _check_tensors(model, tensors, where, quant)
    if dtype is not None:  # the meta model's dtypes after .to(dtype): what each becomes
        targets = {k: v.dtype for k, v in model.to(dtype).state_dict().items()}
        tensors = _converted(tensors, targets, dtype, where / MODEL_FILE)
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_embeddings:  # assigned as two Parameters of one tensor: one again
        model.head.weight = model.embed.weight
    model.rope_cos, model.rope_sin = rotary_table(config.max_seq_len, config.head_size,
                                                  config.rope_theta)
    # .to(dtype) as before the tensors were converted one by one: the rotary tables, the
    # router's fp32 buffers and a quantized model's output dtype follow it alike
    model = model.eval() if dtype is None else model.eval().to(dtype)
    if quant is not None:  # files hold NK; W4A8 experts take the decode kernels' order
        set_expert_layout(model)
    return model


def _check_tensors(model: nn.Module, tensors: dict, where: Path, quant: tuple | None) -> None:
    check_model_fits(model, tensors, where)
    if quant is not None:
        _check_dtypes(model, tensors, where)
        check_finite_scales(model, tensors, where)
        return
    # float weights in any float dtype; an integer buffer (a hash router's token-id table,
    # which the router's load hook checks further) as an integer tensor
    whole = {k: v.dtype for k, v in model.state_dict().items()}
    wrong = sorted(f"{k}: {t.dtype}" for k, t in tensors.items()
                   if not (t.dtype in FLOAT_DTYPES if whole[k].is_floating_point
                           else is_integer(t)))
    if wrong:
        raise CheckpointError(f"checkpoint {where} does not match the model: its "
                              "weights must be float32, bfloat16 or float16 (a hash "
                              f"router's table an integer tensor), got {wrong[:5]}")


def _converted(tensors: dict, targets: dict, dtype: torch.dtype, file: Path) -> dict:
    """``tensors`` with each float one that ``.to(dtype)`` turns into ``dtype`` converted,
    read again from ``file`` one at a time with ``pread``: peak memory the converted model
    plus one tensor as stored. Converting the mapped tensors (or the loaded model) touched
    every page of the map, resident until it is unmapped: the stored model and the
    converted one at once (see tests/test_load_memory.py). Tied names (one tensor) stay
    one tensor."""
    # here: moekit.offload imports this module
    from moekit.offload.safetensors_io import read_header, read_into

    locs = read_header(file)
    names = {id(t): k for k, t in tensors.items() if k in locs}
    todo = {id(t): t for k, t in tensors.items()
            if t.is_floating_point() and targets[k] == dtype != t.dtype}
    # one buffer for every read: a fresh one per tensor, freed after its conversion, left
    # glibc's heap fragmented (its mmap threshold rises to the first freed size): 66 MiB
    # more resident after a 201 MiB fp32 model's bf16 load (tests/test_load_memory.py)
    staging = torch.empty(max((locs[names[i]].nbytes for i in todo if i in names), default=0),
                          dtype=torch.uint8)
    done: dict[int, Tensor] = {}
    fds: dict[Path, int] = {}
    try:
        for i, t in todo.items():
            if i in names:
                loc = locs[names[i]]
                t = read_into(staging[:loc.nbytes].view(loc.dtype).view(loc.shape), [loc], fds)
            done[i] = t.to(dtype)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {k: done.get(id(t), t) for k, t in tensors.items()}


def check_finite_scales(model: nn.Module, tensors: dict, where: Path) -> None:
    """Every scale and zero point of ``model``'s QuantizedTensors in ``tensors`` (by
    state-dict name) is finite, else ``NonFiniteScalesError``: one NaN loaded fine and
    then made the logits NaN, which died in sampling (generate) or scored nan
    (perplexity)."""
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedTensor):
            continue
        for part in ("scales", "zeros"):
            t = tensors.get(f"{name}.{part}")
            if t is not None and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteScalesError(
                    f"checkpoint {where}: {name}.{part} holds {bad} non-finite value(s) (NaN "
                    "or inf): quantization scales and zero points must be finite")


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, bits: int,
                        group_size: int | None = None, scope: str = "all",
                        activations: str = "float", embeddings: bool = True,
                        overwrite: bool = True) -> Path:
    """Load a training checkpoint (run or step directory), quantize it (as ``quantize``
    with these arguments), save it to ``out`` (an earlier quantized output there is
    replaced whole if ``overwrite``, else refused before anything is read)."""
    # what can be checked before the checkpoint is read and quantized (out=None failed
    # only at the end, with Path's TypeError; an unknown scope after quantizing nothing)
    group_size = check_bits(bits, group_size)
    check_activations(activations)
    check_scope(scope)
    _check_replaceable(_check_path("out", out), overwrite)
    if is_quantized_checkpoint(checkpoint):  # was "no state.json or LATEST there"
        meta = read_meta(located(checkpoint))
        raise CheckpointError(f"checkpoint={str(checkpoint)!r} is already quantized "
                              f"(int{meta['bits']}, {META_FILE}): quantize the float run "
                              "or step directory it came from")
    ck = load_checkpoint(checkpoint, optimizer=False)
    # the checkpoint's own tensors (a converted bf16 model stays bf16 until each weight
    # is quantized), the rest in fp32 as a quantized directory holds it
    config = LMConfig.from_dict(ck.state["model_config"])
    model = assemble(config, ck.model, ck.path)
    source = trained_source(ck)
    del ck
    # every check, nothing written
    targets = checked_targets(model, scope, group_size, embeddings)
    # the quantized model's layout: a meta model quantized alike, its floats in fp32
    with meta_device():
        shape = quantize_like(MoETransformer(config), bits, group_size, scope,
                              activations, embeddings).float()
    layout, aliases, owners = _quantized_layout(shape, targets)
    meta = {"format_version": FORMAT_VERSION, "model_config": config.to_dict(), "bits": bits,
            "group_size": group_size, "activations": activations,
            "scope": quantized_scope(shape), "embeddings": quantized_embeddings(shape),
            "tied": aliases, "source": source}
    tensors = _quantized_tensors(model, layout, owners, bits, group_size, activations)
    # a converted model's tokenizer, for `moekit generate`: inside the swapped-in directory
    # (copied after the swap, a failed copy had left the new model without it, and the
    # old output's tokenizer deleted: generate then decoded ids as bytes, a ValueError)
    return _write(out, lambda f: save_stream(layout, tensors, f), meta,
                  find_tokenizer(checkpoint), overwrite)


def trained_source(ck) -> dict:
    """What ``moekit analyze`` needs of the float checkpoint a quantized one came from
    (its path, step, training corpus and batch shape): without it, analyze of the
    quantized directory could not route the text its float checkpoint routes by default,
    nor name the step its --compare against that checkpoint is about."""
    return {"checkpoint": str(ck.path.resolve()), "step": ck.step, "data": ck.state.get("data"),
            "train_config": ck.state.get("train_config")}


def _quantized_layout(shape: MoETransformer, targets: list[Target]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Target]]:
    """(the saved tensors of ``shape``, a meta model quantized by ``quantize_like``, by
    name in state-dict order; the tied aliases, as ``dedupe_tied`` records them for the
    quantized model; each QuantizedTensor's name -> the ``target`` it quantizes (a tied
    embedding's: the head's))."""
    by_id = {id(shape.get_submodule(t.name + ("" if t.kind == "stack" else ".weight"))): t
             for t in targets}
    owners = {name: by_id[id(m)] for name, m in shape.named_modules(remove_duplicate=False)
              if isinstance(m, QuantizedTensor)}
    layout: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}  # meta tensors have no storage: tied ones are the same object
    for name, t in shape.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
            layout[name] = t.detach()
    return layout, aliases, owners


def _quantized_tensors(model: MoETransformer, layout: dict[str, torch.Tensor],
                       owners: dict[str, Target], bits: int, group_size: int | None,
                       activations: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``layout`` one at a time: each weight quantized when its first part
    is due and dropped after its last (one weight's quantized tensors held at a time,
    not the model's), the floats as ``.float()`` gives them."""
    floats = model.state_dict()
    owner, q = None, None
    for name in layout:
        module, part = name.rsplit(".", 1)
        target = owners.get(module)
        if target is None:
            t = floats[name]
            yield name, t.float() if t.is_floating_point() else t
            continue
        if module != owner:
            owner, q = module, None  # the last weight's tensors go before the next's come
            q = quantize_tensor(target.w_EKN, bits, group_size, activations)
        yield name, getattr(q, part)


def load_model(path: str | Path, dtype: torch.dtype | None = torch.float32) -> MoETransformer:
    """A model from a training checkpoint or a quantized one (for ``moekit generate``),
    its float weights in ``dtype`` (None: as saved; a quantized model's packed weights
    and scales stay as they are)."""
    if is_quantized_checkpoint(path):
        return load_quantized(path, dtype)
    ck = load_checkpoint(path, optimizer=False)
    return assemble(LMConfig.from_dict(ck.state["model_config"]), ck.model, ck.path,
                    dtype=dtype)


__all__ = ["is_quantized", "is_quantized_checkpoint", "load_model", "load_quantized",
           "quantize_checkpoint", "save_quantized"]
