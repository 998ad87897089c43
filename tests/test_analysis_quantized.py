"""`moekit analyze` of `moekit quantize` outputs: the loads it reports and the "same top-1"
of --compare against counts made here, by routing the same tokens through models loaded
with moekit.quant's loaders and reading the routers' outputs with forward hooks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from moekit.analysis.cli import run
from moekit.layer import MoE
from moekit.quant import load_model, load_quantized, quantize_checkpoint
from moekit.train import load_corpus
from tests.test_analysis import parse, trained  # noqa: F401  (a fixture, used by name)

SEQ_LEN, TOKENS, BATCH = 32, 1024, 16


def sequences(text) -> torch.Tensor:
    """What analyze routes: the validation split's first TOKENS bytes as [B, SEQ_LEN]."""
    val = load_corpus(str(text)).val
    return val[:TOKENS].long().view(-1, SEQ_LEN)


def decisions(model, ids_BL) -> list[list[dict[int, float]]]:
    """Per MoE layer, per token: {expert: combine weight}, from hooks on the routers."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    seen: list[list[dict[int, float]]] = [[] for _ in layers]

    def hook(i):
        def read(module, inputs, output):
            plan = output.plan
            tokens = [dict() for _ in range(plan.probs_TE.shape[0])]
            for t, e, w in zip(plan.token_S.tolist(), plan.expert_S.tolist(),
                               plan.weight_S.tolist(), strict=True):
                tokens[t][e] = w
            seen[i].extend(tokens)
        return read

    handles = [m.router.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, ids_BL.shape[0], BATCH):
                model(ids_BL[start:start + BATCH])
    finally:
        for h in handles:
            h.remove()
    return seen


def top1(chosen: dict[int, float]) -> int:
    """The chosen expert of the largest weight, the lowest id among equal ones."""
    return min(chosen, key=lambda e: (-chosen[e], e))


def analyze(trained_root, out, *argv) -> None:
    assert run(parse(*argv, "--data", str(trained_root / "text.txt"), "--tokens",
                     str(TOKENS), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH),
                     "--out", str(out))) == 0


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("quantized")
    return {"q8": quantize_checkpoint(trained / "run", root / "q8", bits=8),
            "q4": quantize_checkpoint(trained / "run", root / "q4", bits=4, group_size=32)}


def test_loads_of_a_quantized_model_match_a_recount(trained, quantized, tmp_path):  # noqa: F811
    analyze(trained, tmp_path / "a", str(quantized["q8"]))
    layers = json.loads((tmp_path / "a" / "routing.json").read_text())["layers"]
    seen = decisions(load_quantized(quantized["q8"]), sequences(trained / "text.txt"))
    assert len(layers) == len(seen) == 2
    for layer, tokens in zip(layers, seen, strict=True):
        counts = Counter(e for chosen in tokens for e in chosen)
        assert layer["load"] == [counts[e] for e in range(layer["num_experts"])]
        assert sum(layer["load"]) == TOKENS * layer["top_k"]


@pytest.mark.parametrize("before,after", [("float", "q8"), ("q8", "q4")])
def test_compare_same_top1_matches_a_recount(trained, quantized, tmp_path, before, after):  # noqa: F811
    paths = {"float": trained / "run", **quantized}
    analyze(trained, tmp_path / "c", str(paths[before]), "--compare", str(paths[after]))
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    ids_BL = sequences(trained / "text.txt")
    seen = [decisions(load_model(paths[side]) if side == "float"
                      else load_quantized(paths[side]), ids_BL) for side in (before, after)]
    for layer, a, b in zip(result["layers"], *seen, strict=True):
        same = sum(top1(x) == top1(y) for x, y in zip(a, b, strict=True))
        same_set = sum(set(x) == set(y) for x, y in zip(a, b, strict=True))
        # both are whole counts over TOKENS: one token off is 1/1024
        assert layer["same_top1"] == same / TOKENS
        assert layer["same_expert_set"] == same_set / TOKENS
    if (before, after) == ("q8", "q4"):  # int4 g32 moves some tokens: not a vacuous check
        assert any(c["same_expert_set"] < 1 for c in result["layers"])
    assert result["meta"]["after"]["weights"]["bits"] == int(after[1])


def test_a_quantized_output_routes_its_float_checkpoints_text(trained, quantized, tmp_path,  # noqa: F811
                                                             capsys):
    """Without --data a quantized output reads the corpus its float checkpoint recorded
    (quantized.json's source), as the float one does; one without that record asks."""
    out = tmp_path / "a"
    assert run(parse(str(quantized["q8"]), "--tokens", str(TOKENS), "--out", str(out))) == 0
    meta = json.loads((out / "routing.json").read_text())["meta"]
    assert meta["source"].startswith(str(trained / "text.txt"))
    path = quantized["q8"] / "quantized.json"
    old = json.loads(path.read_text())
    try:
        path.write_text(json.dumps({k: v for k, v in old.items() if k != "source"}))
        assert run(parse(str(quantized["q8"]), "--out", str(tmp_path / "b"))) == 2
        err = capsys.readouterr().err
        assert f"checkpoint={str(quantized['q8'])!r}" in err and "pass --data" in err, err
    finally:
        path.write_text(json.dumps(old))
