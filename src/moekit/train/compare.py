"""`moekit compare`: MoE vs a dense model of equal active FLOPs, same tokens and seeds.

Every variant has the same active FFN width A per token: the dense model has
one SwiGLU of hidden A, an MoE with top-K has experts of hidden A / K, so a
token does the same FFN arithmetic (plus the router's D x E product, < 1%).
Each run's result is cached in its directory (``sweep_cache``), so variants can run
in separate processes (``--variants``) and a final call collects the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from moekit.config import (
    MAX_SEED,
    check_int_range,
    check_out_dir,
    check_positive_int,
    flag_message,
    reject,
)
from moekit.errors import exit_code
from moekit.malloc import tune_malloc
from moekit.models.config import LMConfig, preset
from moekit.train.checkpoint import CheckpointError
from moekit.train.cli import (
    FIELD_FLAGS,
    add_model_arguments,
    add_train_arguments,
    check_device_flag,
    configs_from_args,
)
from moekit.train.data import load_corpus
from moekit.train.interrupt import exit_status
from moekit.train.monitor import MetricsLog, read_metrics
from moekit.train.rundir import write_whole
from moekit.train.sweep_cache import (
    METRICS,
    RESULT,
    cached_result,
    check_cache,
    check_interrupted,
    finished_note,
    forget_metrics,
    last_checkpoint,
    runs_to_train,
    unresumable,
    write_result,
)
from moekit.train.trainer import (
    SHORT_SCHEDULE,
    NonFiniteError,
    TrainConfig,
    Trainer,
    warn_short_schedule,
)

LOAD_PNG = "expert_load_{}.png"  # one per MoE variant in the report


def add_common_arguments(p: argparse.ArgumentParser, out: str, top_ks: list[int]) -> None:
    """Flags shared by `moekit compare` and `moekit scaling`."""
    add_model_arguments(p)
    add_train_arguments(p)
    p.add_argument("--active-ffn", type=int,
                   help="A, FFN hidden size each token uses, shared experts' included "
                        "(default: preset top_k * ffn_dim + shared)")
    p.add_argument("--top-ks", type=int, nargs="+", default=top_ks,
                   help="MoE variants to train (experts of hidden A / K)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+",
                   help="train only these (e.g. dense moe-top2); others are read from cache")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the cached runs (a partial sweep)")
    p.add_argument("--out", default=out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, "runs/compare", [2, 1])


def routed_ffn(base: LMConfig, active_ffn: int) -> int:
    """The part of A the routed experts share: A less the shared experts' hidden size,
    which every variant keeps at the base config's (it had followed each variant's
    ffn_dim: with one shared expert the tiny preset's dense model ran 192 hidden units
    per token, top-2 144, top-1 192)."""
    if base.shared_dim >= active_ffn:
        reject("--active-ffn", active_ffn, "it must exceed the shared experts' hidden size "
               f"{base.shared_dim} (A counts them)")
    return active_ffn - base.shared_dim


def _shared(base: LMConfig) -> dict[str, Any]:
    """The shared experts' size pinned explicitly (nothing changes without them, so the
    configs, and so the cached runs' keys, stay as they were)."""
    return {"shared_ffn_dim": base.shared_dim} if base.num_shared_experts else {}


def moe_variant(base: LMConfig, active_ffn: int, top_k: int,
                num_experts: int | None = None) -> LMConfig:
    """A top-K MoE whose tokens do the FFN arithmetic of a dense SwiGLU of hidden A
    (routed experts of hidden (A - shared) / K, plus the shared experts)."""
    routed = routed_ffn(base, active_ffn)
    if routed % top_k:
        raise ValueError(f"top-ks value {top_k} is not allowed: it must divide "
                         f"active_ffn={active_ffn}" + (
                             f" less the shared experts' {base.shared_dim} = {routed}"
                             if base.num_shared_experts else ""))
    # top-1 under a renormalising softmax router has a constant gate of 1.0, so
    # the router would learn from the aux loss only (measured: val loss 0.14 worse
    # than dense at 1M tokens); Switch's top-1 gate is the raw probability.
    router = "switch" if top_k == 1 and base.router == "softmax" else base.router
    experts = base.num_experts if num_experts is None else num_experts
    try:
        return base.replace(dense=False, top_k=top_k, ffn_dim=routed // top_k,
                            router=router, num_experts=experts, **_shared(base))
    except ValueError as e:  # LMConfig names --top-k, which this command does not read
        if str(e).startswith("top_k="):
            raise ValueError(f"--top-ks value {top_k}: {e}") from None
        raise


def dense_variant(base: LMConfig, active_ffn: int) -> LMConfig:
    """One SwiGLU of hidden A (the dense LM's FFN is top_k * ffn_dim + the shared size)."""
    return base.replace(dense=True, top_k=1, ffn_dim=routed_ffn(base, active_ffn),
                        **_shared(base))


def variants(base: LMConfig, active_ffn: int, top_ks: list[int]) -> dict[str, LMConfig]:
    for k in top_ks:  # LMConfig would name --top-k, which the user did not pass
        if k > base.num_experts:
            reject("--top-ks", k, f"it must be at most --experts={base.num_experts}")
    out = {"dense": dense_variant(base, active_ffn)}
    for k in top_ks:
        out[f"moe-top{k}"] = moe_variant(base, active_ffn, k)
    return out


def train_one(name: str, mcfg: LMConfig, tcfg: TrainConfig, corpus, run_dir: Path,
              progress: bool) -> dict[str, Any]:
    if (run_dir / RESULT).exists():
        return cached_result(run_dir, mcfg, tcfg, corpus)
    trainer = resume_interrupted(run_dir, mcfg, tcfg, corpus, progress)
    if trainer is None:
        print(f"== {name} seed {tcfg.seed}: {run_dir}", flush=True)
        trainer = Trainer(mcfg, tcfg, corpus, run_dir, progress)
    else:
        print(f"== {name} seed {tcfg.seed}: {run_dir} (resuming the interrupted run at "
              f"step {trainer.step})", flush=True)
    summary = trainer.fit()
    # every session's time in fit (the checkpoint of an interrupted one records its own):
    # a resumed run had reported its last session's alone
    result = run_result(name, trainer, summary, corpus, summary["wall_s"])
    write_result(run_dir / RESULT, result)
    return result


def run_result(name: str, trainer: Trainer, summary: dict[str, Any], corpus,
               wall_s: float) -> dict[str, Any]:
    """What result.json caches, from the run's metrics.jsonl (all its sessions, as
    ``read_metrics`` joins them: a resumed run's curve starts at step 0 too)."""
    mcfg, tcfg = trainer.mcfg, trainer.cfg
    records = read_metrics(trainer.out_dir / METRICS)
    vals = final_validation(trainer, [r for r in records if r.get("kind") == "val"])
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"]
    return {
        "variant": name, "seed": tcfg.seed, "total_params": trainer.model.num_params(),
        "active_params": trainer.model.active_params_per_token(),
        "num_experts": 1 if mcfg.dense else mcfg.num_experts,
        "top_k": 0 if mcfg.dense else mcfg.top_k, "router": mcfg.router,
        # a session resumed at the last step trained none: the rate its first one logged
        "tokens_per_s": summary["tokens_per_s"] or (rates[-1] if rates else 0.0),
        "val_loss": vals[-1]["val_loss"], "tokens": summary["tokens"],
        "steps": summary["step"], "wall_s": wall_s, "load_avg_1m": os.getloadavg()[0],
        "curve": [(r["tokens"], r["val_loss"]) for r in vals],
        "step_curve": [(r["step"], r["val_loss"]) for r in vals],
        "load": [(r["step"], r["expert_load"]) for r in vals if "expert_load" in r],
        "model_config": mcfg.to_dict(), "train_config": tcfg.to_dict(),
        "corpus": corpus.location(),
    }


def final_validation(trainer: Trainer, vals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``vals`` ending with one at the run's last step: a session killed after its last
    save but before that line reached metrics.jsonl left none, so it is measured again."""
    if vals and vals[-1]["step"] == trainer.step:
        return vals
    log = MetricsLog(trainer.out_dir)
    try:
        trainer.validate(log)
    finally:
        log.close()
    return [*vals, trainer.history[-1]]


def resume_interrupted(run_dir: Path, mcfg: LMConfig, tcfg: TrainConfig, corpus,
                       progress: bool) -> Trainer | None:
    """The run an interrupted sweep left in ``run_dir``, resumed from its last checkpoint
    (it had started over, appending to its metrics.jsonl: one file, two runs); None when
    it left none, after removing its metrics so that they describe only the new run.
    ValueError, before anything changes, when that checkpoint cannot be resumed or was
    made with other settings than this sweep's."""
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        forget_metrics(run_dir)
        return None
    check_interrupted(run_dir, ckpt, mcfg, tcfg, corpus)
    try:
        return Trainer.resume(ckpt, corpus, progress=progress)
    except CheckpointError as e:
        raise unresumable(run_dir, ckpt, e) from None


def collect(configs: dict[str, LMConfig], wanted: list[str], seeds: list[int],
            tcfg: TrainConfig, corpus, out: Path, progress: bool) -> list[dict[str, Any]]:
    """Train the wanted variants (seed by seed, so a partial sweep covers every
    variant once before repeating one); read the others' cached results."""
    results = []
    for seed in seeds:
        for name, mcfg in configs.items():
            run_dir = out / f"{name}-seed{seed}"
            if name in wanted:
                results.append(train_one(name, mcfg, tcfg.replace(seed=seed), corpus,
                                         run_dir, progress))
            elif (run_dir / RESULT).exists():
                results.append(cached_result(run_dir, mcfg, tcfg.replace(seed=seed), corpus))
    return results


def finished_runs(command: str, args: argparse.Namespace, configs: dict[str, LMConfig],
                  wanted: list[str], tcfg: TrainConfig, corpus, out: Path,
                  plan: bool = False) -> list[dict[str, Any]] | int:
    """collect's results for `moekit <command>` (after the plan line, when ``plan``), or
    the exit status with the error printed (2: a cached run trained with other settings,
    or --out holding no finished run; 1: a write that failed, a run that diverged or a
    cached run's checkpoint that cannot be read (``exit_code``);
    130 / 143: Ctrl-C / SIGTERM, which had ended the sweep with a traceback)."""
    try:
        check_cache(configs, wanted, args.seeds, tcfg, corpus, out)
    except ValueError as e:
        print(f"moekit {command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    if plan:  # after the check: it had claimed "cached" for runs then refused
        print(plan_line(configs, wanted, args.seeds, tcfg, out), flush=True)
    if runs_to_train(configs, wanted, args.seeds, out):
        warn_short_schedule(tcfg)  # once per command: each run's Trainer had warned again
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SHORT_SCHEDULE)
            results = collect(configs, wanted, args.seeds, tcfg, corpus, out,
                              not args.no_progress)
    except ValueError as e:  # CheckpointError too (a cached run's checkpoint): exit 1
        print(f"moekit {command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except NonFiniteError as e:  # a diverged run: had been a traceback
        print(f"moekit {command}: error: {e}; {finished_note(configs, args.seeds, out)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C 130, SIGTERM 143 (a run saves on either)
        print(f"moekit {command}: interrupted: {finished_note(configs, args.seeds, out)}; "
              "the same command trains the rest (the interrupted run resumes from its last "
              "checkpoint)",
              file=sys.stderr)
        return exit_status(e)
    except OSError as e:  # a full disk: was a traceback out of the run's save or log
        return write_failed(command, out, e, f"; {finished_note(configs, args.seeds, out)}; "
                            "the same command trains the rest (the failed run resumes "
                            "from its last checkpoint)")
    if not results:
        print(f"moekit {command}: error: out={args.out!r} holds no finished runs to report",
              file=sys.stderr)
        return 2
    return results


def check_flags(args: argparse.Namespace) -> None:
    """This command's own flags, before any config is built (where 0 would mean 'default'
    or divide by zero) and before any run starts (a bad last seed after the others ran)."""
    if args.seed is not None:  # each run's seed comes from --seeds
        reject("--seed", args.seed, "use --seeds: one run per seed")
    if args.dense:  # the variants set dense themselves
        raise ValueError("--dense is not allowed here: the dense model is one of the "
                         "variants ('dense' in --variants)")
    if getattr(args, "expert_counts", None) is not None and args.experts is not None:
        reject("--experts", args.experts, "use --expert-counts: one MoE per count")
    for flag in ("threads", "active_ffn"):
        if getattr(args, flag) is not None:
            check_positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    for k in args.top_ks:
        check_positive_int("--top-ks", k)
    for seed in args.seeds:
        check_int_range("--seeds", seed, 0, MAX_SEED)
    # a repeated seed read the first's cached run: n=2, spread 0, a false "holds"
    check_once("--seeds", args.seeds, "seed", "the same run counted twice")
    # a repeated top-K is one variant: scaling printed its target line twice
    check_once("--top-ks", args.top_ks, "value", "one variant named twice")
    check_out_dir("--out", args.out)


def check_once(flag: str, values: list[int], what: str, why: str) -> None:
    """``values`` (a ``nargs="+"`` flag's) without a repeat, or a ValueError naming ``flag``."""
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        reject(flag, values, f"each {what} once ({', '.join(map(str, repeated))} repeats): "
               f"a repeated {what} is {why}")


def write_failed(command: str, out: Path, e: OSError, then: str = "") -> int:
    """The one-line error of a write into ``out`` that failed (a full disk, a read-only
    directory), naming the file where the error does; exit status 1."""
    print(f"moekit {command}: error: could not write to {e.filename or out}: "
          f"{e.strerror or e}{then}", file=sys.stderr)
    return 1


def error(command: str, e: Exception) -> int:
    """The one-line error of a bad flag, led by the flag; exit status 2 (1 where it is
    not a flag's but a file's: ``exit_code``)."""
    print(f"moekit {command}: error: {flag_message(e, FIELD_FLAGS)}", file=sys.stderr)
    return exit_code(e)


def base_configs(args: argparse.Namespace) -> tuple[LMConfig, TrainConfig, int]:
    """The base model and train configs, and the default A (the base's active FFN width).
    Every variant sets its own top-K, so without --top-k the base is built at top-K 1: at
    the preset's K (2) it had refused --experts 1 and --router switch, naming --top-k,
    a flag the user had not passed; A still comes from the preset's K."""
    if args.top_k is not None:
        base, tcfg = configs_from_args(args)
        return base, tcfg, base.active_ffn_dim
    base, tcfg = configs_from_args(argparse.Namespace(**{**vars(args), "top_k": 1}))
    top_k = preset(args.preset or "small").top_k
    return base, tcfg, top_k * base.ffn_dim + base.shared_dim


def prepare(args: argparse.Namespace, make_configs: Callable[[LMConfig, int], dict[str, LMConfig]]
            ) -> tuple[dict[str, LMConfig], list[str], TrainConfig, Any]:
    """Configs, the variants to train, the train config and the corpus from the flags
    (ValueError names the bad flag)."""
    check_flags(args)
    base, tcfg, default_active = base_configs(args)
    check_device_flag(args)  # before the corpus is read
    configs = make_configs(base, args.active_ffn or default_active)
    wanted = args.variants or list(configs)
    unknown = sorted(set(wanted) - set(configs))
    if unknown:
        raise ValueError(f"variants={unknown} is not allowed: choose from {list(configs)}")
    if getattr(args, "report_only", False):
        wanted = []
    return configs, wanted, tcfg, load_corpus(args.data)


def table(results: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(r["variant"] for r in results))
    dense = [r["val_loss"] for r in results if r["variant"] == "dense"]
    lines = ["| model | total params | active params/token | tokens/s | final val loss "
             "(mean ± std) | spread (max-min) | vs dense |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        rs = [r for r in results if r["variant"] == name]
        losses = [r["val_loss"] for r in rs]
        mean = statistics.fmean(losses)
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        tps = statistics.fmean(r["tokens_per_s"] for r in rs)
        gap = "" if name == "dense" or not dense else f"{mean - statistics.fmean(dense):+.4f}"
        lines.append(f"| {name} | {rs[0]['total_params']:,} | {rs[0]['active_params']:,} | "
                     f"{tps:,.0f} | {mean:.4f} ± {std:.4f} (n={len(rs)}) | "
                     f"{max(losses) - min(losses):.4f} | {gap} |")
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> list[str]:
    """MoE beats dense 'by more than the seed spread': its worst seed is better than
    dense's best seed, and the mean gap exceeds both variants' max-min spread. The
    difference is written as in the table (MoE minus dense: negative = MoE lower)."""
    dense = [r["val_loss"] for r in results if r["variant"] == "dense"]
    out = []
    for name in dict.fromkeys(r["variant"] for r in results):
        moe = [r["val_loss"] for r in results if r["variant"] == name]
        if name == "dense" or not dense:
            continue
        diff = statistics.fmean(moe) - statistics.fmean(dense)
        words = f"{abs(diff):.4f} {'below' if diff < 0 else 'above'} dense"
        if min(len(moe), len(dense)) < 2:
            out.append(f"{name}: mean val loss {diff:+.4f} vs dense ({words}) from "
                       f"{len(moe)} MoE and {len(dense)} dense seed(s): no claim can be made "
                       "without a seed spread; run at least 2 seeds (--seeds 0 1 2)")
            continue
        spread = max(max(moe) - min(moe), max(dense) - min(dense))
        ok = max(moe) < min(dense) and -diff > spread
        out.append(f"{name}: mean val loss {diff:+.4f} vs dense ({words}), largest seed "
                   f"spread {spread:.4f} -> MoE better by more than the spread: "
                   f"{'holds' if ok else 'NOT shown'} at this budget")
    return out


# measured: the default `moekit train` (small preset, 16 x 128) ran 9,169 tokens/s on
# the 2-core dev box with the C++ kernels; compare's variants have equal active FLOPs
PLAN_TOKENS_PER_S = 9_000


def plan_line(configs: dict[str, LMConfig], wanted: list[str], seeds: list[int],
              tcfg: TrainConfig, out: Path) -> str:
    """What will run before anything does: runs, steps, tokens and a rough time."""
    todo = runs_to_train(configs, wanted, seeds, out)
    tokens = tcfg.steps * tcfg.batch_size * tcfg.seq_len * tcfg.grad_accum
    minutes = len(todo) * tokens / PLAN_TOKENS_PER_S / 60
    return (f"plan: {len(todo)} run(s) to train ({len(wanted)} variant(s) x {len(seeds)} "
            f"seed(s), {len(wanted) * len(seeds) - len(todo)} cached in {out}), "
            f"{tcfg.steps:,} steps of {tcfg.batch_size} x {tcfg.seq_len} = {tokens / 1e6:.2f}M "
            f"tokens each: about {minutes:.0f} min at ~{PLAN_TOKENS_PER_S:,} tokens/s (the "
            "default run on a 2-core CPU); fewer with --variants, --seeds or --steps")


def run(args: argparse.Namespace) -> int:
    tune_malloc()
    try:
        configs, wanted, tcfg, corpus = prepare(
            args, lambda base, active: variants(base, active, args.top_ks))
    except ValueError as e:
        return error("compare", e)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = finished_runs("compare", args, configs, wanted, tcfg, corpus, out, plan=True)
    if isinstance(results, int):
        return results
    report = table(results) + "\n\n" + "\n".join(verdict(results))
    print(report)
    try:
        write_whole(out / "compare.md", report + "\n")
        for path in plots(results, configs, out):
            print(f"wrote {path}")
        for path in remove_stale_load_plots(results, out):
            print(f"removed {path}: its variant is not in this report")
    except OSError as e:
        return write_failed("compare", out, e)
    return 0


def remove_stale_load_plots(results: list[dict[str, Any]], out: Path) -> Iterator[Path]:
    """The expert_load_<variant>.png files in ``out`` of variants not in this report,
    removed: a sweep into a used --out had left an earlier sweep's beside the new report,
    as if they were its own."""
    reported = {r["variant"] for r in results}
    for path in sorted(out.glob(LOAD_PNG.format("*"))):
        variant = path.name.removeprefix("expert_load_").removesuffix(".png")
        if variant not in reported and path.is_file():
            path.unlink()
            yield path


def plots(results: list[dict[str, Any]], configs: dict[str, LMConfig], out: Path
          ) -> Iterator[Path]:
    """The validation curves and each variant's expert load, as PNGs in ``out``."""
    try:
        from moekit.train.plots import plot_curves, plot_load
    except ImportError as e:
        print(f"no plots ({e}): pip install \"moekit[plot]\"", file=sys.stderr)
        return
    yield plot_curves(results, out / "val_loss.png")
    for name in configs:
        first = next((r for r in results if r["variant"] == name and r["load"]), None)
        if first is not None:
            yield plot_load(first, out / LOAD_PNG.format(name))
