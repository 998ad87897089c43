"""Training health and metrics: router-collapse detection, JSONL/TensorBoard logging.

Shape letters: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class RouterCollapseWarning(UserWarning):
    """One expert takes most tokens, or experts receive none, for many steps."""


class CollapseMonitor:
    """Counts consecutive steps in which a layer looks collapsed; warns once per episode.

    ``fraction``: an expert receiving more than this share of a layer's tokens is
    "taking most tokens". An expert with zero tokens is "starved". With ``top_k`` >= the
    number of experts every expert receives every token by construction, so such a layer
    is never "hot" (a 1-expert Switch layer is the dense model, not a collapse).
    """

    def __init__(self, fraction: float, patience: int, top_k: int = 1) -> None:
        self.fraction, self.patience, self.top_k = fraction, patience, top_k
        self.hot: dict[tuple[int, int], int] = {}  # (layer, expert) -> steps in a row
        self.cold: dict[tuple[int, int], int] = {}
        self.warned: set[tuple[str, int, int]] = set()

    def update(self, load_LE: Tensor, tokens: int) -> list[str]:
        """``load_LE``: tokens each expert received this step; returns new warnings."""
        messages = []
        share_LE = load_LE.float() / max(tokens, 1)
        hot_LE = share_LE > self.fraction
        if load_LE.shape[-1] <= self.top_k:
            hot_LE = torch.zeros_like(hot_LE)
        for kind, flags_LE, counts in (("hot", hot_LE, self.hot),
                                       ("cold", load_LE == 0, self.cold)):
            for layer, expert in torch.nonzero(flags_LE).tolist():
                counts[layer, expert] = counts.get((layer, expert), 0) + 1
            for key in [k for k in counts if not bool(flags_LE[k])]:
                del counts[key]  # recovered: a later collapse warns again
                self.warned.discard((kind, *key))
            messages += self._new_warnings(kind, counts, share_LE)
        for msg in messages:
            warnings.warn(msg, RouterCollapseWarning, stacklevel=3)
        return messages

    def _new_warnings(self, kind: str, counts: dict, share_LE: Tensor) -> list[str]:
        due = sorted(k for k, n in counts.items()
                     if n >= self.patience and (kind, *k) not in self.warned)
        by_layer: dict[int, list[int]] = {}
        for layer, expert in due:
            self.warned.add((kind, layer, expert))
            by_layer.setdefault(layer, []).append(expert)
        if kind == "hot":
            return [f"router collapse in MoE layer {layer}: expert(s) {experts} took "
                    f"{share_LE[layer, experts].tolist()} of the tokens for "
                    f">= {self.patience} steps in a row" for layer, experts in by_layer.items()]
        return [f"router collapse in MoE layer {layer}: expert(s) {experts} received no "
                f"tokens for >= {self.patience} steps in a row"
                for layer, experts in by_layer.items()]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; mirrors scalars to
    TensorBoard when the ``tensorboard`` package is installed."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value,
                                       record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one per step and kind across resumed sessions.

    A resumed session starts with ``{"kind": "resume", "step": S}`` and logs the steps
    after S again (its checkpoint is at S): the records an earlier session wrote for
    those steps stay in the file, but they describe a run no checkpoint holds, so
    they are left out here.
    """
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("kind") == "resume" and isinstance(record.get("step"), int):
                records = [r for r in records if r.get("step", 0) <= record["step"]]
            records.append(record)
    return records
