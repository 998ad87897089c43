"""`moekit scaling`: the runner's outputs, resuming from cache, equal active FLOPs."""

from __future__ import annotations

import json

import pytest

import moekit.train.compare as compare
from moekit.cli import main as cli_main
from moekit.models import LMConfig, MoETransformer
from moekit.train.scaling import (
    doubling_gaps,
    scaling_variants,
    steps_to_reach,
    summarize,
    targets,
)

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):  # enough files that the hash split puts some in validation
        (root / f"mod_{i:02d}.py").write_text(TEXT * (3 + i % 5) + f"# file {i}\n")
    return root


def run_cli(corpus_dir, out, steps=3) -> int:
    return cli_main(["scaling", "--preset", "tiny", "--data", str(corpus_dir),
                     "--steps", str(steps), "--batch-size", "2", "--seq-len", "16",
                     "--eval-every", "1", "--eval-batches", "1", "--seeds", "0",
                     "--expert-counts", "2", "4", "--top-ks", "1", "2",
                     "--out", str(out), "--no-progress"])


def test_runner_writes_table_plots_json_then_resumes_without_training(
        tmp_path, corpus_dir, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "scaling"
    assert run_cli(corpus_dir, out) == 0
    first = capsys.readouterr().out
    names = ["dense", "top1-e2", "top2-e2", "top1-e4", "top2-e4"]
    for name in names:
        assert f"| {name} |" in first
    for png in ("scaling.png", "speedup.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    summary = json.loads((out / "scaling.json").read_text())
    assert [p["variant"] for p in summary["points"]] == names
    for p in summary["points"]:
        assert p["val_loss"]["n"] == 1 and p["steps"] == 3
    run = summary["runs"][0]
    assert [s for s, _ in run["step_curve"]] == [0, 1, 2, 3]  # a val point per step
    assert [t for t, _ in run["curve"]] == [0, 32, 64, 96]  # 2 x 16 tokens per step
    assert summary["dense_final_val_loss"] == run["val_loss"]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(compare, "Trainer", no_training)
    assert run_cli(corpus_dir, out) == 0
    again = json.loads((out / "scaling.json").read_text())
    assert again["points"] == summary["points"]
    assert "| top2-e4 |" in capsys.readouterr().out
    # another budget in the same --out must not silently reuse these runs
    assert run_cli(corpus_dir, out, steps=4) == 2
    err = capsys.readouterr().err
    assert "dense-seed0 was trained with steps=3, not steps=4" in err and "new --out" in err


def ffn_free_params(cfg: LMConfig) -> int:
    """Everything but the FFNs, from the architecture: tied embedding V x D, per
    block attention 4 D^2 (qkv + out) and two RMSNorm weights, the final norm."""
    D, L = cfg.dim, cfg.num_layers
    return cfg.vocab_size * D + L * (4 * D * D + 2 * D) + D


@pytest.mark.parametrize("active_ffn", [64, 96])
def test_every_variant_has_the_dense_models_active_ffn_flops(active_ffn):
    base = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16, ffn_dim=8,
                    num_experts=4, top_k=2)
    configs = scaling_variants(base, active_ffn, [1, 2], [1, 2, 4, 8, 16, 32, 64])
    assert len(configs) == 1 + 7 + 6  # dense, top-1 at E=1..64, top-2 at E=2..64
    D, L = base.dim, base.num_layers
    dense = MoETransformer(configs.pop("dense"))
    # a SwiGLU of hidden A: gate and up D x A, down A x D -> 2 * 3 * D * A FLOPs per token
    dense_ffn = 3 * D * active_ffn
    assert dense.num_params() == ffn_free_params(base) + L * dense_ffn
    for name, cfg in configs.items():
        model = MoETransformer(cfg)
        E, K, F = cfg.num_experts, cfg.top_k, cfg.ffn_dim
        assert name == f"top{K}-e{E}" and K * F == active_ffn
        assert (cfg.router == "switch") == (K == 1)
        router = D * E
        assert model.num_params() == ffn_free_params(base) + L * (E * 3 * D * F + router)
        # a token runs K experts of 3 D F weights: the dense FFN's arithmetic, plus the router
        assert model.active_params_per_token() == dense.num_params() + L * router, name


@pytest.mark.parametrize("shared", [dict(num_shared_experts=1),  # hidden 1 x F = 8
                                    dict(num_shared_experts=2, shared_ffn_dim=24),
                                    dict(num_shared_experts=1, moe_every=2)])
def test_shared_experts_keep_every_variant_at_the_dense_models_active_ffn(shared):
    """The shared experts' hidden size had followed each variant's ffn_dim: with one shared
    expert and A = 24 the dense model ran 48 hidden units per token, top-2 36, top-1 48."""
    base = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16, ffn_dim=8,
                    num_experts=4, top_k=2, **shared)
    S = shared.get("shared_ffn_dim", 8)
    A = base.active_ffn_dim  # compare's default: 2 x 8 routed + the shared experts
    assert A == 16 + S
    configs = {**compare.variants(base, A, [1, 2]),
               **scaling_variants(base, A, [1, 2], [1, 4])}
    D, L = base.dim, base.num_layers
    moe_layers = L // base.moe_every
    dense = MoETransformer(configs.pop("dense"))
    assert dense.num_params() == ffn_free_params(base) + L * 3 * D * A  # one SwiGLU of A
    for name, cfg in configs.items():
        model = MoETransformer(cfg)
        E, K = cfg.num_experts, cfg.top_k
        assert K * cfg.ffn_dim == A - S, name  # routed experts get A less the shared part
        # per MoE layer: E experts of (A - S) / K, the shared SwiGLU of S, the router; the
        # other blocks a dense SwiGLU of A
        moe = E * 3 * D * (A - S) // K + 3 * D * S + D * E
        assert model.num_params() == ffn_free_params(base) + moe_layers * moe + (
            L - moe_layers) * 3 * D * A, name
        assert model.active_params_per_token() == dense.num_params() + moe_layers * D * E, name


def test_shared_experts_as_large_as_the_active_ffn_are_refused():
    base = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16, ffn_dim=8,
                    num_experts=4, top_k=2, num_shared_experts=1, shared_ffn_dim=32)
    with pytest.raises(ValueError, match=r"--active-ffn=32 is not allowed: .*hidden size 32"):
        compare.variants(base, 32, [1, 2])


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 3.0), (10, 2.0), (20, 1.0), (30, 0.5)]
    assert steps_to_reach(curve, 1.5) == pytest.approx(15.0)
    assert steps_to_reach(curve, 1.0) == pytest.approx(20.0)
    assert steps_to_reach(curve, 3.5) == 0.0
    assert steps_to_reach(curve, 0.4) is None


def fake_run(variant, top_k, experts, seed, final):
    return {"variant": variant, "seed": seed, "top_k": top_k, "num_experts": experts,
            "total_params": 1, "active_params": 1, "steps": 100, "tokens": 1000,
            "val_loss": final, "step_curve": [(0, 5.0), (50, final + 0.5), (100, final)],
            "curve": [], "load": []}


def test_summary_speedup_gaps_and_targets_from_known_runs():
    runs = [fake_run("dense", 0, 1, s, v) for s, v in ((0, 2.0), (1, 2.2))]
    runs += [fake_run("top2-e2", 2, 2, s, v) for s, v in ((0, 1.9), (1, 1.95))]
    runs += [fake_run("top2-e4", 2, 4, s, v) for s, v in ((0, 1.5), (1, 1.6))]
    s = summarize(runs, ["dense", "top2-e2", "top2-e4"])
    assert s["dense_final_val_loss"] == pytest.approx(2.1)
    e4 = s["points"][2]
    # seed 0: 5.0 -> 2.0 over steps 0..50 passes 2.1 at 50 * 2.9 / 3; seed 1 is 2.1 at 50
    assert e4["steps_to_dense_final"] == [pytest.approx(50 * 2.9 / 3), pytest.approx(50.0)]
    # seed 0 of top2-e2: 5.0 -> 2.4 -> 1.9; 2.1 is 0.3 / 0.5 of the way from 50 to 100
    assert s["points"][1]["steps_to_dense_final"][0] == pytest.approx(80.0)
    # same-seed differences: seed 0 1.5 - 2.0, seed 1 1.6 - 2.2
    assert s["points"][2]["paired_minus_dense"]["mean"] == pytest.approx((-0.5 - 0.6) / 2)
    assert s["points"][2]["paired_minus_dense"]["spread"] == pytest.approx(0.1)
    gaps = doubling_gaps(s["points"], 2)
    assert [(g["from"], g["to"]) for g in gaps] == [(1, 2), (2, 4)]
    assert gaps[0]["drop"] == pytest.approx(2.1 - 1.925)
    assert not gaps[0]["drop_exceeds_spread"]  # dense's spread 0.2 > drop 0.175
    assert gaps[1]["drop_exceeds_spread"]  # 0.375 > 0.1
    text = "\n".join(targets(s, [2]))
    assert "monotonic: yes" in text and "1/3" in text and "0.49x dense's 100" in text
    # one seed has no spread: the comparison is unknown, not "above a spread of 0"
    one = summarize([r for r in runs if r["seed"] == 0], ["dense", "top2-e2", "top2-e4"])
    assert [g["drop_exceeds_spread"] for g in doubling_gaps(one["points"], 2)] == [None, None]
    assert "0/3 (spread unknown for some)" in "\n".join(targets(one, [2]))


def test_a_sweep_without_its_dense_run_says_so_not_that_no_seed_reached_it(tmp_path,
                                                                           monkeypatch):
    """--variants / --report-only without 'dense' cached: the table had read "0/2 seeds
    reach it" and speedup.png had marked every point as not reached."""
    pytest.importorskip("matplotlib")
    from moekit.train.plots import plot_speedup
    from moekit.train.scaling import table

    runs = [fake_run("top2-e4", 2, 4, s, v) for s, v in ((0, 1.5), (1, 1.6))]
    s = summarize(runs, ["dense", "top2-e4"])
    assert s["dense_final_val_loss"] is None
    row = next(ln for ln in table(s).splitlines() if ln.startswith("| top2-e4 |"))
    assert "| no dense run |" in row and "reach" not in row, row
    import matplotlib.pyplot as plt
    seen = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        seen["ax"] = fig.axes[0]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot_speedup(s, tmp_path / "speedup.png")
    ax = seen["ax"]
    assert not ax.lines and not ax.collections  # no point claims a reached / missed target
    assert any("no dense run" in t.get_text() for t in ax.texts)
    assert (tmp_path / "speedup.png").read_bytes().startswith(PNG_MAGIC)


def test_one_expert_switch_lm_is_the_dense_lm_without_router_losses():
    """The curve's E=1 point: with the same weights, a 1-expert top-1 (Switch) LM has
    the dense LM's loss and gradients; only its router losses (z-loss on one logit)
    can make it train differently."""
    import torch

    base = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16, ffn_dim=8,
                    num_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0)
    configs = scaling_variants(base, 48, [1], [1])
    torch.manual_seed(0)
    dense, moe = MoETransformer(configs["dense"]), MoETransformer(configs["top1-e1"])
    dense_params = dict(dense.named_parameters())

    def dense_twin(name):  # experts hold [E, D, 2A] and [E, A, D]; nn.Linear the transpose
        for ours, theirs in (("experts.w_in", "w_in.weight"), ("experts.w_out", "w_out.weight")):
            if ours in name:
                return dense_params[name.replace(ours, theirs)], lambda t: t.T[None]
        return dense_params[name], lambda t: t

    with torch.no_grad():
        for name, p in moe.named_parameters():
            if "router" not in name:
                twin, as_moe = dense_twin(name)
                p.copy_(as_moe(twin))
    ids_BL = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    out_d, out_m = dense(ids_BL[:, :-1], ids_BL[:, 1:]), moe(ids_BL[:, :-1], ids_BL[:, 1:])
    torch.testing.assert_close(out_m.loss, out_d.loss, atol=1e-6, rtol=1e-5)
    assert float(out_m.aux_loss.detach()) == 0.0
    out_d.loss.backward()
    (out_m.loss + out_m.aux_loss).backward()
    for name, p in moe.named_parameters():
        if "router" in name:  # softmax over one expert is 1: no gradient reaches it
            assert p.grad is None or float(p.grad.abs().max()) == 0.0
            continue
        twin, as_moe = dense_twin(name)
        torch.testing.assert_close(p.grad, as_moe(twin.grad), atol=1e-6, rtol=1e-4)


def test_report_only_on_an_empty_out_says_so(tmp_path, corpus_dir, capsys):
    rc = cli_main(["scaling", "--preset", "tiny", "--data", str(corpus_dir), "--report-only",
                   "--expert-counts", "2", "--out", str(tmp_path / "empty")])
    assert rc == 2
    assert "holds no finished runs" in capsys.readouterr().err


def test_cached_runs_of_another_corpus_are_refused(tmp_path, corpus_dir, capsys):
    """The cache checked the model and train configs but not --data: a sweep rerun on
    another corpus into the same --out reported the first corpus's runs as its own."""
    other = tmp_path / "other.txt"
    other.write_text("while True:\n    pass\n" * 200)
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--seeds", "0",
            "--top-ks", "2", "--variants", "dense", "--out", str(out), "--no-progress"]
    assert cli_main([*argv, "--data", str(corpus_dir)]) == 0
    capsys.readouterr()
    assert cli_main([*argv, "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "dense-seed0 was trained on" in err and str(corpus_dir) in err, err
    assert "--data" in err and "new --out" in err, err
    # the same corpus still reads the cache
    assert cli_main([*argv, "--data", str(corpus_dir), "--report-only"]) == 0


def test_a_run_result_is_written_whole_or_not_at_all(tmp_path, corpus_dir, capsys,
                                                     monkeypatch):
    """result.json is written beside itself and renamed: a run stopped while writing it
    leaves no result (the run trains again), not broken JSON; one broken anyway (written
    before this) is named with what to do, not a JSONDecodeError."""
    import os

    from moekit.train import compare

    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--seeds", "0",
            "--top-ks", "2", "--variants", "dense", "--out", str(out), "--no-progress",
            "--data", str(corpus_dir)]

    real = os.replace

    def killed(src, dst):  # the run is stopped as it renames its result into place
        if os.path.basename(dst) == compare.RESULT:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    assert cli_main(argv) != 0
    run = out / "dense-seed0"
    assert not (run / compare.RESULT).exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(f".{compare.RESULT}")]
    monkeypatch.setattr(os, "replace", real)
    capsys.readouterr()
    assert cli_main(argv) == 0  # trains it again and caches it whole
    assert json.loads((run / compare.RESULT).read_text())["variant"] == "dense"
    (run / compare.RESULT).write_text('{"variant": "dense", "val_')
    capsys.readouterr()
    assert cli_main([*argv, "--report-only"]) != 0
    err = capsys.readouterr().err
    assert "result.json is not readable JSON" in err and "delete it" in err, err


def _sweep(corpus_dir, out, steps=4) -> list[str]:
    return ["compare", "--preset", "tiny", "--data", str(corpus_dir), "--steps", str(steps),
            "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--seeds", "0", "--top-ks", "2", "--variants", "dense",
            "--out", str(out), "--no-progress"]


def _stop_after_step(monkeypatch, step: int, stop) -> None:
    """``stop()`` once, right after training step ``step`` of the next run."""
    from moekit.train.trainer import Trainer
    real, done = Trainer.run_step, []

    def run_step(self, log):
        res = real(self, log)
        if self.step == step and not done:
            done.append(True)
            stop()
        return res
    monkeypatch.setattr(Trainer, "run_step", run_step)


def _kinds_steps(run) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads,
            (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] != "train"]


def test_an_interrupted_sweep_run_resumes_from_its_checkpoint(tmp_path, corpus_dir, capsys,
                                                              monkeypatch):
    """The sweep run again had started the interrupted run over, appending to its
    metrics.jsonl (two runs in one file); it resumes from the checkpoint Ctrl-C saved,
    and ends where an uninterrupted sweep does."""
    import os
    import signal

    out = tmp_path / "cut"
    _stop_after_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert cli_main(_sweep(corpus_dir, out)) == 130
    run = out / "dense-seed0"
    assert (run / "LATEST").read_text().strip() == "step_00000002"
    monkeypatch.undo()
    capsys.readouterr()
    assert cli_main(_sweep(corpus_dir, out)) == 0
    assert "resuming the interrupted run at step 2" in capsys.readouterr().out
    assert _kinds_steps(run) == [("val", 0), ("val", 2), ("resume", 2), ("val", 4)]
    assert cli_main(_sweep(corpus_dir, tmp_path / "whole")) == 0
    cut = json.loads((run / compare.RESULT).read_text())
    whole = json.loads((tmp_path / "whole" / "dense-seed0" / compare.RESULT).read_text())
    for key in ("step_curve", "curve", "val_loss", "tokens", "steps"):
        assert cut[key] == whole[key], key  # bit-exact on CPU


def test_an_interrupted_run_without_a_checkpoint_starts_over_clean(tmp_path, corpus_dir,
                                                                   capsys, monkeypatch):
    """Stopped before its first save (a second Ctrl-C), the run trains again from step 0
    with a metrics.jsonl of its own, not appended to the abandoned one's."""
    out = tmp_path / "cut"

    def second_ctrl_c():
        raise KeyboardInterrupt

    _stop_after_step(monkeypatch, 1, second_ctrl_c)
    assert cli_main(_sweep(corpus_dir, out)) == 130
    run = out / "dense-seed0"
    assert not (run / "LATEST").exists() and (run / "metrics.jsonl").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert cli_main(_sweep(corpus_dir, out)) == 0
    assert "left no checkpoint: it starts over" in capsys.readouterr().out
    assert _kinds_steps(run) == [("val", 0), ("val", 2), ("val", 4)]
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
            .splitlines()) if r["kind"] == "train"] == [1]  # log_every 10: step 1, once


def test_an_interrupted_run_with_other_settings_is_refused(tmp_path, corpus_dir, capsys,
                                                           monkeypatch):
    import os
    import signal

    out = tmp_path / "cut"
    _stop_after_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert cli_main(_sweep(corpus_dir, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    before = sorted(p.name for p in (out / "dense-seed0").iterdir())
    assert cli_main(_sweep(corpus_dir, out, steps=6)) == 2
    printed, err = capsys.readouterr()
    assert "plan:" not in printed  # refused before the plan is printed
    assert "dense-seed0 was started (interrupted at step 2) with steps=4, not steps=6" in err
    assert "new --out" in err
    assert sorted(p.name for p in (out / "dense-seed0").iterdir()) == before


def test_a_run_resumed_at_its_last_step_reports_its_final_validation(tmp_path, corpus_dir,
                                                                     capsys, monkeypatch):
    """Killed after its last save, before result.json: the run is resumed at its last
    step (no step to train) and its result holds the whole curve and the final loss; a
    final validation line lost with the kill is measured again."""
    import os

    out = tmp_path / "cut"
    real = os.replace

    def killed(src, dst):  # stopped as it renames its result into place
        if os.path.basename(dst) == compare.RESULT:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    assert cli_main(_sweep(corpus_dir, out)) == 130
    monkeypatch.undo()
    run = out / "dense-seed0"
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["kind"] == "val"
    (run / "metrics.jsonl").write_text("".join(lines[:-1]))  # the last line never landed
    assert cli_main(_sweep(corpus_dir, out)) == 0
    assert _kinds_steps(run) == [("val", 0), ("val", 2), ("resume", 4), ("val", 4)]
    assert cli_main(_sweep(corpus_dir, tmp_path / "whole")) == 0
    capsys.readouterr()
    cut = json.loads((run / compare.RESULT).read_text())
    whole = json.loads((tmp_path / "whole" / "dense-seed0" / compare.RESULT).read_text())
    for key in ("step_curve", "val_loss", "tokens", "steps"):
        assert cut[key] == whole[key], key
    assert cut["tokens_per_s"] > 0  # the first session's rate: the second trained no step


def test_a_resumed_run_records_the_wall_time_of_every_session(tmp_path, corpus_dir,
                                                              monkeypatch):
    """A resumed run's wall_s had been its last session's alone: a run cut after step 2
    of 4 reported half its time. A fake clock in the trainer, 10 s a training step and
    nothing else taking time: the cut session's checkpoint records its 20 s, from which
    the resumed session goes on."""
    import os
    import signal
    import types

    import moekit.train.trainer as trainer_mod
    from moekit.train.trainer import Trainer

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer_mod, "time",
                        types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    real = Trainer.run_step

    def run_step(self, log):
        clock["now"] += 10.0
        return real(self, log)
    monkeypatch.setattr(Trainer, "run_step", run_step)
    _stop_after_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    out = tmp_path / "cut"
    assert cli_main(_sweep(corpus_dir, out)) == 130
    run = out / "dense-seed0"
    assert json.loads((run / "step_00000002" / "state.json").read_text())["wall_s"] == 20.0
    assert cli_main(_sweep(corpus_dir, out)) == 0  # resumed at step 2 (the stop was once)
    assert json.loads((run / compare.RESULT).read_text())["wall_s"] == 40.0


def _disk_fills_writing(monkeypatch, owner, attr: str, name: str) -> None:
    """``owner.attr`` (a writer called as ``(what, path, ...)``: a method, or
    ``save_file(tensors, path)``) writes a few bytes, then the disk is full, for a path
    whose name holds ``name``; other paths are written."""
    real = getattr(owner, attr)

    def half(what, path, *args, **kwargs):
        if name not in str(path):
            return real(what, path, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(owner, attr, half)


def test_compare_onto_a_full_disk_keeps_what_was_written_before(tmp_path, corpus_dir,
                                                                 capsys, monkeypatch):
    """A sweep whose save hit a full disk ended in a traceback, and a report rerun cut
    compare.md's PNGs where good ones were; now one line, the cached runs and the last
    report stay as they were, and the same command finishes the sweep."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    import moekit.train.checkpoint as ckpt_mod
    out = tmp_path / "cmp"
    argv = dense_only = _sweep(corpus_dir, out, steps=2)
    with_moe = [*argv[:argv.index("--variants") + 1], "dense", "moe-top2",
                *argv[argv.index("--variants") + 2:]]
    assert cli_main(dense_only) == 0
    cached = (out / "dense-seed0" / compare.RESULT).read_bytes()
    capsys.readouterr()
    _disk_fills_writing(monkeypatch, ckpt_mod, "save_file", "model.safetensors")
    assert cli_main(with_moe) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"moekit compare: error: could not write to {out}: No space left "
                          f"on device; the runs that finished are cached in {out}"), err
    assert (out / "dense-seed0" / compare.RESULT).read_bytes() == cached
    assert not (out / "moe-top2-seed0" / compare.RESULT).exists()
    assert cli_main(with_moe) == 0  # the same command trains the rest
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"compare.md", "val_loss.png", "expert_load_moe-top2.png"} <= set(before)
    capsys.readouterr()
    _disk_fills_writing(monkeypatch, Figure, "savefig", "expert_load")
    assert cli_main([*with_moe, "--report-only"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"moekit compare: error: could not write to {out}: No space left "
                       "on device"), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_write_failing_before_any_run_finished_says_none_did(tmp_path, corpus_dir,
                                                               capsys, monkeypatch):
    """The first run's first save hit a full disk: the one line said 'the runs that
    finished are cached in OUT' when none had finished."""
    import moekit.train.checkpoint as ckpt_mod
    out = tmp_path / "cmp"
    _disk_fills_writing(monkeypatch, ckpt_mod, "save_file", "model.safetensors")
    assert cli_main(_sweep(corpus_dir, out, steps=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"moekit compare: error: could not write to {out}: No space left "
                          f"on device; no run has finished in {out} yet; the same command "
                          "trains the rest"), err
    assert "cached" not in err, err


def test_scaling_onto_a_full_disk_keeps_the_summary_there_before(tmp_path, corpus_dir,
                                                                capsys, monkeypatch):
    """scaling.json was written in place: a full disk cut it (and a traceback)."""
    from pathlib import Path
    out = tmp_path / "scaling"
    argv = ["scaling", "--preset", "tiny", "--data", str(corpus_dir), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "1", "--eval-batches",
            "1", "--seeds", "0", "--expert-counts", "2", "--top-ks", "1", "--out", str(out),
            "--no-progress"]
    assert cli_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "scaling.json" in before
    capsys.readouterr()
    write_text = Path.write_text

    def cut(self, data, *args, **kwargs):
        if "scaling.json" not in self.name:
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut)
    assert cli_main([*argv, "--report-only"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"moekit scaling: error: could not write to {out}: No space left "
                       "on device"), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert json.loads((out / "scaling.json").read_text())["points"]


def test_a_warmup_longer_than_the_run_is_warned_once_per_command(tmp_path, corpus_dir,
                                                                  capsys):
    """Each run's Trainer warned again: a sweep of dense and moe-top2 printed the same
    line twice. One warning for the command; none when every run is cached."""
    import warnings

    argv = _sweep(corpus_dir, tmp_path / "cmp", steps=2)
    argv[argv.index("--warmup") + 1] = "5"
    argv[argv.index("--variants") + 1:argv.index("--variants") + 2] = ["dense", "moe-top2"]
    with pytest.warns(UserWarning) as caught:
        assert cli_main(argv) == 0
    short = [w for w in caught if "warmup_steps=5 is longer than steps=2" in str(w.message)]
    assert len(short) == 1, [str(w.message) for w in caught]
    assert "== moe-top2 seed 0" in capsys.readouterr().out  # both runs trained
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert cli_main(argv) == 0
    assert not [w for w in again if "warmup_steps" in str(w.message)]


def test_a_cached_run_with_other_settings_is_refused_before_the_plan(tmp_path, corpus_dir,
                                                                      capsys, monkeypatch):
    """The plan line ('0 run(s) to train, 1 cached') was printed, then the cached run was
    refused for its other --steps; the refusal now comes first, and no run trains (seed
    0's moe-top2 had trained before seed 1's cached dense run was refused)."""
    out = tmp_path / "cmp"
    first = _sweep(corpus_dir, out, steps=2)
    first[first.index("--seeds") + 1] = "1"
    assert cli_main(first) == 0
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a run trained before the cached one was refused")

    monkeypatch.setattr(compare, "Trainer", no_training)
    argv = _sweep(corpus_dir, out, steps=3)
    argv[argv.index("--seeds") + 1:argv.index("--seeds") + 2] = ["0", "1"]
    argv[argv.index("--variants") + 1:argv.index("--variants") + 2] = ["moe-top2", "dense"]
    assert cli_main(argv) == 2
    printed, err = capsys.readouterr()
    assert "plan:" not in printed and "cached" not in printed, printed
    assert "dense-seed1 was trained with steps=2, not steps=3" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "dense-seed1",
                                                     "val_loss.png"]


def test_a_report_removes_the_expert_load_plots_of_variants_it_does_not_hold(
        tmp_path, corpus_dir, capsys):
    """A sweep with other --top-ks into a used --out left expert_load_moe-top2.png beside
    a report without moe-top2; only files named expert_load_<variant>.png are removed."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    argv = _sweep(corpus_dir, out, steps=2)
    argv[argv.index("--variants") + 1:argv.index("--variants") + 2] = ["dense", "moe-top2"]
    assert cli_main(argv) == 0
    assert (out / "expert_load_moe-top2.png").is_file()
    keep = ["expert_load_notes.txt", "my_expert_load_x.png", "expert_load_moe-top2.png.bak"]
    for name in keep:
        (out / name).write_text("mine\n")
    capsys.readouterr()
    v = argv.index("--variants")
    top1 = [*argv[:v], *argv[v + 3:]]  # every variant of --top-ks 1
    top1[top1.index("--top-ks") + 1] = "1"
    assert top1[-3:-1] == ["--out", str(out)]
    assert cli_main(top1) == 0  # dense from cache, moe-top1 trained
    printed = capsys.readouterr().out
    assert "| moe-top2 |" not in printed and "| moe-top1 |" in printed
    assert not (out / "expert_load_moe-top2.png").exists()
    assert f"removed {out / 'expert_load_moe-top2.png'}" in printed
    assert (out / "expert_load_moe-top1.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "moe-top2-seed0" / compare.RESULT).is_file()  # the run stays cached
    for name in keep:
        assert (out / name).read_text() == "mine\n"


def test_scaling_md_and_json_are_written_both_or_neither(tmp_path, monkeypatch):
    """They were two write_whole calls: a full disk at scaling.json, after scaling.md was
    renamed in, left a new report beside the old numbers."""
    import os
    from pathlib import Path

    from moekit.train import scaling

    (tmp_path / "scaling.md").write_text("old report\n")
    (tmp_path / "scaling.json").write_text('{"old": 1}')
    write_text = Path.write_text

    def full_at_json(self, data, *args, **kwargs):
        if "scaling.json" in self.name:
            raise OSError(28, "No space left on device")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_json)
    with pytest.raises(OSError, match="No space"):
        scaling.write_outputs({"new": 1}, "new report", tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "scaling.md").read_text() == "old report\n"
    assert json.loads((tmp_path / "scaling.json").read_text()) == {"old": 1}
    assert sorted(os.listdir(tmp_path)) == ["scaling.json", "scaling.md"]
