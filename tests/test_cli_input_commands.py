"""Bad flags of `moekit demo`, `train`, `analyze`, `plan`, `compare` and `scaling`: one
error line on stderr that names the flag and its value, exit status 2, no traceback and
nothing written. Each test failed before its fix (a traceback, a flag taken as its
default, a run trained before the error, or an error that did not name the flag)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import moekit.train.compare as compare
from moekit.cli import main
from moekit.models import MoETransformer, preset
from moekit.train import checkpoint as ckpt_io
from moekit.train.interrupt import Interrupted
from moekit.train.trainer import TrainConfig, make_optimizer


def _fails(capsys, argv: list[str], *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "ok.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return path


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("not a directory\n")
    return path


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- moekit demo: a bad flag was a ValueError / RuntimeError traceback -------------------

@pytest.mark.parametrize("argv,words", [
    (["--dim", "0"], ["--dim", "dim=0", "positive int"]),
    (["--experts", "0"], ["--experts", "num_experts=0"]),
    (["--top-k", "9"], ["--top-k", "top_k=9", "num_experts=8"]),
    (["--capacity-factor", "-1"], ["--capacity-factor", "-1.0"]),
    (["--tokens", "-1"], ["--tokens=-1", "positive int"]),
    (["--tokens", "0"], ["--tokens=0", "positive int"]),  # printed dropped_fraction 1.0
    (["--seed", str(2**64)], [f"--seed={2**64}", "[0, "]),
])
def test_demo_bad_flag(argv, words, capsys):
    _fails(capsys, ["demo", "--dim", "16", "--ffn-dim", "16", "--tokens", "8", *argv], *words)


def test_demo_still_runs(capsys):
    assert main(["demo", "--dim", "16", "--ffn-dim", "16", "--tokens", "8"]) == 0
    assert "moekit demo: softmax router" in capsys.readouterr().out


# -- --out that is a file, under a file, or empty: a traceback (or the cwd written) --------

TRAIN = ["train", "--preset", "tiny", "--steps", "1", "--seq-len", "32", "--no-progress"]


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_train_out_is_a_file(where, text_file, a_file, capsys):
    out = a_file if where == "file" else a_file / "run"
    before = _listing(a_file.parent)
    _fails(capsys, [*TRAIN, "--data", str(text_file), "--out", str(out)], "--out",
           str(out), "is a file")
    assert a_file.read_text() == "not a directory\n"
    assert _listing(a_file.parent) == before


def test_train_empty_out_does_not_write_the_current_directory(text_file, tmp_path,
                                                              monkeypatch, capsys):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    _fails(capsys, [*TRAIN, "--data", str(text_file), "--out", ""], "--out=''",
           "name a directory")
    assert not any(here.iterdir())


@pytest.fixture
def lm_run(tmp_path) -> Path:
    cfg = preset("tiny")
    model = MoETransformer(cfg)
    path = tmp_path / "run"
    ckpt_io.save_checkpoint(path, model, make_optimizer(model, TrainConfig()),
                            {"step": 0, "model_config": cfg.to_dict()})
    return path


def test_analyze_out_is_a_file(lm_run, a_file, text_file, capsys):
    before = _listing(lm_run)
    _fails(capsys, ["analyze", str(lm_run), "--data", str(text_file), "--tokens", "64",
                    "--seq-len", "32", "--out", str(a_file)], "--out", str(a_file), "is a file")
    assert a_file.read_text() == "not a directory\n"
    assert _listing(lm_run) == before


# -- a given 0 taken as "the default" --------------------------------------------------

@pytest.mark.parametrize("flag", ["--ep", "--dp", "--tp", "--pp"])
def test_plan_zero_parallel_size_is_an_error(flag, capsys):
    _fails(capsys, ["plan", "mixtral-8x7b", flag, "0"], flag, f"{flag[2:]}=0", ">= 1")


def test_plan_given_sizes_still_plan(capsys):
    assert main(["plan", "mixtral-8x7b", "--dp", "4", "--tp", "2", "--ep", "4"]) == 0
    assert "dp4 tp2 pp1 ep4" in capsys.readouterr().out


def test_analyze_seq_len_zero_is_an_error(lm_run, text_file, capsys):
    before = _listing(lm_run)
    _fails(capsys, ["analyze", str(lm_run), "--data", str(text_file), "--tokens", "64",
                    "--seq-len", "0"], "--seq-len", "seq_len=0")
    assert _listing(lm_run) == before  # no analysis/ written


# -- moekit compare / scaling: tracebacks, flags ignored, errors after training ----------

@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a run was trained before the bad flag was refused")
    monkeypatch.setattr(compare, "train_one", refuse)


@pytest.mark.parametrize("command", ["compare", "scaling"])
@pytest.mark.parametrize("argv,words", [
    (["--top-ks", "0"], ["--top-ks=0", "positive int"]),  # ZeroDivisionError
    (["--top-ks", "-2"], ["--top-ks=-2"]),  # was "ffn_dim=-32"
    (["--threads", "-1"], ["--threads=-1"]),  # RuntimeError from torch
    (["--threads", "0"], ["--threads=0"]),  # ignored
    (["--active-ffn", "0"], ["--active-ffn=0"]),  # taken as the default
    (["--seeds", "0", "-1"], ["--seeds=-1"]),  # refused after seed 0 was trained
    (["--seed", "3"], ["--seed=3", "--seeds"]),  # ignored: --seeds sets each run's seed
    (["--steps", "0"], ["--steps", "steps=0"]),  # did not name the flag
    (["--dense"], ["--dense", "variants"]),  # ignored: the variants set it
    # the second 0 read the first's cached run: n=2, spread 0, and a verdict of "holds"
    (["--seeds", "0", "1", "0"], ["--seeds=[0, 1, 0]", "0 repeats"]),
    # scaling printed the top-2 target line twice
    (["--top-ks", "2", "1", "2"], ["--top-ks=[2, 1, 2]", "2 repeats"]),
])
def test_compare_and_scaling_bad_flags(command, argv, words, text_file, tmp_path, no_training,
                                       capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    _fails(capsys, [command, "--preset", "tiny", "--data", str(text_file), "--out", str(out),
                    "--no-progress", "--seeds", "0", *argv], *words)
    assert not out.exists()
    assert torch.get_num_threads() == threads


def test_compare_top_ks_beyond_experts_names_top_ks(text_file, tmp_path, no_training, capsys):
    """It had named --top-k (top_k=8), a flag the user never passed."""
    out = tmp_path / "out"
    _fails(capsys, ["compare", "--preset", "tiny", "--data", str(text_file), "--out", str(out),
                    "--experts", "4", "--top-ks", "8", "2"], "--top-ks=8", "--experts=4")
    assert not out.exists()


@pytest.mark.parametrize("counts,words", [
    (["2", "100000"], ["--expert-counts value 100000", "num_experts=100000", "512"]),
    (["0"], ["--expert-counts value 0", ">= 1"]),
])
def test_scaling_expert_counts_out_of_range_names_expert_counts(counts, words, text_file,
                                                                tmp_path, no_training, capsys):
    """100000 had been refused as '--experts: num_experts=100000', a flag scaling refuses."""
    out = tmp_path / "out"
    err = _fails(capsys, ["scaling", "--preset", "tiny", "--data", str(text_file), "--out",
                          str(out), "--expert-counts", *counts], *words)
    assert "--experts:" not in err, err
    assert not out.exists()


def test_compare_top_ks_a_router_cannot_take_names_top_ks(text_file, tmp_path, no_training,
                                                         capsys):
    """It had named --top-k; passing --top-k 1 then failed the same way on moe-top2."""
    out = tmp_path / "out"
    for extra in ([], ["--top-k", "1"]):
        err = _fails(capsys, ["compare", "--preset", "tiny", "--data", str(text_file), "--out",
                              str(out), "--router", "switch", *extra],
                     "--top-ks value 2", "router='switch'")
        assert not err.startswith("moekit compare: error: --top-k:"), err
    assert not out.exists()


@pytest.mark.parametrize("argv,experts,router", [
    (["--experts", "1", "--top-ks", "1"], 1, "switch"),  # the preset's top-k 2 > 1 expert
    (["--router", "switch", "--top-ks", "1"], 4, "switch"),  # switch routes to 1 expert
])
def test_compare_base_config_does_not_impose_the_presets_top_k(argv, experts, router, text_file,
                                                               tmp_path, monkeypatch):
    """Both had been refused naming --top-k (top_k=2), a flag compare does not read: every
    variant sets its own top-k. The default A still comes from the preset's (2 x F)."""
    trained = {}

    def record(name, mcfg, tcfg, corpus, run_dir, progress):
        trained[name] = mcfg
        raise KeyboardInterrupt  # stop the sweep there: nothing trains
    monkeypatch.setattr(compare, "train_one", record)
    rc = main(["compare", "--preset", "tiny", "--data", str(text_file), "--out",
               str(tmp_path / "out"), "--seeds", "0", "--variants", "moe-top1", *argv])
    assert rc == 130 and list(trained) == ["moe-top1"]
    cfg = trained["moe-top1"]
    tiny = preset("tiny")
    assert (cfg.top_k, cfg.num_experts, cfg.router) == (1, experts, router)
    assert cfg.ffn_dim == tiny.top_k * tiny.ffn_dim  # A = the preset's active width


@pytest.mark.parametrize("command", ["compare", "scaling"])
def test_compare_and_scaling_a_full_disk_is_one_line(command, text_file, tmp_path, monkeypatch,
                                                    capsys):
    """An OSError from a run's save (a full disk) had ended the sweep with a traceback."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "x"))
    monkeypatch.setattr(compare, "train_one", full)
    rc = main([command, "--preset", "tiny", "--data", str(text_file), "--out",
               str(tmp_path / "out"), "--seeds", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"could not write to {tmp_path / 'out' / 'x'}: No space left on device" in err, err


def test_compare_a_diverged_run_is_one_line(text_file, tmp_path, monkeypatch, capsys):
    from moekit.train.trainer import NonFiniteError

    def diverged(*args, **kwargs):
        raise NonFiniteError("stopped after 2 non-finite steps in a row at step 7")
    monkeypatch.setattr(compare, "train_one", diverged)
    rc = main(["compare", "--preset", "tiny", "--data", str(text_file), "--out",
               str(tmp_path / "out"), "--seeds", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "error: stopped after 2 non-finite steps in a row at step 7" in err, err


def test_scaling_with_no_expert_count_reaching_a_top_k_is_refused(text_file, tmp_path,
                                                                  no_training, capsys):
    """Every (E, K) had been skipped as E < K: the "sweep" trained and reported dense alone."""
    out = tmp_path / "out"
    _fails(capsys, ["scaling", "--preset", "tiny", "--data", str(text_file), "--out", str(out),
                    "--top-ks", "4", "8", "--expert-counts", "1", "2"],
           "--expert-counts=[1, 2]", "no MoE would train", ">= 4")
    assert not out.exists()


@pytest.mark.parametrize("command", ["compare", "scaling"])
def test_compare_and_scaling_out_is_a_file(command, a_file, text_file, no_training, capsys):
    _fails(capsys, [command, "--preset", "tiny", "--data", str(text_file), "--out",
                    str(a_file), "--no-progress"], "--out", str(a_file), "is a file")
    assert a_file.read_text() == "not a directory\n"


@pytest.mark.parametrize("command", ["compare", "scaling"])
@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, 130),
                                         (Interrupted(signal.SIGTERM), 143)])
def test_compare_and_scaling_ctrl_c_is_one_line(command, stop, status, text_file, tmp_path,
                                               monkeypatch, capsys):
    """Ctrl-C in a sweep had ended it with a traceback (`moekit train` says how to go on);
    a SIGTERM stopping a run (which saves like Ctrl-C) exits 143, as the shell reports."""
    def interrupted(*args, **kwargs):
        raise stop
    monkeypatch.setattr(compare, "train_one", interrupted)
    out = tmp_path / "out"
    try:
        got = main([command, "--preset", "tiny", "--data", str(text_file), "--out",
                    str(out), "--no-progress", "--seeds", "0"])
    except KeyboardInterrupt:  # not raised on: it would end the test session
        pytest.fail("Ctrl-C escaped the command as a traceback")
    assert got == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and str(out) in err, err


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv,where,words", [
    # the corpus read (seconds for the stdlib) had ended `train` with a traceback
    (["train", "--steps", "2"], "moekit.train.cli.load_corpus",
     ["moekit train: interrupted before training started", "nothing was trained"]),
    (["train", "--steps", "2"], "moekit.train.cli.build_trainer",
     ["moekit train: interrupted before training started"]),
    (["compare", "--seeds", "0"], "moekit.train.compare.load_corpus",
     ["moekit compare: interrupted"]),
    (["scaling", "--seeds", "0"], "moekit.train.compare.load_corpus",
     ["moekit scaling: interrupted"]),
    (["analyze", "CHECKPOINT"], "moekit.analysis.cli.load_lm", ["moekit analyze: interrupted"]),
])
def test_ctrl_c_before_training_is_one_line_and_exit_130(argv, where, words, text_file,
                                                          tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(where, _ctrl_c)
    out = tmp_path / "out"
    argv = [str(tmp_path / "run") if a == "CHECKPOINT" else a for a in argv]
    if argv[0] != "analyze":
        argv += ["--preset", "tiny", "--data", str(text_file), "--no-progress"]
    try:
        got = main([*argv, "--out", str(out)])
    except KeyboardInterrupt:  # not raised on: it would end the test session
        pytest.fail("Ctrl-C escaped the command as a traceback")
    err = capsys.readouterr().err.strip()
    assert got == 130 and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "compare", "scaling"])
@pytest.mark.parametrize("device", ["cpu:3", "cpu:1"] + (
    [] if torch.cuda.is_available() else ["cuda", "cuda:0"]))
def test_a_device_this_machine_lacks_is_refused_before_the_corpus_is_read(
        command, device, text_file, tmp_path, monkeypatch, capsys):
    """`--device cpu:3` had trained on the CPU (torch ignores a CPU index) and recorded
    cpu:3 in the checkpoint; a missing GPU was found only after the corpus was read."""
    def no_read(*args, **kwargs):
        raise AssertionError("the corpus was read before --device was checked")
    monkeypatch.setattr("moekit.train.cli.load_corpus", no_read)
    monkeypatch.setattr("moekit.train.compare.load_corpus", no_read)
    out = tmp_path / "out"
    _fails(capsys, [command, "--preset", "tiny", "--data", str(text_file), "--out", str(out),
                    "--no-progress", "--device", device],
           f"--device='{device}'", "no such device on this machine", "cpu, cpu:0")
    assert not out.exists()


def test_devices_here_follow_the_gpu_count(monkeypatch):
    from moekit.train.trainer import check_device_available, devices_here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices_here()[:5] == ["cpu", "cpu:0", "cuda", "cuda:0", "cuda:1"]
    for ok in ("cpu", "cpu:0", "cuda", "cuda:0", "cuda:1"):
        check_device_available(ok)
    with pytest.raises(ValueError, match=r"device='cuda:2' is not allowed: no such device "
                       r"on this machine; it must be one of cpu, cpu:0, cuda, cuda:0, cuda:1"):
        check_device_available("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:0' is not allowed.*one of cpu, cpu:0"):
        check_device_available("cuda:0")


def test_scaling_experts_flag_is_refused(text_file, tmp_path, no_training, capsys):
    # ignored: --expert-counts sets each MoE's experts
    _fails(capsys, ["scaling", "--preset", "tiny", "--data", str(text_file), "--out",
                    str(tmp_path / "out"), "--no-progress", "--experts", "4"],
           "--experts=4", "--expert-counts")
    assert not (tmp_path / "out").exists()


def test_moekits_own_warnings_print_as_one_house_line():
    """Under the `moekit` command a warning from moekit's code reads like its errors
    (``moekit train: warning: ...``), not Python's ``file:line: UserWarning``; warnings
    from other packages keep Python's format."""
    import warnings

    from moekit.cli import PACKAGE_DIR, warning_format

    fmt = warning_format("train")
    ours = fmt(UserWarning("warmup_steps=100 is longer than steps=2"), UserWarning,
               str(PACKAGE_DIR / "train" / "trainer.py"), 372)
    assert ours == "moekit train: warning: warmup_steps=100 is longer than steps=2\n"
    theirs = fmt(UserWarning("x"), UserWarning, warnings.__file__, 1, "")
    assert "UserWarning: x" in theirs and warnings.__file__ in theirs
