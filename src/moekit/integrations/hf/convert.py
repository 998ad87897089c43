"""Lossless conversion between transformers MoE checkpoints and moekit's language model.

    moekit convert --to moekit HF_DIR RUN_DIR     # config.json + *.safetensors -> RUN_DIR/step_0
    moekit convert --to hf RUN_DIR HF_DIR         # and back (the same files)

Four families (``FAMILIES``): Mixtral, Qwen3-MoE (q / k RMSNorms per head, heads of
``head_dim`` wider than D / H, ``norm_topk_prob``), OLMoE (q / k RMSNorms over all
heads, top-k weights not renormalized) and Qwen2-MoE (q / k / v biases, and a shared
expert every token goes through, scaled by sigmoid(h @ shared_expert_gate)); all of them
dropless top-k softmax routers over SwiGLU experts, every layer MoE. Only tensors are
moved (no transformers import). Mixtral stores each expert as ``w1`` (gate) [F, D],
``w3`` (up) [F, D], ``w2`` (down) [D, F], the others as ``gate_proj`` / ``up_proj`` /
``down_proj`` (Qwen2-MoE's shared expert too, beside its [1, D] gate); moekit
stacks them as ``w_in`` [E, D, 2F] = [gate | up] and ``w_out`` [E, F, D]. moekit's
attention has one fused ``qkv`` [(H + 2J) Dh, D] = [q | k | v] with the checkpoint's J
key/value heads (``LMConfig.num_kv_heads``: grouped-query attention, nothing
repeated). Checkpoints converted before moekit had grouped-query attention hold J = H
copies of the key/value heads; they still convert back (the copies regrouped). The
original config.json travels inside the moekit checkpoint, so the round trip gives
back the same files. A model trained in moekit is written as the family its q / k
norms, or its shared experts and q / k / v biases, name (``check_lm``).

Shape letters: V vocabulary, D hidden, F expert hidden, E experts, H heads,
J key/value heads, Dh head size.

The parts: ``convert_config`` (the families; config.json <-> LMConfig) and
``convert_tensors`` (reading shards; tensor names <-> moekit's); this module writes the
directories and is the command.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from moekit.config import reject
from moekit.errors import exit_code
from moekit.inference.text import TOKENIZER_FILES, copy_tokenizer, find_tokenizer
from moekit.integrations.hf.convert_config import (
    FAMILIES,
    Family,
    check_hf,
    check_lm,
    hf_config,
    lm_config,
    mixtral_config,
    same_model,
)
from moekit.integrations.hf.convert_tensors import (
    Reads,
    ShardTensors,
    converted,
    hf_to_moekit_tensors,
    moekit_to_hf_tensors,
    read_hf_dir,
)
from moekit.safetensors_write import save_file

# (names callers import from here, defined in the parts)
__all__ = ["FAMILIES", "Family", "ShardTensors", "WriteError", "add_arguments", "check_dest",
           "check_hf", "check_lm", "hf_config", "hf_to_moekit", "hf_to_moekit_tensors",
           "lm_config", "mixtral_config", "moekit_to_hf", "moekit_to_hf_tensors",
           "read_hf_dir", "run"]


# -- directories ------------------------------------------------------------------------


class WriteError(OSError):
    """A write into a conversion's destination failed (a full disk, a read-only
    directory): it names the path, as the other commands' write errors do (`moekit
    convert` had printed "[Errno 28] No space left on device", no path)."""

    left = ""  # what a replace that failed part way left (``rundir.ReplacedError``)

    def __str__(self) -> str:
        return f"could not write to {self.filename}: {self.strerror}{self.left}"


@contextmanager
def _writing(dst: str | Path, *sources: str | Path | None) -> Iterator[None]:
    """An OSError in the block as a WriteError naming its file, else ``dst``; one naming a
    file of ``sources`` (a tokenizer file that could not be read) is left as it is."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.filename is not None:
            where = Path(os.fsdecode(e.filename)).resolve()
            if any(Path(s).resolve() in (where, *where.parents) for s in sources if s):
                raise
        from moekit.train.rundir import ReplacedError  # lazy: the train package is large

        error = WriteError(e.errno, e.strerror or str(e), str(e.filename or dst))
        if isinstance(e, ReplacedError):  # an --overwrite's swap: the old output is not whole
            error.left = f"; {e.left}"
        raise error from e


def hf_to_moekit(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a moekit LM checkpoint (run directory ``dst``) from a Mixtral, Qwen3-MoE,
    OLMoE or Qwen2-MoE directory, a tensor at a time: the layout is worked out from the shards'
    headers first (meta tensors: names, shapes and dtypes checked against the config,
    nothing read), then each tensor is read, converted and written, so the conversion
    holds about one layer's experts, not the model.

    The run (step_00000000, LATEST, and tokenizer/ where ``src`` has one) is written whole
    into a directory beside ``dst`` and swapped in (``rundir.write_dir``): ``dst`` must be
    new or empty, or hold a checkpoint and ``overwrite`` (it stays as it was until the new
    run is complete, and if anything fails). Anything else is refused before it is
    written (``check_run_dest``)."""
    from moekit.meta import meta_device
    from moekit.models import LMConfig, MoETransformer
    from moekit.train.checkpoint import StreamedWeights, save_checkpoint

    config, shards = read_hf_dir(src)
    check_hf(config, src)
    lm = LMConfig.from_dict(lm_config(config))
    with meta_device():  # no random init: every tensor comes from the checkpoint
        model = MoETransformer(lm)
    meta, layout = hf_to_moekit_tensors(config, shards.as_meta(), str(src))
    try:
        model.load_state_dict(meta, strict=True, assign=True)
    except RuntimeError as e:  # shapes that do not fit the config
        reject("source", str(src), f"its tensors do not fit its config.json: {e}")
    aliases = {"head.weight": "embed.weight"} if lm.tie_embeddings else {}
    weights = StreamedWeights({k: v for k, v in meta.items() if k not in aliases},
                              lambda: converted(config, Reads(shards, str(src))), aliases)
    state = {"step": 0, "model_config": lm.to_dict(),
             "converted_from": {"hf_config": config, "expert_layout": layout}}

    def fill(tmp: Path) -> None:
        # the tokenizer (dst/tokenizer, for `moekit generate`) and the checkpoint go in
        # together or not at all. Written into dst one after the other, a failed copy had
        # left a run without it (generate decoded its ids as bytes), and a failed save had
        # deleted the copy, and with it the tokenizer dst held before
        copy_tokenizer(src, tmp)
        save_checkpoint(tmp, model, torch.optim.SGD(model.parameters(), lr=0.0), state,
                        weights=weights)

    from moekit.train.rundir import clean_run_dir, read_latest, write_dir
    dst = Path(dst)
    with _writing(dst, src):
        if not _check_held(dst, overwrite):
            dst.mkdir(parents=True, exist_ok=True)  # a read-only place is named here
            clean_run_dir(dst)  # .step_*.tmp* an earlier moekit's killed conversions left
        write_dir(dst, fill, check=lambda d: check_run_dest(d, overwrite))
    return dst / read_latest(dst)


def moekit_to_hf(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a transformers directory (config.json + model.safetensors) from a moekit LM
    checkpoint: the family it was converted from, else the one ``check_lm`` names.

    Each file is written whole over what ``dst`` holds; with ``overwrite`` a checkpoint
    there is replaced whole instead (``rundir.write_dir``: the new directory is written
    beside it and swapped in, so no file of the old one stays behind)."""
    from moekit.train.checkpoint import load_checkpoint
    from moekit.train.rundir import write_dir, write_files

    ckpt = load_checkpoint(src, optimizer=False)
    lm = ckpt.state["model_config"]
    check_lm(lm)
    origin = ckpt.state.get("converted_from") or {}
    config = origin.get("hf_config")
    if config is None or not same_model(config, lm):
        config = hf_config(lm, ckpt.model["embed.weight"].dtype)
    tensors = moekit_to_hf_tensors(config, ckpt.model, origin.get("expert_layout", "per_expert"))
    dst = Path(dst)
    tokenizer = find_tokenizer(src)  # the run's tokenizer files go back beside the model
    with _writing(dst, src, tokenizer):  # a full disk or a read-only dst: named
        # each file is written under a temporary name and renamed into place once all are
        # complete, so a failed write leaves no partial file (that would also block
        # `moekit convert`)
        names = [n for n in TOKENIZER_FILES if tokenizer and (tokenizer / n).is_file()]
        writers = {name: (lambda tmp, name=name: shutil.copyfile(tokenizer / name, tmp))
                   for name in names}
        # clone: q/k/v are views of one qkv tensor, and safetensors refuses shared storage
        writers["model.safetensors"] = lambda tmp: save_file(
            {k: v.clone() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        writers["config.json"] = lambda tmp: tmp.write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n")
        if overwrite and checkpoint_in(dst):
            return write_dir(dst, lambda tmp: write_files(tmp, writers))
        made = not dst.exists()
        dst.mkdir(parents=True, exist_ok=True)
        try:
            write_files(dst, writers)  # fsynced, renamed, dst fsynced
        except BaseException:
            if made and not any(dst.iterdir()):
                dst.rmdir()
            raise
    return dst


# -- `moekit convert` -------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("source", help="a transformers Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE "
                   "directory (config.json + *.safetensors) or a moekit run / step_* "
                   "directory")
    p.add_argument("dest", help="directory to write, new or empty (--to hf: or holding "
                   "no checkpoint)")
    p.add_argument("--to", choices=("moekit", "hf"), default=None,
                   help="direction (default: moekit when source has config.json, else hf)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in dest (whole: it stays as it was "
                   "until the new one is complete); without it that is refused, as `moekit "
                   "quantize` refuses an --out holding its output")


RUN_MARKERS = ("LATEST", "state.json", "config.json", "model.safetensors")


def checkpoint_in(dst: Path) -> list[str]:
    """What in ``dst`` makes it a checkpoint (moekit's or transformers'): RUN_MARKERS it
    holds, and its first step_* directory."""
    return [m for m in RUN_MARKERS if (dst / m).exists()] + \
        [p.name for p in sorted(dst.glob("step_*"))[:1]]


def check_dest(source: str | Path, dest: str | Path, overwrite: bool = False) -> None:
    """The output must be a new place: not the input, not inside it, not a checkpoint
    (unless ``overwrite``: then it is replaced whole)."""
    src, dst = Path(source).resolve(), Path(dest).resolve()
    if dst == src or src in dst.parents:
        reject("dest", str(dest), f"it must not be the source {str(source)!r} or a directory "
               "inside it")
    _check_held(Path(dest), overwrite)


def _check_held(dest: Path, overwrite: bool) -> list[str]:
    """``checkpoint_in(dest)``, refused unless ``overwrite``."""
    held = checkpoint_in(dest)
    if held and not overwrite:
        reject("dest", str(dest), f"it already holds a checkpoint ({', '.join(held)}); pick a "
               "new or empty directory, or replace it whole with overwrite=True (moekit "
               "convert --overwrite)")
    return held


def check_run_dest(dst: Path, overwrite: bool) -> None:
    """``hf_to_moekit``'s ``dst``: new or empty, or a checkpoint it may replace whole."""
    if not _check_held(dst, overwrite) and dst.exists() and not (
            dst.is_dir() and not any(dst.iterdir())):
        reject("dest", str(dst), "it exists and holds no checkpoint: the run is written "
               "beside it and swapped in whole, which would delete what it holds; pass a "
               "new or empty directory")


def run(args) -> int:
    to = args.to or ("moekit" if (Path(args.source) / "config.json").is_file() else "hf")
    try:
        check_dest(args.source, args.dest, args.overwrite)
        convert = hf_to_moekit if to == "moekit" else moekit_to_hf
        out = convert(args.source, args.dest, overwrite=args.overwrite)
    except (ValueError, OSError, KeyError) as e:  # KeyError: a tensor the source lacks
        print(f"moekit convert: error: {e}", file=sys.stderr)
        return exit_code(e)  # 2 had been given for a failed write too (train: 1)
    print(f"wrote {out}")
    return 0
