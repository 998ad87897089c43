"""PNG plots for `moekit compare` (needs matplotlib: ``pip install moekit[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(results: list[dict[str, Any]], path: Path) -> Path:
    """Validation loss vs tokens: mean over seeds per variant, band = min..max."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name in dict.fromkeys(r["variant"] for r in results):
        curves = [r["curve"] for r in results if r["variant"] == name]
        n = min(len(c) for c in curves)
        tokens = [curves[0][i][0] for i in range(n)]
        per_point = [[c[i][1] for c in curves] for i in range(n)]
        mean = [sum(v) / len(v) for v in per_point]
        line, = ax.plot(tokens, mean, label=f"{name} (n={len(curves)})")
        ax.fill_between(tokens, [min(v) for v in per_point], [max(v) for v in per_point],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("MoE vs dense of equal active FLOPs")
    finals = [r["val_loss"] for r in results]
    ax.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_load(result: dict[str, Any], path: Path) -> Path:
    """Heatmap per MoE layer: share of tokens per expert (rows) over training (columns)."""
    steps = [s for s, _ in result["load"]]
    load_SLE = [load for _, load in result["load"]]
    num_layers = len(load_SLE[0])
    fig, axes = plt.subplots(1, num_layers, figsize=(3.2 * num_layers, 3.0), dpi=100,
                             squeeze=False)
    for layer in range(num_layers):
        grid = [[load_SLE[s][layer][e] for s in range(len(steps))]
                for e in range(len(load_SLE[0][layer]))]
        ax = axes[0][layer]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(steps[0], steps[-1], len(grid) - 0.5, -0.5))
        ax.set_title(f"MoE layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.suptitle(f"expert load over training: {result['variant']} seed {result['seed']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
