"""`moekit analyze` of a checkpoint converted from transformers, which reads its
tokenizer's ids (``moekit convert`` copies the tokenizer into RUN/tokenizer).

analyze had routed the corpus's UTF-8 bytes as token ids whatever the checkpoint's
vocabulary (a byte 32, a space, went in as BPE token 32), so every number it wrote
described text the model never reads. Oracle: transformers' own router logits of the
original model over the tokenizers library's ids of the same text, in the same windows
(top-k of each layer's logits, counted per expert); the tokens' labels are the
tokenizer's pieces decoded by the tokenizers library.
"""

from __future__ import annotations

import csv
import json

import torch

from moekit.cli import main as cli_main
from moekit.train.data import load_corpus
from tests import test_generate_tokenizer as tg

TEXT = "def hello(world):\n    return world + 1\n\nthe quick brown fox jumps over\n" * 400


def test_a_converted_checkpoint_is_analysed_in_its_tokenizers_ids(tmp_path):
    tok, model = tg.convert_random_qwen3(tmp_path, seed=5, max_positions=64, moe_ffn=16)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "an"
    assert cli_main(["analyze", str(tmp_path / "lm"), "--data", str(data), "--tokens", "256",
                     "--seq-len", "32", "--out", str(out)]) == 0
    routing = json.loads((out / "routing.json").read_text())

    val = bytes(load_corpus(str(data)).val.tolist()).decode()  # the split analyze reads
    ids = tok.encode(val).ids
    ids_BL = torch.tensor(ids[:len(ids) // 32 * 32][:256]).view(-1, 32)
    assert routing["meta"]["tokens"] == ids_BL.numel()
    with torch.no_grad():
        logits = model(ids_BL, output_router_logits=True).router_logits  # per layer [B*L, E]
    K, E = model.config.num_experts_per_tok, model.config.num_experts
    for layer, logits_TE in zip(routing["layers"], logits, strict=True):
        want = torch.bincount(logits_TE.topk(K, -1).indices.flatten(), minlength=E)
        assert layer["load"] == want.tolist()
    # tokens.csv names each token by its text
    rows = list(csv.DictReader((out / "tokens.csv").open()))
    for row in rows[:50]:
        assert row["token"] == repr(tok.decode([int(row["token_id"])]))
    assert any(row["token"] == repr(" world") for row in rows)
