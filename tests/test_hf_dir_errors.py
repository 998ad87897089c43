"""A transformers checkpoint directory passed where a moekit checkpoint goes.

A new user's first try is `moekit generate --checkpoint path/to/hf-model`; it had read
"no state.json or LATEST there; pass a run directory or one of its step_* directories",
which does not say that the directory must be converted first. Now every command that
loads a checkpoint names `moekit convert`, before anything is loaded.
"""

from __future__ import annotations

import pytest

from moekit.cli import main as cli_main

hf_models = pytest.importorskip("tests.hf_models")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf_models.qwen3_moe().save_pretrained(path)
    return path


@pytest.mark.parametrize("argv", [
    ["generate", "--checkpoint", "{d}", "--prompt", "x"],
    ["perplexity", "--checkpoint", "{d}"],
    ["serve", "--checkpoint", "{d}", "--port", "0"],
    ["quantize", "{d}", "--bits", "8", "--out", "{d}-q"],
    ["analyze", "{d}"],
])
def test_a_transformers_directory_is_told_to_be_converted(hf_dir, argv, capsys):
    rc = cli_main([a.format(d=hf_dir) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"checkpoint={str(hf_dir)!r} is a transformers checkpoint (config.json, " \
           "model_type 'qwen3_moe')" in err
    assert f"moekit convert {hf_dir} RUN" in err
