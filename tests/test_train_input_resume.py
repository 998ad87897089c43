"""`moekit train --resume`: the run goes on with its own corpus and settings, and its
metrics keep one record per step. Each test failed before its fix.

Before: ``--resume RUN`` without ``--data`` continued a ``--data`` run on the Python
standard library without a word; ``--lr``, ``--batch-size``, ``--preset``, ``--bf16``
and the other settings a resumed run keeps were ignored without a word (the
NonFiniteError message says "lower the learning rate", and ``--resume RUN --lr 1e-4``
trained on at the saved rate); and a run resumed from a checkpoint older than its last
logged step logged those steps a second time, so ``read_metrics`` returned two
validation losses for one step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moekit.cli import main as cli_main
from moekit.models import LMConfig
from moekit.train import TrainConfig, Trainer, load_corpus, read_metrics

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "2", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(the data file, a 2-step run trained on it)."""
    root = tmp_path_factory.mktemp("resume_input")
    data = root / "book.txt"
    data.write_text(TEXT * 60)
    assert cli_main(["train", *TINY, "--data", str(data), "--out", str(root / "run")]) == 0
    return data, root / "run"


@pytest.fixture
def run(tmp_path, saved) -> Path:
    return Path(shutil.copytree(saved[1], tmp_path / "run"))


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def one_error_line(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_resume_without_data_goes_on_with_the_runs_corpus(run, saved, capsys):
    data = saved[0]
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{data}: 1 train files"), out
    state = json.loads((run / "step_00000003" / "state.json").read_text())
    assert state["data"]["corpus"] == str(data)


def test_resume_without_data_whose_corpus_is_gone_is_one_line(run, saved, tmp_path, capsys):
    moved = str(shutil.move(saved[0], tmp_path / "moved.txt"))
    try:
        before = tree(run)
        assert cli_main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 2
        one_error_line(capsys, "resume=", str(saved[0]), "does not exist", "--data")
        assert tree(run) == before
        # naming the corpus where it is now resumes
        assert cli_main(["train", "--resume", str(run), "--steps", "3", "--data", moved,
                         "--no-progress"]) == 0
    finally:
        shutil.move(moved, saved[0])


@pytest.mark.parametrize("argv,shown", [
    (["--lr", "1e-4"], "--lr=0.0001"),
    (["--batch-size", "4"], "--batch-size=4"),
    (["--seq-len", "8"], "--seq-len=8"),
    (["--warmup", "0"], "--warmup=0"),
    (["--seed", "1"], "--seed=1"),
    (["--preset", "tiny"], "--preset=tiny"),
    (["--layers", "1"], "--layers=1"),
    (["--bf16"], "--bf16"),
])
def test_resume_refuses_the_settings_it_keeps(run, saved, argv, shown, capsys):
    before = tree(run)
    rc = cli_main(["train", "--resume", str(run), "--steps", "3", "--data", str(saved[0]),
                   "--no-progress", *argv])
    assert rc == 2
    one_error_line(capsys, shown, "not allowed with --resume", "--steps", "--out")
    assert tree(run) == before  # nothing trained, saved or cleaned


def test_resume_takes_the_flags_it_can_change(run, saved):
    assert cli_main(["train", "--resume", str(run), "--steps", "4", "--eval-every", "1",
                     "--save-every", "1", "--device", "cpu", "--data", str(saved[0]),
                     "--no-progress"]) == 0
    assert (run / "step_00000004").is_dir()


def test_metrics_of_a_run_resumed_from_an_older_checkpoint_have_one_record_per_step(
        tmp_path, saved):
    corpus = load_corpus(str(saved[0]))
    model = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=16,
                     num_experts=4, top_k=2)
    train = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=0, eval_every=2,
                        eval_batches=1, save_every=2, log_every=1, keep_checkpoints=3)
    Trainer(model, train, corpus, tmp_path, progress=False).fit()
    logged = (tmp_path / "metrics.jsonl").read_text()
    # e.g. killed after step 4, before its save: resumed from the step 2 checkpoint
    Trainer.resume(tmp_path / "step_00000002", corpus, progress=False).fit()
    assert (tmp_path / "metrics.jsonl").read_text().startswith(logged)  # nothing lost
    records = read_metrics(tmp_path / "metrics.jsonl")
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), keys
    assert keys == [("val", 0), ("train", 1), ("train", 2), ("val", 2), ("resume", 2),
                    ("train", 3), ("train", 4), ("val", 4)]


def test_resume_from_another_directory_reads_the_runs_corpus(tmp_path, monkeypatch, capsys):
    """A run trained on a relative --data recorded that relative path: resumed from
    another working directory it trained on whatever that name held there."""
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "data").mkdir(parents=True)
    (second / "data").mkdir(parents=True)
    (first / "data" / "book.txt").write_text(TEXT * 60)
    for name in ("x.txt", "y.txt"):  # another corpus under the same relative name
        (second / "data" / name).write_text("other text\n" * 400)
    monkeypatch.chdir(first)
    assert cli_main(["train", *TINY, "--data", "data", "--out", "run"]) == 0
    monkeypatch.chdir(second)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(first / "run"), "--steps", "3",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{first / 'data'}: 1 train files"), out
    state = json.loads((first / "run" / "step_00000003" / "state.json").read_text())
    assert state["data"]["corpus"] == str(first / "data")


def test_resume_with_out_is_refused_not_ignored(run, tmp_path, capsys):
    """--out was ignored with --resume: the run went on in its own directory, and the
    directory the user named was never written."""
    before = tree(run)
    branch = tmp_path / "branch"
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--steps", "3", "--out", str(branch),
                     "--no-progress"]) == 2
    one_error_line(capsys, f"--out={branch}", "--resume", "copy the run directory")
    assert tree(run) == before and not branch.exists()


def test_one_process_resume_refuses_a_run_whose_newest_checkpoint_is_sharded(
        tmp_path, saved, capsys):
    """Rank 0 of a ``--nproc`` run renames ``dcp_step_N`` into place, then writes the
    one-process ``step_N`` and moves LATEST. Killed in between, it leaves LATEST naming
    an older step: a one-process ``--resume RUN`` went back to that step without a word
    and wrote a second, different ``step_N`` beside ``dcp_step_N``."""
    corpus = load_corpus(str(saved[0]))
    model = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=16,
                     num_experts=4, top_k=2)
    train = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0, eval_every=2,
                        eval_batches=1, save_every=1, keep_checkpoints=3)
    run = tmp_path / "run"
    Trainer(model, train, corpus, run, progress=False).fit()
    # the directory that crash leaves: a complete step 2 (manifest.json written last)
    # under the sharded name, LATEST still at step 1
    (run / "step_00000002").rename(run / "dcp_step_00000002")
    (run / "LATEST").write_text("step_00000001\n")
    before = tree(run)
    rc = cli_main(["train", "--resume", str(run), "--steps", "3", "--data", str(saved[0]),
                   "--no-progress"])
    assert rc == 1  # the run directory: a runtime failure, not a usage error
    one_error_line(capsys, f"resume={str(run)!r}", "dcp_step_00000002", "past step 1",
                   "--nproc", "step_00000001")
    assert tree(run) == before  # nothing trained, saved or cleaned
    with pytest.raises(ValueError, match="dcp_step_00000002"):
        Trainer.resume(run, corpus, progress=False)
    assert tree(run) == before
    # the way back the message offers: the step_* directory itself
    assert Trainer.resume(run / "step_00000001", corpus, progress=False).step == 1
