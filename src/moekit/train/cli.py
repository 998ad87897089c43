"""`moekit train` (also `python -m moekit.train`): train the MoE language model."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from moekit.config import ROUTERS, check_out_dir, check_positive_int, flag_message
from moekit.errors import exit_code
from moekit.malloc import tune_malloc
from moekit.models.config import PRESETS, QK_NORMS, LMConfig, preset
from moekit.models.generate import generate
from moekit.train import checkpoint as ckpt_io
from moekit.train import data as data_io
from moekit.train.checkpoint import LATEST, CheckpointError
from moekit.train.data import decode, encode, load_corpus
from moekit.train.interrupt import exit_status
from moekit.train.launch import (
    add_distributed_arguments,
    check_parallel_flags,
    run_distributed,
    wants_distributed,
)
from moekit.train.memory import check_model_memory, warn_step_memory
from moekit.train.monitor import read_metrics
from moekit.train.trainer import (
    NonFiniteError,
    TrainConfig,
    Trainer,
    check_device_available,
)

DEFAULT_OUT = "runs/train"
# model flag -> LMConfig field (None = keep the preset's value)
MODEL_FLAGS = {"dim": "dim", "layers": "num_layers", "heads": "num_heads",
               "kv_heads": "num_kv_heads", "head_dim": "head_dim", "qk_norm": "qk_norm",
               "qkv_bias": "qkv_bias", "shared_experts": "num_shared_experts",
               "shared_ffn_dim": "shared_ffn_dim", "shared_expert_gate": "shared_expert_gate",
               "ffn_dim": "ffn_dim", "experts": "num_experts", "top_k": "top_k",
               "moe_every": "moe_every", "router": "router", "groups": "num_groups",
               "topk_groups": "topk_groups", "aux_loss_coef": "aux_loss_coef",
               "z_loss_coef": "z_loss_coef", "bias_update_rate": "bias_update_rate",
               "capacity_factor": "capacity_factor", "hash_seed": "hash_seed"}
TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len",
               "grad_accum": "grad_accum", "lr": "lr", "warmup": "warmup_steps",
               "eval_every": "eval_every", "eval_batches": "eval_batches",
               "save_every": "save_every", "seed": "seed", "max_bad_steps": "max_bad_steps",
               "device": "device"}
# the model flags that set its parameter count, named when the model cannot fit in memory
SIZE_FLAGS = ("preset", "dim", "layers", "heads", "kv_heads", "head_dim", "ffn_dim",
              "experts", "top_k", "moe_every", "shared_experts", "shared_ffn_dim")
# what --resume may change; every other setting is the run's own, read from its checkpoint
RESUME_FLAGS = ("steps", "eval_every", "save_every", "device")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS),  # None: tell a given one apart
                   help="model size (default small)")
    g.add_argument("--dim", type=int, help="D, model size")
    g.add_argument("--layers", type=int, help="number of transformer blocks")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--kv-heads", type=int,
                   help="key/value heads (grouped-query attention; default: --heads)")
    g.add_argument("--head-dim", type=int, help="size of one head (default: dim / heads)")
    g.add_argument("--qk-norm", choices=QK_NORMS,
                   help="RMSNorms on q and k: per head (Qwen3-MoE) or over all heads "
                   "(OLMoE); default none")
    g.add_argument("--qkv-bias", action="store_true", default=None,
                   help="biases on the q, k and v projections (Qwen2-MoE)")
    g.add_argument("--ffn-dim", type=int, help="F, hidden size of one expert")
    g.add_argument("--experts", type=int, help="E, experts per MoE layer")
    g.add_argument("--top-k", type=int, help="K, experts per token")
    g.add_argument("--moe-every", type=int, help="MoE FFN on every N-th block (1 = all)")
    g.add_argument("--shared-experts", type=int,
                   help="shared experts per MoE layer: an FFN every token goes through "
                   "(DeepSeekMoE, Qwen2-MoE); default 0")
    g.add_argument("--shared-ffn-dim", type=int,
                   help="hidden size of the shared experts (default: shared experts * F)")
    g.add_argument("--shared-expert-gate", action="store_true", default=None,
                   help="scale the shared experts' output by sigmoid(h @ w) (Qwen2-MoE)")
    g.add_argument("--router", choices=ROUTERS)
    g.add_argument("--groups", type=int,
                   help="G, group-limited routing (DeepSeek-V3): experts in G groups, each "
                   "token picks from its best --topk-groups groups; router softmax or "
                   "sigmoid; default 1 (no groups)")
    g.add_argument("--topk-groups", type=int,
                   help="groups each token may pick experts from (1..G; default 1)")
    g.add_argument("--hash-seed", type=int,
                   help="--router hash only: seed of the token-id tables (MoE layer l uses "
                   "seed + l); default 0")
    g.add_argument("--aux-loss-coef", type=float)
    g.add_argument("--z-loss-coef", type=float)
    g.add_argument("--bias-update-rate", type=float,
                   help="aux-loss-free balancing step (DeepSeek-V3); 0 = off")
    g.add_argument("--capacity-factor", type=float, help="default: dropless")
    g.add_argument("--dense", action="store_true",
                   help="dense baseline: one SwiGLU of hidden top_k * ffn_dim (+ the shared "
                   "experts' hidden size) per block")
    g.add_argument("--untied-embeddings", action="store_true",
                   help="an output head of its own (default: the head is the embedding "
                   "table, tied; Qwen-, Mixtral- and OLMoE-style models untie them)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--data", help="text file or directory (default: the Python stdlib source)")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--grad-accum", type=int,
                   help="micro-batches per optimizer step: --batch-size B --grad-accum N "
                   "trains on the windows --batch-size B*N draws (the aux balancing loss "
                   "is taken per micro-batch of B)")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int, help="warm-up steps")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--eval-batches", type=int,
                   help="fixed validation batches, each of the --batch-size x --grad-accum "
                   "windows a step trains on, run in micro-batches of --batch-size")
    g.add_argument("--save-every", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-bad-steps", type=int,
                   help="stop after this many non-finite steps in a row")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast (AVX-512 BF16 kernels where the CPU has them)")
    g.add_argument("--fp32", action="store_true",
                   help="no autocast (the default)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", help="cpu (default), cuda, ...")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_train_arguments(p)
    # None: tell a given --out apart (a resumed run writes into its own directory)
    p.add_argument("--out", help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--resume", metavar="DIR",
                   help="continue a run from its directory or a step_* checkpoint")
    add_distributed_arguments(p)


def picked(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in flags.items()
            if getattr(args, flag, None) is not None}


def use_bf16(args: argparse.Namespace) -> bool:
    # fp32 unless --bf16: the full default run on the quiet dev box (2026-12-02, 2 threads)
    # took 5 min 53 s at 9,549 tokens/s in bf16 (val 1.231) against 4 min 13 s at 12,355
    # tokens/s in fp32 (val 1.225), although one 1-thread step costs 0.78x the CPU time in
    # bf16: the D=128 model's GEMMs are too small to pay for the casts. On the Intel AMX VM
    # (2026-12-04, 60 steps) bf16 ran 12.0-12.4k tokens/s against 14.9k in fp32, after the
    # expert GEMMs stopped building a oneDNN primitive per row count (5.3k before).
    if args.bf16 and args.fp32:
        raise ValueError("--bf16 and --fp32 were both given: pick one")
    return args.bf16


def configs_from_args(args: argparse.Namespace) -> tuple[LMConfig, TrainConfig]:
    changes = picked(args, MODEL_FLAGS)
    if args.dense:
        changes["dense"] = True
    if args.untied_embeddings:
        changes["tie_embeddings"] = False
    model = preset(args.preset or "small", **changes)
    check_hash_seed_flag(args, model)
    train = TrainConfig(**picked(args, TRAIN_FLAGS), bf16=use_bf16(args), compile=args.compile)
    if train.seq_len > model.max_seq_len:
        model = model.replace(max_seq_len=train.seq_len)
    return model, train


# model flags that only an MoE layer reads: the dense baseline (--dense) sizes its FFN by
# --ffn-dim, --top-k and the shared-expert flags and reads none of these
MOE_ONLY_FLAGS = ("experts", "router", "groups", "topk_groups", "aux_loss_coef",
                  "z_loss_coef", "bias_update_rate", "capacity_factor", "moe_every")


def warn_unused_by_dense(args: argparse.Namespace) -> None:
    """A warning naming the MoE-only flags given with --dense: they were dropped without a
    word, and a baseline run as the MoE command + --dense (the way to compare them) still
    runs. (Called by one process, or by the --nproc launcher before torchrun: not on every
    rank.)"""
    unused = [f"--{flag.replace('_', '-')}" for flag in MOE_ONLY_FLAGS
              if getattr(args, flag, None) is not None]
    if args.dense and unused:
        warnings.warn(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect "
                      "with --dense: the dense model has no router or experts (its FFN's "
                      "hidden size is --top-k x --ffn-dim + the shared experts')",
                      UserWarning, stacklevel=2)


def check_hash_seed_flag(args: argparse.Namespace, model: LMConfig) -> None:
    """--hash-seed seeds the hash router's tables and nothing else: refused with another
    router, or with --dense (no router at all), where it would be saved in the config and
    never read."""
    if args.hash_seed is None:
        return
    if model.dense:
        raise ValueError(f"--hash-seed={args.hash_seed} is not allowed with --dense: the "
                         "dense model has no router, and the seed only seeds the hash "
                         "router's token-id tables; drop --hash-seed or --dense")
    if model.router == "hash":
        return
    whose = "" if args.router is not None else f" (preset {args.preset or 'small'}'s router)"
    raise ValueError(f"--hash-seed={args.hash_seed} is not allowed with "
                     f"--router={model.router}{whose}: it seeds the hash router's token-id "
                     "tables only; add --router hash or drop --hash-seed")


def size_flags(args: argparse.Namespace) -> str:
    """The flags given that size the model, as typed ("--dim=100000 --experts=64"), or the
    default preset's name when none was."""
    given = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in SIZE_FLAGS
             if getattr(args, flag, None) is not None]
    given += [f"--{flag.replace('_', '-')}" for flag in ("dense", "untied_embeddings")
              if getattr(args, flag, False)]
    return " ".join(given) or "--preset=small"


def describe(trainer: Trainer) -> str:
    return describe_model(trainer.model, trainer.mcfg)


def describe_model(m: torch.nn.Module, c: LMConfig) -> str:
    """The model line: parameters of ``m`` (a ``MoETransformer``), total and active."""
    kind = "dense" if c.dense else f"MoE E={c.num_experts} K={c.top_k} router={c.router}"
    if not c.dense and c.num_groups > 1:
        kind += f" groups={c.num_groups} topk_groups={c.topk_groups}"
    return (f"{kind}, D={c.dim} L={c.num_layers} F={c.ffn_dim}: {m.num_params():,} parameters,"
            f" {m.active_params_per_token():,} active per token")


# config field -> the flag that sets it, so an error names what the user typed
FIELD_FLAGS = {field: "--" + flag.replace("_", "-")
               for flag, field in {**MODEL_FLAGS, **TRAIN_FLAGS, "data": "data",
                                   "threads": "threads", "bf16": "bf16",
                                   "compile": "compile"}.items()}


def error(e: Exception) -> int:
    """The one-line error of every bad flag: flag, value, what is allowed; exit status 2
    (1 for a checkpoint --resume could not use: ``exit_code``)."""
    print(f"moekit train: error: {flag_message(e, FIELD_FLAGS)}", file=sys.stderr)
    return exit_code(e)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        check_positive_int("threads", threads)
        torch.set_num_threads(threads)


def check_new_out(out: str | Path) -> None:
    """A new run must not write into a directory that holds one (single-process or --nproc)."""
    check_out_dir("--out", out)
    path = Path(out)
    if (path / LATEST).exists() or any(path.glob("dcp_step_*")):
        raise ValueError(f"out={str(out)!r} already holds a run; continue it with "
                         f"--resume {out}, or pick another --out")


def write_failed_text(trainer: Trainer, e: OSError) -> str:
    """The error of a write that failed (a full disk) during a run, one process or a rank:
    the checkpoint to resume from, or, where none was written yet, to start over (it had
    read "the last complete checkpoint is None (resume with: moekit train --resume RUN)",
    and that resume failed: no checkpoint there)."""
    if trainer.last_checkpoint is None:
        then = ("no checkpoint was written yet: free space and run the same command again "
                "to start over")
    else:
        hint = trainer.resume_hint or f"moekit train --resume {trainer.out_dir}"
        then = f"the last complete checkpoint is {trainer.last_checkpoint} (resume with: {hint})"
    return (f"could not write to {trainer.out_dir} at step {trainer.step}: "
            f"{e.strerror or e}; {then}")


def check_device_flag(args: argparse.Namespace) -> None:
    """``--device`` names a device this machine has, before the corpus is read or anything
    built (``--device cpu:3`` had trained on the CPU; a missing GPU was found only after
    the corpus was read)."""
    if getattr(args, "device", None) is not None:
        check_device_available(args.device, "--device")


def check_resume_path(resume: str) -> None:
    if not Path(resume).exists():
        # a checkpoint that is not there: exit 1, as for generate --checkpoint and the rest
        raise CheckpointError(f"--resume={resume} is not allowed: it does not exist; pass a "
                              "run directory or one of its step_* checkpoints")


def check_resume_flags(args: argparse.Namespace) -> None:
    """A resumed run keeps the settings saved in its checkpoint: a flag that would change
    one of them is refused, not ignored (``--resume RUN --lr 1e-4`` had trained on at the
    saved learning rate without a word)."""
    given = [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
             for flag, field in {"preset": "preset", **MODEL_FLAGS, **TRAIN_FLAGS}.items()
             if field not in RESUME_FLAGS and getattr(args, flag, None) is not None]
    given += [f"--{flag.replace('_', '-')}"
              for flag in ("dense", "untied_embeddings", "bf16", "fp32", "compile")
              if getattr(args, flag, False)]
    if getattr(args, "out", None) is not None:  # had been ignored: the run went on in RUN
        given.append(f"--out={args.out}")
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not "
                         "allowed with --resume: a resumed run keeps the settings saved in "
                         "its checkpoint; only --steps, --eval-every, --save-every, --device "
                         "and --data may be given; it goes on in its own directory (start a "
                         "new run with --out to change the others, or copy the run directory "
                         "to branch it)")


def data_for(args: argparse.Namespace) -> str | None:
    """``--data``; on ``--resume`` without it, the corpus the run was trained on (its
    checkpoint names it), not the default one: resuming a ``--data`` run without the flag
    had continued on the Python standard library without a word."""
    if not args.resume or args.data is not None:
        return args.data
    check_resume_path(args.resume)
    ckpt = ckpt_io.resolve(args.resume)
    try:
        source = json.loads((ckpt / ckpt_io.STATE_FILE).read_text())["data"]["corpus"]
    except (OSError, ValueError, KeyError, TypeError):  # Trainer.resume names the problem
        return None
    return recorded_corpus(args.resume, source)


def recorded_corpus(resume: str, source: object) -> str | None:
    """The corpus a checkpoint names, for ``load_corpus``: None for the default one (or
    none recorded); an error naming --data when it does not exist here."""
    return data_io.recorded_corpus(source, f"resume={resume!r}")


def _val_at(run_dir: Path, step: int) -> float | None:
    """The validation loss logged at ``step`` by an earlier session of this run, if any."""
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError):  # no log, or a corrupt line: the summary goes without it
        return None
    vals = [r.get("val_loss") for r in records
            if r.get("kind") == "val" and r.get("step") == step]
    return vals[-1] if vals else None


def loss_line(trainer: Trainer, summary: dict, start_step: int) -> str:
    """"validation loss A -> B" from the step this session started at to the end."""
    vals = [r for r in trainer.history if r.get("kind") == "val"]
    first = vals[0]["val_loss"] if vals and vals[0]["step"] == start_step else None
    if first is None and start_step:
        first = _val_at(trainer.out_dir, start_step)
    start = f"{first:.3f} at step {start_step} -> " if first is not None else ""
    if start_step and first is None:
        start = f"(resumed at step {start_step}) "
    return (f"done: step {summary['step']}, validation loss {start}{summary['val_loss']:.3f} "
            f"nats/byte, {summary['tokens_per_s']:.0f} tokens/s in training steps "
            f"({summary['seconds']:.0f} s in all), {summary['skipped_steps']} skipped steps")


def build_trainer(args: argparse.Namespace, corpus) -> Trainer:
    """A new or resumed Trainer; raises ValueError (CheckpointError is one) on bad input."""
    if args.resume:
        check_resume_path(args.resume)
        check_resume_flags(args)
        overrides = {k: v for k, v in picked(args, TRAIN_FLAGS).items() if k in RESUME_FLAGS}
        trainer = Trainer.resume(args.resume, corpus, progress=not args.no_progress,
                                 **overrides)
        if trainer.step >= trainer.cfg.steps:
            raise ValueError(f"resume={args.resume!r} is already at step {trainer.step} of "
                             f"steps={trainer.cfg.steps}: pass a larger --steps to continue")
    else:
        model_cfg, train_cfg = configs_from_args(args)
        warn_unused_by_dense(args)
        check_new_out(args.out)
        check_model_memory(model_cfg, size_flags(args), train_cfg.device)
        warn_step_memory(model_cfg, train_cfg.batch_size, train_cfg.seq_len, train_cfg.device)
        trainer = Trainer(model_cfg, train_cfg, corpus, args.out,
                          progress=not args.no_progress)
    return trainer


def run(args: argparse.Namespace) -> int:
    tune_malloc()  # every step frees and re-allocates the same activations
    if not args.resume and args.out is None:
        args.out = DEFAULT_OUT
    try:
        set_threads(args.threads)
    except ValueError as e:
        return error(e)
    if wants_distributed(args):
        return run_distributed(args)
    try:
        check_parallel_flags(args)  # unused by one process, but a bad value is still refused
        check_device_flag(args)
        if args.resume:
            check_resume_flags(args)  # before the corpus is read
        corpus = load_corpus(data_for(args))
        trainer = build_trainer(args, corpus)
    except (ValueError, CheckpointError) as e:
        return error(e)
    except KeyboardInterrupt as e:  # had been a traceback from inside the corpus read
        # (seconds for the stdlib) or the model build; nothing was trained or saved
        print("moekit train: interrupted before training started: nothing was trained "
              "or saved", file=sys.stderr)
        return exit_status(e)
    print(corpus.describe())
    print(f"model: {describe(trainer)}")
    print(f"precision: {'bf16 autocast' if trainer.cfg.bf16 else 'fp32'}")
    print(f"run directory: {trainer.out_dir} (metrics.jsonl, checkpoints)")
    start_step = trainer.step
    try:
        summary = trainer.fit()
    except KeyboardInterrupt as e:  # Ctrl-C 130, SIGTERM 143: what a shell reports
        print(f"resume with: moekit train --resume {trainer.out_dir}")
        return exit_status(e)
    except NonFiniteError as e:
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk had ended the run with a traceback from a save
        print(f"moekit train: error: {write_failed_text(trainer, e)}", file=sys.stderr)
        return 1
    print(loss_line(trainer, summary, start_step))
    print(f"checkpoint: {summary['checkpoint']}")
    prompt = encode("def ")[None].to(trainer.cfg.device)
    room = min(200, trainer.mcfg.max_seq_len - prompt.shape[1])
    sample = generate(trainer.model, prompt, room,
                      temperature=0.8, top_k=40)
    print("sample:\n" + decode(sample[0]))
    return 0
