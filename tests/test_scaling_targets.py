"""moekit scaling's "minus dense" / "beats dense" target lines (top-1 at 8 experts and
more) and their criterion, beats_dense, had no test (train/scaling.py 167-169, 196-197):
hand-made runs whose losses put each case on one side of it."""

from __future__ import annotations

from moekit.train.scaling import summarize, targets
from tests.test_scaling import fake_run


def test_top1_lines_against_dense_say_whether_each_beats_it():
    """beats_dense: the mean gap exceeds both seed spreads and the worst MoE seed is
    below the best dense seed. Dense: mean 2.1333, spread 0.2, best 2.0."""
    dense = [fake_run("dense", 0, 1, s, v) for s, v in enumerate((2.0, 2.2, 2.2))]
    cases = {  # variant: seeds' final losses
        "top1-e4": (1.0, 1.0, 1.0),  # below 8 experts: no line
        "top1-e8": (1.70, 1.75, 1.72),  # gap 0.4100 > 0.2, worst 1.75 < 2.0: yes
        "top1-e16": (1.80, 2.05, 1.90),  # gap 0.2167 < its own spread 0.25: NO
        "top1-e32": (1.80, 1.80, 2.00),  # gap 0.2667 > 0.2, but worst 2.0 = best dense: NO
    }
    runs = dense + [fake_run(v, 1, int(v.split("-e")[1]), s, x)
                    for v, xs in cases.items() for s, x in enumerate(xs)]
    lines = [ln for ln in targets(summarize(runs, ["dense", *cases]), [1])
             if "minus dense" in ln]
    tail = " (negative = better); beats dense by more than the seed spread: "
    assert lines == [f"top1-e8 minus dense: -0.4100{tail}yes",
                     f"top1-e16 minus dense: -0.2167{tail}NO",
                     f"top1-e32 minus dense: -0.2667{tail}NO"]


def test_no_dense_run_means_no_dense_lines():
    runs = [fake_run("top1-e8", 1, 8, s, 1.7) for s in range(2)]
    assert not [ln for ln in targets(summarize(runs, ["top1-e8"]), [1]) if "dense" in ln]
