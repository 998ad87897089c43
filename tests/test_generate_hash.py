"""A hash-router checkpoint loads for generation (`moekit generate`, `moekit serve`,
`moekit quantize`: quant.io.load_model): its int64 token-id table was refused as a
weight that must be float32, bfloat16 or float16."""

from __future__ import annotations

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.models import MoETransformer, preset
from moekit.models.generate import generate
from moekit.quant.io import load_model
from moekit.train.checkpoint import save_checkpoint


@pytest.fixture
def hash_run(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", router="hash", hash_seed=5)).eval()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 1, "model_config": model.config.to_dict()})
    return tmp_path / "run", model


def test_a_hash_router_checkpoint_loads_with_its_tables_and_generates_alike(hash_run):
    run, model = hash_run
    loaded = load_model(run)
    for name, table in model.state_dict().items():
        if name.endswith("hash_table"):
            assert torch.equal(loaded.state_dict()[name], table), name
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert generate(loaded, ids, 6, temperature=0).tolist() == \
        generate(model, ids, 6, temperature=0).tolist()


def test_moekit_generate_runs_a_hash_router_checkpoint(hash_run, capsys):
    run, _ = hash_run
    assert cli_main(["generate", "--checkpoint", str(run), "--prompt", "def ",
                     "--max-new-tokens", "4"]) == 0
    assert "does not match the model" not in capsys.readouterr().err


def test_a_float_hash_table_is_still_refused(hash_run):
    """An integer buffer given as floats is refused before anything is built."""
    from moekit.quant.io import assemble
    from moekit.train.checkpoint import CheckpointError

    run, model = hash_run
    tensors = {k: v.float() if k.endswith("hash_table") else v.clone()
               for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="hash_table: torch.float32"):
        assemble(model.config, tensors, run)
