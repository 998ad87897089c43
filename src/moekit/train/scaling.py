"""`moekit scaling`: validation loss against the number of experts at equal active FLOPs.

The Switch Transformer's scaling experiment at CPU scale: a dense SwiGLU of
hidden A, and for each top-K and each expert count E an MoE whose E experts
have hidden A / K, so every token does the same FFN arithmetic (plus the
router's D x E product). All variants train on the same tokens per seed.
Runs are cached one ``result.json`` per (variant, seed) by ``compare``'s
machinery, so a sweep resumes where it stopped and can be split over
processes with ``--variants``.

Writes ``scaling.md`` (table + targets), ``scaling.json`` (everything behind
them, curves included), ``scaling.png`` and ``speedup.png``.
Shape letters: E experts, K experts per token, A active FFN hidden size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from moekit.malloc import tune_malloc
from moekit.models.config import LMConfig
from moekit.train.compare import (
    add_common_arguments,
    dense_variant,
    error,
    finished_runs,
    moe_variant,
    prepare,
    write_failed,
)
from moekit.train.rundir import write_files

EXPERT_COUNTS = [1, 2, 4, 8, 16, 32, 64]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, "runs/scaling", [1, 2])
    p.add_argument("--expert-counts", type=int, nargs="+", default=EXPERT_COUNTS,
                   help="E values to train for each top-K (E < K is skipped)")


def variant_name(top_k: int, num_experts: int) -> str:
    return f"top{top_k}-e{num_experts}"


def scaling_variants(base: LMConfig, active_ffn: int, top_ks: list[int],
                     expert_counts: list[int]) -> dict[str, LMConfig]:
    """dense, then every (E, K) with K <= E, cheapest expert count first."""
    for e in expert_counts:
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"--expert-counts value {e!r} is not allowed: it must be an "
                             "int >= 1")
    if max(expert_counts) < min(top_ks):  # every MoE skipped: a dense-only "sweep"
        raise ValueError(f"--expert-counts={expert_counts} is not allowed: every count is "
                         f"below every --top-ks value ({top_ks}), so no MoE would train; give "
                         f"a count >= {min(top_ks)}")
    out = {"dense": dense_variant(base, active_ffn)}
    for e in sorted(set(expert_counts)):
        for k in top_ks:
            if k <= e:
                out[variant_name(k, e)] = _counted_variant(base, active_ffn, k, e)
    return out


def _counted_variant(base: LMConfig, active_ffn: int, top_k: int, num_experts: int
                     ) -> LMConfig:
    """moe_variant at one --expert-counts value: LMConfig's refusal of num_experts had
    been led by --experts, a flag this command refuses (it reads --expert-counts)."""
    try:
        return moe_variant(base, active_ffn, top_k, num_experts)
    except ValueError as e:
        if str(e).startswith("num_experts="):
            raise ValueError(f"--expert-counts value {num_experts}: {e}") from None
        raise


# -- analysis ------------------------------------------------------------------


def spread_stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "spread": max(values) - min(values)}


def steps_to_reach(step_curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation loss reaches ``target``, interpolated
    linearly between evaluations; None when the run never reaches it."""
    prev = None
    for step, loss in step_curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def point(name: str, runs: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """One (variant) point: seed statistics of the final loss and steps to ``target``."""
    first = runs[0]
    reach = [None if target is None else steps_to_reach(r["step_curve"], target)
             for r in runs]
    done = [s for s in reach if s is not None]
    return {"variant": name, "top_k": first["top_k"], "num_experts": first["num_experts"],
            "total_params": first["total_params"], "active_params": first["active_params"],
            "steps": first["steps"], "tokens": first["tokens"],
            "seeds": [r["seed"] for r in runs], "val_loss": spread_stats(
                [r["val_loss"] for r in runs]),
            "steps_to_dense_final": reach,
            "steps_to_dense_final_mean": statistics.fmean(done) if len(done) == len(
                reach) else None}


def summarize(results: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """Per-variant points (in ``order``) plus the dense reference they are measured against."""
    by_name = {n: [r for r in results if r["variant"] == n] for n in order}
    dense = by_name.get("dense") or []
    target = statistics.fmean(r["val_loss"] for r in dense) if dense else None
    points = [point(n, rs, target) for n, rs in by_name.items() if rs]
    dense_by_seed = {r["seed"]: r["val_loss"] for r in dense}
    for pt, rs in zip(points, (rs for rs in by_name.values() if rs), strict=True):
        # same seed = same training tokens: the per-seed difference cancels data-order noise
        diffs = [r["val_loss"] - dense_by_seed[r["seed"]] for r in rs
                 if r["seed"] in dense_by_seed]
        pt["paired_minus_dense"] = spread_stats(diffs) if diffs else None
    return {"dense_final_val_loss": target, "points": points,
            "wall_s": sum(r.get("wall_s", 0.0) for r in results),
            "runs": [{k: v for k, v in r.items() if k != "load"} for r in results]}


def _line(points: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    return sorted((p for p in points if p["top_k"] == top_k), key=lambda p: p["num_experts"])


def doubling_gaps(points: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """Loss drop between consecutive expert counts of one top-K line (dense counts as
    E=1 for top-K > 1), against the larger of the two points' seed spreads."""
    line = _line(points, top_k)
    dense = next((p for p in points if p["variant"] == "dense"), None)
    if top_k > 1 and dense is not None:
        line = [dense, *line]
    out = []
    for a, b in zip(line, line[1:], strict=False):
        gap = a["val_loss"]["mean"] - b["val_loss"]["mean"]
        spread = max(a["val_loss"]["spread"], b["val_loss"]["spread"])
        known = min(a["val_loss"]["n"], b["val_loss"]["n"]) > 1  # one seed has no spread
        out.append({"from": a["num_experts"], "to": b["num_experts"], "drop": gap,
                    "spread": spread if known else None,
                    "drop_exceeds_spread": gap > spread if known else None})
    return out


def beats_dense(p: dict[str, Any], dense: dict[str, Any]) -> bool:
    """compare's criterion: the mean gap exceeds both seed spreads and the worst MoE
    seed is below the best dense seed."""
    gap = dense["val_loss"]["mean"] - p["val_loss"]["mean"]
    spread = max(p["val_loss"]["spread"], dense["val_loss"]["spread"])
    return gap > spread and p["val_loss"]["max"] < dense["val_loss"]["min"]


def _gap_text(g: dict[str, Any]) -> str:
    spread = "n/a, one seed" if g["spread"] is None else f"{g['spread']:.4f}"
    return f"{g['from']}->{g['to']}: {g['drop']:+.4f} (spread {spread})"


def targets(summary: dict[str, Any], top_ks: list[int]) -> list[str]:
    """The issue's targets, as measured (partial sweeps say what is missing)."""
    points = summary["points"]
    dense = next((p for p in points if p["variant"] == "dense"), None)
    lines = []
    for k in top_ks:
        gaps = doubling_gaps(points, k)
        if k == 1:  # the target asks top-1 to fall monotonically from 8 experts on
            gaps = [g for g in gaps if g["from"] >= 8]
        mono = all(g["drop"] > 0 for g in gaps)
        text = ", ".join(_gap_text(g) for g in gaps)
        first3 = [g["drop_exceeds_spread"] for g in gaps[:3]]
        lines.append(f"top-{k} loss drop per doubling: {text or 'n/a'}; monotonic: "
                     f"{'yes' if gaps and mono else 'no'}; first three drops above the "
                     f"seed spread: {sum(x is True for x in first3)}/3"
                     f"{' (spread unknown for some)' if None in first3 else ''}")
    if dense is not None:
        for p in _line(points, 1):
            if p["num_experts"] >= 8:
                gap = p["val_loss"]["mean"] - dense["val_loss"]["mean"]
                lines.append(f"{p['variant']} minus dense: {gap:+.4f} (negative = better); "
                             f"beats dense by more than the seed spread: "
                             f"{'yes' if beats_dense(p, dense) else 'NO'}")
        for p in _line(points, 2)[-1:]:
            s = p["steps_to_dense_final_mean"]
            ratio = "not reached by every seed" if s is None else \
                f"{s:.0f} steps = {s / dense['steps']:.2f}x dense's {dense['steps']}"
            lines.append(f"{p['variant']} steps to dense's final val loss: {ratio}")
    return lines


def table(summary: dict[str, Any]) -> str:
    target = summary["dense_final_val_loss"]
    lines = ["| variant | K | E | total params | active params/token | final val loss "
             "(mean ± std, n) | spread (max-min) | vs dense | steps to dense's final "
             "(x dense) | same-seed minus dense (mean, min..max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in summary["points"]:
        v = p["val_loss"]
        gap = "" if p["variant"] == "dense" or target is None else f"{v['mean'] - target:+.4f}"
        lines.append(f"| {p['variant']} | {p['top_k'] or '-'} | {p['num_experts']} | "
                     f"{p['total_params']:,} | {p['active_params']:,} | {v['mean']:.4f} ± "
                     f"{v['std']:.4f} (n={v['n']}) | {v['spread']:.4f} | {gap} | "
                     f"{_steps_cell(p, summary)} | {_paired_cell(p)} |")
    return "\n".join(lines)


def _paired_cell(p: dict[str, Any]) -> str:
    d = p.get("paired_minus_dense")
    if p["variant"] == "dense" or not d:
        return ""
    return f"{d['mean']:+.4f} ({d['min']:+.4f}..{d['max']:+.4f}, n={d['n']})"


def _steps_cell(p: dict[str, Any], summary: dict[str, Any]) -> str:
    if p["variant"] == "dense":
        return f"{p['steps']} (1.00x)"
    if summary["dense_final_val_loss"] is None:  # it had read "0/n seeds reach it"
        return "no dense run"
    reached = [s for s in p["steps_to_dense_final"] if s is not None]
    if len(reached) < len(p["steps_to_dense_final"]):
        return f"{len(reached)}/{len(p['steps_to_dense_final'])} seeds reach it"
    dense_steps = next(q["steps"] for q in summary["points"] if q["variant"] == "dense")
    mean = p["steps_to_dense_final_mean"]
    return f"{mean:.0f} ({mean / dense_steps:.2f}x)"


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                   .splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg_at_write": os.getloadavg()}


# -- the command -----------------------------------------------------------------


def write_outputs(summary: dict[str, Any], report: str, out: Path) -> list[Path]:
    """scaling.md and scaling.json both or neither where a write fails (``write_files``:
    only their two renames, back to back, can be split): written one after the other, a
    failure (a full disk, a kill) between them left a new scaling.md beside the previous
    scaling.json, a report that disagreed with its own numbers."""
    texts = {"scaling.md": report + "\n", "scaling.json": json.dumps(summary, indent=1)}
    write_files(out, {name: (lambda path, text=text: path.write_text(text, encoding="utf-8"))
                      for name, text in texts.items()})
    written = [out / name for name in texts]
    try:
        from moekit.train.plots import plot_scaling, plot_speedup
    except ImportError as e:
        print(f"no plots ({e}); pip install matplotlib", file=sys.stderr)
        return written
    return [*written, plot_scaling(summary, out / "scaling.png"),
            plot_speedup(summary, out / "speedup.png")]


def run(args: argparse.Namespace) -> int:
    tune_malloc()
    try:
        configs, wanted, tcfg, corpus = prepare(args, lambda base, active: scaling_variants(
            base, active, args.top_ks, args.expert_counts))
    except ValueError as e:
        return error("scaling", e)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = finished_runs("scaling", args, configs, wanted, tcfg, corpus, out)
    if isinstance(results, int):
        return results
    summary = summarize(results, list(configs))
    summary["config"] = {"model": next(iter(configs.values())).to_dict(),
                         "train": tcfg.to_dict(), "top_ks": args.top_ks,
                         "expert_counts": args.expert_counts, "seeds": args.seeds}
    summary["machine"] = machine()
    summary["targets"] = targets(summary, args.top_ks)
    report = table(summary) + "\n\n" + "\n".join(f"- {t}" for t in summary["targets"])
    print(report)
    try:
        for path in write_outputs(summary, report, out):
            print(f"wrote {path}")
    except OSError as e:  # a full disk: was a traceback, after scaling.json was cut short
        return write_failed("scaling", out, e)
    return 0
