"""`moekit plan --search` with layout flags, and reading a cut-off ``metrics.jsonl``.
Each test failed before its fix.

Before: ``moekit plan MODEL --search --tp 8 --zero 3`` dropped ``--tp``/``--zero`` (and
``--dp``, ``--pp``, ``--ep``, ``--recompute``, ``--micro-batch``) without a word and
ranked every layout; a value no layout could have (``--search --tp 3``) was no error.
``read_metrics`` raised a bare JSONDecodeError (no file, no line) on the cut-off last
line a run killed while writing leaves, so one lost record hid all the others, and a
resumed run's first record was glued onto that cut-off line.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import pytest

from moekit.models import LMConfig
from moekit.plan import Cluster, Layout, TrainSetup, get_gpu, get_preset, search
from moekit.plan.cli import add_arguments, plans_from_args, run
from moekit.train import TrainConfig, Trainer, load_corpus, read_metrics
from moekit.train.monitor import MetricsLog

# -- moekit plan --search with layout flags ---------------------------------------------

SMALL = ("olmoe-1b-7b", "--gpus", "8", "--global-batch", "64", "--seq-len", "2048")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def every_fitting_layout() -> list[Layout]:
    """Plain --search with a top larger than the number of layouts: all that fit."""
    plans = plans_from_args(parse(*SMALL, "--search", "--top", "100000"))
    return [p.layout for p in plans]


def test_plain_search_still_ranks_every_layout(every_fitting_layout):
    plans = plans_from_args(parse(*SMALL, "--search", "--top", "5"))
    assert len(plans) == 5 and all(p.fits for p in plans)
    speeds = [p.time.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    assert [p.layout for p in plans] == every_fitting_layout[:5]
    lays = every_fitting_layout  # no flag given: nothing held fixed
    assert {lay.tp for lay in lays} == {1, 2, 4, 8} and {lay.zero for lay in lays} == {
        0, 1, 2, 3}
    assert {lay.recompute for lay in lays} == {"none", "full"}
    assert {lay.micro_batch for lay in lays} == {1, 2, 4, 8}


@pytest.mark.parametrize("flags,fixed", [
    (("--tp", "2"), {"tp": 2}),
    (("--tp", "2", "--zero", "3"), {"tp": 2, "zero": 3}),
    (("--dp", "4", "--ep", "2"), {"dp": 4, "ep": 2}),
    (("--pp", "2", "--recompute", "full"), {"pp": 2, "recompute": "full"}),
    (("--zero", "0", "--micro-batch", "2"), {"zero": 0, "micro_batch": 2}),
])
def test_search_keeps_to_the_layout_flags_given(every_fitting_layout, flags, fixed):
    """Exactly the layouts of the plain search that have the given values, same order."""
    plans = plans_from_args(parse(*SMALL, "--search", "--top", "100000", *flags))
    want = [lay for lay in every_fitting_layout
            if all(getattr(lay, k) == v for k, v in fixed.items())]
    assert want and [p.layout for p in plans] == want


def test_search_micro_batch_outside_the_searched_ones():
    """A given --micro-batch replaces the 1, 2, 4, 8 the search tries."""
    plans = plans_from_args(parse(*SMALL, "--search", "--micro-batch", "16", "--top", "50"))
    assert plans and {p.layout.micro_batch for p in plans} == {16}


def test_search_table_names_the_flags(capsys):
    assert run(parse(*SMALL, "--search", "--top", "3", "--tp", "2", "--zero", "3")) == 0
    out = capsys.readouterr().out
    assert "layouts that fit with --tp 2 --zero 3, fastest first" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+dp", line)]
    assert len(rows) == 3 and all(" tp2 " in r and " z3" in r for r in rows), out


def test_search_that_fits_nothing_names_the_flags(capsys):
    argv = ("olmoe-1b-7b", "--gpus", "2", "--global-batch", "64", "--search")
    assert run(parse(*argv, "--dp", "2", "--zero", "0")) == 0  # some layouts fit
    capsys.readouterr()
    flags = ("--dp", "2", "--zero", "0", "--recompute", "none", "--micro-batch", "8")
    assert run(parse(*argv, *flags)) == 1
    out = capsys.readouterr().out
    assert f"no layout with {' '.join(flags)} fits in memory on 2 x h100" in out
    assert "without some of those flags" in out


@pytest.mark.parametrize("flags,words", [
    (("--tp", "3"), ("--tp: tp=3 is not allowed", "tp = 1, 2, 4, 8", "num_heads")),
    (("--ep", "3"), ("--ep: ep=3 is not allowed", "ep = 1, 2, 4, 8", "num_experts")),
    (("--dp", "3"), ("--dp: dp=3 is not allowed", "dp * tp * pp = num_gpus")),
    (("--pp", "32"), ("--pp: pp=32 is not allowed", "number of layers")),
    (("--micro-batch", "3"), ("--micro-batch: micro_batch=3 is not allowed",
                              "global_batch=64")),
    (("--dp", "4", "--tp", "4"), ("layout='dp=4 tp=4' is not allowed",
                                  "all of these together")),
    (("--dp", "8", "--ep", "8", "--tp", "2"), ("layout='dp=8 tp=2 ep=8' is not allowed",)),
    (("--zero", "4"), ("--zero: zero=4 is not allowed", "0, 1, 2 or 3")),
    (("--recompute", "some"), ("--recompute: recompute='some' is not allowed", "full")),
    (("--tp", "0"), ("--tp: tp=0 is not allowed", ">= 1")),
])
def test_search_refuses_a_layout_flag_no_layout_has(flags, words, capsys):
    with pytest.raises(ValueError, match=re.escape(words[0].split(": ", 1)[-1])):
        plans_from_args(parse(*SMALL, "--search", *flags))
    assert run(parse(*SMALL, "--search", *flags)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err, err


def test_one_layout_defaults_are_unchanged():
    """--zero / --recompute / --micro-batch default to None now (to see what was given);
    the layout without them is still ZeRO 1, no recomputation, micro-batch 1."""
    lay = plans_from_args(parse("mixtral-8x7b"))[0].layout
    assert lay == Layout(dp=8, ep=8, zero=1, recompute="none", micro_batch=1)
    lay = plans_from_args(parse("mixtral-8x7b", "--zero", "3", "--micro-batch", "2"))[0].layout
    assert (lay.zero, lay.micro_batch) == (3, 2)


@pytest.fixture(scope="module")
def small():
    return (get_preset("olmoe-1b-7b").spec, Cluster(gpu=get_gpu("h100"), num_gpus=8),
            TrainSetup(seq_len=512, global_batch=64))


def test_search_api_fixed(small):
    plans = search(*small, top=1000, fixed={"tp": 4, "recompute": "full"})
    assert plans and all(p.layout.tp == 4 and p.layout.recompute == "full" for p in plans)
    assert search(*small, top=3, fixed={}) == search(*small, top=3)
    assert search(*small, top=3, fixed=None) == search(*small, top=3)


@pytest.mark.parametrize("fixed,words", [
    ({"tensor": 2}, "fixed='tensor' is not allowed: its keys must be Layout fields"),
    ([("tp", 2)], "fixed=[('tp', 2)] is not allowed: it must be a dict"),
    ({"tp": 2.0}, "tp=2.0 is not allowed: it must be an int >= 1"),
    ({"zero": True}, "zero=True is not allowed: it must be 0, 1, 2 or 3"),
    ({"tp": 16}, "tp=16 is not allowed: no layout searched on num_gpus=8 has it"),
])
def test_search_api_fixed_bad_input(small, fixed, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        search(*small, fixed=fixed)


# -- metrics.jsonl cut off by a killed run -----------------------------------------------

RECORDS = [{"kind": "val", "step": 0, "val_loss": 5.5},
           {"kind": "train", "step": 1, "loss": 5.4},
           {"kind": "train", "step": 2, "loss": 5.3}]


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read_quietly(path: Path) -> list[dict]:
    """read_metrics, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_metrics(path)


@pytest.mark.parametrize("cut", [
    b'{"kind": "train", "step": 3, "lo',  # cut inside a string
    b'{"kind": "train", "step": 3, "loss": 5.',  # inside a number
    b'{"kind": "train", "step"',
    b"{",
    b'{"kind": "train", "note": "caf\xc3',  # inside a UTF-8 character
    b"\x00\x00\x00\x00",  # a crash can leave zero bytes where the write did not land
], ids=["string", "number", "key", "brace", "utf8", "zeros"])
def test_cut_off_last_line_is_skipped_with_a_warning(tmp_path, cut):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(jsonl(RECORDS).encode() + cut)
    with pytest.warns(UserWarning, match=re.escape(f"{path}: skipped line 4, cut off")):
        assert read_metrics(path) == RECORDS


@pytest.mark.parametrize("text,line,why", [
    (jsonl(RECORDS[:1]) + '{"kind": "tr\n' + jsonl(RECORDS[1:]), 2, "Unterminated string"),
    (jsonl(RECORDS[:2]) + "[1, 2]\n" + jsonl(RECORDS[2:]), 3, "a JSON list, not an object"),
    (jsonl(RECORDS[:2]) + "not json\n\n" + jsonl(RECORDS[2:]), 3, "Expecting value"),
    # a bad last line that has its newline was written whole: not a cut, an error too
    (jsonl(RECORDS) + '{"kind": "train", "step": 3,\n', 4, "Expecting property name"),
    # two bad lines at the end: the first is in the middle
    (jsonl(RECORDS) + '{"a"\n{"b', 4, "Expecting ':'"),
], ids=["cut-then-more", "list", "text-then-blank", "bad-last-with-newline", "two-bad"])
def test_corrupt_line_in_the_middle_names_file_and_line(tmp_path, text, line, why):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: line {line} is not a JSON "
                                                   f"object ({why}")):
        read_metrics(path)


def test_whole_file_reads_without_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(jsonl(RECORDS) + "\n")
    assert read_quietly(path) == RECORDS


def test_appending_after_a_cut_off_line_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    cut = '{"kind": "train", "step": 3, "lo'
    path.write_text(jsonl(RECORDS) + cut)
    before = path.read_bytes()
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"kind": "resume", "step": 2})
    log.write({"kind": "train", "step": 3, "loss": 5.2})
    log.close()
    text = path.read_text()
    assert text.encode().startswith(before)  # nothing lost, the cut line included
    lines = text.splitlines()
    assert lines[3] == cut  # ended by a newline, not glued to the next record
    assert json.loads(lines[4])["kind"] == "cut_line"  # marked as cut, for readers
    assert lines[5:] == ['{"kind": "resume", "step": 2}',
                         '{"kind": "train", "step": 3, "loss": 5.2}']
    assert read_quietly(path) == [*RECORDS, {"kind": "resume", "step": 2},
                                  {"kind": "train", "step": 3, "loss": 5.2}]
    # a second session appends after whole lines: no second mark
    MetricsLog(tmp_path, tensorboard=False).close()
    assert path.read_text() == text


def test_appending_to_a_whole_or_new_file_adds_nothing(tmp_path):
    MetricsLog(tmp_path / "new", tensorboard=False).close()
    assert (tmp_path / "new" / "metrics.jsonl").read_bytes() == b""
    path = tmp_path / "metrics.jsonl"
    path.write_text(jsonl(RECORDS))
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"kind": "resume", "step": 2})
    log.close()
    assert path.read_text() == jsonl([*RECORDS, {"kind": "resume", "step": 2}])


def test_a_corrupt_line_is_not_excused_by_a_later_mark(tmp_path):
    """The mark excuses only the line right above it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(jsonl(RECORDS[:1]) + "oops\n" + jsonl(RECORDS[1:])
                    + '{"kind": "cut_line"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 is not a JSON object")):
        read_metrics(path)


def test_run_killed_mid_write_resumes_and_reads(tmp_path):
    """A real run: metrics.jsonl cut inside its last record, then resumed."""
    data = tmp_path / "book.txt"
    data.write_text("def add(a, b):\n    return a + b\n\nclass P:\n    x: int = 0\n" * 60)
    corpus = load_corpus(str(data))
    model = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=16,
                     num_experts=4, top_k=2)
    train = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=0, eval_every=2,
                        eval_batches=1, save_every=2, log_every=1, keep_checkpoints=3)
    Trainer(model, train, corpus, tmp_path / "run", progress=False).fit()
    path = tmp_path / "run" / "metrics.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole[:-12])  # killed while writing the last record (val, step 3)
    with pytest.warns(UserWarning, match="cut off"):
        kept = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in kept] == [
        ("val", 0), ("train", 1), ("train", 2), ("val", 2), ("train", 3)]
    Trainer.resume(tmp_path / "run" / "step_00000002", corpus, progress=False).fit()
    records = read_quietly(path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("val", 0), ("train", 1), ("train", 2), ("val", 2), ("resume", 2), ("train", 3),
        ("val", 3)]
    assert path.read_bytes().startswith(whole[:-12] + b"\n")


def test_resume_summary_reads_the_val_loss_past_a_cut_line(tmp_path):
    """`moekit train --resume`'s summary line takes the validation loss at the resumed
    step through read_metrics: a cut line that MetricsLog has ended and marked does not
    hide it (its own parser gave up on any bad line)."""
    from moekit.train.cli import _val_at

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "val", "step": 2, "val_loss": 4.5}\n{"kind": "train", "st')
    MetricsLog(tmp_path, tensorboard=False).close()
    assert _val_at(tmp_path, 2) == 4.5
    assert _val_at(tmp_path, 3) is None
    path.write_text('{"kind": "val", "step": 2, "val_loss": 4.5}\nnot json\n{"step": 3}\n')
    assert _val_at(tmp_path, 2) is None  # a corrupt log: the summary goes without it
