"""Training checkpoints' error branches and the optimizer's non-tensor state, which no
test reached (train/checkpoint.py lines 89, 173, 194, 217-220, 229-230, 242, 275-284 and
checkpoint_state.py 193 had 0 hits under coverage).

Consistent crafted checkpoints re-hash their manifest (``rewrite_state`` of
tests/test_checkpoint_security.py), so the check under test is the one that fires.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.models import MoETransformer
from moekit.train import CheckpointError, load_checkpoint, restore, rundir
from moekit.train import checkpoint as ckpt_io
from tests.test_checkpoint_security import (  # noqa: F401  (fixtures)
    MODEL,
    STEP,
    bitwise_equal,
    corpus,
    fresh_model_and_optimizer,
    rewrite_state,
    saved_run,
    snapshot,
)


@pytest.fixture
def ckpt(tmp_path, saved_run):  # noqa: F811  (the imported fixture, used by name)
    """A copy of the module's tiny trained run (2 steps)."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def test_latest_naming_a_deleted_step_directory(ckpt):
    shutil.rmtree(ckpt / STEP)
    with pytest.raises(CheckpointError, match=rf"LATEST names '{STEP}', which is not a "
                                              r"complete checkpoint directory"):
        load_checkpoint(ckpt)


def test_a_quantize_output_passed_as_a_training_checkpoint_says_what_to_pass(ckpt, tmp_path):
    from moekit.quant.io import load_model, save_quantized
    from moekit.quant.model import quantize

    out = tmp_path / "q8"
    save_quantized(quantize(load_model(ckpt), bits=8), out)
    with pytest.raises(CheckpointError, match=r"is a `moekit quantize` output, not a training "
                                              r"checkpoint: pass the float run directory"):
        load_checkpoint(out)


def test_state_json_of_another_format_version(ckpt):
    rewrite_state(ckpt / STEP, lambda s: s.update(format_version=1))
    with pytest.raises(CheckpointError, match=r"state.json: format_version must be 2"):
        load_checkpoint(ckpt)


def test_state_json_that_is_not_json(ckpt):
    (ckpt / STEP / ckpt_io.STATE_FILE).write_text('{"step": 2,')
    rundir.write_manifest(ckpt / STEP, list(ckpt_io.FILES))
    with pytest.raises(CheckpointError, match=r"state.json is unreadable or corrupt"):
        load_checkpoint(ckpt)


def test_a_weights_file_that_is_not_safetensors(ckpt):
    (ckpt / STEP / ckpt_io.MODEL_FILE).write_bytes(b"\x10\0\0\0\0\0\0\0not a header")
    rundir.write_manifest(ckpt / STEP, list(ckpt_io.FILES))
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable "
                                              r"safetensors file"):
        load_checkpoint(ckpt)


def test_a_tied_weight_pointing_at_a_missing_tensor(ckpt):
    rewrite_state(ckpt / STEP, lambda s: s["tied"].update({"lm_head.weight": "no.such"}))
    with pytest.raises(CheckpointError, match=r"tied weight 'lm_head.weight' points at "
                                              r"missing 'no.such'"):
        load_checkpoint(ckpt)


def _rewrite_optimizer(ckpt, change) -> None:
    path = ckpt / STEP / ckpt_io.OPTIM_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    rundir.write_manifest(ckpt / STEP, list(ckpt_io.FILES))


def _first_state_key(tensors: dict, name: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(f".{name}"))


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update({"state.9999.exp_avg": torch.zeros(1)}),
     r"optimizer tensor 'state.9999.exp_avg' \(torch.float32\) is not a floating state of a "
     r"parameter"),
    (lambda t: t.update({"bogus": torch.zeros(1)}), r"optimizer tensor 'bogus'"),
    (lambda t: t.update({_first_state_key(t, "exp_avg"): torch.zeros(3, 1, 2)}),
     r"optimizer exp_avg of parameter \d+ is \(3, 1, 2\), the model's is"),
])
def test_optimizer_tensors_that_do_not_fit_leave_everything_as_it_was(ckpt, change, match):
    _rewrite_optimizer(ckpt, change)
    ck = load_checkpoint(ckpt)  # the files are consistent: restore is what refuses them
    model, optimizer = fresh_model_and_optimizer()
    rng, before = torch.get_rng_state(), snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=match):
        restore(ck, model, optimizer)
    assert bitwise_equal(before, snapshot(model, optimizer))
    assert torch.equal(rng, torch.get_rng_state())


def test_an_optimizer_with_another_number_of_groups(ckpt):
    ck = load_checkpoint(ckpt)
    model = MoETransformer(MODEL)
    optimizer = torch.optim.AdamW(model.parameters())  # one group; the trainer makes two
    with pytest.raises(CheckpointError, match=r"the optimizer has 2 parameter groups, the "
                                              r"model needs 1"):
        restore(ck, model, optimizer)


class CountingSGD(torch.optim.SGD):
    """SGD that keeps a plain int and float per parameter (no built-in torch optimizer
    keeps non-tensor state now, but the checkpoint format stores it as JSON scalars)."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                state["last_lr"] = group["lr"] / 4
        return out


def _counting_run(lr: float):
    torch.manual_seed(0)
    model = MoETransformer(MODEL)
    optimizer = CountingSGD(model.parameters(), lr=lr, momentum=0.5)
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 8))
        model(ids, ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_non_tensor_optimizer_state_round_trips(tmp_path):
    model, optimizer = _counting_run(lr=0.1)
    ckpt_io.save_checkpoint(tmp_path / "run", model, optimizer,
                            {"step": 3, "model_config": MODEL.to_dict()})
    scalars = json.loads((tmp_path / "run" / "step_00000003" / "state.json").read_text())[
        "optimizer"]["scalars"]
    assert scalars["0.count"] == 3 and scalars["0.last_lr"] == 0.025
    other_model, other = _counting_run(lr=0.3)  # other values everywhere
    restore(load_checkpoint(tmp_path / "run"), other_model, other)
    want, got = optimizer.state_dict(), other.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert set(got["state"]) == set(want["state"])
    for i, entry in want["state"].items():
        assert got["state"][i]["count"] == entry["count"] == 3
        assert got["state"][i]["last_lr"] == entry["last_lr"] == 0.025
        assert torch.equal(got["state"][i]["momentum_buffer"], entry["momentum_buffer"])
