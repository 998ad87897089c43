"""What loading a checkpoint costs in memory and imports: a load in another dtype
converts one tensor at a time (its peak RSS, in a fresh process, is the converted model
plus one stored tensor, not the stored model plus the converted one), with the values
of ``model.to(dtype)``; building the model on the meta device imports no torch._dynamo."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.models import MoETransformer, preset
from moekit.quant.io import load_model, load_quantized, quantize_checkpoint
from moekit.train.checkpoint import save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
MiB = 2**20


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


def _assert_same(got: MoETransformer, want: MoETransformer) -> None:
    """Every parameter and buffer (the rotary tables too) equal in dtype and bits."""
    want_all = dict(want.named_buffers()) | dict(want.named_parameters())
    got_all = dict(got.named_buffers()) | dict(got.named_parameters())
    assert got_all.keys() == want_all.keys()
    for name, t in want_all.items():
        assert got_all[name].dtype == t.dtype, name
        assert torch.equal(got_all[name], t), name


CONFIGS = [
    # LMConfig changes                                   what it exercises
    {},                                                  # plain softmax router
    {"tie_embeddings": True, "router": "sigmoid",        # tied weights stay one tensor;
     "bias_update_rate": 1e-3},                          # fp32 balancing buffers
    {"router": "hash", "num_shared_experts": 1,          # an int64 buffer; shared
     "shared_expert_gate": True, "moe_every": 2},        # experts; a dense layer
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("changes", CONFIGS)
def test_a_load_in_another_dtype_equals_the_model_moved_to_it(tmp_path, changes, dtype):
    model = _save(tmp_path / "run", **changes)
    loaded = load_model(tmp_path / "run", dtype)
    want = copy.deepcopy(model).to(dtype)  # torch's Module.to on the model in memory
    _assert_same(loaded, want)
    for name, w in model.named_parameters():  # the weights themselves: w.to(dtype)
        assert torch.equal(loaded.get_parameter(name), w.detach().to(dtype)), name
    if model.config.tie_embeddings:
        assert loaded.head.weight is loaded.embed.weight
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want(ids).logits)


@pytest.mark.parametrize("scope", ["experts", "all"])
def test_a_quantized_load_in_bf16_equals_the_loaded_model_moved_to_it(tmp_path, scope):
    _save(tmp_path / "run")
    q = quantize_checkpoint(tmp_path / "run", tmp_path / "q", bits=8, scope=scope,
                            embeddings=False)
    _assert_same(load_model(q, torch.bfloat16),
                 load_quantized(q).to(torch.bfloat16))  # as loaded before: whole, then .to


# A fresh process loads a warm-up checkpoint first (the imports and one-off allocations
# of any load), resets its peak (clear_refs 5, Linux 4.0+) and loads the big one.
PEAK = textwrap.dedent("""
    import json, sys, torch
    from moekit.quant.io import load_model

    def kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    load_model(sys.argv[1], torch.bfloat16)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        print(json.dumps({"skip": str(e)}))
        sys.exit()
    before = kib("VmRSS")
    model = load_model(sys.argv[2], torch.bfloat16)
    print(json.dumps({"before": before, "peak": kib("VmHWM")}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_a_bf16_load_of_an_fp32_checkpoint_peaks_at_bf16_plus_one_tensor(tmp_path):
    _save(tmp_path / "warm")
    # 8 layers of 16 experts, D=256 F=512: 201 MiB in fp32, 100 MiB in bf16, the largest
    # tensor (one layer's w_in) 16 MiB; a load in ~2 s
    model = _save(tmp_path / "big", dim=256, num_layers=8, num_heads=4, ffn_dim=512,
                  num_experts=16, vocab_size=256, max_seq_len=256)
    sizes = [t.numel() for t in model.state_dict().values() if t.is_floating_point()]
    fp32, bf16, largest = 4 * sum(sizes), 2 * sum(sizes), 4 * max(sizes)
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "warm"),
                          str(tmp_path / "big")], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": ""})
    got = json.loads(out.stdout.splitlines()[-1])
    if "skip" in got:
        pytest.skip(f"cannot reset the peak RSS: {got['skip']}")
    grew = (got["peak"] - got["before"]) * 1024
    # the bf16 model, the one fp32 buffer each tensor is read into, and 8 MiB for the
    # allocator, Python objects and the rotary tables (measured 2 MiB: 118 MiB in all, on
    # the 2-vCPU Intel Xeon VM); the whole-model .to(bfloat16) this replaced held every
    # fp32 tensor too: fp32 + bf16, 301 MiB (300 measured)
    bound = bf16 + largest + 8 * MiB
    assert grew <= bound < fp32 + bf16, (grew / MiB, bound / MiB, (fp32 + bf16) / MiB)


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
