"""`moekit train --nproc 2 --ep 2` as a user runs it: the launcher re-runs itself under
torchrun; a resume, its exit status from the ranks', a stop by a signal to one rank or to
the launcher, a full disk at a save, and errors found inside the ranks. The process-group
checks of expert parallelism themselves are in tests/test_distributed.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")


def test_cli_launches_through_torchrun(tmp_path):
    """`python -m moekit.train --nproc 2 --ep 2` re-runs itself under torchrun."""
    import subprocess
    import sys

    data = tmp_path / "data.txt"
    data.write_text((Path(__file__).parent.parent / "src/moekit/layer.py").read_text() * 2)
    cmd = [sys.executable, "-m", "moekit.train", "--nproc", "2", "--ep", "2", "--preset",
           "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
           "--eval-batches", "1", "--data", str(data), "--out", str(tmp_path / "run"),
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent / "src"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    # the ranks' own errors come before torchrun's summary: keep enough of stderr
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    assert "mesh: dp=1 x ep=2" in done.stdout and "done: step 2" in done.stdout
    # the whole model's parameters, as one process counts them (rank 0 holds half the
    # experts: it had counted its own, 29,088 and 16,800 active per token)
    from moekit.models import MoETransformer, preset
    one = MoETransformer(preset("tiny"))
    per_expert = sum(p[0].numel() for p in one.blocks[0].ffn.experts.parameters())
    total = sum(p.numel() for p in one.parameters())
    active = total - one.config.num_layers * (one.config.num_experts - one.config.top_k) \
        * per_expert
    assert f"{total:,} parameters, {active:,} active per token" in done.stdout, done.stdout
    assert (tmp_path / "run" / "dcp_step_00000002" / "trainer.json").exists()
    assert (tmp_path / "run" / "dcp_step_00000002" / "manifest.json").exists()  # complete
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    # the same state as a single-process checkpoint: generate reads the run directly
    from moekit.cli import main
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step_00000002"
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "4"]) == 0
    trainer_json = json.loads((tmp_path / "run" / "dcp_step_00000002" / "trainer.json").read_text())
    assert trainer_json["data"] == {"corpus": str(data)}

    # --resume without --data continues on the corpus the run was trained on (it had
    # taken the default corpus), with this session's --dispatcher
    resume = [sys.executable, "-m", "moekit.train", "--nproc", "2", "--ep", "2", "--resume",
              str(tmp_path / "run"), "--steps", "3", "--no-progress"]
    done = subprocess.run(resume + ["--dispatcher", "all_gather"], capture_output=True,
                          text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    assert f"{data}: 1 train files" in done.stdout
    assert "dispatcher all_gather" in done.stdout and "done: step 3" in done.stdout
    # a flag that would change a saved setting is refused before torchrun starts
    done = subprocess.run(resume + ["--lr", "1e-4"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2
    assert "--lr=0.0001 is not allowed with --resume" in done.stderr
    assert "launching" not in done.stdout
    # a checkpoint that is not there is a runtime failure, 1 as in one process (had been 2)
    missing = [a if a != str(tmp_path / "run") else str(tmp_path / "nope") for a in resume]
    done = subprocess.run(missing, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"--resume={tmp_path / 'nope'} is not allowed: it does not exist" in done.stderr
    assert "launching" not in done.stdout


@pytest.mark.parametrize("codes,status,line", [
    ({0: 143, 1: 143}, 143, None),  # stopped together after saving: rank 0 said so
    ({0: 130, 1: 130}, 130, None),
    ({0: 2, 1: 2}, 2, None),  # each printed its error
    ({0: -15, 1: -15}, 143, "moekit train: rank 0 was killed by SIGTERM, rank 1 was "
                            "killed by SIGTERM"),
    ({0: 1, 1: -15}, 1, "moekit train: error: rank 0 exited 1, rank 1 was killed by "
                        "SIGTERM"),
    ({1: 143}, 1, "moekit train: error: rank 1 exited 143; the other 1 exited 0"),
])
def test_launcher_status_from_the_ranks(codes, status, line, capsys):
    """torchrun's report of failed ranks (it had ended every stop with exit 1 and a
    traceback) as the launcher's exit status and at most one line."""
    from moekit.train.launch import ranks_status
    assert ranks_status(codes, 2) == status
    err = capsys.readouterr().err
    assert err.splitlines() == ([] if line is None else [line]), err


# -- `moekit train --nproc 2` stopped by a signal, as a user sees it ----------------------

TRAIN_CLI = ["--nproc", "2", "--ep", "2", "--preset", "tiny", "--steps", "100000",
             "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--eval-every",
             "100000", "--eval-batches", "1", "--save-every", "100000", "--no-progress",
             "--timeout", "20"]  # a rank left waiting fails in 20 s, not the default 300


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}


@contextlib.contextmanager
def _training(tmp_path: Path, out: Path):
    """The launcher training until stopped, once a first step is logged, and its ranks
    (LOCAL_RANK -> pid); whatever still runs at the end is killed."""
    data = tmp_path / "data.txt"
    data.write_text((Path(__file__).parent.parent / "src/moekit/layer.py").read_text() * 2)
    # a Python handler, not SIG_IGN (pytest run as a background job): SIG_DFL after exec
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moekit.train", *TRAIN_CLI, "--data", str(data), "--out",
             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_cli_env())
    finally:
        signal.signal(signal.SIGINT, previous)
    ranks: dict[int, int] = {}
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 150
        while '"kind": "train"' not in (metrics.read_text() if metrics.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                stdout, stderr = proc.communicate()
                pytest.fail(f"training did not start: {stdout[-2000:]} {stderr[-4000:]}")
            time.sleep(0.1)
        ranks.update(_ranks(proc.pid))
        yield proc, ranks
    finally:  # nothing left running, nor holding the pipes, after a failed test
        for pid in [*_descendants(proc.pid), *ranks.values(), proc.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
    below, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        below += kids
        todo += kids
    return below


def _ranks(pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the processes below ``pid`` that torchrun started."""
    ranks = {}
    for child in _descendants(pid):
        with contextlib.suppress(OSError):
            env = dict(v.split("=", 1) for v in (Path(f"/proc/{child}/environ").read_bytes()
                       .decode(errors="replace").split("\0")) if "=" in v)
            if "LOCAL_RANK" in env and "moekit.train" in Path(f"/proc/{child}/cmdline").read_text():
                ranks[int(env["LOCAL_RANK"])] = child
    return ranks


def _gone(pids, within_s: float = 10.0) -> bool:
    """Whether every process of ``pids`` ended (or is a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
                    alive.append(pid)
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _stopped(proc: subprocess.Popen, ranks: dict[int, int], status: int, label: str
             ) -> tuple[str, str]:
    """The launcher's output once it ended, checked: ``status``, every rank gone, one
    line from rank 0 saying where it saved, no traceback, nothing from torchrun."""
    stdout, stderr = proc.communicate(timeout=90)  # EOF: no rank holds its pipes either
    assert _gone(ranks.values()), "a rank outlived the launcher"
    assert proc.returncode == status, stdout[-2000:] + stderr[-6000:]
    stopped = [line for line in stdout.splitlines() if "interrupted at step" in line]
    assert len(stopped) == 1 and f"({label}): saved" in stopped[0], stdout
    for noise in ("Traceback", "ChildFailedError", "SignalException", "closing signal"):
        assert noise not in stderr, stderr
    return stopped[0], stderr


@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' pids in /proc")
def test_cli_sigterm_to_one_rank_stops_all_then_resumes(tmp_path):
    """`kill -TERM` of rank 1 alone: every rank stops after the same step and exits 143
    (the launcher too), with one checkpoint holding every rank's shard, which --resume
    continues. Rank 0 had gone on into the next step's collectives: both ranks failed at
    the collective timeout with no checkpoint, under torchrun's report (exit 1)."""
    out = tmp_path / "run"
    with _training(tmp_path, out) as (proc, ranks):
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        start = time.monotonic()
        line, _ = _stopped(proc, ranks, 143, "SIGTERM")
        assert time.monotonic() - start < 60
    [ckpt] = out.glob("dcp_step_*")
    step = int(ckpt.name.split("_")[-1])
    assert line.endswith(f"saved {ckpt}; resume with: moekit train --nproc 2 --ep 2 "
                         f"--resume {out}"), line
    assert (ckpt / "manifest.json").is_file()
    assert {p.name.split("_")[2] for p in ckpt.glob("__*_*.distcp")} == {"0", "1"}
    assert (out / "LATEST").read_text().strip() == f"step_{step:08d}"

    done = subprocess.run([sys.executable, "-m", "moekit.train", "--nproc", "2", "--ep", "2",
                           "--resume", str(out), "--steps", str(step + 1), "--no-progress"],
                          capture_output=True, text=True, timeout=150, env=_cli_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert f"done: step {step + 1}" in done.stdout
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "resume", "step": step} in records


@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' pids in /proc")
def test_cli_ctrl_c_to_the_launcher_stops_the_ranks_with_one_line(tmp_path):
    """SIGINT to the launcher alone (its ranks run in sessions of their own): it had
    SIGKILLed torchrun, sometimes before torchrun passed the signal on, leaving the
    ranks training with no parent; now they stop after one step, save and exit 130."""
    out = tmp_path / "run"
    with _training(tmp_path, out) as (proc, ranks):
        assert sorted(ranks) == [0, 1], ranks
        proc.send_signal(signal.SIGINT)
        _stopped(proc, ranks, 130, "Ctrl-C")
    [ckpt] = out.glob("dcp_step_*")
    assert (ckpt / "manifest.json").is_file()


def test_cli_full_disk_at_a_save_is_one_line_naming_the_complete_checkpoint(tmp_path):
    """The disk fills as rank 0 writes the one-process step_N, after dcp_step_N is complete:
    rank 0 had ended in a traceback; now one line, naming dcp_step_N (which an --nproc
    resume continues from) and the command to resume with."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        "from moekit.train import checkpoint\n"
        "def full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "checkpoint.save_checkpoint = full\n")
    data, out = tmp_path / "data.txt", tmp_path / "run"
    data.write_text((Path(__file__).parent.parent / "src/moekit/layer.py").read_text() * 2)
    argv = [a if a != "100000" else "2" for a in TRAIN_CLI]  # 2 steps, a save at step 2
    env = {**_cli_env(), "PYTHONPATH": f"{hook}{os.pathsep}{_cli_env()['PYTHONPATH']}"}
    done = subprocess.run([sys.executable, "-m", "moekit.train", *argv, "--data", str(data),
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("moekit train (rank 0)")]
    assert lines == [
        f"moekit train (rank 0): error: could not write to {out} at step 2: "
        f"{os.strerror(28)}; the last complete checkpoint is {out / 'dcp_step_00000002'} "
        f"(resume with: moekit train --nproc 2 --ep 2 --resume {out})"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (out / "dcp_step_00000002" / "manifest.json").is_file()


# -- an error found inside the ranks (run_rank's `except ValueError`) -------------------


def _ranks_fail(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """`moekit train --nproc 2 --ep 2 ARGV` run to its end: the launcher's checks passed
    (it launched torchrun), so what failed, failed inside the ranks."""
    done = subprocess.run([sys.executable, "-m", "moekit.train", "--nproc", "2", "--ep", "2",
                           "--no-progress", *argv], capture_output=True, text=True,
                          timeout=150, env=_cli_env(), cwd=tmp_path)
    assert "launching: torchrun" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    # each rank's line, and no launcher line naming a rank killed by torchrun's SIGTERM
    for noise in ("Traceback", "ChildFailedError", "moekit train: error: rank"):
        assert noise not in done.stderr, done.stderr[-4000:]
    return done


def test_cli_a_bad_value_found_inside_the_ranks_exits_2_with_their_message(tmp_path):
    """A corpus too short for --seq-len is found where the ranks read it (the launcher
    does not): each rank prints the error and exits 2, the launcher 2 (a bad value)."""
    data = tmp_path / "short.txt"
    data.write_text("x = 1\n" * 50)  # 301 bytes with the newline read adds: 5%, 16, validate
    done = _ranks_fail(tmp_path, "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                       "--seq-len", "16", "--data", str(data), "--out", "run")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in (0, 1):
        assert (f"moekit train (rank {rank}): error: data={str(data)!r} is not allowed: its "
                "val split has 16 bytes; it needs at least seq_len + 2 = 18") in done.stderr
    assert not (tmp_path / "run").exists()


def test_cli_a_checkpoint_error_inside_the_ranks_exits_1_with_their_message(tmp_path):
    """A one-process checkpoint whose state.json names ffn_dim=64 over tensors of 32 (its
    manifest redone, as an edit would): the launcher reads only the state, which is valid;
    the ranks find the mismatch when they load the tensors, each exits 1, the launcher 1."""
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    from moekit.train.rundir import MANIFEST, write_manifest

    data = tmp_path / "data.txt"
    data.write_text((Path(__file__).parent.parent / "src/moekit/layer.py").read_text())
    train = TrainConfig(steps=1, batch_size=4, seq_len=16, eval_batches=1, warmup_steps=0)
    Trainer(preset("tiny"), train, load_corpus(str(data)), tmp_path / "run",
            progress=False).fit()
    ckpt = tmp_path / "run" / "step_00000001"
    state = json.loads((ckpt / "state.json").read_text())
    state["model_config"]["ffn_dim"] = 64
    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt, [p.name for p in ckpt.iterdir() if p.name != MANIFEST])
    done = _ranks_fail(tmp_path, "--resume", "run", "--steps", "2")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in (0, 1):
        assert (f"moekit train (rank {rank}): error: checkpoint {ckpt.relative_to(tmp_path)} "
                "does not match the model: ") in done.stderr, done.stderr[-4000:]
