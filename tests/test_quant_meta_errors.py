"""A damaged `moekit quantize` output (quantized.json or model.safetensors) raises a
CheckpointError naming the file and what is wrong, from load_quantized, load_offloaded and
`moekit generate` alike. These branches of quant/io.py had no test; quantized.json
holding a JSON number / null, "tied": [] or "model_config": [] raised TypeError or
AttributeError (a traceback from `moekit generate`), a deeply nested one RecursionError.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from moekit.models import MoETransformer
from moekit.models.config import LMConfig
from moekit.offload import load_offloaded
from moekit.quant.io import META_FILE, MODEL_FILE, load_quantized, save_quantized
from moekit.quant.model import quantize
from moekit.train.checkpoint import CheckpointError

CFG = LMConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=8, num_experts=4, top_k=2,
               max_seq_len=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("q") / "q8"
    save_quantized(quantize(MoETransformer(CFG), bits=8), out)
    return out


@pytest.fixture
def q8(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "q8")


def _edit(path, change) -> None:
    meta = json.loads((path / META_FILE).read_text())
    change(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def _delete(key):
    return lambda m: m.pop(key)


def _set(key, value):
    return lambda m: m.update({key: value})


EDITS = {  # how quantized.json is damaged: (edit, what the error says)
    "a number": ("5", r"quantized.json must hold a JSON object, not a int"),
    "null": ("null", r"quantized.json must hold a JSON object, not a NoneType"),
    "a list": ('["bits"]', r"quantized.json must hold a JSON object, not a list"),
    "not JSON": ('{"bits": 8,', r"quantized.json is unreadable or corrupt"),
    "nested deep": ("[" * 100_000 + "]" * 100_000, r"quantized.json is unreadable or corrupt: "
                                                   r"maximum recursion depth"),
    "no sha256": (_delete("sha256"), r"quantized.json lacks the key 'sha256'"),
    "no tied": (_delete("tied"), r"quantized.json lacks the key 'tied'"),
    "tied a list": (_set("tied", []), r"quantized.json: tied must map tensor names to tensor"),
    "tied to a number": (_set("tied", {"head.weight.data": 5}), r"tied must map tensor names"),
    "model_config a list": (_set("model_config", []), r"quantized.json: model_config must be a "
                                                      r"JSON object, got a list"),
    "format_version 4": (_set("format_version", 4), r"format_version must be 1, 2 or 3, got 4"),
    "scope": (_set("scope", "router"), r"scope='router' must be one of \('all', 'experts'\)"),
    "embeddings 1": (_set("embeddings", 1), r"embeddings must be true or false, got 1"),
    "activations": (_set("activations", "int4"), r"activations='int4' is not allowed"),
    "sha256 of another file": (_set("sha256", "0" * 64), r"model.safetensors is corrupt or "
                                                         r"truncated: its SHA-256 does not match"),
}


def _damage(path, edit) -> None:
    if isinstance(edit, str):
        (path / META_FILE).write_text(edit)
    else:
        _edit(path, edit)


@pytest.mark.parametrize("what", sorted(EDITS))
def test_a_damaged_quantized_json_is_named(q8, what):
    edit, match = EDITS[what]
    _damage(q8, edit)
    with pytest.raises(CheckpointError, match=match):
        load_quantized(q8)
    with pytest.raises(CheckpointError, match=match):  # reads quantized.json the same way
        load_offloaded(q8, "1GiB")


@pytest.mark.parametrize("what", ["a number", "tied a list", "model_config a list"])
def test_generate_names_a_damaged_quantized_json_in_one_line(q8, what, capsys):
    from moekit.cli import main

    _damage(q8, EDITS[what][0])
    assert main(["generate", "--checkpoint", str(q8), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit generate: error: ") and "\n" not in err
    assert "Traceback" not in err and "quantized.json" in err


def test_a_model_file_that_is_not_safetensors_with_a_matching_sha256(q8):
    garbage = b"\x10\0\0\0\0\0\0\0not a header"
    (q8 / MODEL_FILE).write_bytes(garbage)
    _edit(q8, _set("sha256", hashlib.sha256(garbage).hexdigest()))
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable "
                                              r"safetensors file"):
        load_quantized(q8)


def test_save_quantized_refuses_a_float_model(tmp_path):
    with pytest.raises(ValueError, match=r"model is not quantized: call "
                                          r"moekit.quantize\(model, bits=...\) first"):
        save_quantized(MoETransformer(CFG), tmp_path / "out")
    assert not (tmp_path / "out").exists()
