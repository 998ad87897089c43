"""Bad flags of `moekit bench` (and `moekit bench --decode`): one error line on stderr
that names the flag, its value and what is allowed, exit status 2, no traceback, and
nothing built, timed or written. Each test failed before its fix (a traceback, exit
status 1, a run that wrote NaN or empty results, or --quick replacing an explicit flag).

No benchmark runs here: the flags are small enough that a regression fails fast, and the
tuned-malloc variables are set so that ``harness.use_malloc`` never re-executes pytest.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moekit import bench
from moekit.cli import build_parser, main

CPU = bench._load()
DECODE = bench._load(bench.DECODE_SCRIPT)
pytestmark = pytest.mark.skipif(CPU is None or DECODE is None,
                                reason="benchmarks/ is not in this checkout")
# a tiny, otherwise valid run: before the fixes some bad flags ran it to the end
TINY = ["--configs", "8,4,2,8", "--dim", "8", "--dtypes", "fp32", "--impls", "moekit",
        "--reps", "1", "--warmup", "0", "--no-memory", "--no-breakdown"]


@pytest.fixture(autouse=True)
def _tuned_malloc(monkeypatch) -> None:
    for name, value in CPU.harness.TUNED_MALLOC.items():
        monkeypatch.setenv(name, value)


def _refused(capsys, tmp_path: Path, flags: list[str], *words: str,
             decode: bool = False) -> str:
    """``moekit bench [TINY --out tmp/r.json] FLAGS`` exits 2 with one error line holding
    ``words`` and writes no results."""
    out = tmp_path / "r.json"
    argv = ["bench", *flags] if decode else ["bench", *TINY, "--out", str(out), *flags]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("moekit bench: error: "), err
    assert "Traceback" not in err and "is not allowed" in err, err
    for w in words:
        assert w in err, err
    assert not out.exists()
    return err


def _checked(*flags: str):
    args = build_parser().parse_args(["bench", *flags])
    return bench.check_args(args, DECODE if args.decode else CPU)


# -- the defects of the audit -------------------------------------------------------------

def test_configs_of_two_numbers(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--configs", "1,2"], "--configs='1,2'", "T,E,K,F")


def test_configs_not_ints(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--configs", "a,b,c,d"], "--configs='a,b,c,d'", "T,E,K,F")


def test_configs_zero_tokens(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--configs", "0,4,2,8"], "--configs='0,4,2,8'", "positive")


def test_threads_zero(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--threads", "0"], "--threads=0", "positive int")


def test_dim_zero(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--dim", "0"], "--dim=0", "positive int")


def test_out_under_a_file(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("notes\n")
    out = tmp_path / "notes.txt" / "x.json"
    _refused(capsys, tmp_path, ["--out", str(out)], f"--out='{out}'", "is a file")
    assert (tmp_path / "notes.txt").read_text() == "notes\n"


def test_decode_threads_zero(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--decode", "--threads", "0"], "--threads=0", "positive int",
             decode=True)


def test_impls_unknown_exits_2(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--impls", "nosuch"], "--impls='nosuch'", "moekit-loop")


def test_reps_zero(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--reps", "0"], "--reps=0", "positive int")


def test_quick_keeps_an_explicit_dtypes(capsys, tmp_path):
    # explicit flags win over --quick's choices (as --configs and --impls did already),
    # so --dtypes fp16 is checked, not silently replaced by fp32
    _refused(capsys, tmp_path, ["--quick", "--dtypes", "fp16"], "--dtypes='fp16'", "bf16")
    checked = _checked("--quick", "--dtypes", "bf16", "--reps", "7")
    assert checked.dtypes == ["bfloat16"] and checked.reps == 7


# -- more of the same kind ----------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--dtypes", "fp16"], ["--dtypes='fp16'", "fp32, bf16"]),
    (["--dtypes", ""], ["--dtypes=''"]),
    (["--impls", "moekit,"], ["--impls='moekit,'"]),
    (["--configs", ""], ["--configs=''"]),
    (["--configs", "8,4,2,8;"], ["--configs='8,4,2,8;'"]),
    (["--configs", "8,4,5,8"], ["--configs='8,4,5,8'", "K=5", "E=4"]),
    (["--configs", "8,1024,2,8"], ["--configs='8,1024,2,8'", "512"]),
    (["--warmup", "-1"], ["--warmup=-1", ">= 0"]),
    (["--slow-max-t", "0"], ["--slow-max-t=0", "positive int"]),
    (["--out", ""], ["--out=''"]),
])
def test_more_bad_flags(capsys, tmp_path, flags, words):
    _refused(capsys, tmp_path, flags, *words)


def test_out_is_a_directory(capsys, tmp_path):
    _refused(capsys, tmp_path, ["--out", str(tmp_path)], "--out=", "directory")


@pytest.mark.parametrize("flags, words", [
    (["--out", "x.json"], ["--out='x.json'", "--decode"]),
    (["--dtypes", "bf16"], ["--dtypes='bf16'", "--decode"]),
    (["--no-memory"], ["--no-memory", "--decode"]),
])
def test_decode_refuses_flags_it_would_ignore(capsys, tmp_path, flags, words):
    _refused(capsys, tmp_path, ["--decode", *flags], *words, decode=True)


# -- good flags still resolve -------------------------------------------------------------

def test_quick_defaults():
    checked = _checked("--quick")
    assert checked.configs == CPU.QUICK_CONFIGS and checked.dtypes == ["float32"]
    assert checked.reps == 3 and "moekit" in checked.impls and "reference" not in checked.impls


def test_full_defaults(tmp_path):
    out = tmp_path / "new" / "r.json"
    checked = _checked("--out", str(out), "--configs", "4096,64,8,256;256,8,2,1024")
    assert checked.configs == [(4096, 64, 8, 256), (256, 8, 2, 1024)]
    assert checked.dtypes == ["float32", "bfloat16"] and checked.reps == 5
    assert len(checked.impls) == 10 and checked.out == str(out) and not out.parent.exists()


def test_decode_quick_and_threads_pass_on():
    checked = _checked("--decode", "--quick", "--threads", "1")
    assert checked.quick and checked.threads == 1 and checked.models == ["fine"]
    assert checked.batches == [1, 4] and checked.reps == 2


# -- the scripts run directly refuse the same way -----------------------------------------

@pytest.mark.parametrize("script, argv, words", [
    ("cpu", ["--threads", "0"], ["bench_cpu.py: error: --threads=0"]),
    ("cpu", ["--configs", "1,2"], ["bench_cpu.py: error: --configs='1,2'"]),
    ("decode", ["--threads", "0"], ["bench_decode.py: error: --threads=0"]),
    ("decode", ["--batches", "1,x"], ["bench_decode.py: error: --batches='1,x'"]),
    ("decode", ["--models", "nosuch"], ["--models='nosuch'", "fine, mixtral"]),
    ("decode", ["--new-tokens", "5000"], ["--new-tokens=5000", "<= 992"]),
    ("decode", ["--prefill-variants", "fp64"], ["--prefill-variants='fp64'"]),
])
def test_scripts_refuse_bad_flags(capsys, script, argv, words):
    module = CPU if script == "cpu" else DECODE
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


# -- help ---------------------------------------------------------------------------------

def _help(capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["bench", *flags])
    assert e.value.code == 0
    return capsys.readouterr().out


def _flags_of(module) -> dict[str, str]:
    """--flag -> help text, from the benchmark's own parser."""
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    module.add_arguments(p)
    return {a.option_strings[-1]: a.help or "" for a in p._actions}


def test_help_of_the_cpu_benchmark(capsys):
    out = _help(capsys, "--help")
    text = " ".join(out.split())
    assert out.startswith("usage: moekit bench [-h]")
    assert "CPU benchmark: moekit vs dense FFN" in text
    for flag, help_text in _flags_of(CPU).items():
        assert flag in out and " ".join(help_text.split()) in text, flag
    assert "--decode" in out and "`moekit bench --decode --help` describes them" in text


@pytest.mark.parametrize("flags", [["--decode", "--help"], ["--decode", "-h"],
                                   ["--quick", "--decode", "--help"],
                                   # -h before --decode had printed bench_cpu's help
                                   ["--help", "--decode"], ["-h", "--quick", "--de"]])
def test_help_of_the_decode_benchmark(capsys, flags):
    """`moekit bench --decode --help` printed bench_cpu's help (its --configs, --dtypes,
    ...), none of which apply with --decode: now bench_decode's description and the two
    flags passed on to it, with bench_decode's own help texts."""
    out = _help(capsys, *flags)
    text = " ".join(out.split())
    assert out.splitlines()[0] == ("usage: moekit bench --decode [-h] [--quick] "
                                   "[--threads THREADS]")
    assert " ".join(DECODE.__doc__.split("\n\n")[0].split()) in text
    decode_flags = _flags_of(DECODE)
    for flag in bench.DECODE_FLAGS:
        own = " ".join(decode_flags[f"--{flag}"].split())
        # --quick's own text ends "(--models, --batches, ... given as well win)": flags
        # `moekit bench --decode` refuses, left out of its help
        assert own.split(" (--models")[0] in text, flag
    listed = [line.split()[0].rstrip(",") for line in out.splitlines()
              if line.startswith("  -")]
    assert listed == ["-h", "--quick", "--threads"]  # none of bench_cpu's
    # every flag the help names is one the command takes (--decode, -h and the two)
    assert set(re.findall(r"--[a-z][a-z-]*", out)) == {"--decode", "--help", "--quick",
                                                        "--threads"}, out
