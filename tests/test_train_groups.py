"""Group-limited routing (DeepSeek-V3) through the LM config and `moekit train`.

Shape letters: T tokens, E experts, G router groups, X experts per group (E / G).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.models import LMConfig, MoETransformer
from moekit.routing.router import Router
from moekit.train import checkpoint as ckpt_io
from moekit.train.cli import describe_model
from moekit.train.generate_cli import load_model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
SMALL = ["--preset", "tiny", "--warmup", "1", "--batch-size", "2", "--seq-len", "16",
         "--eval-every", "3", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(20):
        (root / f"mod_{i:02d}.py").write_text(TEXT * (2 + i % 3) + f"# file {i}\n")
    return root


def allowed_groups_TG(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, router: str,
                      num_groups: int, topk_groups: int) -> torch.Tensor:
    """The oracle: an expert scores its softmax (sigmoid) probability + its selection
    bias; softmax groups score their best expert, sigmoid groups the sum of their best
    two; each token keeps its best topk_groups groups."""
    T, E = logits_TE.shape
    logits_TE = logits_TE.double()
    p_TE = logits_TE.softmax(-1) if router == "softmax" else logits_TE.sigmoid()
    s_TGX = (p_TE + (0 if bias_E is None else bias_E.double())).view(T, num_groups, -1)
    best_TGX = s_TGX.sort(-1, descending=True).values
    group_TG = best_TGX[..., 0] if router == "softmax" else best_TGX[..., :2].sum(-1)
    allowed_TG = torch.zeros(T, num_groups, dtype=torch.bool)
    for t in range(T):  # a per-token loop: obviously right, not fast
        for g in sorted(range(num_groups), key=lambda g: -float(group_TG[t, g]))[:topk_groups]:
            allowed_TG[t, g] = True
    return allowed_TG


def routed_pairs(model: MoETransformer, ids: torch.Tensor) -> list:
    """(router, logits_TE, token_S, expert_S) of every MoE layer for one forward."""
    seen: list = []

    def hook(mod, _inp, out):
        plan = out.plan
        seen.append((mod, plan.logits_TE.detach(), plan.token_S, plan.expert_S))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_cli_trained_model_routes_within_its_groups(tmp_path, corpus_dir, capsys, router):
    out = tmp_path / "run"
    rc = cli_main(["train", *SMALL, "--data", str(corpus_dir), "--steps", "3", "--out",
                   str(out), "--router", router, "--experts", "8", "--top-k", "2",
                   "--groups", "4", "--topk-groups", "2", "--bias-update-rate", "0.01"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"router={router} groups=4 topk_groups=2" in printed  # the model line
    state = json.loads((out / "step_00000003" / "state.json").read_text())
    assert state["model_config"]["num_groups"] == 4
    assert state["model_config"]["topk_groups"] == 2
    model = load_model(str(out))
    assert model.config.num_groups == 4 and model.config.topk_groups == 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=gen)
    layers = routed_pairs(model.eval(), ids)
    assert len(layers) == model.config.num_layers
    for mod, logits_TE, token_S, expert_S in layers:
        assert mod.expert_bias is not None and mod.expert_bias.abs().sum() > 0  # it moved
        allowed_TG = allowed_groups_TG(logits_TE, mod.expert_bias, router, 4, 2)
        group_S = expert_S // 2  # X = 8 / 4 experts per group
        assert allowed_TG[token_S, group_S].all()
        assert len(token_S) == 2 * logits_TE.shape[0]  # dropless: K pairs per token
    # the decode path (no one-call kernel for groups) generates from it too
    rc = cli_main(["generate", "--checkpoint", str(out), "--prompt", "def ",
                   "--max-new-tokens", "4"])
    assert rc == 0 and capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("flags,flag,message", [
    (["--groups", "3"], "--groups", "it must divide num_experts=8"),
    (["--groups", "0"], "--groups", "positive"),
    (["--groups", "4", "--topk-groups", "5"], "--topk-groups", "between 1 and num_groups=4"),
    (["--groups", "4", "--topk-groups", "0"], "--topk-groups", "positive"),
    (["--groups", "4", "--topk-groups", "1", "--top-k", "3"], "--top-k",
     "topk_groups * experts per group = 2"),
    (["--groups", "2", "--router", "hash"], "--groups", "router='softmax' or 'sigmoid'"),
    (["--groups", "2", "--router", "switch", "--top-k", "1"], "--groups",
     "router='softmax' or 'sigmoid'"),
    (["--groups", "2", "--router", "expert_choice"], "--groups",
     "router='softmax' or 'sigmoid'"),
])
def test_bad_group_flags_are_refused_naming_the_flag(tmp_path, corpus_dir, capsys, flags, flag,
                                                     message):
    rc = cli_main(["train", *SMALL, "--data", str(corpus_dir), "--steps", "1", "--out",
                   str(tmp_path / "run"), "--experts", "8", *flags])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"moekit train: error: {flag}: ") and message in err
    assert not (tmp_path / "run").exists()


def test_config_without_group_fields_loads_as_no_groups(tmp_path, corpus_dir, capsys,
                                                        monkeypatch):
    # a checkpoint written before the fields existed: its model_config lacks them
    real = LMConfig.to_dict

    def old_to_dict(self):
        d = real(self)
        del d["num_groups"], d["topk_groups"]
        return d

    monkeypatch.setattr(LMConfig, "to_dict", old_to_dict)
    out = tmp_path / "old"
    assert cli_main(["train", *SMALL, "--data", str(corpus_dir), "--steps", "2", "--out",
                     str(out)]) == 0
    monkeypatch.undo()
    state = json.loads((out / "step_00000002" / "state.json").read_text())
    assert "num_groups" not in state["model_config"]
    model = load_model(str(out))
    assert (model.config.num_groups, model.config.topk_groups) == (1, 1)
    ck = ckpt_io.load_checkpoint(out)
    assert torch.equal(model.state_dict()["embed.weight"], ck.model["embed.weight"])
    assert cli_main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    assert cli_main(["plan", str(out / "step_00000002" / "state.json")]) == 0
    capsys.readouterr()


def test_plan_reads_a_grouped_model_config(capsys, tmp_path):
    cfg = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=16, num_experts=8, top_k=2,
                   router="sigmoid", num_groups=4, topk_groups=2)
    path = tmp_path / "lm.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert cli_main(["plan", str(path)]) == 0
    assert "parameters" in capsys.readouterr().out


def test_group_fields_reach_every_moe_layer_and_the_model_line():
    cfg = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=16, num_experts=6, top_k=3,
                   router="softmax", num_groups=3, topk_groups=2)
    model = MoETransformer(cfg)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers and all((r.cfg.num_groups, r.cfg.topk_groups) == (3, 2) for r in routers)
    assert "groups=3 topk_groups=2" in describe_model(model, cfg)
    assert "groups" not in describe_model(MoETransformer(cfg.replace(num_groups=1, topk_groups=1)),
                                          cfg.replace(num_groups=1, topk_groups=1))
