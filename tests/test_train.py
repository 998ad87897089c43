"""Trainer, data and checkpoints on tiny configs (seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.models import LMConfig, MoETransformer
from moekit.train import (
    CheckpointError,
    CollapseMonitor,
    NonFiniteError,
    RouterCollapseWarning,
    TrainConfig,
    Trainer,
    decode,
    encode,
    load_checkpoint,
    load_corpus,
    lr_at,
    make_optimizer,
    read_metrics,
    restore,
    sample_windows,
)
from moekit.train import checkpoint as ckpt_io
from moekit.train.data import list_files, stdlib_dir
from moekit.train.interrupt import Interrupted, InterruptFlag, exit_status

MODEL = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32, ffn_dim=16,
                 num_experts=4, top_k=2)
TRAIN = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
                    eval_every=6, eval_batches=2, save_every=6, log_every=1, seed=3)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):  # enough files that the hash split puts some in validation
        (root / f"mod_{i:02d}.py").write_text(TEXT * (3 + i % 5) + f"# file {i}\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skip.py").write_text("never read\n")
    return root


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return load_corpus(str(corpus_dir), val_percent=20)


def fit(tmp_path, corpus, model=MODEL, train=TRAIN, **kw):
    trainer = Trainer(model, train, corpus, tmp_path, progress=False, **kw)
    trainer.fit()
    return trainer


def train_losses(history):
    return [(r["step"], r["loss"]) for r in history if r["kind"] == "train"]


# -- data ------------------------------------------------------------------------


def test_corpus_split_is_by_file_deterministic_and_complete(corpus_dir, corpus):
    files = list_files(corpus_dir, frozenset({".py"}))
    assert all("site-packages" not in str(p) for p in files) and len(files) == 40
    total = sum(p.stat().st_size + 1 for p in files)  # each file + a newline
    assert corpus.train.numel() + corpus.val.numel() == total
    assert corpus.val_files > 0 and corpus.train_files + corpus.val_files == 40
    again = load_corpus(str(corpus_dir), val_percent=20)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)


def test_stdlib_is_the_default_source():
    files = list_files(stdlib_dir(), frozenset({".py"}))
    assert len(files) > 500
    assert not any("site-packages" in p.parts for p in files)


def test_bytes_round_trip_and_windows_shift_by_one():
    text = "héllo, wörld"
    assert decode(encode(text)) == text
    data = torch.arange(200, dtype=torch.uint8)
    ids, tgt = sample_windows(data, 3, 10, seed=5)
    assert torch.equal(ids[:, 1:], tgt[:, :-1])
    assert torch.equal(tgt - ids, torch.ones_like(ids))  # consecutive bytes
    again = sample_windows(data, 3, 10, seed=5)
    assert torch.equal(again[0], ids)


def test_bad_data_arguments():
    with pytest.raises(ValueError, match="data="):
        load_corpus("/no/such/place")
    with pytest.raises(ValueError, match="val_percent"):
        load_corpus(None, val_percent=0)


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", -1), ("grad_accum", 65), ("lr", float("nan")),
    ("beta2", 1.5), ("warmup_steps", -1), ("max_bad_steps", 0), ("seed", -3),
])
def test_bad_train_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_seq_len_longer_than_model_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        Trainer(MODEL, TRAIN.replace(seq_len=64), corpus, tmp_path)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


# -- training ---------------------------------------------------------------------


def test_loss_decreases(tmp_path, corpus):
    trainer = fit(tmp_path, corpus, train=TRAIN.replace(steps=30, eval_every=30))
    vals = [r["val_loss"] for r in trainer.history if r["kind"] == "val"]
    assert vals[0] > 5.0  # ~ln(256) = 5.55 at init
    assert vals[-1] < vals[0] - 1.0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert {"train", "val"} <= {r["kind"] for r in records}
    assert all(len(r["expert_load"]) == 2 for r in records if r["kind"] == "val"
               and "expert_load" in r)


def test_tokens_per_s_counts_training_steps_after_the_first(tmp_path, corpus, monkeypatch):
    """A fake clock: validation, checkpoints and the first step (where a fresh machine
    builds the C++ kernels) take long; the reported rate is the later steps' alone."""
    import moekit.train.trainer as trainer_mod

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock["now"])
    trainer = Trainer(MODEL, TRAIN.replace(steps=4, eval_every=2, save_every=2), corpus,
                      tmp_path, progress=False)
    real_step, real_validate, real_save = trainer.step_once, trainer.validate, trainer.save
    seconds = iter([40.0, 0.5, 0.5, 0.5])  # the first step's build, then 0.5 s a step

    def step_once():
        clock["now"] += next(seconds)
        return real_step()

    def slow(fn):
        def call(*a, **k):
            clock["now"] += 7.0
            return fn(*a, **k)
        return call

    monkeypatch.setattr(trainer, "step_once", step_once)
    monkeypatch.setattr(trainer, "validate", slow(real_validate))
    monkeypatch.setattr(trainer, "save", slow(real_save))
    summary = trainer.fit()
    tokens = TRAIN.batch_size * TRAIN.seq_len
    assert summary["tokens_per_s"] == pytest.approx(tokens / 0.5)
    assert summary["seconds"] == pytest.approx(40.0 + 3 * 0.5 + 3 * 7.0 + 2 * 7.0)
    rates = [r["tokens_per_s"] for r in trainer.history if r["kind"] == "train"]
    assert rates == pytest.approx([tokens / 40.0] + [tokens / 0.5] * 3)


def poison_embedding(model, calls):
    """Forward hook: NaN out the embedding on the given (0-based) forward calls."""
    count = {"n": 0}

    def hook(module, inputs, output):
        count["n"] += 1
        return output * float("nan") if count["n"] - 1 in calls else output

    return model.embed.register_forward_hook(hook)


def test_nan_batch_is_skipped_and_logged(tmp_path, corpus):
    trainer = Trainer(MODEL.replace(bias_update_rate=0.01), TRAIN.replace(steps=6), corpus,
                      tmp_path, progress=False)
    # forwards 0 and 1 are the first validation's two batches: call 5 is step 4
    poison_embedding(trainer.model, calls={TRAIN.eval_batches + 3})
    trainer.fit()
    assert trainer.counters["skipped_steps"] == 1
    skips = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [4]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skipped_step_changes_nothing(tmp_path, corpus):
    trainer = Trainer(MODEL.replace(bias_update_rate=0.01), TRAIN, corpus, tmp_path,
                      progress=False)
    handle = poison_embedding(trainer.model, calls={0})
    from moekit.train.monitor import MetricsLog
    log = MetricsLog(tmp_path, tensorboard=False)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    res = trainer.run_step(log)
    log.close()
    handle.remove()
    assert res.skipped
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights, expert bias and loads untouched
    assert not trainer.optimizer.state  # AdamW never stepped


def test_too_many_bad_steps_stop_with_clear_error(tmp_path, corpus):
    trainer = Trainer(MODEL, TRAIN.replace(save_every=2, max_bad_steps=3), corpus, tmp_path,
                      progress=False)
    poison_embedding(trainer.model, calls=set(range(5, 100)))  # bad from step 4 on
    with pytest.raises(NonFiniteError, match="3 consecutive .*step_00000002"):
        trainer.fit()
    assert load_checkpoint(tmp_path).step == 2  # step 4 was skipped, so it was not saved


@pytest.mark.parametrize("model", [
    MODEL.replace(bias_update_rate=0.01),  # the selection bias is trainer-driven state
    MODEL.replace(router="noisy_topk"),  # routing noise draws from the torch RNG
])
def test_resume_matches_uninterrupted_run(tmp_path, corpus, model):
    train = TRAIN.replace(steps=8, grad_accum=2, eval_every=4, save_every=4)
    full = fit(tmp_path / "full", corpus, model=model, train=train)
    first = Trainer(model, train, corpus, tmp_path / "cut", progress=False)
    from moekit.train.monitor import MetricsLog
    log = MetricsLog(tmp_path / "cut", tensorboard=False)
    first.validate(log)
    for _ in range(4):
        first.run_step(log)
    log.close()
    first.save()
    del first
    resumed = Trainer.resume(tmp_path / "cut", corpus, progress=False)
    assert resumed.step == 4
    resumed.fit()
    expected = [x for x in train_losses(full.history) if x[0] > 4]
    assert train_losses(resumed.history) == expected  # bit-exact on CPU
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


# -- checkpoints -------------------------------------------------------------------


def trained(tmp_path, corpus, steps=3):
    trainer = Trainer(MODEL.replace(bias_update_rate=0.01), TRAIN.replace(steps=steps),
                      corpus, tmp_path, progress=False)
    trainer.fit()
    return trainer


def test_checkpoint_round_trip_is_exact(tmp_path, corpus):
    trainer = trained(tmp_path, corpus)
    ck = load_checkpoint(tmp_path)
    model = MoETransformer(LMConfig.from_dict(ck.state["model_config"]))
    optimizer = make_optimizer(model, TRAIN)
    restore(ck, model, optimizer)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert model.head.weight is model.embed.weight  # still tied
    a, b = trainer.optimizer.state_dict(), optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx, entry in a["state"].items():
        for name, t in entry.items():
            assert torch.equal(t, b["state"][idx][name]), (idx, name)
    assert ck.state["counters"]["tokens"] == 3 * TRAIN.batch_size * TRAIN.seq_len


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, corpus, monkeypatch):
    trainer = trained(tmp_path, corpus)
    real_save = ckpt_io.save_file

    def crash_mid_write(tensors, path):
        if path.endswith(ckpt_io.OPTIM_FILE):
            Path(path).write_bytes(b"\x00" * 10)  # a partial file, then the "crash"
            raise OSError("disk full (simulated)")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_io, "save_file", crash_mid_write)
    trainer.step = 99
    with pytest.raises(OSError, match="simulated"):
        trainer.save()
    assert load_checkpoint(tmp_path).step == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # temp dir cleaned up


def corrupt_truncate(ck: Path):
    f = ck / ckpt_io.MODEL_FILE
    f.write_bytes(f.read_bytes()[:-100])


def corrupt_flip(ck: Path):
    f = ck / ckpt_io.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def corrupt_json(ck: Path):
    (ck / ckpt_io.STATE_FILE).write_text("{not json")


def corrupt_missing(ck: Path):
    (ck / ckpt_io.OPTIM_FILE).unlink()


@pytest.mark.parametrize("damage,message", [
    (corrupt_truncate, "corrupt or truncated"), (corrupt_flip, "corrupt or truncated"),
    (corrupt_json, "state.json is corrupt"),  # the manifest covers state.json too
    (corrupt_missing, "missing"),
])
def test_bad_checkpoint_gives_named_error(tmp_path, corpus, damage, message):
    trained(tmp_path, corpus)
    damage(tmp_path / "step_00000003")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_mismatched_checkpoint_leaves_model_untouched(tmp_path, corpus):
    trained(tmp_path, corpus)
    ck = load_checkpoint(tmp_path)
    other = MoETransformer(MODEL.replace(num_experts=8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not match the model"):
        restore(ck, other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint="):
        load_checkpoint(tmp_path / "nothing")


def test_keeps_only_the_newest_checkpoints(tmp_path, corpus):
    trainer = Trainer(MODEL, TRAIN.replace(steps=8, save_every=2, keep_checkpoints=2),
                      corpus, tmp_path, progress=False)
    trainer.fit()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006",
                                                               "step_00000008"]
    assert (tmp_path / "LATEST").read_text().strip() == "step_00000008"


# -- health --------------------------------------------------------------------------


def test_router_collapse_warns_with_layer_and_experts():
    monitor = CollapseMonitor(fraction=0.9, patience=3)
    load = torch.tensor([[10, 10, 10, 10], [0, 95, 5, 0]])  # layer 1: expert 1 hot, 0/3 cold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            messages = monitor.update(load, tokens=100)
    assert any("layer 1" in m and "[1]" in m and "took" in m for m in messages)
    assert any("layer 1" in m and "[0, 3]" in m and "no tokens" in m for m in messages)
    assert all(issubclass(w.category, RouterCollapseWarning) for w in caught)
    assert monitor.update(load, tokens=100) == []  # warned once per episode


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (2, 2), (4, 8)])
def test_router_collapse_not_claimed_when_every_expert_must_take_every_token(num_experts, top_k):
    """E <= K: every token goes to every expert (a 1-expert Switch layer is dense)."""
    monitor = CollapseMonitor(fraction=0.9, patience=2, top_k=top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            assert monitor.update(torch.full((2, num_experts), 100), tokens=100) == []
    hot = CollapseMonitor(fraction=0.9, patience=2, top_k=1)  # same loads, E > K: collapse
    with pytest.warns(RouterCollapseWarning):
        for _ in range(2):
            hot.update(torch.tensor([[100, 0, 0]]), tokens=100)


# -- command line ----------------------------------------------------------------------


def test_cli_train_then_generate(tmp_path, corpus_dir, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--preset", "tiny", "--data", str(corpus_dir), "--steps", "4",
                   "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
                   "--eval-batches", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "validation loss" in capsys.readouterr().out
    rc = cli_main(["generate", "--checkpoint", str(out), "--prompt", "def ",
                   "--max-new-tokens", "10", "--top-k", "20", "--top-p", "0.9"])
    text = capsys.readouterr().out
    assert rc == 0 and text.startswith("def ") and len(text) > 10
    rc = cli_main(["train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(out)])
    assert rc == 2 and "--resume" in capsys.readouterr().err  # never mixes two runs
    rc = cli_main(["generate", "--checkpoint", str(tmp_path / "nope")])
    assert rc == 1 and "checkpoint" in capsys.readouterr().err  # a missing checkpoint
    state = json.loads((out / "step_00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["model_config"]["dim"] == 32


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "moekit.train", "--help"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.returncode == 0 and "--resume" in done.stdout


def test_bf16_autocast_trains(tmp_path, corpus):
    trainer = fit(tmp_path, corpus, train=TRAIN.replace(steps=3, bf16=True))
    assert trainer.counters["skipped_steps"] == 0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_cli_compare_writes_table_and_plots(tmp_path, corpus_dir, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    rc = cli_main(["compare", "--preset", "tiny", "--data", str(corpus_dir), "--steps", "2",
                   "--batch-size", "2", "--seq-len", "16", "--eval-every", "1",
                   "--eval-batches", "1", "--seeds", "0", "1", "--top-ks", "2", "1",
                   "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    for name in ("dense", "moe-top2", "moe-top1"):
        assert f"| {name} |" in text
    assert (out / "val_loss.png").stat().st_size > 1000
    assert (out / "expert_load_moe-top2.png").exists()
    results = [json.loads((out / f"{v}-seed0" / "result.json").read_text())
               for v in ("dense", "moe-top1")]
    # equal active FFN width: active params differ only by the routers' D x E weights
    assert results[1]["active_params"] - results[0]["active_params"] == 2 * 32 * 4


def _ctrl_c_in_step_3(trainer: Trainer, presses: int) -> None:
    """Run ``trainer.fit()`` pressing Ctrl-C ``presses`` times during step 3's forward."""
    calls = {"n": 0}

    def press(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == TRAIN.eval_batches + 3:  # the validation's batches, then steps
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    handle = trainer.model.embed.register_forward_hook(press)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    handle.remove()


def test_ctrl_c_finishes_the_step_saves_and_resumes(tmp_path, corpus):
    trainer = Trainer(MODEL, TRAIN, corpus, tmp_path, progress=False)
    _ctrl_c_in_step_3(trainer, presses=1)
    assert trainer.step == 3  # the step in flight was completed, not torn
    assert load_checkpoint(tmp_path).step == 3
    resumed = Trainer.resume(tmp_path, corpus, progress=False)
    assert resumed.fit()["step"] == TRAIN.steps


def test_second_ctrl_c_stops_at_once_and_saves_nothing(tmp_path, corpus):
    """A second Ctrl-C can land between the optimizer's update and the step counter:
    fit stops there and writes no checkpoint (one could hold part of step 3's update
    labelled step 2)."""
    trainer = Trainer(MODEL, TRAIN, corpus, tmp_path, progress=False)
    _ctrl_c_in_step_3(trainer, presses=2)
    assert trainer.step == 2  # step 3 never completed
    assert trainer.last_checkpoint is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("step_")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_finishes_the_step_saves_and_restores_the_handler(tmp_path, corpus):
    """SIGTERM (a scheduler's, ``timeout``'s, ``kill``'s) had ended a run without a
    checkpoint: it stops like Ctrl-C now, at the step boundary, with LATEST valid."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        mine = signal.getsignal(signal.SIGTERM)
        trainer = Trainer(MODEL, TRAIN, corpus, tmp_path, progress=False)
        calls = {"n": 0}

        def term(module, inputs, output):
            calls["n"] += 1
            if calls["n"] == TRAIN.eval_batches + 3:  # step 3's forward
                os.kill(os.getpid(), signal.SIGTERM)

        trainer.model.embed.register_forward_hook(term)
        with pytest.raises(Interrupted) as stopped:
            trainer.fit()
        assert stopped.value.signum == signal.SIGTERM and exit_status(stopped.value) == 143
        assert received == []  # fit's handler took it, not the one before
        assert signal.getsignal(signal.SIGTERM) is mine  # ... and gave it back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer.step == 3 and load_checkpoint(tmp_path).step == 3
    assert (tmp_path / "LATEST").read_text().strip() == "step_00000003"
    assert Trainer.resume(tmp_path, corpus, progress=False).fit()["step"] == TRAIN.steps


def test_interrupt_flag_leaves_ignored_signals_and_other_threads_alone():
    """A signal the process ignores (``nohup``, SIGINT of a background job) stays
    ignored; a loop in another thread installs nothing (signal.signal would raise)."""
    import threading

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with InterruptFlag():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = []

    def in_thread():
        with InterruptFlag() as flag:
            seen.append(flag.previous)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert seen == [{}]


def test_cli_train_sigterm_saves_one_line_and_exits_143(tmp_path, corpus_dir):
    """As a user sees it: `moekit train` killed with SIGTERM saves at the step boundary,
    says so on one line, and exits 143 (128 + SIGTERM, what a shell reports)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moekit.cli", "train", "--preset", "tiny", "--data",
         str(corpus_dir), "--steps", "100000", "--warmup", "1", "--batch-size", "2",
         "--seq-len", "16", "--eval-every", "100000", "--eval-batches", "1",
         "--save-every", "100000", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and '"kind": "train"' not in (
                metrics.read_text() if metrics.exists() else ""):
            time.sleep(0.2)  # wait for the first logged step (no timing is asserted)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    stopped = [line for line in stdout.splitlines() if "interrupted at step" in line]
    assert len(stopped) == 1 and "(SIGTERM): saved" in stopped[0], stdout
    assert f"resume with: moekit train --resume {out}" in stdout
    assert "Traceback" not in stderr, stderr
    ck = load_checkpoint(out)  # LATEST names a whole checkpoint
    assert ck.step >= 1 and stopped[0].endswith(str(out / f"step_{ck.step:08d}"))


def test_single_text_file_validates_on_its_tail(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(32, 127)) * 20)  # 1900 bytes
    corpus = load_corpus(str(path), val_percent=10)
    assert corpus.train.numel() == 1710  # 90% of the 1900 bytes + the appended newline
    assert torch.equal(torch.cat([corpus.train, corpus.val])[:-1],
                       torch.tensor(list(path.read_bytes()), dtype=torch.uint8))
