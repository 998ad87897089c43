"""Checkpoints as untrusted input: no code execution, no path traversal, integrity of
every file and field, all-or-nothing restore, and crash safety of saves.

One tiny run (2 steps, ~1 s) is trained per module and copied into each test.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.models import LMConfig, MoETransformer
from moekit.train import CheckpointError, Trainer, load_checkpoint, make_optimizer, restore, rundir
from moekit.train import checkpoint as ckpt_io
from moekit.train.data import Corpus, encode

MODEL = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=8,
                 num_experts=4, top_k=2)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20
STEP = "step_00000002"


def tiny_train():
    from moekit.train import TrainConfig
    return TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2,
                       eval_batches=1, save_every=2, log_every=1)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    data = encode(TEXT)
    return Corpus(data[:900], data[900:], "inline", 1, 1)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, corpus) -> Path:
    run = tmp_path_factory.mktemp("saved") / "run"
    Trainer(MODEL, tiny_train(), corpus, run, progress=False).fit()
    assert (run / "LATEST").read_text().strip() == STEP
    return run


@pytest.fixture
def run(tmp_path, saved_run) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def snapshot(model, optimizer) -> list[torch.Tensor]:
    out = [t.clone() for t in model.state_dict().values()]
    for entry in optimizer.state_dict()["state"].values():
        out += [t.clone() for t in entry.values() if isinstance(t, torch.Tensor)]
    return out


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1).view(torch.uint8),
                                                                  y.view(-1).view(torch.uint8))
        for x, y in zip(a, b, strict=True))


def fresh_model_and_optimizer():
    torch.manual_seed(123)  # different weights from the saved run
    model = MoETransformer(MODEL)
    optimizer = make_optimizer(model, tiny_train())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss \
        .backward()
    optimizer.step()  # the optimizer has state to lose
    return model, optimizer


def rewrite_state(ckpt: Path, change) -> None:
    """Edit state.json and re-hash it: a consistent checkpoint with a bad field."""
    state = json.loads((ckpt / ckpt_io.STATE_FILE).read_text())
    change(state)
    (ckpt / ckpt_io.STATE_FILE).write_text(json.dumps(state))
    rundir.write_manifest(ckpt, list(ckpt_io.FILES))


# -- code execution from a DCP checkpoint ----------------------------------------------


class RunsCode:
    """Unpickling this runs a shell command (what a crafted .metadata did)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def dcp_layer(seed: int) -> MoE:
    torch.manual_seed(seed)
    return MoE(MoEConfig(dim=8, ffn_dim=12, num_experts=4, top_k=2))


def evil_top_level(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))


def evil_nested(ckpt: Path, marker: Path) -> None:
    """A genuine Metadata with the payload tucked into one of its fields."""
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    md.storage_meta.save_id = RunsCode(marker)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def evil_bytes_entry(ckpt: Path, marker: Path) -> None:
    """A BytesStorageMetadata entry makes DCP torch.load(weights_only=False) a data file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = pickle.loads((ckpt / ".metadata").read_bytes())
    payload = pickle.dumps(RunsCode(marker))
    (ckpt / "__9_0.distcp").write_bytes(payload)
    fqn = "model.router.weight"
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    for index, info in md.storage_data.items():
        if index.fqn == fqn:
            info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(payload)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def evil_path(ckpt: Path, marker: Path) -> None:
    """A data file outside the checkpoint directory."""
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere/__0_0.distcp"
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("craft", [evil_top_level, evil_nested, evil_bytes_entry, evil_path])
def test_crafted_dcp_metadata_runs_no_code(tmp_path, craft):
    from moekit.distributed.checkpoint import load_checkpoint as dcp_load
    from moekit.distributed.checkpoint import save_checkpoint as dcp_save

    ckpt, marker = tmp_path / "dcp", tmp_path / "PWNED"
    dcp_save(ckpt, dcp_layer(0))
    craft(ckpt, marker)
    target = dcp_layer(1)
    before = [t.clone() for t in target.state_dict().values()]
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        dcp_load(ckpt, target)
    assert not marker.exists(), "loading the checkpoint ran a command"
    assert bitwise_equal(before, list(target.state_dict().values()))


def test_genuine_dcp_checkpoint_still_loads(tmp_path):
    from moekit.distributed.checkpoint import load_checkpoint as dcp_load
    from moekit.distributed.checkpoint import save_checkpoint as dcp_save

    want = dcp_layer(0)
    dcp_save(tmp_path / "dcp", want)
    got = dcp_layer(1)
    dcp_load(tmp_path / "dcp", got)
    assert bitwise_equal(list(want.state_dict().values()), list(got.state_dict().values()))


def test_dcp_load_that_fails_halfway_leaves_the_model_untouched(tmp_path):
    """DCP loads into what it is given, one tensor after another: loaded straight into
    the model, a truncated data file raised CheckpointError with router.weight already
    replaced by the checkpoint's."""
    from moekit.distributed.checkpoint import load_checkpoint as dcp_load
    from moekit.distributed.checkpoint import save_checkpoint as dcp_save

    dcp_save(tmp_path / "dcp", dcp_layer(0))
    (data,) = (tmp_path / "dcp").glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    target = dcp_layer(1)
    before = [t.clone() for t in target.state_dict().values()]
    with pytest.raises(CheckpointError, match="DCP load of"):
        dcp_load(tmp_path / "dcp", target)
    assert bitwise_equal(before, list(target.state_dict().values()))


def test_no_unrestricted_unpickling_in_moekit():
    """No call in moekit unpickles freely: no pickle.load(s), and torch.load only with
    weights_only=True (the allow-listed DCP reader subclasses pickle.Unpickler)."""
    import ast

    src = Path(__file__).parent.parent / "src" / "moekit"
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in ("pickle.load", "pickle.loads"), (path, node.lineno)
            if name == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", (path, node.lineno)


# -- LATEST may only name a checkpoint directory inside the run ---------------------------


def _victim(tmp_path: Path, saved_run: Path) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "victim"))


BAD_LATEST = {
    "parent": lambda victim: f"../victim/{STEP}",
    "absolute": lambda victim: str(victim / STEP),
    "nested": lambda victim: f"{STEP}/../{STEP}",
    "short": lambda victim: "step_2",
    "empty": lambda victim: "",
}


def readers(corpus):
    from moekit.analysis.cli import load_lm
    from moekit.plan.hf import read_spec_file
    from moekit.train.generate_cli import load_model

    return {"load_checkpoint": load_checkpoint, "generate": load_model, "analyze": load_lm,
            "plan": read_spec_file,
            "resume": lambda p: Trainer.resume(p, corpus, progress=False)}


@pytest.mark.parametrize("content", sorted(BAD_LATEST))
@pytest.mark.parametrize("reader", ["load_checkpoint", "generate", "analyze", "plan", "resume"])
def test_latest_cannot_leave_the_run_directory(tmp_path, run, saved_run, corpus, content,
                                               reader):
    victim = _victim(tmp_path, saved_run)
    victim_files = sorted((p.relative_to(victim), p.stat().st_mtime_ns)
                          for p in victim.rglob("*"))
    shutil.rmtree(run / STEP)
    text = BAD_LATEST[content](victim)
    (run / "LATEST").write_text(text + "\n")
    with pytest.raises(CheckpointError, match=re.escape(f"LATEST holds {text!r}")):
        readers(corpus)[reader](str(run))
    assert sorted((p.relative_to(victim), p.stat().st_mtime_ns)
                  for p in victim.rglob("*")) == victim_files


def test_latest_naming_a_symlink_is_refused(tmp_path, run, saved_run):
    victim = _victim(tmp_path, saved_run)
    (run / "step_00000099").symlink_to(victim / STEP)
    (run / "LATEST").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(run)


# -- state.json is covered by the manifest; every field is checked ------------------------


def flip_step(text: str) -> str:
    return text.replace('"step": 2', '"step": 3', 1)


def flip_lr(text: str) -> str:
    return text.replace('"lr": 0.003', '"lr": 0.007', 1)


@pytest.mark.parametrize("edit", [flip_step, flip_lr])
def test_edited_state_json_is_caught(run, edit):
    path = run / STEP / ckpt_io.STATE_FILE
    text = path.read_text()
    assert edit(text) != text
    path.write_text(edit(text))
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        load_checkpoint(run)


def test_every_byte_of_state_json_and_manifest_is_covered(run):
    """A sample of single-bit flips: each must raise CheckpointError (never load)."""
    g = torch.Generator().manual_seed(0)
    for name in (ckpt_io.STATE_FILE, ckpt_io.MANIFEST):
        path = run / STEP / name
        clean = path.read_bytes()
        for pos in torch.randint(len(clean), (40,), generator=g).tolist():
            bad = bytearray(clean)
            bad[pos] ^= 1 << (pos % 8)
            path.write_bytes(bytes(bad))
            with pytest.raises(CheckpointError):
                load_checkpoint(run)
        path.write_bytes(clean)
    assert load_checkpoint(run).step == 2


BAD_FIELDS = {  # consistent checkpoints (manifest re-written) whose state.json is wrong
    "step negative": (lambda s: s.update(step=-1), "step=-1"),
    "step a string": (lambda s: s.update(step="2"), "step='2'"),
    "step a bool": (lambda s: s.update(step=True), "step=True"),
    "lr NaN": (lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")), "lr=nan"),
    "beta >= 1": (lambda s: s["optimizer"]["param_groups"][0].update(betas=[0.9, 1.5]),
                  "betas"),
    "params shared": (lambda s: s["optimizer"]["param_groups"][1].update(
        params=s["optimizer"]["param_groups"][0]["params"][:1]), "params"),
    "counter negative": (lambda s: s["counters"].update(tokens=-5), "counters"),
    "wall time negative": (lambda s: s.update(wall_s=-1.0), "wall_s=-1.0"),
    "wall time a string": (lambda s: s.update(wall_s="20"), "wall_s='20'"),
    "rng too short": (lambda s: s["torch_rng"].pop(), "torch_rng"),
    "rng byte 256": (lambda s: s["torch_rng"].__setitem__(0, 256), "torch_rng"),
    "model config": (lambda s: s["model_config"].update(top_k=99), "model_config"),
    "train config": (lambda s: s["train_config"].update(steps=0), "train_config"),
}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_bad_field_is_refused_at_load(run, field):
    change, message = BAD_FIELDS[field]
    rewrite_state(run / STEP, change)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        load_checkpoint(run)


def invalid_mt19937(ck) -> None:
    ck.state["torch_rng"][17] ^= 0xFF  # a byte set_rng_state validates (found by flipping)


def optimizer_flag_changed(ck) -> None:
    ck.state["optimizer"]["param_groups"][0]["amsgrad"] = 0.5


def optimizer_group_key_missing(ck) -> None:
    del ck.state["optimizer"]["param_groups"][1]["eps"]


@pytest.mark.parametrize("damage", [invalid_mt19937, optimizer_flag_changed,
                                    optimizer_group_key_missing])
def test_restore_is_all_or_nothing(run, damage):
    ck = load_checkpoint(run)
    damage(ck)
    model, optimizer = fresh_model_and_optimizer()
    rng = torch.get_rng_state()
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError):
        restore(ck, model, optimizer)
    assert bitwise_equal(before, snapshot(model, optimizer))
    assert torch.equal(rng, torch.get_rng_state())


# -- crash safety ----------------------------------------------------------------------


def test_crash_while_replacing_the_latest_checkpoint_keeps_it(run, corpus, monkeypatch):
    """Re-saving the step LATEST names; the process dies between the renames."""
    old = load_checkpoint(run)
    trainer = Trainer.resume(run, corpus, progress=False)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)  # the re-save holds other weights
    real_rename = os.rename

    def die_on_rename_in(src, dst):
        if ".tmp" in Path(src).name:
            raise KeyboardInterrupt("killed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", die_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(os, "rename", real_rename)
    after = load_checkpoint(run)  # LATEST still leads to the old, complete checkpoint
    assert after.step == 2 and bitwise_equal(list(old.model.values()),
                                             list(after.model.values()))
    Trainer(MODEL, tiny_train(), corpus, run, progress=False)  # a start cleans up
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "step_"))) == [STEP]
    assert bitwise_equal(list(old.model.values()), list(load_checkpoint(run).model.values()))


def test_crash_before_latest_is_rewritten(run, corpus, monkeypatch):
    trainer = Trainer.resume(run, corpus, progress=False)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    new = [t.clone() for t in trainer.model.state_dict().values()]

    def die(*args):
        raise KeyboardInterrupt("killed (simulated)")

    monkeypatch.setattr(rundir, "write_latest", die)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    got = load_checkpoint(run)
    assert bitwise_equal(new, [got.model[k] for k in trainer.model.state_dict()])
    Trainer(MODEL, tiny_train(), corpus, run, progress=False)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_leftovers_of_killed_saves_are_cleaned_at_start(run, corpus):
    leftovers = [run / f".{STEP}.tmpab12cd", run / ".dcp_step_00000004.tmp"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\x00" * 64)
    (run / ".LATEST.x8k2").write_text(STEP + "\n")
    keep = run / "notes.txt"
    keep.write_text("mine")
    Trainer.resume(run, corpus, progress=False)
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert keep.read_text() == "mine" and load_checkpoint(run).step == 2


def test_newest_complete_dcp_checkpoint_is_resumed(tmp_path):
    from moekit.train.distributed import find_resumable

    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"dcp_step_{step:08d}"
        d.mkdir()
        (d / "trainer.json").write_text("{}")
        if complete:
            rundir.write_manifest(d, ["trainer.json"])
    (tmp_path / "dcp_step_00000008").symlink_to(tmp_path / "dcp_step_00000004")
    (tmp_path / "dcp_step_9").mkdir()
    assert find_resumable(tmp_path) == tmp_path / "dcp_step_00000004"
    shutil.rmtree(tmp_path / "dcp_step_00000002")
    (tmp_path / "dcp_step_00000004" / rundir.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no complete dcp_step_"):
        find_resumable(tmp_path)
