"""Training health and metrics: router-collapse detection, JSONL/TensorBoard logging.

Shape letters: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NoReturn

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

    def state(self) -> dict[str, list]:
        """The streaks and the warnings given, as JSON for a checkpoint: a resumed run goes
        on counting from them. Its patience had restarted at the resume, so a collapse
        that began before it warned ``patience`` steps after it (later than the
        uninterrupted run), and a run resumed more often than that never warned."""
        return {"hot": [[*k, n] for k, n in sorted(self.hot.items())],
                "cold": [[*k, n] for k, n in sorted(self.cold.items())],
                "warned": [list(w) for w in sorted(self.warned)]}

    def load_state(self, state: dict[str, list] | None) -> None:
        """What ``state`` returned (checked by ``checkpoint_state``); None, from a
        checkpoint saved before the monitor was, starts a fresh patience."""
        state = state or {"hot": [], "cold": [], "warned": []}
        self.hot = {(layer, expert): n for layer, expert, n in state["hot"]}
        self.cold = {(layer, expert): n for layer, expert, n in state["cold"]}
        self.warned = {(kind, layer, expert) for kind, layer, expert in state["warned"]}

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
        cut = _ends_mid_line(self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if cut:  # a session killed mid-write: end its cut line, and say so for read_metrics
            self.file.write("\n" + json.dumps(CUT_MARK) + "\n")
            self.file.flush()
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


# Written by MetricsLog on the line after one a killed session left unfinished.
CUT_MARK = {"kind": "cut_line", "note": "the line above was cut off: an earlier session "
            "was killed while writing it"}


def _ends_mid_line(path: Path) -> bool:
    """Whether ``path`` exists and its last line has no newline (a write cut short)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one per step and kind across resumed sessions.

    A resumed session starts with ``{"kind": "resume", "step": S}`` and logs the steps
    after S again (its checkpoint is at S): the records an earlier session wrote for
    those steps stay in the file, but they describe a run no checkpoint holds, so
    they are left out here.

    A run killed while writing leaves its last line cut off (no newline): that line is
    skipped with a warning, and so is, silently, such a line that a later session ended
    and marked (``{"kind": "cut_line"}``, which is left out too). Any other line that is
    not a JSON object raises ValueError naming the file and the line number.
    """
    records: list[dict[str, Any]] = []
    bad: tuple[int, bytes, str] | None = None  # an unparsed line, judged by what follows
    bad_ended = False  # whether that line has its newline (then it was written whole)
    with open(path, "rb") as f:  # bytes: a cut may split a character; json.loads decodes
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip(b"\n"))
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as e:
                if bad is not None:
                    _corrupt(path, *bad)
                why = (f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError)
                       else str(e))
                bad = (number, line.rstrip(b"\n"), why)
                bad_ended = line.endswith(b"\n")
                continue
            if record.get("kind") == CUT_MARK["kind"]:
                bad = None  # MetricsLog marked the line above as cut off by a kill
                continue
            if bad is not None:
                _corrupt(path, *bad)
            if record.get("kind") == "resume" and isinstance(record.get("step"), int):
                records = [r for r in records if r.get("step", 0) <= record["step"]]
            records.append(record)
    if bad is not None:
        if bad_ended:  # the last line, but it has its newline: written whole, not cut
            _corrupt(path, *bad)
        warnings.warn(f"{path}: skipped line {bad[0]}, cut off (the run was killed while "
                      f"writing it?): {_shown(bad[1])}; returning the {len(records)} "
                      "records before it", stacklevel=2)
    return records


def _shown(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= 80 else text[:80] + "...")


def _corrupt(path: str | Path, number: int, line: bytes, why: str) -> NoReturn:
    raise ValueError(f"{path}: line {number} is not a JSON object ({why}): {_shown(line)}; "
                     "only a cut-off last line (a run killed while writing) is skipped, so "
                     "repair or delete this line")
