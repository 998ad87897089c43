"""What loading a checkpoint costs in memory and imports: building the model on the
meta device imports no torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.models import MoETransformer, preset
from moekit.quant.io import quantize_checkpoint
from moekit.train.checkpoint import save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _save(run: Path, **changes) -> MoETransformer:
    """A random fp32 model saved as the training checkpoint ``run``; its router's fp32
    balancing buffers (where it has them) set to values bf16 cannot hold."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", **changes)).eval()
    for moe in model.moe_layers():
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.copy_(torch.randn_like(moe.router.expert_bias) * 1e-3)
            moe.router.load.copy_(torch.arange(257.0, 257.0 + moe.router.load.numel()))
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": model.config.to_dict()})
    return model


NO_DYNAMO = textwrap.dedent("""
    import sys, torch
    from moekit.offload import load_offloaded
    from moekit.quant.io import load_model

    HEAVY = ("torch._dynamo", "sympy")
    assert not any(m in sys.modules for m in HEAVY), "imported before any load"
    kind, path = sys.argv[1:]
    if kind == "offloaded":
        load_offloaded(path, "1MiB").expert_offload.close()
    else:
        load_model(path, torch.bfloat16 if kind == "bf16" else None)
    print(sorted(m for m in HEAVY if m in sys.modules))
""")


@pytest.mark.parametrize("kind", ["resident", "bf16", "offloaded", "quantized"])
def test_a_load_imports_no_torch_dynamo(tmp_path, kind):
    """Building the model on the meta device ran torch's Python references (the weight
    inits' normal_, the rotary table's arange, to_empty's empty_like), which imported
    torch._dynamo, sympy and triton: +75 MiB of RssAnon and ~70 MiB of libraries."""
    _save(tmp_path / "run")
    path = tmp_path / "run"
    if kind == "quantized":
        path = quantize_checkpoint(path, tmp_path / "q", bits=4, group_size=32)
    out = subprocess.run([sys.executable, "-c", NO_DYNAMO, kind, str(path)],
                         capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"
