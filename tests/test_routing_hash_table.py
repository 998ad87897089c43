"""The hash router's token-id table: a uniformly random K-subset per id, a table per
LM layer, and old checkpoints' tables loaded as saved.

Shape letters: V token-id vocabulary, E experts, K experts per token, L layers.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.models import LMConfig, MoETransformer
from moekit.routing.hashing import hash_table


def consecutive_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """The table as drawn before: K consecutive entries of one permutation per id."""
    gen = torch.Generator().manual_seed(seed)
    perm_E = torch.randperm(num_experts, generator=gen)
    base_V = torch.randint(num_experts, (vocab_size,), generator=gen)
    return perm_E[(base_V[:, None] + torch.arange(top_k)) % num_experts]


def pair_counts(table_VK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Co-occurrences of each unordered expert pair (e < f), flattened."""
    counts_EE = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for a, b in itertools.combinations(range(table_VK.shape[1]), 2):
        lo = torch.minimum(table_VK[:, a], table_VK[:, b])
        hi = torch.maximum(table_VK[:, a], table_VK[:, b])
        counts_EE.index_put_((lo, hi), torch.ones(len(lo), dtype=torch.float64),
                             accumulate=True)
    iu = torch.triu_indices(num_experts, num_experts, offset=1)
    return counts_EE[iu[0], iu[1]]


def chi2_per_dof(observed: torch.Tensor, expected: float) -> float:
    """Pearson's chi-square over the cells, divided by its degrees of freedom (~1 when
    the counts are uniform)."""
    return float(((observed - expected) ** 2 / expected).sum()) / (observed.numel() - 1)


@pytest.mark.parametrize("V,E,K", [(1, 4, 1), (37, 7, 3), (256, 8, 8), (1000, 64, 6)])
def test_rows_hold_k_distinct_experts_in_range(V, E, K):
    table_VK = hash_table(V, E, K, seed=5)
    assert table_VK.shape == (V, K) and table_VK.dtype == torch.int64
    assert int(table_VK.min()) >= 0 and int(table_VK.max()) < E
    assert all(len(set(row)) == K for row in table_VK.tolist())


def test_same_seed_same_table_other_seed_other_table():
    assert torch.equal(hash_table(500, 16, 4, 7), hash_table(500, 16, 4, 7))
    assert not torch.equal(hash_table(500, 16, 4, 7), hash_table(500, 16, 4, 8))


def test_every_pair_occurs_near_uniformly_and_loads_near_vk_over_e():
    V, E, K = 200_000, 16, 4
    table_VK = hash_table(V, E, K, seed=0)
    pairs = pair_counts(table_VK, E)
    expected = V * K * (K - 1) / (E * (E - 1))  # per unordered pair: 10,000
    assert bool((pairs > 0).all())  # all E(E-1)/2 = 120 pairs, not E = 16
    # uniform counts give chi2/dof ~ 1 (+-0.13 at 119 dof); the bound is 2
    assert chi2_per_dof(pairs, expected) < 2.0
    old = pair_counts(consecutive_table(V, E, K, 0), E)
    assert int((old > 0).sum()) <= E * (K - 1)  # the old table: only E pairs per gap
    assert chi2_per_dof(old, expected) > 100
    loads_E = torch.bincount(table_VK.reshape(-1), minlength=E).double()
    assert torch.allclose(loads_E, torch.full((E,), V * K / E, dtype=torch.float64),
                          rtol=0.02)  # 50,000 each, binomial sd ~190 (0.4%)


def test_large_vocab_spans_blocks_deterministically():
    # more rows than one block of keys: the blocks follow one generator
    table_VK = hash_table(70_000, 8, 2, seed=3)
    assert table_VK.shape == (70_000, 2) and torch.equal(table_VK, hash_table(70_000, 8, 2, 3))
    assert not torch.equal(table_VK[:4096], table_VK[65_536:65_536 + 4096])


LM = LMConfig(dim=32, num_layers=4, num_heads=2, max_seq_len=32, ffn_dim=16, num_experts=8,
              top_k=2, router="hash")


def hash_tables(model: MoETransformer) -> list[torch.Tensor]:
    return [b.ffn.router.hash_table for b in model.blocks if b.is_moe]


def test_each_lm_layer_gets_its_own_table_from_the_base_seed():
    tables = hash_tables(MoETransformer(LM))
    assert len(tables) == 4
    for a, b in itertools.combinations(tables, 2):
        assert not torch.equal(a, b)
    assert all(torch.equal(t, hash_table(256, 8, 2, seed=layer))
               for layer, t in enumerate(tables))  # hash_seed 0 + layer
    again = hash_tables(MoETransformer(LM))
    assert all(torch.equal(a, b) for a, b in zip(tables, again, strict=True))
    other = hash_tables(MoETransformer(LM.replace(hash_seed=10)))
    assert torch.equal(other[0], hash_table(256, 8, 2, seed=10))
    assert LMConfig.from_dict({k: v for k, v in LM.to_dict().items()
                               if k != "hash_seed"}).hash_seed == 0  # old configs


def test_moe_every_layers_take_their_block_index():
    model = MoETransformer(LM.replace(moe_every=2))
    tables = hash_tables(model)
    assert len(tables) == 2
    assert torch.equal(tables[0], hash_table(256, 8, 2, seed=1))
    assert torch.equal(tables[1], hash_table(256, 8, 2, seed=3))


@pytest.mark.parametrize("value", [-1, 2**63, 1.5, True])
def test_bad_hash_seed_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"hash_seed=.* is not allowed"):
        LM.replace(hash_seed=value)


def test_old_checkpoint_loads_and_routes_by_its_own_table():
    # a state dict saved with the old (consecutive, same for every layer) tables
    old_VK = consecutive_table(256, 8, 2, seed=0)
    model = MoETransformer(LM)
    state = model.state_dict()
    names = [k for k in state if k.endswith("router.hash_table")]
    assert len(names) == 4
    for k in names:
        state[k] = old_VK.clone()
    fresh = MoETransformer(LM)
    assert not torch.equal(hash_tables(fresh)[0], old_VK)
    fresh.load_state_dict(state)
    assert all(torch.equal(t, old_VK) for t in hash_tables(fresh))
    ids_BL = torch.arange(64).reshape(2, 32) * 3 % 256
    seen = []
    for b in fresh.blocks:
        b.ffn.router.register_forward_hook(lambda m, i, out: seen.append(out.plan))
    with torch.no_grad():
        fresh(ids_BL)
    assert len(seen) == 4
    for plan in seen:
        assert torch.equal(plan.expert_S.view(-1, 2), old_VK[ids_BL.reshape(-1)])


def test_bare_layer_table_follows_its_config_seed():
    cfg = MoEConfig(dim=8, ffn_dim=8, num_experts=6, top_k=3, router="hash",
                    hash_vocab_size=40, hash_seed=9)
    assert torch.equal(MoE(cfg).router.hash_table, hash_table(40, 6, 3, 9))


# -- moekit train --hash-seed --------------------------------------------------------

SMALL = ["--preset", "tiny", "--warmup", "1", "--batch-size", "2", "--seq-len", "16",
         "--eval-every", "1", "--eval-batches", "1", "--no-progress", "--steps", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 200)
    return path


def cli_model(out, corpus, *flags: str) -> MoETransformer:
    """Train one step with ``flags`` through the CLI and load the saved model."""
    from moekit.cli import main as cli_main
    from moekit.train.checkpoint import load_checkpoint, restore
    assert cli_main(["train", *SMALL, "--data", str(corpus), "--out", str(out),
                     "--router", "hash", *flags]) == 0
    ck = load_checkpoint(out)
    model = MoETransformer(LMConfig.from_dict(ck.state["model_config"]))
    restore(ck, model, rng=False)
    return model


def seeded_tables(model: MoETransformer, seed: int) -> list[torch.Tensor]:
    """The tables hash_seed=seed gives: MoE block l draws from seed + l."""
    c = model.config
    return [hash_table(c.vocab_size, c.num_experts, c.top_k, seed=seed + layer)
            for layer in range(c.num_layers) if c.is_moe_layer(layer)]


def test_cli_hash_seed_picks_the_tables(tmp_path, corpus, capsys):
    a = cli_model(tmp_path / "a", corpus, "--hash-seed", "7")
    same = cli_model(tmp_path / "same", corpus, "--hash-seed", "7")
    other = cli_model(tmp_path / "other", corpus, "--hash-seed", "8")
    default = cli_model(tmp_path / "default", corpus)
    ta, ts, to, td = map(hash_tables, (a, same, other, default))
    assert len(ta) >= 2 and a.config.hash_seed == 7 and default.config.hash_seed == 0
    assert all(torch.equal(x, y) for x, y in zip(ta, ts, strict=True))
    assert all(not torch.equal(x, y) for x, y in zip(ta, to, strict=True))
    for tables, seed in ((ta, 7), (to, 8), (td, 0)):
        assert all(torch.equal(x, y) for x, y in zip(tables, seeded_tables(a, seed),
                                                      strict=True))


@pytest.mark.parametrize("flags,words", [
    (["--router", "hash", "--hash-seed", "-1"],
     ["--hash-seed: hash_seed=-1 is not allowed", "[0, 9223372036854775807]"]),
    (["--router", "hash", "--hash-seed", str(2**63)], [f"--hash-seed: hash_seed={2**63} "]),
    (["--router", "softmax", "--hash-seed", "3"],
     ["--hash-seed=3 is not allowed with --router=softmax:", "add --router hash"]),
    (["--hash-seed", "3"],  # the preset's router, not typed
     ["--hash-seed=3 is not allowed with --router=softmax (preset tiny's router)"]),
    (["--dense", "--router", "hash", "--hash-seed", "3"],  # a dense model has no router
     ["--hash-seed=3 is not allowed with --dense:", "drop --hash-seed or --dense"]),
    (["--dense", "--hash-seed", "3"],
     ["--hash-seed=3 is not allowed with --dense:", "drop --hash-seed or --dense"]),
])
def test_cli_bad_hash_seed_is_refused_naming_the_flag(tmp_path, corpus, capsys, flags, words):
    from moekit.cli import main as cli_main
    assert cli_main(["train", *SMALL, "--data", str(corpus), "--out", str(tmp_path / "run"),
                     *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_cli_hash_seed_is_refused_with_resume(tmp_path, corpus, capsys):
    from moekit.cli import main as cli_main
    cli_model(tmp_path / "run", corpus, "--hash-seed", "7")
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--steps", "2",
                     "--hash-seed", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--hash-seed=8 is not allowed with --resume" in err, err
