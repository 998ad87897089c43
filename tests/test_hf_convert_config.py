"""`moekit convert --to moekit`: a bad config.json is named, with what is wrong in it.

Before: a config.json missing a key the conversion reads printed only
``moekit convert: error: 'hidden_size'``, and one that is not valid JSON printed the
parser's message (``Expecting property name ...``) without naming the file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.models import LMConfig, MoETransformer
from moekit.train.checkpoint import save_checkpoint

MODEL = LMConfig(dim=16, num_layers=1, num_heads=2, max_seq_len=16, ffn_dim=8,
                 num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Mixtral directory (config.json + model.safetensors), written by `convert --to hf`."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = MoETransformer(MODEL)
    save_checkpoint(root / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": MODEL.to_dict()})
    assert cli_main(["convert", "--to", "hf", str(root / "run"), str(root / "hf")]) == 0
    return root / "hf"


def _source(hf_dir, tmp_path, text: str):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "config.json").write_text(text)
    return src


def _without(hf_dir, key: str) -> str:
    config = json.loads((hf_dir / "config.json").read_text())
    del config[key]
    return json.dumps(config)


def test_the_unedited_directory_converts(hf_dir, tmp_path):
    assert cli_main(["convert", "--to", "moekit", str(hf_dir), str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("key", ["hidden_size", "num_local_experts", "rms_norm_eps",
                                 "num_hidden_layers"])
def test_missing_key_names_the_file_and_the_key(hf_dir, tmp_path, capsys, key):
    src = _source(hf_dir, tmp_path, _without(hf_dir, key))
    assert cli_main(["convert", "--to", "moekit", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(src / "config.json") in err and repr(key) in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,what", [
    ('{"model_type": "mixtral",\n', "not valid JSON"),
    ("\udcff", "not valid JSON"),  # not UTF-8
    ("[1, 2]", "JSON object"),
])
def test_config_that_is_not_json_names_the_file(hf_dir, tmp_path, capsys, text, what):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert cli_main(["convert", "--to", "moekit", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(src / "config.json") in err and what in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
