"""What a new user trips on (issue 12): a fresh install without numpy or matplotlib, and
the CLI's answers to runs that cannot work. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.functions import cpu_ext
from moekit.models import MoETransformer, preset
from moekit.safetensors_write import save_file
from moekit.train import checkpoint as ckpt_io
from moekit.train.compare import plan_line, table, variants, verdict
from moekit.train.memory import GIB, check_step_memory, estimate_step_bytes
from moekit.train.trainer import TrainConfig, make_optimizer

SRC = Path(__file__).parents[1] / "src"
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "2", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("newcomer")
    for i in range(20):
        (root / f"m{i}.py").write_text(TEXT * (3 + i % 4))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli_main(["train", *TINY, "--data", str(data), "--out", str(out)]) == 0
    return out


def _one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# -- a fresh environment: no numpy, no matplotlib ------------------------------------

BLOCK = ("import sys; sys.modules['numpy'] = None; sys.modules['matplotlib'] = None; "
         "from moekit.cli import main; sys.exit(main(sys.argv[1:]))")


def _moekit_without_numpy(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "MOEKIT_CPU_EXT": "0"}
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], capture_output=True,
                          text=True, timeout=240, env=env)


def test_train_generate_analyze_without_numpy_or_matplotlib(tmp_path, data):
    """`import numpy` fails in the child, as on a fresh `pip install -e .`."""
    out = tmp_path / "run"
    done = _moekit_without_numpy("train", *TINY, "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "step_00000002" / "model.safetensors").exists()
    done = _moekit_without_numpy("generate", "--checkpoint", str(out), "--max-new-tokens", "5")
    assert done.returncode == 0 and done.stdout.startswith("def "), done.stderr[-3000:]
    done = _moekit_without_numpy("analyze", str(out), "--tokens", "256", "--seq-len", "16",
                                 "--data", str(data), "--out", str(tmp_path / "an"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'pip install "moekit[plot]"' in done.stderr
    assert sorted(p.name for p in (tmp_path / "an").iterdir()) \
        == ["report.md", "routing.json", "tokens.csv"]  # no PNGs
    assert "moekit[plot]" in (tmp_path / "an" / "report.md").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64, torch.int64, torch.int32, torch.int8,
                                   torch.uint8, torch.bool])
def test_safetensors_writer_is_read_back_by_safetensors(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 7, generator=g) * 100
    tensors = {"a": base.to(dtype), "scalar": base[0, 0, 0].to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype),
               "strided": base.transpose(0, 2).to(dtype)}  # not contiguous
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_streamed_safetensors_are_read_back_and_checked_against_the_header(tmp_path):
    """save_stream writes tensors made one at a time under a header from their layout;
    one out of order, of another dtype or shape, or missing is refused."""
    from safetensors.torch import load_file

    from moekit.safetensors_write import save_stream

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6).view(2, 3),
               "c": torch.ones(5).bfloat16()}
    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    save_stream(layout, iter(tensors.items()), tmp_path / "t.safetensors")
    back = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    items = list(tensors.items())
    for bad, match in [(items[::-1], "'c'.*the header expects 'a'"),
                       ([items[0], ("b", tensors["b"].float()), items[2]], "'b' torch.float32"),
                       ([items[0], ("b", tensors["b"].view(3, 2)), items[2]], r"\(3, 2\)"),
                       (items[:2], r"tensors \['c'\] of the header were never given"),
                       ([*items, ("d", torch.ones(1))], "expects no more tensors")]:
        with pytest.raises(ValueError, match=match):
            save_stream(layout, iter(bad), tmp_path / "bad.safetensors")


# -- moekit train ----------------------------------------------------------------------


def test_nproc_run_refuses_an_existing_run_directory(run_dir, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    rc = cli_main(["train", "--nproc", "2", "--ep", "2", "--preset", "tiny", "--out",
                   str(run_dir)])
    assert rc == 2
    _one_error_line(capsys, "already holds a run", f"--resume {run_dir}")
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing launched


def test_ep_that_does_not_divide_nproc_fails_before_torchrun(tmp_path, capsys):
    rc = cli_main(["train", "--nproc", "2", "--ep", "3", "--out", str(tmp_path / "r")])
    assert rc == 2
    _one_error_line(capsys, "--ep=3", "2 processes", "[1, 2]")
    assert not (tmp_path / "r").exists()


def _refuse_torchrun(monkeypatch):
    import moekit.train.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was launched before the bad flag was refused")
    monkeypatch.setattr(launch, "launch_torchrun", refuse)


def test_ep_with_a_dense_model_fails_before_torchrun(tmp_path, monkeypatch, capsys):
    """--ep 2 --dense had printed "mesh: dp=1 x ep=2" and trained as plain data
    parallelism: a dense model has no experts to shard."""
    _refuse_torchrun(monkeypatch)
    rc = cli_main(["train", "--nproc", "2", "--ep", "2", "--dense", "--preset", "tiny",
                   "--out", str(tmp_path / "r")])
    assert rc == 2
    _one_error_line(capsys, "--ep=2", "dense model (--dense)", "no experts", "must be 1")
    assert not (tmp_path / "r").exists()


def test_nproc_resume_of_a_dense_run_with_ep_fails_before_torchrun(data, tmp_path,
                                                                   monkeypatch, capsys):
    run = tmp_path / "dense"
    assert cli_main(["train", *TINY, "--dense", "--data", str(data), "--out",
                     str(run)]) == 0
    capsys.readouterr()
    _refuse_torchrun(monkeypatch)
    before = sorted(p.name for p in run.iterdir())
    assert cli_main(["train", "--resume", str(run), "--nproc", "2", "--ep", "2",
                     "--steps", "4"]) == 2
    _one_error_line(capsys, "--ep=2", f"--resume={run}", "dense model", "no experts")
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("nproc", ["1", "2"])
@pytest.mark.parametrize("argv,words", [
    (["--timeout", "nan"], ["--timeout=nan", "(0, 1e+12]"]),  # a traceback on every rank
    (["--timeout", "0"], ["--timeout=0.0", "(0, 1e+12]"]),
    (["--overlap-chunks", "0"], ["--overlap-chunks=0", "positive int"]),
    (["--dispatcher", "all_to_all_dedup", "--capacity-factor", "1.25"],
     ["--dispatcher='all_to_all_dedup'", "--capacity-factor=1.25", "dropless"]),
    (["--dispatcher", "all_to_all_dedup", "--overlap-chunks", "2"],
     ["--dispatcher='all_to_all_dedup'", "--overlap-chunks=2", "not chunked"]),
])
def test_bad_parallel_flags_fail_before_torchrun(nproc, argv, words, tmp_path, monkeypatch,
                                                 capsys):
    import moekit.train.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was launched before the bad flag was refused")
    monkeypatch.setattr(launch, "launch_torchrun", refuse)
    rc = cli_main(["train", "--nproc", nproc, "--preset", "tiny", "--steps", "2",
                   "--out", str(tmp_path / "r"), *argv])
    assert rc == 2
    _one_error_line(capsys, *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,words", [
    (["--nproc", "3", "--steps", "4"], ["--nproc=3", "batch size 2", "[1, 2]"]),
    (["--nproc", "2", "--ep", "2", "--steps", "2"], ["already at step 2 of steps=2"]),
    (["--nproc", "2", "--ep", "2"], ["already at step 2 of steps=2"]),
])
def test_nproc_resume_that_cannot_go_on_fails_before_torchrun(run_dir, argv, words,
                                                               monkeypatch, capsys):
    """The saved batch size against the processes, and a run already at --steps, are
    refused before torchrun starts (every rank had found them once started, each printing
    the error under torchrun's failure report)."""
    import moekit.train.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was launched before the resume was refused")
    monkeypatch.setattr(launch, "launch_torchrun", refuse)
    before = sorted(p.name for p in run_dir.iterdir())
    assert cli_main(["train", "--resume", str(run_dir), "--no-progress", *argv]) == 2
    _one_error_line(capsys, f"--resume={run_dir}", *words)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_nproc_resume_with_ep_not_dividing_the_experts_fails_before_torchrun(
        data, tmp_path, monkeypatch, capsys):
    import moekit.train.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("torchrun was launched before the resume was refused")
    run = tmp_path / "e3"
    assert cli_main(["train", *TINY, "--experts", "3", "--data", str(data), "--out",
                     str(run)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(launch, "launch_torchrun", refuse)
    assert cli_main(["train", "--resume", str(run), "--nproc", "2", "--ep", "2",
                     "--steps", "4"]) == 2
    _one_error_line(capsys, "--ep=2", "3 experts")


def test_nproc_resume_picks_the_newest_of_dcp_and_one_process_checkpoints(tmp_path):
    """`--nproc --resume RUN`: the newest complete dcp_step_*, or the step_* LATEST names
    where that is newer (a one-process resume went on past the dcp one); a damaged LATEST
    is an error that names the dcp checkpoint there is."""
    from moekit.errors import CheckpointError
    from moekit.train.distributed import newest_checkpoint

    run = tmp_path / "run"
    for name, mark in (("dcp_step_00000010", "manifest.json"), ("dcp_step_00000014", None),
                       ("step_00000010", "state.json"), ("step_00000012", "state.json")):
        (run / name).mkdir(parents=True)
        if mark:
            (run / name / mark).write_text("{}")
    assert newest_checkpoint(run) == run / "dcp_step_00000010"  # no LATEST: dcp only
    (run / "LATEST").write_text("step_00000010\n")
    assert newest_checkpoint(run) == run / "dcp_step_00000010"  # the same step: dcp
    (run / "LATEST").write_text("step_00000012\n")
    assert newest_checkpoint(run) == run / "step_00000012"
    (run / "LATEST").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="dcp_step_00000010"):
        newest_checkpoint(run)


def test_resume_of_a_missing_path_says_it_does_not_exist(tmp_path, capsys):
    rc = cli_main(["train", "--resume", str(tmp_path / "nope")])
    assert rc == 1  # no checkpoint there: a runtime failure
    _one_error_line(capsys, "--resume=", "does not exist")


def test_resumed_run_reports_loss_from_its_start_step(run_dir, data, capsys, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--steps", "4", "--data", str(data),
                     "--no-progress"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("done:"))
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, open(run / "metrics.jsonl"))
            if r["kind"] == "val"}
    m = re.search(r"validation loss ([\d.]+) at step 2 -> ([\d.]+)", line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(vals[2], abs=5e-4)
    assert float(m.group(2)) == pytest.approx(vals[4], abs=5e-4)


def test_seq_len_whose_memory_explodes_is_refused(tmp_path, capsys):
    rc = cli_main(["train", "--seq-len", "100000", "--out", str(tmp_path / "r")])
    assert rc == 2
    _one_error_line(capsys, "--seq-len=100000", "GiB")
    assert not (tmp_path / "r").exists()


def _meta_params(**changes) -> int:
    """The oracle: parameters of the model itself, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in MoETransformer(preset("small", **changes)).parameters())


def _one_gpu(monkeypatch) -> None:
    """A machine with one CUDA device as far as --device's check can tell: without one,
    --device cuda is refused before the model's size is looked at."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("argv,device_words", [
    (["--dim", "8192"], ("x 16 bytes", "AdamW")),
    (["--dim", "8192", "--device", "cuda"], ("x 4 bytes", "before they move to cuda")),
    (["--ffn-dim", "65536", "--experts", "64"], ("x 16 bytes",)),
])
def test_a_model_too_big_for_memory_is_refused_by_its_flags(tmp_path, capsys, monkeypatch,
                                                            argv, device_words):
    """`moekit train --dim 100000` was blamed on --seq-len (CPU) or built in memory until
    the OS killed it (another --device): refused before anything is built, naming the
    model flags, the planner's estimate and the memory available."""
    from moekit.train import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 2.0 * GIB)
    _one_gpu(monkeypatch)
    rc = cli_main(["train", *argv, "--out", str(tmp_path / "r")])
    assert rc == 2
    sizes = dict(zip(argv[::2], argv[1::2], strict=True))
    fields = {"--dim": "dim", "--ffn-dim": "ffn_dim", "--experts": "num_experts"}
    params = _meta_params(**{fields[f]: int(v) for f, v in sizes.items() if f in fields})
    per = 4 if "--device" in sizes else 16
    flags = " ".join(f"{f}={v}" for f, v in sizes.items() if f in fields)
    _one_error_line(capsys, f"{flags} is not allowed here",
                    f"about {per * params / GIB:,.1f} GiB", f"{params:,} parameters",
                    "2.0 GiB available", *device_words)
    assert not (tmp_path / "r").exists()


def test_expert_parallel_training_checks_the_model_before_torchrun(tmp_path, monkeypatch):
    """--nproc N: each process builds the whole model here; refused before launching."""
    import argparse

    from moekit.train import launch, memory
    from moekit.train.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--nproc", "4", "--ep", "2", "--dim", "4096", "--device", "cuda",
                         "--out", str(tmp_path / "r")])
    params = _meta_params(dim=4096)
    _one_gpu(monkeypatch)
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * 4 * params - 1.0)
    with pytest.raises(ValueError, match=re.escape(
            f"--dim=4096 is not allowed here: the model needs about "
            f"{16 * params / GIB:,.1f} GiB ({params:,} parameters x 4 bytes x 4 processes")):
        launch.validate(args, 4)
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * 4 * params + 1.0)
    launch.validate(args, 4)  # it fits: nothing refused


def test_memory_estimate_covers_what_autograd_saves():
    """Oracle: the distinct storages autograd saves in one forward (+ fp32 logits grad)."""
    cfg = preset("tiny").replace(max_seq_len=128)
    model = MoETransformer(cfg)
    B, L = 4, 128
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 256, (B, L))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, ids)
    saved = sum(n for p, n in seen.items() if p not in params) + B * L * 256 * 4
    fixed = 16 * sum(p.numel() for p in model.parameters())
    est = estimate_step_bytes(cfg, B, L) - fixed
    assert saved <= est <= 3 * saved, (saved, est)


def test_memory_check_warns_when_tight_and_refuses_when_over():
    cfg = preset("small")
    need = estimate_step_bytes(cfg, 16, 128)
    assert check_step_memory(cfg, 16, 128, available=4 * need) is None
    assert "warning" in check_step_memory(cfg, 16, 128, available=1.5 * need)
    with pytest.raises(ValueError, match=r"--seq-len=128 with --batch-size=16"):
        check_step_memory(cfg, 16, 128, available=0.9 * need)
    assert need / GIB < 1  # the default run stays well inside any machine


# -- moekit compare ----------------------------------------------------------------------


def _results(dense: list[float], moe: list[float]) -> list[dict]:
    row = {"total_params": 1, "active_params": 1, "tokens_per_s": 1.0}
    return ([{**row, "variant": "dense", "val_loss": v} for v in dense]
            + [{**row, "variant": "moe-top2", "val_loss": v} for v in moe])


def test_compare_with_one_seed_makes_no_claim():
    text = " ".join(verdict(_results([1.8], [1.6])))
    assert "no claim" in text and "holds" not in text


@pytest.mark.parametrize("dense,moe", [([1.80, 1.81], [1.60, 1.62]),
                                       ([1.60, 1.62], [1.80, 1.81])])
def test_compare_sentence_sign_agrees_with_the_table(dense, moe):
    rows = table(_results(dense, moe)).splitlines()
    in_table = float(rows[-1].split("|")[-2])
    said = verdict(_results(dense, moe))[0]
    assert float(re.search(r"mean val loss ([+-][\d.]+)", said).group(1)) == in_table
    assert ("below dense" in said) == (in_table < 0)
    assert ("holds" in said) == (in_table < 0)  # clear gaps over a tiny spread


def test_compare_prints_its_plan_and_time_before_training(tmp_path, monkeypatch, capsys):
    import moekit.train.compare as compare

    def refuse(*a, **k):
        raise RuntimeError("training started")
    monkeypatch.setattr(compare, "train_one", refuse)
    with pytest.raises(RuntimeError, match="training started"):
        cli_main(["compare", "--out", str(tmp_path / "c"), "--no-progress"])
    line = capsys.readouterr().out.splitlines()[0]
    tokens = 1500 * 16 * 128  # the defaults: 3 variants x 3 seeds
    assert line.startswith("plan: 9 run(s)") and "1,500 steps" in line
    assert f"about {9 * tokens / compare.PLAN_TOKENS_PER_S / 60:.0f} min" in line
    base = preset("small")
    assert "0 cached" in plan_line(variants(base, 512, [2, 1]), ["dense"], [0],
                                   TrainConfig(), tmp_path)


# -- moekit convert ----------------------------------------------------------------------


def _lm_run(path: Path) -> Path:
    cfg = preset("tiny")
    model = MoETransformer(cfg)
    ckpt_io.save_checkpoint(path, model, make_optimizer(model, TrainConfig()),
                            {"step": 0, "model_config": cfg.to_dict()})
    return path


@pytest.mark.parametrize("dest", ["same", "inside", "existing_run"])
def test_convert_refuses_its_input_or_an_existing_checkpoint(tmp_path, dest, capsys):
    src = _lm_run(tmp_path / "lm")
    other = _lm_run(tmp_path / "other")
    target = {"same": src, "inside": src / "hf", "existing_run": other}[dest]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert cli_main(["convert", str(src), str(target)]) == 2
    _one_error_line(capsys, "dest=", "not allowed")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


# -- moekit plan ---------------------------------------------------------------------------


def test_plan_that_does_not_fit_shows_no_throughput(capsys):
    assert cli_main(["plan", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "OOM" in out and "does not fit in memory" in out
    assert "tokens/s" not in out and "utilisation" not in out


def test_plan_defaults_to_a_stated_realistic_efficiency(capsys):
    assert cli_main(["plan", "gpt-oss-20b", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["compute_efficiency"] == 0.39
    assert cli_main(["plan", "gpt-oss-20b", "--gpus", "8"]) == 0
    assert "at 39% of peak (--efficiency)" in capsys.readouterr().out


def test_plan_search_without_a_fit_names_the_gpu_count(capsys):
    assert cli_main(["plan", "mixtral-8x7b", "--search"]) == 1
    assert "8 x h100" in capsys.readouterr().out


# -- plots -----------------------------------------------------------------------------------


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _images(fig):
    """Every heatmap (imshow images and pcolormesh meshes) outside the colour bar."""
    from matplotlib.collections import QuadMesh
    return [im for ax in _panels(fig) for im in [*ax.get_images(), *(
        c for c in ax.collections if isinstance(c, QuadMesh))]]


def test_val_loss_axis_shows_every_point():
    pytest.importorskip("matplotlib")
    from moekit.train.plots import curves_figure
    results = [{"variant": v, "curve": [(0, 5.55), (100, 2.0 + i), (200, 1.2 + i)],
                "val_loss": 1.2 + i} for i, v in enumerate(["dense", "moe-top2"])]
    lo, hi = curves_figure(results).axes[0].get_ylim()
    assert lo < 1.2 and hi > 5.55


def test_load_and_coactivation_heatmaps_share_one_centred_scale():
    pytest.importorskip("matplotlib")
    from moekit.analysis.report import coactivation_figure, load_figure
    from moekit.train.plots import load_figure as compare_load_figure
    layers = [{"name": f"blocks.{i}.ffn", "num_experts": 4,
               "load_share": [0.1, 0.2, 0.3, 0.4][::1 - 2 * i],
               "coactivation": [[1.0, 0.2 + i, 3.0, 1.0]] * 4,  # over chance: / 1.0
               "coactivation_expected": [[1.0] * 4] * 4} for i in range(2)]
    result = {"variant": "moe-top2", "seed": 0,
              "load": [(10, [[0.1, 0.9], [0.5, 0.5]]), (20, [[0.7, 0.3], [0.4, 0.6]])]}
    for fig, top in ((load_figure(layers), 1.6), (coactivation_figure(layers), 3.0),
                     (compare_load_figure(result), 1.8)):
        norms = {id(im.norm) for im in _images(fig)}
        assert len(norms) == 1, "each panel has its own colour scale"
        norm = _images(fig)[0].norm
        assert (norm.vmin, norm.vcenter) == (0.0, 1.0) and norm.vmax >= top
        for ax in _panels(fig):
            if ax.get_images() or ax.collections:
                assert ax.get_xlabel() and ax.get_ylabel()


@pytest.mark.parametrize("load,edges", [
    # evaluations every 10 steps and a last one at step 25: columns 0-10, 10-20, 20-25
    ([(10, [[0.1, 0.9]]), (20, [[0.5, 0.5]]), (25, [[0.75, 0.25]])], [0, 10, 20, 25]),
    # --steps equal to --eval-every: one evaluation had drawn an empty panel (zero width)
    ([(10, [[0.25, 0.75]])], [0, 10]),
])
def test_compare_load_columns_span_the_steps_each_share_was_counted_over(load, edges):
    """The load logged at an evaluation counts the steps since the previous one; the
    heatmap had spread its columns evenly from the first evaluation to the last."""
    pytest.importorskip("matplotlib")
    import numpy as np

    from moekit.train.plots import load_figure
    fig = load_figure({"variant": "moe-top1", "seed": 0, "load": load})
    (mesh,) = _images(fig)
    ax = fig.axes[0]
    assert ax.get_xlim() == (edges[0], edges[-1])
    assert ax.get_ylim() == (1.5, -0.5)  # expert 0 on top, one row per expert
    xs = mesh.get_coordinates()[0, :, 0]
    assert xs.tolist() == edges
    # colour = share x E (2 experts): 1.0 is a uniform load
    want = [[share[0][e] * 2 for _, share in load] for e in range(2)]
    assert np.allclose(np.asarray(mesh.get_array()).reshape(2, len(load)), want)


# -- the C++ kernels' build message --------------------------------------------------------


def test_every_build_of_the_cpp_kernels_says_so(tmp_path, monkeypatch, capsys):
    """Another environment's build in the same directory must not silence the message."""
    import torch.utils.cpp_extension as ext

    built = []

    def fake_load(name, sources, build_directory, **kw):
        built.append(build_directory)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return "module"

    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(cpu_ext.ENV, raising=False)
    # what the old shared layout held after a build in some other virtualenv
    old = tmp_path / "py311_cpu" / cpu_ext.NAME
    old.mkdir(parents=True)
    (old / f"{cpu_ext.NAME}.so").write_bytes(b"")

    def get() -> str:
        monkeypatch.setattr(cpu_ext, "_tried", False)
        monkeypatch.setattr(cpu_ext, "_module", None)
        assert cpu_ext.get() == "module"
        return capsys.readouterr().err

    assert "building the C++ CPU expert kernels" in get()
    assert get() == ""  # built for this environment: loads silently
    monkeypatch.setattr(ext, "include_paths", lambda *a, **k: ["/another/venv/torch/include"])
    assert "building the C++ CPU expert kernels" in get()
    assert len(set(built)) == 2


@pytest.mark.parametrize("argv,named", [
    (["--experts", "8", "--router", "sigmoid"], "--experts, --router have no effect"),
    (["--capacity-factor", "1.5"], "--capacity-factor has no effect"),
])
def test_moe_only_flags_with_dense_are_named_in_one_warning(argv, named, data, tmp_path):
    """The MoE command + --dense (the baseline) still trains, and says which of its flags
    the dense model does not read (they had been dropped without a word)."""
    out = tmp_path / "dense"
    with pytest.warns(UserWarning) as caught:
        assert cli_main(["train", *TINY, "--warmup", "1", "--dense", *argv, "--data",
                         str(data), "--out", str(out)]) == 0
    said = [str(w.message) for w in caught if "--dense" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(named), said
    state = out / (out / "LATEST").read_text().strip() / "state.json"
    assert json.loads(state.read_text())["model_config"]["dense"] is True


def test_dense_flags_that_size_it_give_no_warning(data, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["train", *TINY, "--warmup", "1", "--dense", "--top-k", "2",
                         "--ffn-dim", "64", "--data", str(data), "--out",
                         str(tmp_path / "d")]) == 0
    assert not [w for w in caught if "--dense" in str(w.message)]
