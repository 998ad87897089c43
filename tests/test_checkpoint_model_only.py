"""Loads that run a model never open optimizer.safetensors; a resume still restores it.

Before: every ``load_checkpoint`` hashed optimizer.safetensors whole (the manifest
check) and mapped it, twice the model's bytes under AdamW, for `moekit generate`,
`perplexity`, `serve`, `analyze`, `quantize` and `convert --to hf`, none of which use it.
Here the optimizer file is replaced by garbage of the same size (any hash or parse of it
fails) and its two readers, the manifest's hash and safetensors' ``load_file``, refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moekit.errors import CheckpointError
from moekit.models import LMConfig, MoETransformer
from moekit.train import checkpoint as ckpt_io
from moekit.train import rundir
from moekit.train.checkpoint import load_checkpoint, restore, save_checkpoint

CFG = LMConfig(vocab_size=64, dim=32, num_layers=2, num_heads=2, max_seq_len=16, ffn_dim=32,
               num_experts=4, top_k=2)


def _trained_run(root: Path) -> tuple[Path, MoETransformer, torch.optim.AdamW]:
    """A run directory whose checkpoint holds AdamW moments after one step."""
    torch.manual_seed(0)
    model = MoETransformer(CFG)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    out = model(ids[:, :-1], ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    optim.step()
    run = root / "run"
    save_checkpoint(run, model, optim, {"step": 1, "model_config": CFG.to_dict()})
    return run, model, optim


def _optimizer_unreadable(run: Path, monkeypatch) -> Path:
    """optimizer.safetensors as garbage, and both of its readers refusing it by name."""
    optim_file = run / "step_00000001" / ckpt_io.OPTIM_FILE
    optim_file.write_bytes(b"\xff" * optim_file.stat().st_size)
    real_sha, real_load = rundir.sha256, ckpt_io.load_file

    def refuse(real):
        def opener(path, *args, **kwargs):
            if Path(path).name == ckpt_io.OPTIM_FILE:
                raise AssertionError(f"{path} was opened")
            return real(path, *args, **kwargs)
        return opener

    monkeypatch.setattr(rundir, "sha256", refuse(real_sha))
    monkeypatch.setattr(ckpt_io, "load_file", refuse(real_load))
    return optim_file


def _assert_weights(got: dict[str, torch.Tensor], model: MoETransformer) -> None:
    want = model.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_a_model_only_load_does_not_open_the_optimizer_file(tmp_path, monkeypatch):
    run, model, _ = _trained_run(tmp_path)
    _optimizer_unreadable(run, monkeypatch)
    ck = load_checkpoint(run, optimizer=False)
    assert ck.optimizer is None and ck.step == 1
    _assert_weights(ck.model, model)
    with pytest.raises(AssertionError, match="optimizer.safetensors was opened"):
        load_checkpoint(run)  # the default (a resume) still reads and checks it


def test_a_model_only_load_still_checks_the_model_file(tmp_path):
    run, _, _ = _trained_run(tmp_path)
    f = run / "step_00000001" / ckpt_io.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(run, optimizer=False)


def _generate(run):
    from moekit.train.generate_cli import load_model  # generate, perplexity, serve
    return load_model(str(run)).state_dict()


def _analyze(run):
    from moekit.analysis.load import load_lm
    return load_lm(str(run))[0].state_dict()


def _offloaded(run):
    from moekit.offload.lm import load_offloaded
    model = load_offloaded(run, "1GiB", prefetch=False)
    model.expert_offload.close()
    return None  # its experts stay on disk; that it loaded is the check


def _quantize(run):
    from moekit.quant.io import quantize_checkpoint
    quantize_checkpoint(run, run.parent / "q", bits=8)


def _to_hf(run):
    from moekit.integrations.hf.convert import moekit_to_hf
    moekit_to_hf(run, run.parent / "hf")


@pytest.mark.parametrize("load", [_generate, _analyze, _offloaded, _quantize, _to_hf],
                         ids=["generate", "analyze", "offload", "quantize", "convert"])
def test_commands_that_run_a_model_leave_the_optimizer_file_alone(tmp_path, monkeypatch,
                                                                  load):
    run, model, _ = _trained_run(tmp_path)
    _optimizer_unreadable(run, monkeypatch)
    weights = load(run)
    if weights is not None:
        _assert_weights(weights, model)


def test_restoring_an_optimizer_from_a_model_only_load_is_refused_first(tmp_path):
    run, _, _ = _trained_run(tmp_path)
    ck = load_checkpoint(run, optimizer=False)
    torch.manual_seed(1)
    other = MoETransformer(CFG)
    optim = torch.optim.AdamW(other.parameters())
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="loaded without its optimizer state"):
        restore(ck, other, optim)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert optim.state_dict()["state"] == {}


def test_a_resume_load_restores_the_optimizer_bitwise(tmp_path):
    run, model, optim = _trained_run(tmp_path)
    ck = load_checkpoint(run)
    fresh = MoETransformer(CFG)
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    restore(ck, fresh, fresh_optim)
    _assert_weights(fresh.state_dict(), model)
    want, got = optim.state_dict(), fresh_optim.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"]) and want["state"]
    for idx, entry in want["state"].items():
        assert sorted(got["state"][idx]) == sorted(entry)
        for name, t in entry.items():
            assert torch.equal(got["state"][idx][name], t), (idx, name)
    assert os.path.getsize(run / "step_00000001" / ckpt_io.OPTIM_FILE) > 0
