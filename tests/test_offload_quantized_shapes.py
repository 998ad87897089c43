"""load_offloaded checks every stored expert tensor of a quantized checkpoint, as
load_quantized does, before anything is read.

Before: only the expert count (dim 0) was checked, so a quantized directory with
misshaped scales, data of the wrong size or float16 zeros loaded without a word and the
first forward died inside the int4 / int8 kernels ("int4 scales and zeros must be
[E, N, K/g] ...", "zeros must be contiguous float32"), naming neither file nor tensor.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moekit.models import MoETransformer, preset
from moekit.offload import ShardError
from moekit.offload.lm import load_offloaded
from moekit.quant import io as qio
from moekit.safetensors_write import save_file
from moekit.train.checkpoint import CheckpointError, save_checkpoint
from moekit.train.rundir import sha256


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_q")
    torch.manual_seed(0)
    lm = MoETransformer(preset("tiny", dim=64, ffn_dim=64))
    save_checkpoint(root / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 1, "model_config": lm.config.to_dict()})
    return {bits: qio.quantize_checkpoint(root / "run", root / f"q{bits}", bits=bits,
                                          group_size=32 if bits == 4 else None)
            for bits in (4, 8)}


def _tamper(src, dst, name, edit):
    """A consistent directory (SHA-256 recorded anew) whose tensor ``name`` is edited."""
    shutil.copytree(src, dst)
    f = dst / qio.MODEL_FILE
    tensors = {k: v.clone() for k, v in load_file(str(f)).items()}  # no mmap of f
    tensors[name] = edit(tensors[name]).contiguous()
    save_file(tensors, str(f))
    meta = json.loads((dst / qio.META_FILE).read_text())
    meta["sha256"] = sha256(f)
    (dst / qio.META_FILE).write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("bits,name,edit,match", [
    (4, "blocks.1.ffn.experts.w_out.scales", lambda t: t[:, :, :1], r"shape \(4, 64, 1\)"),
    (4, "blocks.0.ffn.experts.w_in.zeros", lambda t: t.half(), "torch.float16"),
    (4, "blocks.0.ffn.experts.w_in.data", lambda t: t[:, :-1], r"shape \(4, 127, 32\)"),
    (8, "blocks.0.ffn.experts.w_out.scales", lambda t: t[:, :-1], r"shape \(4, 63\)"),
    (8, "blocks.1.ffn.experts.w_in.data", lambda t: t.view(torch.uint8), "torch.uint8"),
])
def test_misshaped_quantized_experts_are_refused_at_load(quantized, tmp_path, bits, name,
                                                          edit, match):
    bad = _tamper(quantized[bits], tmp_path / "bad", name, edit)
    with pytest.raises(CheckpointError):  # the resident loader refuses it
        qio.load_quantized(bad)
    with pytest.raises(ShardError, match=f"{name} in .*{match}.*the model needs"):
        load_offloaded(bad, "64MiB")
