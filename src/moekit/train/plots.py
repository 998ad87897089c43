"""PNG plots for `moekit compare` (needs matplotlib: ``pip install "moekit[plot]"``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from moekit.train.rundir import write_files  # noqa: E402


def _save(fig, path: Path) -> Path:
    """``fig`` as the PNG ``path``, whole or not at all (``rundir.write_files``): saved in
    place, a full disk had left a cut plot where the last sweep's good one was."""
    path = Path(path)
    try:
        write_files(path.parent, {path.name: fig.savefig})
    finally:
        plt.close(fig)
    return path


def curves_figure(results: list[dict[str, Any]]):
    """Validation loss vs tokens: mean over seeds per variant, band = min..max."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    values = []
    for name in dict.fromkeys(r["variant"] for r in results):
        curves = [r["curve"] for r in results if r["variant"] == name]
        n = min(len(c) for c in curves)
        tokens = [curves[0][i][0] for i in range(n)]
        per_point = [[c[i][1] for c in curves] for i in range(n)]
        mean = [sum(v) / len(v) for v in per_point]
        line, = ax.plot(tokens, mean, label=f"{name} (n={len(curves)})")
        ax.fill_between(tokens, [min(v) for v in per_point], [max(v) for v in per_point],
                        color=line.get_color(), alpha=0.2)
        values += [x for v in per_point for x in v]
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("MoE vs dense of equal active FLOPs")
    if values:  # every point, the first (untrained, ~5.5) included
        pad = 0.03 * (max(values) - min(values)) or 0.05
        ax.set_ylim(min(values) - pad, max(values) + pad)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(results: list[dict[str, Any]], path: Path) -> Path:
    fig = curves_figure(results)
    return _save(fig, path)


def centred_norm(values: list[float]) -> TwoSlopeNorm:
    """One colour scale for every panel: 0 .. max, white at 1.0 (uniform load)."""
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, max(values, default=2.0)))


def load_figure(result: dict[str, Any]):
    """Heatmap per MoE layer: each expert's load / uniform load (rows) over training."""
    steps = [s for s, _ in result["load"]]
    load_SLE = [load for _, load in result["load"]]
    num_layers = len(load_SLE[0])
    rel_LES = [[[load_SLE[s][layer][e] * len(load_SLE[0][layer]) for s in range(len(steps))]
                for e in range(len(load_SLE[0][layer]))] for layer in range(num_layers)]
    norm = centred_norm([v for grid in rel_LES for row in grid for v in row])
    fig, axes = plt.subplots(1, num_layers, figsize=(3.2 * num_layers + 1.2, 3.0), dpi=100,
                             squeeze=False, layout="constrained")
    # the load logged at an evaluation is the share over the steps since the one before,
    # so its column spans them: an imshow from the first to the last evaluation had drawn
    # each column one window late, a last short window as wide as the others, and a run
    # with one evaluation as an empty panel (zero width)
    edges = [0, *steps]
    for layer, grid in enumerate(rel_LES):
        ax = axes[0][layer]
        im = ax.pcolormesh(edges, [e - 0.5 for e in range(len(grid) + 1)], grid,
                           cmap="coolwarm", norm=norm)
        ax.set_ylim(len(grid) - 0.5, -0.5)  # expert 0 on top
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"MoE layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="load / uniform load (1.0 = balanced)")
    fig.suptitle(f"expert load over training: {result['variant']} seed {result['seed']}")
    return fig


def plot_load(result: dict[str, Any], path: Path) -> Path:
    fig = load_figure(result)
    return _save(fig, path)


def _by_top_k(summary: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    lines: dict[int, list[dict[str, Any]]] = {}
    for p in summary["points"]:
        if p["variant"] != "dense":
            lines.setdefault(p["top_k"], []).append(p)
    return {k: sorted(v, key=lambda p: p["num_experts"]) for k, v in sorted(lines.items())}


def _dense(summary: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in summary["points"] if p["variant"] == "dense"), None)


def _log2_axis(ax, summary: dict[str, Any]) -> None:
    ax.set_xscale("log", base=2)
    counts = sorted({p["num_experts"] for p in summary["points"]})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel("experts per MoE layer (E)")
    ax.grid(alpha=0.3)


def plot_scaling(summary: dict[str, Any], path: Path) -> Path:
    """Final validation loss against E: one line per top-K (error bars = min..max over
    seeds), the dense model as a horizontal band (min..max over seeds)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    dense = _dense(summary)
    if dense is not None:
        v = dense["val_loss"]
        ax.axhline(v["mean"], color="black", lw=1, label=f"dense (n={v['n']})")
        ax.axhspan(v["min"], v["max"], color="black", alpha=0.12)
    for k, line in _by_top_k(summary).items():
        e = [p["num_experts"] for p in line]
        mean = [p["val_loss"]["mean"] for p in line]
        err = [[m - p["val_loss"]["min"] for m, p in zip(mean, line, strict=True)],
               [p["val_loss"]["max"] - m for m, p in zip(mean, line, strict=True)]]
        n = min(p["val_loss"]["n"] for p in line)
        ax.errorbar(e, mean, yerr=err, marker="o", capsize=3,
                    label=f"top-{k}{' (Switch router)' if k == 1 else ''}, n>={n}")
    _log2_axis(ax, summary)
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title("equal active FLOPs per token: loss vs number of experts")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_speedup(summary: dict[str, Any], path: Path) -> Path:
    """Steps to reach the dense model's final validation loss, per E and top-K
    (mean over seeds; crosses at the top = not reached by every seed)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    dense = _dense(summary)
    top = dense["steps"] if dense is not None else max(p["steps"] for p in summary["points"])
    if dense is not None:
        ax.axhline(top, color="black", lw=1, label=f"dense: {top} steps")
    else:  # a partial sweep: every point had been drawn as "not reached by every seed"
        ax.text(0.5, 0.5, "no dense run cached: nothing to reach\n(train it: --variants dense)",
                ha="center", va="center", transform=ax.transAxes)
    for k, line in (_by_top_k(summary) if dense is not None else {}).items():
        missed = [p for p in line if p["steps_to_dense_final_mean"] is None]
        steps = [math.nan if p in missed else p["steps_to_dense_final_mean"] for p in line]
        lines = ax.plot([p["num_experts"] for p in line], steps, marker="o",
                        label=f"top-{k}")  # NaN breaks the line where a point is missing
        if missed:
            ax.scatter([p["num_experts"] for p in missed], [top * 1.05] * len(missed),
                       marker="x", color=lines[0].get_color(),
                       label=f"top-{k}: not reached by every seed")
    _log2_axis(ax, summary)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel("steps to reach dense's final val loss")
    ax.set_title("training steps to dense quality (lower = faster)")
    if dense is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
