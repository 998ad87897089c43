"""`moekit analyze`: routing counts against brute-force loops over the router's own
decisions, statistics against hand-worked cases, and the report of a tiny trained LM."""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import moekit
from moekit.analysis import RoutingCollector, analyze_model
from moekit.analysis.cli import add_arguments, analyze_checkpoint, run
from moekit.analysis.collect import CLASS_NAMES, LayerRouting, byte_class_table
from moekit.analysis.report import fmt_items, layer_section
from moekit.analysis.stats import (
    coactivation_expected,
    coactivation_lift,
    imbalance,
    mutual_information_bits,
    summarise,
    top_lift,
)


class EmbedMoE(nn.Module):
    """Token ids -> embedding -> one MoE layer: the smallest model with routing."""

    def __init__(self, cfg: moekit.MoEConfig, vocab: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.dim)
        self.moe = moekit.MoE(cfg)

    def forward(self, ids_BL):
        return self.moe(self.embed(ids_BL), token_ids=ids_BL)


ROUTERS = [
    dict(router="softmax", top_k=2),
    dict(router="sigmoid", top_k=3, num_groups=2, topk_groups=1),
    dict(router="softmax", top_k=2, capacity_factor=0.5),  # drops
    dict(router="expert_choice", top_k=2),
    dict(router="hash", top_k=2, hash_vocab_size=256),
]


@pytest.mark.parametrize("kw", ROUTERS)
def test_collector_matches_brute_force(kw):
    torch.manual_seed(0)
    E, D = 6, 16
    model = EmbedMoE(moekit.MoEConfig(dim=D, ffn_dim=8, num_experts=E, **kw)).eval()
    batches = [torch.randint(0, 256, (3, 11)), torch.randint(0, 256, (2, 7))]
    with RoutingCollector(model, 256) as rc:
        for ids in batches:
            rc.set_tokens(ids)
            model(ids)
    layer = rc.layers[0]
    classes = byte_class_table()
    load, co = [0] * E, [[0] * E for _ in range(E)]
    tok = torch.zeros(256, E, dtype=torch.long)
    pat = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), E, dtype=torch.long)
    entropy, dropped, denom = 0.0, 0.0, 0.0
    with torch.no_grad():
        for ids in batches:
            x = model.embed(ids).reshape(-1, D)
            plan = model.moe.router(x, ids.reshape(-1), ids.shape[1]).plan
            chosen = [set() for _ in range(x.shape[0])]
            for t, e in zip(plan.token_S.tolist(), plan.expert_S.tolist(), strict=True):
                load[e] += 1
                chosen[t].add(e)
                b, pos = divmod(t, ids.shape[1])
                v = int(ids[b, pos])
                tok[v, e] += 1
                prev = 0 if pos == 0 else int(classes[int(ids[b, pos - 1])])
                pat[prev, classes[v], e] += 1
            for s in chosen:
                for i in s:
                    for j in s:
                        co[i][j] += 1
            for p_E in plan.probs_TE:
                entropy -= sum(float(p) * math.log(float(p)) for p in p_E if p > 0)
            stats = model.moe(model.embed(ids), token_ids=ids).stats
            n = x.shape[0] if kw["router"] == "expert_choice" else len(plan.token_S)
            dropped += float(stats.dropped_fraction) * n
            denom += n
    assert layer.load_E.tolist() == load
    assert layer.co_EE.tolist() == co
    assert torch.equal(layer.token_VE, tok)
    assert torch.equal(layer.pattern_CCE, pat)
    assert layer.tokens == 3 * 11 + 2 * 7
    assert layer.entropy_sum == pytest.approx(entropy, rel=1e-5)
    assert layer.dropped / layer.drop_denominator == pytest.approx(dropped / denom, abs=1e-6)
    if "capacity_factor" in kw:
        assert layer.dropped > 0


@pytest.mark.parametrize("kw", [
    dict(router="expert_choice", top_k=2, capacity_factor=0.5),  # tokens no expert took
    dict(router="softmax", top_k=2, capacity_factor=0.5),  # pairs over capacity
])
def test_dropped_fraction_is_the_exact_count(kw):
    """The dropped fraction is a ratio of whole counts (dropped / routed, summed over
    batches), from the routing decided by hand here: it had been summed from each batch's
    fp32 fraction times its size (0.5156249850988388 for 33 of 64)."""
    torch.manual_seed(0)
    E, D = 4, 16
    model = EmbedMoE(moekit.MoEConfig(dim=D, ffn_dim=8, num_experts=E, **kw)).eval()
    batches = [torch.randint(0, 256, (3, 7)), torch.randint(0, 256, (1, 7))]  # T 21, 7
    layer = analyze_model(model, torch.cat(batches), 256, batch_size=3)[0]
    dropped = total = 0
    with torch.no_grad():
        for ids in batches:
            x = model.embed(ids).reshape(-1, D).double()
            logits = x @ model.moe.router.weight.double().T
            T = x.shape[0]
            if kw["router"] == "expert_choice":  # each expert takes its C best tokens
                C = min(T, math.ceil(0.5 * T / E))
                covered = {int(t) for e in range(E)
                           for t in logits.softmax(-1)[:, e].topk(C).indices}
                dropped, total = dropped + T - len(covered), total + T
            else:  # each token its 2 best experts; an expert keeps its first C pairs
                C = math.ceil(0.5 * T * 2 / E)
                seen = [0] * E
                for t in range(T):
                    for e in logits[t].topk(2).indices.tolist():
                        seen[e] += 1
                        dropped += seen[e] > C
                total += 2 * T
    assert dropped > 0
    assert layer["dropped_fraction"] == dropped / total


def test_hooks_are_removed_and_input_checked():
    model = EmbedMoE(moekit.MoEConfig(dim=8, ffn_dim=8, num_experts=4))
    with RoutingCollector(model, 256) as rc:
        with pytest.raises(ValueError, match="set_tokens"):
            model(torch.randint(0, 256, (2, 5)))  # no set_tokens: refused
        with pytest.raises(ValueError, match="ids_BL"):
            rc.set_tokens(torch.tensor([[300]]))
    assert not model.moe._forward_hooks and not model.moe.router._forward_hooks
    with pytest.raises(ValueError, match="no moekit.MoE layers"):
        RoutingCollector(nn.Linear(2, 2), 256)


# -- statistics on hand-worked cases -------------------------------------------------


def test_statistics_hand_worked():
    assert imbalance(torch.tensor([5, 5, 5, 5]))["coefficient_of_variation"] == 0
    imb = imbalance(torch.tensor([30, 10, 0, 0]))
    assert (imb["max_over_mean"], imb["starved_experts"]) == (3.0, 2)
    assert imb["load_entropy_normalised"] == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    # expert 0 only ever sees 'a', expert 1 only 'b', half the text each: 1 bit
    token_VE = torch.zeros(256, 2, dtype=torch.long)
    token_VE[ord("a"), 0] = token_VE[ord("b"), 1] = 50
    assert mutual_information_bits(token_VE) == pytest.approx(1.0)
    token_VE[ord("a"), 1] = token_VE[ord("b"), 0] = 50  # now independent: 0 bits
    assert mutual_information_bits(token_VE) == pytest.approx(0.0, abs=1e-12)
    base = torch.zeros(256, dtype=torch.long)
    base[ord("a")], base[ord("b")] = 20, 80
    counts = torch.zeros(256, 1, dtype=torch.long)
    counts[ord("a"), 0], counts[ord("b"), 0] = 10, 10  # 'a': 50% at the expert vs 20%
    items = top_lift(counts, base, 0, [repr(chr(i)) for i in range(256)], 5, 1)
    assert items[0]["item"] == "'a'" and items[0]["lift"] == pytest.approx(2.5)
    assert items[0]["routed"] == pytest.approx(0.5)
    # 10 tokens: experts 0,1 always together (lift 10/5 = 2), expert 2 never with them
    co = torch.tensor([[5, 5, 0], [5, 5, 0], [0, 0, 5]])
    lift = coactivation_lift(co, 10)
    assert lift[0, 1] == pytest.approx(2.0) and lift[0, 2] == 0


def test_expert_items_rank_by_tokens_beyond_chance_not_by_lift():
    """An item seen 7 times at lift 7 had topped one seen 91 times at lift 4.6: the list
    ranks by count - occurrences x the expert's share, recomputed here by hand."""
    labels = [repr(chr(i)) for i in range(256)]
    base = torch.zeros(256, dtype=torch.long)
    counts = torch.zeros(256, 2, dtype=torch.long)
    for ch, occurrences, at_0 in (("x", 10, 7), ("y", 200, 91), ("z", 790, 2), ("w", 0, 0)):
        base[ord(ch)] = occurrences
        counts[ord(ch), 0], counts[ord(ch), 1] = at_0, occurrences - at_0
    items = top_lift(counts, base, 0, labels, 5, 5)
    N, pairs = int(base.sum()), int(counts[:, 0].sum())  # 1000 tokens, 100 at expert 0
    want = []
    for v in range(256):
        c, n = int(counts[v, 0]), int(base[v])
        expected = n * pairs / N
        if c >= 5 and c - expected > 0:
            want.append((c - expected, c, labels[v], c / expected))
    want.sort(reverse=True)
    assert [it["item"] for it in items] == [w[2] for w in want] == ["'y'", "'x'"]
    for it, (excess, c, _, lift) in zip(items, want, strict=True):
        assert it["count"] == c and it["excess"] == pytest.approx(excess)
        assert it["expected"] == pytest.approx(c - excess)
        assert it["lift"] == pytest.approx(lift)  # still shown
    row = fmt_items(items)
    assert row.startswith("`'y'` +71 x4.5") and "`'x'` +6 x7.0" in row


def random_k_sets(p_E: list[float], T: int, K: int, seed: int) -> Tensor:
    """[T, E] 0/1: T random K-expert sets, P(set) ~ prod over its experts of p/(1-p)
    (independent coins with these odds, kept when exactly K come up): the
    maximum-entropy routing that coactivation_expected takes as chance."""
    gen, kept, n = torch.Generator().manual_seed(seed), [], 0
    while n < T:
        coins = (torch.rand(100_000, len(p_E), generator=gen) < torch.tensor(p_E)).double()
        kept.append(coins[coins.sum(1) == K])
        n += kept[-1].shape[0]
    return torch.cat(kept)[:T]


@pytest.mark.parametrize("K,p_E", [
    (2, [0.5] * 8),  # equal loads: uniformly random 2-sets of 8 experts
    (2, [0.9, 0.5, 0.3, 0.2, 0.1, 0.1, 0.05, 0.0]),  # skewed, one expert never chosen
    (3, [0.8, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1]),
])
def test_coactivation_chance_is_random_routing_at_the_same_loads(K, p_E):
    """Routing drawn at random (no association between experts beyond their loads) is
    at chance on every pair, within sampling noise; the lift P(i and j) / (P(i) P(j)),
    whose 1.0 the plot called independent, is far below 1 for it at top-K."""
    T = 40_000
    hot_TE = random_k_sets(p_E, T, K, seed=K)
    co = (hot_TE.T @ hot_TE).long()
    expected = coactivation_expected(co, T, K)
    off = ~torch.eye(len(p_E), dtype=torch.bool)
    assert torch.equal(expected.diagonal(), co.diagonal().double())
    # K - 1 other experts per token: each row of pairs sums to (K - 1) * its load
    assert torch.allclose((expected * off).sum(1), (K - 1) * co.diagonal().double(),
                          rtol=1e-9, atol=1e-6)
    seen = off & (expected > 0)
    z = (co - expected)[seen] / expected[seen].sqrt()  # Poisson noise of a count
    assert z.abs().max() < 4.5, z
    assert torch.equal(co[off & (expected == 0)], torch.zeros_like(co[off & (expected == 0)]))
    if len(set(p_E)) == 1:
        E = len(p_E)
        assert coactivation_lift(co, T)[off].mean() == pytest.approx(
            (K - 1) * E / (K * (E - 1)), rel=0.02)  # 0.57 at top-2 of 8, not 1.0


def test_coactivation_chance_with_equal_loads_is_exact():
    """Equal loads: T K (K-1) / (E (E-1)) tokens per pair (uniform K-sets); expert choice:
    n_i n_j / T; top-1 has no pairs."""
    T, E = 700, 7
    for K in (2, 3, 7):
        co = torch.full((E, E), 0, dtype=torch.long)
        co.diagonal().fill_(T * K // E)
        want = T * K * (K - 1) / (E * (E - 1))
        got = coactivation_expected(co, T, K)
        assert got[0, 1] == pytest.approx(want, rel=1e-9) and got[2, 6] == got[0, 1]
    assert coactivation_expected(co, T, 1)[0, 1] == 0
    assert coactivation_expected(co, T, 2, expert_choice=True)[0, 1] == pytest.approx(
        (T * 7 // E) ** 2 / T)


def test_coactivation_pairs_rank_by_count_and_by_tokens_beyond_chance():
    """A pair seen twice had led "Most co-activated expert pairs" on its lift (two rare
    experts that only ever go together) ahead of pairs seen thousands of times. The
    report now lists the pairs seen most often and the pairs with the most tokens beyond
    chance; routing.json holds every pair with its count, chance and ratio."""
    from collections import Counter
    sets = ([(0, 1)] * 3000 + [(2, 3)] * 2500 + [(0, 2)] * 800 + [(1, 3)] * 700
            + [(0, 3)] * 500 + [(1, 2)] * 450 + [(4, 5)] * 2)
    E, K, T = 6, 2, len(sets)
    layer = LayerRouting("moe", E, K, 256)
    for s in sets:
        for i in s:
            layer.load_E[i] += 1
            for j in s:
                layer.co_EE[i, j] += 1
    layer.tokens, layer.pairs = T, K * T
    out = summarise(layer, torch.ones(256, dtype=torch.long), None)
    lift = torch.tensor(out["coactivation_lift"])
    assert lift.max() == lift[4, 5]  # the rare pair has by far the largest lift
    counts = Counter(sets)
    pairs = out["coactivation_pairs"]
    assert len(pairs) == E * (E - 1) // 2
    assert [(tuple(p["experts"]), p["tokens"]) for p in pairs if p["tokens"]] \
        == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    for p in pairs:
        c, x = counts.get(tuple(p["experts"]), 0), p["expected"]
        assert p["tokens"] == c and p["share"] == c / T and p["excess"] == pytest.approx(c - x)
        assert p["over_chance"] == (pytest.approx(c / x) if x > 0 else None)
    text = "\n".join(layer_section(out))
    frequent = text.split("most often: ")[1].split(".\n")[0]
    assert [w.split(" ")[0] for w in frequent.split("), ")] == ["0+1", "2+3", "0+2"]
    over = text.split("beyond chance): ")[1].split(".\n")[0]
    by_excess = sorted((x - c, i, j) for i in range(E) for j in range(i + 1, E)
                       for c, x in [(counts.get((i, j), 0), out["coactivation_expected"][i][j])]
                       if c > x)  # most tokens beyond chance first, ties: lower ids first
    assert [w.split(" ")[0] for w in over.split("), ")] \
        == [f"{i}+{j}" for _, i, j in by_excess[:3]]
    assert "4+5" not in frequent and not over.startswith("4+5")


def test_hash_router_specialisation_is_exact():
    """A hash router's expert is a function of the token: I(token; expert) equals the
    expert entropy minus log2(K) (the K experts of a token are equally likely)."""
    from moekit.models import MoETransformer, preset
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", router="hash"))
    ids = torch.randint(0, 256, (8, 32))
    layers = analyze_model(model, ids, 256, batch_size=3)
    load = torch.tensor(layers[0]["load"], dtype=torch.double)
    p = load / load.sum()
    h = float(-(p[p > 0] * p[p > 0].log2()).sum())
    spec = layers[0]["specialisation"]
    assert spec["token_mutual_information_bits"] == pytest.approx(h - 1.0, abs=1e-9)
    assert spec["expert_entropy_bits"] == pytest.approx(h)


def test_router_entropy_is_not_reported_for_a_hash_router():
    """A hash router has no scores: the analysis had given the entropy of the 1/K it
    puts on the table's K experts, ln K, as "router entropy (33% of max)". A scored
    router's entropy is still the mean over tokens of its distribution's."""
    from moekit.analysis.report import summary_table
    from moekit.models import MoETransformer, preset
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 32))
    model = MoETransformer(preset("tiny", router="hash")).eval()
    layers = analyze_model(model, ids, 256, batch_size=4)
    assert layers[0]["router_entropy_nats"] is None
    assert layers[0]["router_entropy_normalised"] is None
    assert "n/a (hash: no scores)" in summary_table(layers)[2]
    model = MoETransformer(preset("tiny", router="softmax")).eval()
    layers = analyze_model(model, ids, 256, batch_size=4)
    router, inputs = model.blocks[0].ffn.router, []
    hook = router.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    p = (inputs[0].double() @ router.weight.double().T).softmax(-1)  # softmax over E
    want = float(-(p * p.log()).sum(1).mean())
    assert layers[0]["router_entropy_nats"] == pytest.approx(want, rel=1e-5)
    assert f"{want:.3f} nats" in summary_table(layers)[2]


# -- end to end on a tiny trained checkpoint -----------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def _json_source(root: Path) -> Path:
    """A text file of the stdlib's json decoder and encoder sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = root / "text.txt"
    text.write_text((stdlib / "json" / "decoder.py").read_text()
                    + (stdlib / "json" / "encoder.py").read_text())
    return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LM trained for 3 steps on two stdlib files."""
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    root = tmp_path_factory.mktemp("analyze")
    text = _json_source(root)
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, eval_every=3, eval_batches=1,
                      save_every=3, log_every=1)
    Trainer(preset("tiny", moe_every=1), cfg, load_corpus(str(text)), root / "run",
            progress=False).fit()
    return root


def test_analyze_trained_checkpoint(trained, capsys):
    out = trained / "report"
    assert run(parse(str(trained / "run"), "--data", str(trained / "text.txt"),
                     "--tokens", "1024", "--seq-len", "64", "--out", str(out))) == 0
    assert "blocks.0.ffn" in capsys.readouterr().out
    result = json.loads((out / "routing.json").read_text())
    assert result["meta"]["step"] == 3 and result["meta"]["tokens"] == 1024
    assert len(result["layers"]) == 2  # the tiny preset has 2 MoE layers
    for layer in result["layers"]:
        K, E = layer["top_k"], layer["num_experts"]
        assert sum(layer["load"]) == layer["pairs"] == 1024 * K
        assert [layer["coactivation"][e][e] for e in range(E)] == layer["load"]
        assert layer["dropped_fraction"] == 0  # dropless
        assert 0 < layer["router_entropy_nats"] <= math.log(E)
        assert sum(layer["load_share"]) == pytest.approx(1.0)
        for item in layer["specialisation"]["experts"]:
            assert all(t["count"] >= 5 for t in item["tokens"])
    report = (out / "report.md").read_text()
    assert "## Summary" in report and "| blocks.1.ffn |" in report
    for png in ("load_heatmap.png", "coactivation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cut", ["routing.json", "report.md"])
def test_analyze_onto_a_full_disk_keeps_the_report_there_before(trained, tmp_path, cut,
                                                                monkeypatch, capsys):
    """A rerun whose write fails partway (the disk fills while ``cut`` is written) had
    left a cut routing.json where a good one was, and a traceback; now the report there
    before is as it was, no temporary file is left, and the error is one line."""
    out = tmp_path / "report"
    argv = [str(trained / "run"), "--data", str(trained / "text.txt"), "--seq-len", "64",
            "--out", str(out)]
    assert run(parse(*argv, "--tokens", "512")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    write_text = Path.write_text

    def disk_fills(self, data, *args, **kwargs):
        if cut.split(".")[0] not in self.name:
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_fills)
    assert run(parse(*argv, "--tokens", "1024")) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert err == (f"moekit analyze: error: could not write out={str(out)!r}: No space "
                   "left on device; what was there before is unchanged"), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads((out / "routing.json").read_text())["meta"]["tokens"] == 512


def _failing_after_the_renames(monkeypatch, out: Path, where: str) -> None:
    """Inject a failure once the new files start going into ``out``: the directory's
    fsync, the rename onto report.md (routing.json's went first), or the removal of an
    earlier run's compare.json (made a directory, which unlink refuses)."""
    import errno
    import os
    if where == "directory fsync":
        real = os.fsync

        def fsync(fd):
            if Path(os.readlink(f"/proc/self/fd/{fd}")) == out:
                raise OSError(errno.EIO, "Input/output error (injected)")
            real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    elif where == "second rename":
        replace = os.replace

        def refuse(src, dst):
            if Path(dst).name == "report.md":
                raise OSError(errno.EIO, "Input/output error (injected)")
            replace(src, dst)
        monkeypatch.setattr(os, "replace", refuse)
    else:
        (out / "compare.json").mkdir()


@pytest.mark.parametrize("where,left", [
    ("directory fsync", "the new files are in place, whole, but the directory's fsync "
     "failed: a power loss before the disk syncs may undo the renames"),
    ("second rename", "routing.json is new (whole), the rest as before"),
    ("stale compare.json", "the new report is in place, but the earlier run's "
     "compare.json could not be removed"),
])
def test_analyze_says_what_a_write_failing_after_a_rename_left(trained, tmp_path, where,
                                                               left, monkeypatch, capsys):
    """A failure after the first new file was renamed into place had been reported as
    "what was there before is unchanged", untrue: the message now says what is on disk,
    and the files are as it says."""
    out = tmp_path / "report"
    argv = [str(trained / "run"), "--data", str(trained / "text.txt"), "--seq-len", "64",
            "--out", str(out)]
    assert run(parse(*argv, "--tokens", "512")) == 0
    old_report = (out / "report.md").read_text()
    capsys.readouterr()
    _failing_after_the_renames(monkeypatch, out, where)
    assert run(parse(*argv, "--tokens", "1024")) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    strerror = ("Is a directory" if where == "stale compare.json"
                else "Input/output error (injected)")
    assert err == (f"moekit analyze: error: could not write out={str(out)!r}: "
                   f"{strerror}; {left}"), err
    assert json.loads((out / "routing.json").read_text())["meta"]["tokens"] == 1024
    if where == "second rename":
        assert (out / "report.md").read_text() == old_report
    else:
        assert "1,024 tokens" in (out / "report.md").read_text()
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_plan_decode_reads_the_routing_of_analyze(trained, tmp_path, capsys):
    """`moekit plan RUN --decode --expert-load routing.json`: the step's distinct experts
    from the measured loads (each layer's sum over e of 1 - (1 - load_e / tokens)^B, here
    from the file), and the plan says so."""
    from moekit.cli import main as cli_main

    out = tmp_path / "report"
    assert run(parse(str(trained / "run"), "--data", str(trained / "text.txt"),
                     "--tokens", "512", "--seq-len", "64", "--out", str(out))) == 0
    capsys.readouterr()
    routing = json.loads((out / "routing.json").read_text())
    B = 3
    want = sum(sum(1 - (1 - c / layer["tokens"]) ** B for c in layer["load"])
               for layer in routing["layers"]) / len(routing["layers"])
    assert cli_main(["plan", str(trained / "run"), "--decode", "--batch", str(B),
                     "--expert-load", str(out / "routing.json"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["routing"] == "measured"
    assert plan["distinct_experts_per_layer"] == pytest.approx(want, rel=1e-12)
    assert cli_main(["plan", str(trained / "run"), "--decode", "--batch", str(B)]) == 0
    assert "uniform routing" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (("--tokens", "0"), ("tokens=0",)),
    (("--seq-len", "1000"), ("seq_len=1000", "max_seq_len=64")),
    (("--top", "0"), ("top=0",)),
])
def test_analyze_bad_input(trained, argv, words, capsys):
    args = parse(str(trained / "run"), "--data", str(trained / "text.txt"), *argv)
    with pytest.raises(ValueError) as e:
        analyze_checkpoint(args)
    for w in words:
        assert w in str(e.value)
    assert run(args) == 2 and "error" in capsys.readouterr().err


def test_analyze_of_a_dcp_checkpoint_names_what_to_pass(tmp_path, capsys):
    """A dcp_step_* directory had read "no state.json or LATEST there", like an empty one."""
    run_dir = tmp_path / "run"
    dcp = run_dir / "dcp_step_00000004"
    dcp.mkdir(parents=True)
    for name in ("manifest.json", ".metadata", "trainer.json"):
        (dcp / name).write_text("{}")
    assert run(parse(str(dcp))) == 1  # the checkpoint: a runtime failure
    err = capsys.readouterr().err
    for w in (f"checkpoint={str(dcp)!r}", "moekit train --nproc", "--resume",
              f"pass its run directory {str(run_dir)!r}"):
        assert w in err, err
    assert "/step_00000004" not in err  # not there: not offered
    (run_dir / "step_00000004").mkdir()
    (run_dir / "step_00000004" / "state.json").write_text("{}")
    assert run(parse(str(dcp))) == 1
    assert f"or {str(run_dir / 'step_00000004')!r}" in capsys.readouterr().err


def test_analyze_of_a_quantized_directory_reports_its_routing_and_weights(trained, tmp_path,
                                                                         capsys):
    """A `moekit quantize` output is analysed like its float checkpoint (it was refused,
    asking for the float one; users quantize and want to see its routing), its report
    naming the bits and that the routers stayed float32; written beside it by default."""
    from moekit.quant.io import quantize_checkpoint

    q = quantize_checkpoint(trained / "run", tmp_path / "q8", bits=8)
    assert run(parse(str(q), "--data", str(trained / "text.txt"), "--tokens", "512")) == 0
    out = tmp_path / "analysis" / "step_00000003_q8"
    meta = json.loads((out / "routing.json").read_text())["meta"]
    assert (meta["step"], meta["weights"]["bits"], meta["weights"]["group_size"]) == (3, 8, None)
    assert meta["weights"]["router_dtypes"] == ["float32"]
    report = (out / "report.md").read_text()
    for w in ("- weights: int8 (one scale per output channel)", "kept in float32"):
        assert w in report, report


def test_analyze_names_the_split_that_is_too_short(trained, tmp_path, capsys):
    """A 1,000-byte file validates on its last 5% (about 50 bytes): the error names the
    split and its size, not "the text has 51 tokens"."""
    from moekit.train import load_corpus
    text = tmp_path / "short.txt"
    text.write_text("x = 1\n" * 166 + "y = ")
    n = load_corpus(str(text)).val.numel()
    assert n < 64
    args = parse(str(trained / "run"), "--data", str(text), "--seq-len", "64")
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "--split: split='val'" in err and f"holds {n} tokens" in err, err
    assert "seq_len=64" in err


def test_analyze_defaults_to_the_training_corpus(trained):
    result, out = analyze_checkpoint(parse(str(trained / "run"), "--tokens", "256"))
    assert result["meta"]["source"] == f"{trained / 'text.txt'} (val split)"
    assert out == trained / "run" / "analysis" / "step_00000003"


def test_default_analysis_survives_the_run_going_on(tmp_path, capsys):
    """`moekit analyze RUN` without --out wrote into RUN/step_N/analysis, and the trainer
    deletes that directory when it prunes old checkpoints: the report was lost when the
    run went on. The default is now beside the checkpoints, where pruning never reaches."""
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    text = tmp_path / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text())
    corpus = load_corpus(str(text))
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=1, eval_batches=1,
                      save_every=1, keep_checkpoints=1, warmup_steps=0)
    Trainer(preset("tiny"), cfg, corpus, tmp_path / "run", progress=False).fit()
    assert run(parse(str(tmp_path / "run"), "--tokens", "64", "--seq-len", "16")) == 0
    written = [Path(w) for w in capsys.readouterr().out.split("wrote ")[1].split(", ")]
    report = next(w for w in written if w.name == "report.md")
    before = report.read_text()
    Trainer.resume(tmp_path / "run", corpus, progress=False, steps=2).fit()
    assert not (tmp_path / "run" / "step_00000001").exists()  # pruned (keep 1)
    assert report.exists() and report.read_text() == before
    assert report.parent == tmp_path / "run" / "analysis" / "step_00000001"


def test_moekit_command_runs_analyze(trained, capsys):
    from moekit.cli import main
    out = trained / "via_main"
    assert main(["analyze", str(trained / "run"), "--tokens", "256", "--seq-len", "32",
                 "--out", str(out)]) == 0
    assert (out / "report.md").exists() and "wrote" in capsys.readouterr().out


def test_analyze_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        analyze_checkpoint(parse(str(tmp_path / "nope")))


def test_analyze_refuses_when_the_training_corpus_is_gone(trained, tmp_path, capsys):
    """`moekit analyze` follows `moekit train --resume`'s rule: a run whose recorded
    corpus is gone needs --data (it had analyzed the Python standard library in its place
    without a word)."""
    from moekit.cli import main
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    text = tmp_path / "text.txt"
    text.write_text((trained / "text.txt").read_text())
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, eval_batches=1, warmup_steps=1)
    Trainer(preset("tiny"), cfg, load_corpus(str(text)), tmp_path / "run",
            progress=False).fit()
    text.unlink()  # the corpus the run was trained on is gone
    assert main(["analyze", str(tmp_path / "run"), "--tokens", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --data" in err, err
    assert str(text) in err and "does not exist here" in err, err
    assert not (tmp_path / "run" / "step_00000001" / "analysis").exists()
    # --data still analyzes any text
    assert main(["analyze", str(tmp_path / "run"), "--tokens", "256", "--seq-len", "32",
                 "--data", str(trained / "text.txt")]) == 0


def test_python_dash_m_moekit_runs_the_command(trained, tmp_path):
    """`python -m moekit analyze ...` (a checkout on PYTHONPATH, no console script) had
    failed with "No module named moekit.__main__"; it gives what `moekit analyze` gives."""
    import os
    import subprocess
    import sys
    src = str(Path(moekit.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [str(trained / "run"), "--tokens", "256", "--seq-len", "32"]
    done = subprocess.run([sys.executable, "-m", "moekit", "analyze", *argv,
                           "--out", str(tmp_path / "m")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert run(parse(*argv, "--out", str(tmp_path / "direct"))) == 0
    via_m = json.loads((tmp_path / "m" / "routing.json").read_text())
    direct = json.loads((tmp_path / "direct" / "routing.json").read_text())
    assert via_m["layers"] == direct["layers"]


def test_analysis_records_the_tokens_per_forward_pass(tmp_path, capsys):
    """A capacity (and expert choice) is a fraction of the tokens routed together, so a
    capped model's dropped fraction depends on --batch-size x --seq-len: routing.json and
    the report had not said how many, nor that training routed another number."""
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    text = tmp_path / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text())
    corpus = load_corpus(str(text))
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=16, eval_every=1, eval_batches=1,
                      warmup_steps=0)
    Trainer(preset("tiny", capacity_factor=1.0), cfg, corpus, tmp_path / "run",
            progress=False).fit()
    drops = {}
    for batch in (4, 1):
        out = tmp_path / f"b{batch}"
        assert run(parse(str(tmp_path / "run"), "--tokens", "256", "--seq-len", "16",
                         "--batch-size", str(batch), "--out", str(out))) == 0
        err = capsys.readouterr().err
        meta = json.loads((out / "routing.json").read_text())["meta"]
        assert meta["batch_size"] == batch and meta["tokens_per_forward"] == 16 * batch
        assert meta["train_tokens_per_forward"] == 4 * 16
        assert meta["routing_depends_on_batch"] is True
        assert ("warning" in err and "analysed 16 per pass, trained on 64" in err) \
            == (batch == 1), err
        report = (out / "report.md").read_text()
        assert f"routed {16 * batch} tokens per forward pass" in report
        assert "training routed 64" in report and "capacity factor 1" in report
        layers = json.loads((out / "routing.json").read_text())["layers"]
        drops[batch] = [layer["dropped_fraction"] for layer in layers]
    assert drops[1] != drops[4]  # what the note is about


def test_heatmaps_label_every_expert():
    """With 8 experts matplotlib had labelled 0, 2, 4, 6 only: a reader counted cells."""
    pytest.importorskip("matplotlib")
    from moekit.analysis.report import coactivation_figure, load_figure
    E = 8
    layers = [{"name": f"blocks.{i}.ffn", "num_experts": E, "load_share": [1 / E] * E,
               "coactivation": [[10] * E] * E, "coactivation_expected": [[5.0] * E] * E}
              for i in range(2)]
    load_ax = load_figure(layers).axes[0]
    assert [t.get_text() for t in load_ax.get_xticklabels()] == [str(e) for e in range(E)]
    for ax in coactivation_figure(layers).axes:
        if ax.get_images():
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                assert [t.get_text() for t in labels] == [str(e) for e in range(E)]


def test_analyze_of_a_dense_run_names_the_checkpoint(tmp_path, capsys):
    """A dense baseline (moekit train --dense) had been refused with "model has no
    moekit.MoE layers", which named neither the checkpoint nor what to pass."""
    from moekit.cli import main
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    text = tmp_path / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text())
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_batches=1, warmup_steps=0)
    Trainer(preset("tiny", dense=True), cfg, load_corpus(str(text)), tmp_path / "run",
            progress=False).fit()
    assert main(["analyze", str(tmp_path / "run"), "--tokens", "64", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"checkpoint={str(tmp_path / 'run' / 'step_00000001')!r}" in err, err
    assert "dense model" in err and "--dense" in err, err
    assert not (tmp_path / "run" / "analysis").exists()


@pytest.mark.parametrize("kw", [dict(router="softmax", top_k=2),
                                dict(router="expert_choice", top_k=2)])
def test_tokens_csv_says_which_token_went_to_which_expert(kw, tmp_path):
    """The report listed a few items per expert by lift; nothing machine-readable said
    where every token went. tokens.csv has one row per (layer, token, expert) that
    occurred, counted here by a loop over the router's own decisions."""
    import csv
    from collections import Counter

    from moekit.analysis.report import write_report
    torch.manual_seed(0)
    E, D = 5, 16
    model = EmbedMoE(moekit.MoEConfig(dim=D, ffn_dim=8, num_experts=E, **kw)).eval()
    ids = torch.randint(40, 60, (6, 9))  # few distinct bytes: every one seen many times
    layers = analyze_model(model, ids, 256, batch_size=3)
    want, occurrences = Counter(), Counter(ids.reshape(-1).tolist())
    with torch.no_grad():
        for chunk in ids.split(3):
            x = model.embed(chunk).reshape(-1, D)
            plan = model.moe.router(x, chunk.reshape(-1)).plan
            flat = chunk.reshape(-1).tolist()
            for t, e in zip(plan.token_S.tolist(), plan.expert_S.tolist(), strict=True):
                want[(flat[t], e)] += 1
    meta = {"checkpoint": "-", "step": 0, "source": "-", "tokens": ids.numel(),
            "sequences": 6, "seq_len": 9, "model": "-"}
    paths = write_report({"meta": meta, "layers": layers}, tmp_path)
    rows = list(csv.DictReader(paths["tokens"].open()))
    assert paths["tokens"] == tmp_path / "tokens.csv"
    got = {(int(r["token_id"]), int(r["expert"])): r for r in rows}
    assert {k: int(r["count"]) for k, r in got.items()} == dict(want)
    for (v, _), r in got.items():
        assert r["layer"] == "moe" and r["token"] == repr(chr(v))
        assert int(r["occurrences"]) == occurrences[v]
        assert float(r["routed"]) == pytest.approx(int(r["count"]) / occurrences[v], rel=1e-5)


def test_report_of_a_routing_json_without_expert_pairs_says_re_run(tmp_path):
    """A routing.json from before coactivation_pairs had crashed write_report with a
    KeyError traceback: one line naming the file (or the checkpoint), an old report kept."""
    from moekit.analysis.report import write_report
    torch.manual_seed(0)
    model = EmbedMoE(moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=4, top_k=2)).eval()
    ids = torch.randint(0, 256, (2, 16))
    layers = analyze_model(model, ids, 256, batch_size=2)
    meta = {"checkpoint": "runs/old/step_00000200", "step": 200, "source": "-",
            "tokens": 32, "sequences": 2, "seq_len": 16, "model": "-"}
    out = tmp_path / "report"
    write_report({"meta": meta, "layers": layers}, out)
    before = (out / "report.md").read_text()
    for layer in layers:
        del layer["coactivation_pairs"], layer["coactivation_expected"]
    old = tmp_path / "routing.json"
    old.write_text(json.dumps({"meta": meta, "layers": layers}))
    with pytest.raises(ValueError) as e:
        write_report({"meta": meta, "layers": layers}, out)
    msg = str(e.value)
    assert "\n" not in msg and "coactivation_pairs" in msg and "'moe'" in msg
    assert "re-run `moekit analyze runs/old/step_00000200`" in msg
    with pytest.raises(ValueError, match=f"routing.json {str(old)!r} is not allowed: .*re-run"):
        write_report(old, out)
    assert (out / "report.md").read_text() == before


# -- comparing two checkpoints (analyze --compare) ------------------------------------


def own_decisions(model: nn.Module, ids: Tensor, batch_size: int) -> list[dict[str, Any]]:
    """Per MoE layer, from the routers' own plans: each token's expert set and top-1 (the
    chosen expert of largest weight, lowest id on ties, -1 for none), and the loads."""
    from moekit.layer import MoE
    routers = [m.router for m in model.modules() if isinstance(m, MoE)]
    plans: list[list] = [[] for _ in routers]
    hooks = [r.register_forward_hook(lambda m, i, o, k=k: plans[k].append(o.plan))
             for k, r in enumerate(routers)]
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start:start + batch_size])
    for h in hooks:
        h.remove()
    out = []
    for layer_plans in plans:
        sets, top1, load = [], [], None
        for plan in layer_plans:
            T, E = plan.probs_TE.shape
            load = torch.zeros(E) if load is None else load
            best: list[dict[int, float]] = [{} for _ in range(T)]
            for t, e, w in zip(plan.token_S.tolist(), plan.expert_S.tolist(),
                               plan.weight_S.tolist(), strict=True):
                best[t][e] = w
                load[e] += 1
            for d in best:
                sets.append(frozenset(d))
                top1.append(min(d, key=lambda e, d=d: (-d[e], e)) if d else -1)
        out.append({"sets": sets, "top1": top1, "share": load / load.sum()})
    return out


@pytest.mark.parametrize("kw", [dict(router="softmax", top_k=2),
                                dict(router="expert_choice", top_k=2),
                                dict(router="sigmoid", top_k=3)])
def test_compare_stability_and_load_change_match_the_routers_decisions(kw):
    from moekit.analysis.analyze import collect_routing, summarise_all
    from moekit.analysis.compare import compare
    cfg = moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=5, **kw)
    torch.manual_seed(0)
    a = EmbedMoE(cfg).eval()
    b = EmbedMoE(cfg).eval()
    with torch.no_grad():  # b: a with its router nudged, so some tokens move
        b.load_state_dict(a.state_dict())
        b.moe.router.weight.add_(0.5 * torch.randn_like(b.moe.router.weight))
    ids = torch.randint(0, 256, (5, 13))
    rc_a = collect_routing(a, ids, 256, batch_size=2, decisions=True)
    rc_b = collect_routing(b, ids, 256, batch_size=2, decisions=True)
    c = compare(rc_a.layers, rc_b.layers, summarise_all(rc_a), summarise_all(rc_b))[0]
    da, db = own_decisions(a, ids, 2)[0], own_decisions(b, ids, 2)[0]
    T = ids.numel()
    same_top1 = sum(x == y for x, y in zip(da["top1"], db["top1"], strict=True)) / T
    same_set = sum(x == y for x, y in zip(da["sets"], db["sets"], strict=True)) / T
    assert 0 < same_top1 < 1  # the case is not trivial
    assert c["same_top1"] == pytest.approx(same_top1)
    assert c["same_expert_set"] == pytest.approx(same_set)
    diff = (db["share"] - da["share"]).abs()
    assert c["load_share_max_abs_change"] == pytest.approx(float(diff.max()))
    assert c["load_share_total_variation"] == pytest.approx(0.5 * float(diff.sum()))
    # a model compared with itself: every token keeps its experts, nothing moves
    rc_a2 = collect_routing(a, ids, 256, batch_size=2, decisions=True)
    same = compare(rc_a.layers, rc_a2.layers, summarise_all(rc_a), summarise_all(rc_a2))[0]
    assert (same["same_top1"], same["same_expert_set"]) == (1.0, 1.0)
    assert same["load_share_total_variation"] == 0.0


@pytest.mark.parametrize("kw", ROUTERS)
def test_compare_of_the_second_load_summary_equals_that_of_its_full_summary(kw):
    """analyze --compare summarises the second checkpoint with load_summary only (not its
    co-activation fit or per-expert lists): compare.json's layers are those the full
    summaries give, and load_summary is summarise's head, value for value."""
    from moekit.analysis.analyze import collect_routing, summarise_all
    from moekit.analysis.compare import compare
    from moekit.analysis.stats import load_summary
    cfg = moekit.MoEConfig(dim=16, ffn_dim=8, num_experts=6, **kw)
    torch.manual_seed(0)
    a = EmbedMoE(cfg).eval()
    b = EmbedMoE(cfg).eval()  # initialised apart: other loads, other decisions
    ids = torch.randint(0, 256, (5, 13))
    rc_a = collect_routing(a, ids, 256, batch_size=2, decisions=True)
    rc_b = collect_routing(b, ids, 256, batch_size=2, decisions=True)
    full_a, full_b = summarise_all(rc_a), summarise_all(rc_b)
    light_b = [load_summary(layer) for layer in rc_b.layers]
    assert compare(rc_a.layers, rc_b.layers, full_a, light_b) \
        == compare(rc_a.layers, rc_b.layers, full_a, full_b)
    for light, full in zip(light_b, full_b, strict=True):
        assert list(full)[:len(light)] == list(light)  # routing.json's key order kept
        assert light == {k: full[k] for k in light}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A tiny LM saved at steps 2 and 4 of one run, and a run with 3 experts."""
    from moekit.models import preset
    from moekit.train import TrainConfig, Trainer, load_corpus
    root = tmp_path_factory.mktemp("compare")
    text = _json_source(root)
    for name, lm, steps in (("run", preset("tiny", moe_every=1), 4),
                            ("other", preset("tiny", moe_every=1, num_experts=3), 1)):
        cfg = TrainConfig(steps=steps, batch_size=4, seq_len=32, eval_every=steps,
                          eval_batches=1, save_every=min(steps, 2), log_every=1, lr=1e-2,
                          warmup_steps=1)
        Trainer(lm, cfg, load_corpus(str(text)), root / name, progress=False).fit()
    return root


def test_analyze_compare_writes_the_change_between_two_steps(two_steps, capsys):
    from moekit.analysis.analyze import windows
    from moekit.analysis.cli import load_lm
    from moekit.train import load_corpus
    root = two_steps
    a, b = root / "run" / "step_00000002", root / "run" / "step_00000004"
    assert run(parse(str(a), "--compare", str(b), "--data", str(root / "text.txt"),
                     "--tokens", "512", "--seq-len", "64", "--batch-size", "3")) == 0
    out = root / "run" / "analysis" / "step_00000002_vs_step_00000004"
    assert "same top-1" in capsys.readouterr().out
    comp = json.loads((out / "compare.json").read_text())
    routing = json.loads((out / "routing.json").read_text())
    assert (comp["meta"]["before"]["step"], comp["meta"]["after"]["step"]) == (2, 4)
    ids = windows(load_corpus(str(root / "text.txt")).val, 512, 64)
    da = own_decisions(load_lm(str(a))[0], ids, 3)
    db = own_decisions(load_lm(str(b))[0], ids, 3)
    assert len(comp["layers"]) == len(da) == 2
    for c, x, y, r in zip(comp["layers"], da, db, routing["layers"], strict=True):
        same = sum(p == q for p, q in zip(x["top1"], y["top1"], strict=True)) / ids.numel()
        same_set = sum(p == q for p, q in zip(x["sets"], y["sets"], strict=True))
        assert c["same_top1"] == pytest.approx(same)
        assert c["same_expert_set"] == pytest.approx(same_set / ids.numel())
        diff = (y["share"] - x["share"]).abs()
        assert c["load_share_total_variation"] == pytest.approx(0.5 * float(diff.sum()))
        assert c["load_share"]["before"] == pytest.approx(x["share"].tolist())
        assert c["imbalance"]["max_over_mean"]["before"] == r["imbalance"]["max_over_mean"]
    report = (out / "report.md").read_text()
    assert "## Compared with step 4" in report and "| blocks.1.ffn |" in report
    # the layers as compare gives them from both checkpoints' full summaries
    from moekit.analysis.analyze import collect_routing, summarise_all
    from moekit.analysis.compare import compare
    rc_a, rc_b = (collect_routing(load_lm(str(p))[0], ids, 256, 3, True) for p in (a, b))
    full = compare(rc_a.layers, rc_b.layers, summarise_all(rc_a), summarise_all(rc_b))
    assert comp["layers"] == json.loads(json.dumps(full))


def test_analyze_compare_refuses_another_model_in_one_line(two_steps, capsys):
    root = two_steps
    a, other = root / "run" / "step_00000004", root / "other" / "step_00000001"
    assert run(parse(str(a), "--compare", str(other), "--data", str(root / "text.txt"),
                     "--tokens", "256", "--seq-len", "64",
                     "--out", str(root / "refused"))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(a) in err and str(other) in err
    assert "4 vs 3 experts" in err and not (root / "refused").exists()


@pytest.mark.parametrize("how", ["missing", "empty", "corrupt"])
def test_analyze_compare_with_a_bad_checkpoint_names_the_compare_flag(two_steps, tmp_path,
                                                                      how, capsys):
    """A bad --compare path had read "checkpoint='...'": the first checkpoint's name."""
    root = two_steps
    a, bad = root / "run" / "step_00000004", tmp_path / "other"
    if how != "missing":
        bad.mkdir()
    if how == "corrupt":
        (bad / "state.json").write_text("{not json")
    assert run(parse(str(a), "--compare", str(bad), "--data", str(root / "text.txt"),
                     "--out", str(tmp_path / "refused"))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"moekit analyze: error: --compare: "
                                              f"compare={str(bad)!r}"), err
    assert "checkpoint=" not in err and not (tmp_path / "refused").exists()


def test_analyze_refuses_an_out_inside_a_checkpoint(two_steps, capsys):
    """--out in a step_* directory had written the report among the checkpoint's files,
    where the trainer deletes it with the step when it prunes old checkpoints."""
    root = two_steps
    a, b = root / "run" / "step_00000002", root / "run" / "step_00000004"
    before = {p: sorted(p.iterdir()) for p in (a, b)}
    for argv, inside in (((str(a),), a), ((str(a),), a / "report"),
                         ((str(a), "--compare", str(b)), b / "x")):
        assert run(parse(*argv, "--data", str(root / "text.txt"), "--tokens", "256",
                         "--seq-len", "64", "--out", str(inside))) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--out={str(inside)!r}" in err, err
        assert "inside checkpoint" in err
    assert {p: sorted(p.iterdir()) for p in (a, b)} == before


def test_analyze_again_without_compare_removes_the_old_compare_json(two_steps, capsys):
    """A compare.json left from an earlier --compare run into the same --out had stayed
    beside the new routing.json, describing checkpoints and tokens it no longer matched."""
    root = two_steps
    a, b = root / "run" / "step_00000002", root / "run" / "step_00000004"
    out = root / "reused"
    common = ("--data", str(root / "text.txt"), "--seq-len", "64", "--out", str(out))
    assert run(parse(str(a), "--compare", str(b), "--tokens", "256", *common)) == 0
    assert (out / "compare.json").is_file()
    assert run(parse(str(b), "--tokens", "128", *common)) == 0
    capsys.readouterr()
    assert not (out / "compare.json").exists()
    assert "## Compared" not in (out / "report.md").read_text()
    assert json.loads((out / "routing.json").read_text())["meta"]["tokens"] == 128
    assert {p.name for p in out.iterdir()} == {
        "routing.json", "report.md", "tokens.csv", "load_heatmap.png", "coactivation.png"}


def _layers(n: int, E: int, K: int = 2) -> list[dict[str, Any]]:
    return [{"name": f"blocks.{i}.ffn", "num_experts": E, "top_k": K,
             "load_share": [(e + 1) / (E * (E + 1) / 2) for e in range(E)],
             "coactivation": [[10 if K > 1 or i == j else 0 for j in range(E)]
                              for i in range(E)],
             "coactivation_expected": [[5.0 if K > 1 else 0.0] * E] * E} for i in range(n)]


@pytest.mark.parametrize("n,E", [(1, 4), (1, 64), (2, 4), (12, 8)])
def test_plot_texts_lie_inside_the_figure(n, E):
    """With one MoE layer (--moe-every 2 on the tiny preset) the load heatmap was 1.45 in
    tall: its colour bar label and title were cut at the figure's edge."""
    pytest.importorskip("matplotlib")
    from moekit.analysis.report import coactivation_figure, load_figure
    for fig in (load_figure(_layers(n, E)), coactivation_figure(_layers(n, E))):
        fig.canvas.draw()
        renderer, box = fig.canvas.get_renderer(), fig.bbox
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        texts += [t for t in fig.texts]
        for t in texts:
            if t.get_text():
                ext = t.get_window_extent(renderer)
                assert box.x0 - 0.5 <= ext.x0 and ext.x1 <= box.x1 + 0.5, t.get_text()
                assert box.y0 - 0.5 <= ext.y0 and ext.y1 <= box.y1 + 0.5, t.get_text()


def test_coactivation_plot_of_top1_layers_says_there_are_no_pairs():
    """Top-1 (switch) layers had an all-black panel each under a colour bar, which read
    as data; a top-1 panel now says it has no pairs, beside a top-2 layer's heatmap."""
    pytest.importorskip("matplotlib")
    from moekit.analysis.report import coactivation_figure
    fig = coactivation_figure(_layers(1, 4, K=1) + _layers(1, 4, K=2))
    top1, top2 = fig.axes[:2]
    assert not top1.get_images() and not top1.axison
    assert any("no expert pairs" in t.get_text() for t in top1.texts)
    assert len(top2.get_images()) == 1 and len(fig.axes) == 3  # + one colour bar
    only_top1 = coactivation_figure(_layers(2, 4, K=1))
    assert len(only_top1.axes) == 2 and not any(ax.get_images() for ax in only_top1.axes)


def test_report_explains_every_summary_column():
    """report.md's summary had columns (starved, dropped, CV) that its text never defined:
    'starved' is the count of experts under 10% of the mean load, checked here by hand."""
    from moekit.analysis.report import markdown, summary_table
    from moekit.analysis.stats import imbalance
    load = [100, 100, 100, 7]  # mean 76.75: 7 < 7.675, the one starved expert
    assert imbalance(torch.tensor(load))["starved_experts"] == 1
    layer = {"name": "blocks.0.ffn", "num_experts": 4, "top_k": 2, "load": load,
             "load_share": [v / sum(load) for v in load],
             "imbalance": imbalance(torch.tensor(load)), "dropped_fraction": 0.0,
             "router_entropy_nats": 1.0, "router_entropy_normalised": 1.0 / math.log(4),
             "specialisation": {"token_mutual_information_bits": 0.5, "experts": []},
             "coactivation_pairs": [], "coactivation_expected": [[0.0] * 4] * 4}
    meta = {"checkpoint": "c", "step": 1, "source": "s", "tokens": 10, "sequences": 1,
            "seq_len": 10, "model": "m"}
    text = markdown({"meta": meta, "layers": [layer]}, plots=False)
    head = summary_table([layer])[0]
    for column, definition in (("load max/mean", "the busiest expert's load / the mean"),
                               ("CV", "the standard deviation of the loads / their mean"),
                               ("starved", "less than 10% of the mean load"),
                               ("dropped", "the fraction of pairs the capacity removed"),
                               ("router entropy", "in nats"), ("MI (bits)", "mutual")):
        assert column in head and definition in text, column


def test_compare_section_gives_the_share_change_in_percentage_points():
    """The largest load-share change read '5.00%' for 25% -> 30%: a relative change of 20%
    to a reader; it is 5 percentage points, named so."""
    from moekit.analysis.compare import compare_layer, compare_section
    load_a, load_b = [25, 25, 25, 25], [30, 20, 25, 25]
    summary = [{"name": "blocks.0.ffn", "num_experts": 4, "top_k": 2, "tokens": 50,
                "load_share": [v / 100 for v in load], "router_entropy_nats": None,
                "router_entropy_normalised": None,
                "imbalance": {"max_over_mean": 1.0, "coefficient_of_variation": 0.0,
                              "load_entropy_normalised": 1.0}} for load in (load_a, load_b)]
    layer = compare_layer(*summary, {"same_top1": 1.0, "same_expert_set": 1.0})
    meta = {"before": {"checkpoint": "a", "step": 1}, "after": {"checkpoint": "b", "step": 2},
            "tokens": 50}
    lines = compare_section({"meta": meta, "layers": [layer]})
    head = next(i for i, line in enumerate(lines) if line.startswith("| layer"))
    assert "max share change (pp)" in lines[head]
    assert lines[head + 2].split(" | ")[1] == "5.00"  # 30% - 25%


def test_report_model_line_names_shared_experts_groups_and_moe_every():
    """A run with --shared-experts, --groups or --moe-every had read as a plain top-K
    model in report.md: its shared experts, its groups and its dense blocks unnamed."""
    from moekit.analysis.cli import model_line
    from moekit.models import LMConfig
    base = dict(vocab_size=256, dim=32, num_layers=4, num_heads=2, ffn_dim=32,
                num_experts=4, top_k=2)
    assert model_line(LMConfig(**base)) == "4 layers, dim 32, 4 experts, top-2, softmax router"
    line = model_line(LMConfig(**base, moe_every=2, num_groups=2, topk_groups=1,
                               num_shared_experts=1, capacity_factor=1.0))
    for words in ("an MoE FFN every 2 blocks", "2 expert groups, 1 per token",
                  "1 shared expert every token goes through", "capacity factor 1"):
        assert words in line, words
    assert "2 shared experts" in model_line(LMConfig(**base, num_shared_experts=2))


@pytest.mark.parametrize("batch,sequences,last", [(24, 64, 16), (16, 64, 16), (100, 3, 3),
                                                  (5, 11, 1), (1, 7, 1)])
def test_report_names_the_last_forward_pass_when_it_is_shorter(batch, sequences, last):
    """64 sequences at --batch-size 24 are passes of 24, 24 and 16 sequences: the report
    had said every pass routed 24 x L tokens (what capacity drops depend on)."""
    from types import SimpleNamespace

    from moekit.analysis.cli import forward_size
    from moekit.analysis.report import forward_lines
    cfg = SimpleNamespace(router="softmax", capacity_factor=1.0)
    ck = SimpleNamespace(state={"train_config": {"batch_size": 2, "seq_len": 8}})
    sizes = [min(batch, sequences - s) for s in range(0, sequences, batch)]  # the passes
    assert sizes[-1] == last
    meta = forward_size(cfg, ck, batch, 8, sequences)
    assert meta["tokens_per_forward"] == sizes[0] * 8
    assert meta["last_forward_tokens"] == last * 8
    line = forward_lines(meta)[0]
    assert (f", {last * 8:,} in the last" in line) == (last != sizes[0])


def test_report_says_the_chance_of_a_pair_ignores_expert_groups():
    """--groups 2 --topk-groups 1 with 4 experts, top-2: a token's two experts are one
    group, so cross-group pairs never occur and in-group pairs read 8x chance; the
    report now says the chance count does not know the groups."""
    from moekit.analysis.report import group_note
    assert "within 1 of 2 expert groups" in group_note(
        {"model_config": {"num_groups": 2, "topk_groups": 1}})
    for cfg in ({"num_groups": 1, "topk_groups": 1}, {"num_groups": 2, "topk_groups": 2},
                {}):
        assert group_note({"model_config": cfg}) == ""
    assert group_note({}) == ""


def test_re_rendering_a_compare_run_keeps_its_compare_json(two_steps, capsys):
    """write_report(OUT/routing.json, OUT) re-renders a report in place; after a
    --compare run it deleted compare.json, the comparison's only copy, as if a plain
    analyze run had replaced the output."""
    from moekit.analysis.report import write_report
    root = two_steps
    a, b = root / "run" / "step_00000002", root / "run" / "step_00000004"
    out = root / "rerendered"
    assert run(parse(str(a), "--compare", str(b), "--tokens", "256", "--data",
                     str(root / "text.txt"), "--seq-len", "64", "--out", str(out))) == 0
    capsys.readouterr()
    compare_text = (out / "compare.json").read_text()
    routing_text = (out / "routing.json").read_text()
    write_report(out / "routing.json", out)
    assert (out / "compare.json").read_text() == compare_text
    assert (out / "routing.json").read_text() == routing_text


def test_a_re_rendered_report_keeps_its_compared_section(two_steps, capsys):
    """write_report(OUT/routing.json, ...) wrote report.md without its "Compared with"
    section although compare.json stayed beside routing.json: now the report re-rendered
    in place is the one `moekit analyze --compare` wrote, and rendered into another
    directory it brings compare.json along. A compare.json of another analysis (other
    tokens) is not attached; one that is not a comparison is refused, naming it, and
    nothing is written."""
    import shutil

    from moekit.analysis.report import write_report
    root = two_steps
    a, b = root / "run" / "step_00000002", root / "run" / "step_00000004"
    out = root / "rerendered_section"
    assert run(parse(str(a), "--compare", str(b), "--tokens", "256", "--data",
                     str(root / "text.txt"), "--seq-len", "64", "--out", str(out))) == 0
    capsys.readouterr()
    written = {name: (out / name).read_text() for name in ("report.md", "compare.json")}
    assert "## Compared with step 4" in written["report.md"]
    write_report(out / "routing.json", out)
    assert (out / "report.md").read_text() == written["report.md"]
    assert (out / "compare.json").read_text() == written["compare.json"]

    paths = write_report(out / "routing.json", root / "elsewhere")
    assert paths["compare"] == root / "elsewhere" / "compare.json"
    for name, text in written.items():
        assert (root / "elsewhere" / name).read_text() == text, name

    other = root / "other_tokens"  # the routing.json of a plain 128-token analysis
    assert run(parse(str(a), "--tokens", "128", "--data", str(root / "text.txt"),
                     "--seq-len", "64", "--out", str(other))) == 0
    capsys.readouterr()
    shutil.copy(out / "compare.json", other / "compare.json")
    plain = (other / "report.md").read_text()
    write_report(other / "routing.json", other)
    assert (other / "report.md").read_text() == plain  # no section of other tokens

    (out / "compare.json").write_text('{"meta": {}}')
    with pytest.raises(ValueError, match=r"compare.json '.*rerendered_section/compare.json' "
                       r"is not allowed beside .*: it cannot be read as the comparison"):
        write_report(out / "routing.json", out)
    assert (out / "report.md").read_text() == written["report.md"]
