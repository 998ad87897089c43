"""Small input gaps: each was accepted (or half-accepted) in silence before.

A shared-expert gate with no shared experts, an unknown mesh device type, float or
2-D or out-of-vocabulary training data, and a warm-up longer than the run.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.distributed as dist

import moekit
from moekit.distributed import init_mesh
from moekit.models import LMConfig
from moekit.train import TrainConfig, Trainer, encode, lr_at, sample_windows
from moekit.train.data import Corpus

# -- MoEConfig: shared_expert_gate needs shared experts ---------------------------------


def test_shared_expert_gate_without_shared_experts_is_refused():
    """Was accepted; no shared FFN is built, so the gate did nothing."""
    with pytest.raises(ValueError, match=re.escape(
            "shared_expert_gate=True is not allowed: it must be False when "
            "num_shared_experts=0")):
        moekit.MoEConfig(dim=8, ffn_dim=8, num_experts=4, shared_expert_gate=True)
    cfg = moekit.MoEConfig(dim=8, ffn_dim=8, num_experts=4, num_shared_experts=1,
                           shared_expert_gate=True)
    assert moekit.MoE(cfg).shared.gate is not None
    # a non-bool is still named as such, not as a missing shared expert
    with pytest.raises(ValueError, match="shared_expert_gate='yes' is not allowed: it must be "
                       "True or False"):
        moekit.MoEConfig(dim=8, ffn_dim=8, shared_expert_gate="yes")


# -- init_mesh: device_type ---------------------------------------------------------------


@pytest.mark.parametrize("device_type", ["bogus", "CPU", "cuda:0", "xla", torch.device("cpu")])
def test_init_mesh_refuses_unknown_device_type_before_any_process_group(device_type):
    """"bogus" built a mesh whose device setup torch skipped in silence; "xla" failed
    later with "DeviceMesh process groups not initialized!". Checked before the
    process group is looked at, so no group is needed here."""
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=re.escape(
            f"device_type={device_type!r} is not allowed: it must be one of cpu, cuda")):
        init_mesh(1, 1, device_type=device_type)  # type: ignore[arg-type]
    assert not dist.is_initialized()


def test_init_mesh_known_device_type_reaches_the_process_group_check():
    for device_type in ("cpu", "cuda", None):
        with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
            init_mesh(1, 1, device_type=device_type)


# -- sample_windows: 1-D byte token ids -----------------------------------------------------


@pytest.mark.parametrize("data,needle", [
    # float ids were truncated by .long(): 154.7 became 154
    (torch.arange(200, dtype=torch.float32) + 0.7, "data_N.dtype=torch.float32"),
    (torch.arange(200, dtype=torch.float64), "data_N.dtype=torch.float64"),
    (torch.ones(200, dtype=torch.bool), "data_N.dtype=torch.bool"),
    (torch.arange(100, dtype=torch.int8), "data_N.dtype=torch.int8"),  # bytes > 127 wrap
    # a 2-D tensor: numel() sized the draw, dim 0 was indexed -> IndexError
    (torch.arange(400, dtype=torch.uint8).reshape(20, 20), "data_N.shape=(20, 20)"),
    (torch.arange(4000).reshape(1000, 4), "data_N.shape=(1000, 4)"),
    (list(range(200)), "data_N='list'"),  # AttributeError: 'list' has no attribute 'numel'
])
def test_sample_windows_refuses_data_that_is_not_byte_ids(data, needle):
    with pytest.raises(ValueError, match=re.escape(needle + " is not allowed")):
        sample_windows(data, 2, 5, seed=0)


@pytest.mark.parametrize("offset,bad", [(300, r"[34]\d\d"), (-1000, r"-\d+")])
def test_sample_windows_refuses_ids_outside_the_byte_vocabulary(offset, bad):
    """Ids >= 256 went to the model and failed as an embedding IndexError; < 0 too."""
    data = torch.arange(200) + offset
    with pytest.raises(ValueError, match=f"data_N token id={bad} is not allowed: it must be "
                       r"a byte in \[0, 256\)"):
        sample_windows(data, 2, 5, seed=0)


@pytest.mark.parametrize("name,batch,seq_len", [("batch", 0, 5), ("seq_len", 2, -3),
                                                ("batch", 2.0, 5)])
def test_sample_windows_checks_batch_and_seq_len(name, batch, seq_len):
    with pytest.raises(ValueError, match=f"{name}=.* is not allowed: it must be a positive int"):
        sample_windows(torch.arange(200, dtype=torch.uint8), batch, seq_len, seed=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_sample_windows_takes_byte_ids_of_any_integer_dtype(dtype):
    data = torch.arange(256).to(dtype)
    ids, tgt = sample_windows(data, 3, 10, seed=5)
    assert ids.dtype == torch.long and ids.shape == (3, 10)
    assert torch.equal(tgt - ids, torch.ones_like(ids))
    text = encode("def f():\n    return 1\n" * 10)  # int64, as encode gives it
    assert sample_windows(text, 2, 8, seed=1)[0].shape == (2, 8)


# -- Trainer: warm-up longer than the run -----------------------------------------------------

MODEL = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=8,
                 num_experts=4, top_k=2)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    data = encode(TEXT)
    return Corpus(data[:900], data[900:], "inline", 1, 1)


def test_warmup_longer_than_the_run_warns_with_the_peak_lr(tmp_path, corpus):
    """steps=20 with the default warmup_steps=100 peaked at lr/5 and never decayed."""
    cfg = TrainConfig(steps=20, batch_size=2, seq_len=16, lr=3e-3)  # no warning here
    assert cfg.warmup_steps == 100
    peak = max(lr_at(s, cfg) for s in range(cfg.steps))
    assert peak == pytest.approx(6e-4)
    with pytest.warns(UserWarning, match=re.escape(
            "warmup_steps=100 is longer than steps=20: the learning rate peaks at 0.0006 "
            "(lr=0.003 x 20/100)")):
        Trainer(MODEL, cfg, corpus, tmp_path, progress=False)


@pytest.mark.parametrize("steps,warmup", [(20, 20), (20, 5), (20, 0), (1500, 100)])
def test_warmup_that_fits_the_run_does_not_warn(tmp_path, corpus, steps, warmup):
    """warmup_steps == steps still reaches lr on the last step; the README's defaults
    (1500 steps, warm-up 100) do not warn."""
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, batch_size=2, seq_len=16)
    assert max(lr_at(s, cfg) for s in range(steps)) == pytest.approx(cfg.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(MODEL, cfg, corpus, tmp_path, progress=False)
    defaults = TrainConfig()
    assert defaults.warmup_steps <= defaults.steps
