"""The README's Python examples run as written.

Each example is taken from the README itself (so an edit there is what is tested) and
executed with only the names it leaves undefined (a model, input tensors) given small
values here; checks on what it computes follow where the example implies a result.
Examples that need a transformers download, torchrun or a checkpoint on disk are
left to their own tests (test_hf*, test_distributed*, test_offload*)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.reference import ref_expert

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def block(first_line: str) -> str:
    """The one README example whose code starts with ``first_line``."""
    found = [b for b in python_blocks() if b.startswith(first_line)]
    assert len(found) == 1, f"{len(found)} README examples start with {first_line!r}"
    return found[0]


def run(code: str, **names) -> dict:
    scope = dict(names)
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    return scope


def _per_token_swiglu(x_TD, experts_TK, weights_TK, w_in, w_out):
    """sum_k weights_TK[t, k] * expert(x_TD[t]) token by token: tests/reference.py's expert."""
    experts = SimpleNamespace(w_in=w_in, w_out=w_out, b_in=None, b_out=None)
    cfg = SimpleNamespace(activation="swiglu")
    return torch.stack([sum(w * ref_expert(x_D, experts, int(e), cfg)
                            for e, w in zip(e_K, w_K, strict=True))
                        for x_D, e_K, w_K in zip(x_TD, experts_TK, weights_TK, strict=True)])


def tiny_lm():
    from moekit.models import MoETransformer, preset

    torch.manual_seed(0)
    # dims of 64: int4 groups of 64 must tile every input dimension
    return MoETransformer(preset("tiny", dim=64, ffn_dim=64, max_seq_len=128)).eval()


def test_quickstart(capsys):
    scope = run(block("import torch\nimport moekit\n"))
    y, x = scope["y"], scope["x"]
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert scope["moe"].experts.w_in.grad is not None  # the backward ran
    printed = capsys.readouterr().out  # what the comment promises: load, drops, entropy, z
    for key in ("tokens_per_expert", "dropped_fraction", "router_entropy", "z_loss"):
        assert key in printed


def test_train_in_python(tmp_path, monkeypatch):
    code = block("from moekit.models import MoETransformer, generate, preset\n")
    assert "TrainConfig(steps=200)" in code and '"runs/py"' in code
    code = code.replace("TrainConfig(steps=200)",
                        "TrainConfig(steps=2, eval_every=2, eval_batches=1, warmup_steps=1)")
    code = code.replace('preset("small"', 'preset("tiny", max_seq_len=128')  # seconds, not minutes
    monkeypatch.chdir(tmp_path)
    run(code)
    assert (tmp_path / "runs" / "py" / "metrics.jsonl").is_file()


def test_analyze_in_python(tmp_path, monkeypatch, capsys):
    code = block("from moekit.analysis import analyze_model\n")
    monkeypatch.chdir(tmp_path)
    model = tiny_lm()
    ids_BL = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    scope = run(code, model=model, ids_BL=ids_BL)
    layers = scope["layers"]
    assert [layer["name"] for layer in layers] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert all(layer["tokens"] == 128 and sum(layer["load"]) == 128 * 2 for layer in layers)
    assert capsys.readouterr().out.count("blocks.") == 2
    for name in ("report.md", "routing.json", "tokens.csv"):
        assert (tmp_path / "analysis" / name).is_file()


def test_engine(capsys):
    scope = run(block("from moekit.inference import Engine, GenerationConfig\n"),
                model=tiny_lm())
    gens, stats = scope["gens"], scope["stats"]
    assert len(gens) == 2 and gens[0].prompt == list(b"def ")
    assert 1 <= len(gens[1].tokens) <= 64 and stats.tokens_per_s > 0
    assert "tokens/s" in capsys.readouterr().out


def test_fused_functions(monkeypatch):
    """The Triton section's example: on CUDA, or on CPU through Triton's interpreter
    (conftest.py imports the kernels interpreted; the interpreter reads the variable
    while it runs too)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the example runs moekit's Triton kernels)")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    T, D, E, F = 12, 16, 4, 8
    x_TD, w_router = torch.randn(T, D), torch.randn(E, D)
    w_in_EDG, w_out_EFD = torch.randn(E, D, 2 * F) / 4, torch.randn(E, F, D) / 4
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    scope = run(block("from moekit.functions.routing import fused_dispatch\n"),
                x_TD=x_TD.to(dev), w_router=w_router.to(dev), w_in_EDG=w_in_EDG.to(dev),
                w_out_EFD=w_out_EFD.to(dev))
    experts_TK, scores_TE = scope["experts_TK"].cpu(), scope["scores_TE"].cpu()
    # independent reference: softmax top-2, renormalised, SwiGLU experts token by token
    probs_TE = torch.softmax(x_TD @ w_router.T, -1)
    top_TK = probs_TE.topk(2, -1)
    assert torch.equal(experts_TK.sort(-1).values, top_TK.indices.sort(-1).values)
    weights_TK = scores_TE.gather(1, experts_TK)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)  # renormalize=True
    ref = _per_token_swiglu(x_TD, experts_TK, weights_TK, w_in_EDG, w_out_EFD)
    torch.testing.assert_close(scope["y_TD"].cpu(), ref, rtol=1e-4, atol=1e-5)


def test_quantize_and_decode_experts():
    torch.manual_seed(0)
    T, D, E, F = 3, 64, 4, 32
    w_in, w_out = torch.randn(E, D, 2 * F) / 8, torch.randn(E, F, D) / 8
    x_TD = torch.randn(T, D)
    experts_TK = torch.tensor([[0, 2], [1, 2], [3, 0]])
    weights_TK = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    ids = torch.tensor([list(b"def f(x):")])
    model = tiny_lm()
    scope = run(block("import moekit, torch\nfrom moekit.inference import decode_experts\n"),
                model=model, ids=ids, x_TD=x_TD, experts_TK=experts_TK,
                weights_TK=weights_TK, w_in=w_in, w_out=w_out)
    assert scope["model"] is model  # quantized in place
    assert scope["logits"].shape == (1, ids.shape[1], model.config.vocab_size)
    ref = _per_token_swiglu(x_TD, experts_TK, weights_TK, w_in, w_out)
    torch.testing.assert_close(scope["y_TD"], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("line", [0, 1])
def test_quantize_scopes(line):
    """Two alternatives, one per line: each on its own model."""
    import moekit
    from moekit.quant.linear import QuantizedLinear
    from moekit.quant.tensor import QuantizedTensor

    code = block("model = moekit.quantize(model, bits=4, group_size=64)").splitlines()[line]
    model = run(code, moekit=moekit, model=tiny_lm())["model"]
    assert isinstance(model.blocks[0].ffn.experts.w_in, QuantizedTensor)
    # "everything" quantizes attention too, scope="experts" keeps it float
    assert isinstance(model.blocks[0].attn.qkv, QuantizedLinear) == (line == 0)
