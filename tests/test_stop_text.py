"""Stop strings matched in the text (`moekit generate --stop`, `moekit serve`'s "stop"),
and the finish reason that says so.

A byte-level model's invalid bytes decode to U+FFFD: a stop "\\ufffd" cut the text there,
but its bytes (EF BF BD) never matched the ids, so the sequence ran on and reported
"length". Oracles: the text Python's incremental UTF-8 decoder writes byte by byte, and
the tokenizers library's decode of prompt + generation.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
import random

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.inference.engine import Engine, GenerationConfig
from moekit.inference.server import Service
from moekit.inference.text import ByteText, cut_text, finish_reason
from moekit.models import MoETransformer, preset
from moekit.train.checkpoint import save_checkpoint


def _written(ids: list[int]) -> list[str]:
    """The text written after each of the bytes ``ids`` as a stream: Python's incremental
    UTF-8 decoder fed one byte at a time, from the first (it holds the bytes that may
    begin a character still to come; also ED A0-BF, a surrogate's, until a 3rd byte)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return list(itertools.accumulate(utf8.decode(bytes([b])) for b in ids))


def _first_hit(ids: list[int], stops: list[str]) -> int | None:
    """The number of bytes after which the text written first holds a stop string."""
    return next((k + 1 for k, text in enumerate(_written(ids))
                 if any(s in text for s in stops)), None)


def _random_bytes(rng: random.Random, n: int) -> list[int]:
    """Whole characters of 1-4 bytes for n // 2 bytes (so that a window of the last bytes
    starts inside one), then also U+FFFD's own bytes and what is no character: lone
    continuation bytes, lead bytes cut short, 0xC0 and 0xFF."""
    whole = [b"a", b"z", "\u00e9".encode(), "\u4e2d".encode(), "\U0001f642".encode()]
    broken = ["\ufffd".encode(), b"\x80", b"\xbf", b"\xe4", b"\xe4\xb8", b"\xf0\x9f\x99",
              b"\xe0\x80", b"\xed\xa0", b"\xc0", b"\xff"]
    out: list[int] = []
    while len(out) < n:
        out += rng.choice(whole if len(out) < n // 2 else whole + broken)
    return out[:n]


@pytest.mark.parametrize("stops", [["\ufffd"], ["\ufffd\ufffd"], ["a\ufffd"],
                                   ["\ufffd\u00e9", "z"], ["\u4e2d\ufffd\ufffda"]])
def test_byte_stop_matches_where_the_settled_text_first_holds_it(stops):
    """Random bytes, longer than the window of bytes decoded (a character cut at its
    start): the stop fires after the byte at which the written text first holds one of
    ``stops``, and not before. A string without U+FFFD matches as bytes."""
    text = ByteText()
    seqs = text.stop_sequences(stops)
    assert seqs == tuple(tuple(s.encode()) for s in stops if "\ufffd" not in s)
    hit = text.stop_in_text(stops)
    fired = 0
    for seed in range(150):
        ids = _random_bytes(random.Random(seed), 60)
        want = _first_hit(ids, [s for s in stops if "\ufffd" in s])
        got = next((k for k in range(1, len(ids) + 1) if hit([65], ids[:k])), None)
        assert got == want, (seed, ids)
        fired += want is not None and want > 4 * max(map(len, stops)) + 4  # the window
    assert fired  # (some past the window)
    # the first byte already no character; a stop string's own bytes
    assert hit([65], [0x80]) == ("\ufffd" in stops)
    assert ByteText().stop_in_text(["x"]) is None


def test_bytes_that_begin_a_character_are_not_a_replacement_character_yet():
    hit = ByteText().stop_in_text(["\ufffd"])
    ids = list("a\u4e2d\U0001f642".encode())
    assert not any(hit([], ids[:k]) for k in range(1, len(ids) + 1))
    assert hit([], [*ids, 0xE4, 0x41])  # a character cut short by the next byte
    # the end of a generation: what is left is U+FFFD in the text (it ran to its length)
    text = ByteText().decode_after([], [*ids, 0xE4])
    assert text.endswith("\ufffd") and cut_text(text, ["\ufffd"], False) == "a\u4e2d\U0001f642"
    assert finish_reason("length", text, ["\ufffd"]) == "stop"
    assert finish_reason("length", "a\u4e2d", ["\ufffd"]) == "length"
    assert finish_reason("cancelled", text, ["\ufffd"]) == "cancelled"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    run = tmp_path_factory.mktemp("stop") / "run"
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    return model, run


def _reference(model, prompt: str, seed: int, n: int) -> tuple[list[int], int]:
    """A sampled generation with no stop, and the number of its bytes after which the
    settled text first holds U+FFFD."""
    cfg = GenerationConfig(max_new_tokens=n, temperature=1.0, seed=seed)
    (g,), _ = Engine(model).generate([list(prompt.encode())], cfg)
    k = _first_hit(g.tokens, ["\ufffd"])
    assert k is not None and k > 1, g.tokens  # invalid bytes, after valid ones
    return g.tokens, k


def test_generate_stops_at_a_replacement_character_with_reason_stop(tiny, tmp_path, capsys):
    model, run = tiny
    seed = next(s for s in range(50) if (_first_hit(Engine(model).generate(
        [list(b"def ")], GenerationConfig(max_new_tokens=40, temperature=1.0, seed=s)
    )[0][0].tokens, ["\ufffd"]) or 0) > 1)
    tokens, k = _reference(model, "def ", seed, 40)
    want = cut_text(bytes(tokens).decode("utf-8", "replace"), ["\ufffd"])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens",
            "40", "--temperature", "1", "--seed", str(seed), "--stop", "\\ufffd"]
    assert cli_main([*argv, "--jsonl", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["text"], record["finish_reason"], record["completion_tokens"]) == \
        (want, "stop", k)
    capsys.readouterr()
    assert cli_main(argv) == 0  # streamed: the same text, the same number of tokens
    io = capsys.readouterr()
    assert io.out == "def " + want + "\n" and f" {k} new tokens" in io.err


@pytest.mark.parametrize("stream", [False, True])
def test_serve_stops_at_a_replacement_character_with_reason_stop(tiny, stream):
    model, _ = tiny
    seed = next(s for s in range(50) if (_first_hit(Engine(model).generate(
        [list(b"x = ")], GenerationConfig(max_new_tokens=30, temperature=1.0, seed=s)
    )[0][0].tokens, ["\ufffd"]) or 0) > 1)
    tokens, k = _reference(model, "x = ", seed, 30)
    want = cut_text(bytes(tokens).decode("utf-8", "replace"), ["\ufffd"], False)
    service = Service(model, ByteText(), "tiny")
    pieces: list[str] = []
    (choice,), usage, _ = service.generate(service.parse(
        {"prompt": "x = ", "max_tokens": 30, "temperature": 1.0, "seed": seed,
         "stop": ["\ufffd"]}, False),
        (lambda i, piece, entries: pieces.append(piece) or True) if stream else None)
    assert (choice.text, choice.finish_reason, usage["completion_tokens"]) == (want, "stop", k)
    if stream:
        assert "".join(pieces) == want


tokenizers = pytest.importorskip("tokenizers")


@pytest.mark.parametrize("decoder", ["metaspace", "byte_fallback"])
def test_a_tokenizers_stop_is_matched_in_the_text_after_the_prompt(decoder, tmp_path):
    """A stop " fox" in the first generated token "▁fox": the text after "the" holds it
    (a SentencePiece decoder drops the space of a text's first token: it never matched,
    while the text written was cut there). A character's first byte tokens are not a
    stop "\\ufffd"; a stray byte is (test below: at once). Oracle: the tokenizers
    library's decode of prompt + generation, less the prompt's, where the tokens after
    do not change it."""
    from tests.test_generate_tokenizer import _metaspace, _text

    tok = _metaspace(decoder)
    text = _text(tok, tmp_path / "tok")
    prompt = tok.encode("the").ids
    for s, stops in [("the fox jumps", [" fox"]), ("the 中 fox 中", ["\ufffd", "jump"]),
                     ("the quick fox", ["k f"])]:
        new = tok.encode(s).ids[len(prompt):]
        whole = [tok.decode(prompt + new[:k])[len(tok.decode(prompt)):]
                 for k in range(1, len(new) + 1)]
        # what the tokens after the k-th do not change
        settled = [os.path.commonprefix(whole[k:]) for k in range(len(whole))]
        want = next((k + 1 for k, w in enumerate(settled) if any(t in w for t in stops)),
                    None)
        hit = text.stop_in_text(stops)
        assert next((k for k in range(1, len(new) + 1) if hit(prompt, new[:k])), None) == want
    if decoder == "byte_fallback":
        stray = [tok.token_to_id("<0xE4>")]
        hit = text.stop_in_text(["\ufffd"])
        assert not hit(prompt, stray)  # maybe a character's first byte
        assert hit(prompt, [*stray, *tok.encode("the fox").ids[1:]])


def _gpt2_byte_char(b: int) -> str:
    """GPT-2's byte-level alphabet (``bytes_to_unicode``): the character a byte-level
    tokenizer spells byte ``b`` with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return chr(b) if b in printable else chr(256 + [c for c in range(256)
                                                    if c not in printable].index(b))


@pytest.mark.parametrize("decoder", ["byte_fallback", "byte_level"])
def test_a_tokenizers_stop_ending_in_a_replacement_character_is_matched_once_certain(
        decoder, tmp_path):
    """A stop string ending in U+FFFD matched after the token whose bytes make it certain
    (0xFF, 0xC0, a stray continuation byte: no later byte makes them a character); it
    had waited for more text. Not while the last bytes may begin a character (E4, E4 B8,
    F0 9F, ED). Oracle: the tokenizers library's decode of prompt + generation + every
    one- and two-byte continuation (E4 B8 AD is "中"): certain where each holds the stop."""
    from tests.test_generate_tokenizer import _byte_level_multilingual, _metaspace, _text

    tok = _metaspace("byte_fallback") if decoder == "byte_fallback" \
        else _byte_level_multilingual()
    text = _text(tok, tmp_path / "tok")
    spell = (lambda b: f"<0x{b:02X}>") if decoder == "byte_fallback" else _gpt2_byte_char
    byte = [tok.token_to_id(spell(b)) for b in range(256)]
    assert None not in byte
    prompt = tok.encode("the").ids
    x = tok.encode("the x").ids[len(prompt):]
    conts = [[byte[b]] for b in range(256)] + [[byte[b], byte[c]] for b in range(0x80, 0xC0)
                                               for c in range(0x80, 0xC0)]
    base = tok.decode(prompt)

    def after(ids):  # the text ids add after the prompt, as the library decodes it
        whole = tok.decode(prompt + ids)
        assert whole.startswith(base)
        return whole[len(base):]

    for stop, gen, certain in [
            ("\ufffd", [byte[0xFF]], True), ("\ufffd", [byte[0xC0]], True),
            ("\ufffd", [byte[0x80]], True), ("x\ufffd", [*x, byte[0xFF]], True),
            ("\ufffd", [*x, byte[0xBF]], True),
            ("\ufffd", [byte[0xE4]], False), ("\ufffd", [byte[0xE4], byte[0xB8]], False),
            ("\ufffd", [byte[0xF0], byte[0x9F]], False), ("\ufffd", [byte[0xED]], False)]:
        assert stop in after(gen)
        assert all(stop in after(gen + c) for c in conts) == certain, (stop, gen)
        assert text.stop_in_text([stop])(prompt, gen) == certain, (decoder, stop, gen)
