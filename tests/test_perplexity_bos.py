"""`moekit perplexity` with a tokenizer that starts every text with a BOS token
(Mixtral's, Llama's): each chunk starts with it, as llama.cpp's ``llama-perplexity``
(which the command follows) replaces each chunk's first token with BOS. Only the first
chunk had started with it, the others in mid-text, where a model trained on texts that
start with BOS predicts worse (a converted Mixtral's numbers were not llama.cpp's).
Oracle: transformers' own forward of the original model on the tokenizers library's ids,
each chunk's first id replaced by the BOS id by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import processors

from moekit.cli import main as cli_main
from tests import hf_models
from tests import test_generate_tokenizer as tg
from tests.test_perplexity import TEXT, _reference

transformers = hf_models.transformers


def test_every_chunk_starts_with_the_tokenizers_bos(tmp_path, capsys):
    tok = tg._tokenizer()
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**{**hf_models.COMMON, "vocab_size": 320,
                                        "bos_token_id": bos, "eos_token_id": None,
                                        "max_position_embeddings": 64},
                                     intermediate_size=32, num_local_experts=8,
                                     num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "lm")]) == 0
    capsys.readouterr()
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids = tok.encode(TEXT).ids
    assert ids[0] == bos and bos not in ids[1:]
    chunks = [[bos, *ids[c * 24 + 1:(c + 1) * 24]] for c in range(3)]
    want = sum(sum(_reference(model, chunk, 24, 8)) for chunk in chunks)
    assert cli_main(["perplexity", "--checkpoint", str(tmp_path / "lm"), "--text",
                     str(tmp_path / "text.txt"), "--context", "24", "--score-from", "8",
                     "--chunks", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 3 * 16 and r["nll"] == pytest.approx(want, rel=1e-5)
