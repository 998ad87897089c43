"""`moekit serve`'s completions ``text_offset`` where tokens cut characters.

A byte-level tokenizer's tokens may hold part of a UTF-8 character, or bytes that are
none (the text shows U+FFFD there). Offsets had summed the tokens' own texts, a part of a
character counting 0, so every token after such a token pointed before its own text.
Oracle: the text's characters with the bytes each is made of, decoded here with Python's
strict UTF-8 decoder one character at a time (an invalid run of bytes: one U+FFFD for its
longest start of a character, as UTF-8 decoders write it), checked against the
tokenizers library's text; a token's offset is the number of characters whose bytes all
come before its first byte.
"""

from __future__ import annotations

import codecs
import threading

import pytest
import torch

from moekit.inference.server import Service, make_server
from tests import test_generate_tokenizer as tg
from tests.test_serve import _post

transformers = tg.transformers


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(tokenizer, the transformers model, the server's URL) of a random Qwen3-MoE whose
    byte-level tokenizer knows only ASCII pieces, converted and served."""
    from moekit.inference.text import text_for
    from moekit.quant.io import load_model

    root = tmp_path_factory.mktemp("offsets")
    tok, model = tg.convert_random_qwen3(root, seed=3, max_positions=256, moe_ffn=16)
    service = Service(load_model(root / "lm"), text_for(root / "lm"), "q")
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tok, model, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _token_bytes(tok, ids: list[int]) -> list[bytes]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's table

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    # ids past the tokenizer's vocabulary (the model's is 320 of its 300) write nothing
    return [bytes(byte_of[c] for c in tok.id_to_token(t) or "") for t in ids]


def _characters(raw: bytes) -> list[tuple[str, int]]:
    """(character, the offset of the byte after it) of the UTF-8 text ``raw``."""
    out, at = [], 0
    while at < len(raw):
        for n in range(1, 5):  # a whole character of n bytes
            try:
                out.append((raw[at:at + n].decode("utf-8"), at + n))
                break
            except UnicodeDecodeError:
                continue
        else:  # invalid: U+FFFD for the longest start of a character here (1-3 bytes)
            n = 1
            while n < 3 and at + n < len(raw):
                try:
                    codecs.getincrementaldecoder("utf-8")().decode(raw[at:at + n + 1])
                except UnicodeDecodeError:
                    break
                n += 1
            out.append(("\ufffd", at + n))
        at = out[-1][1]
    return out


def _want_offsets(tok, ids: list[int], text: str) -> list[int]:
    pieces = _token_bytes(tok, ids)
    chars = _characters(b"".join(pieces))
    assert "".join(c for c, _ in chars) == text  # the oracle's text is the tokenizer's
    starts = [sum(map(len, pieces[:j])) for j in range(len(ids))]
    return [sum(end <= s for _, end in chars) for s in starts]


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt,echo", [
    ("import torch", False),
    ("h\u00e9llo w\u00f6rld \u4e2d\u6587 x", True),  # characters the vocabulary cuts
])
def test_offsets_point_at_each_tokens_text_after_cut_characters(served, prompt, echo):
    tok, model, url = served
    ids = tok.encode(prompt).ids
    new = _greedy(model, ids, 48)
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "logprobs": 0,
            "echo": echo}
    status, r = _post(url, body)
    assert status == 200
    c = r["choices"][0]
    assert c["text"] == (prompt if echo else "") + tok.decode(new)
    labels, got = c["logprobs"]["tokens"], c["logprobs"]["text_offset"]
    assert any(t.startswith("bytes:") for t in labels)  # the case is here
    assert got == _want_offsets(tok, (ids if echo else []) + new, c["text"])
    for label, at in zip(labels, got, strict=True):  # whole characters: their own text
        if not label.startswith("bytes:"):
            assert c["text"][at:at + len(label)] == label
    if not echo:  # streamed, the chunks' offsets joined are the whole answer's
        status, events = _post(url, {**body, "stream": True})
        chunks = [e["choices"][0] for e in events[:-1] if e["choices"][0]["logprobs"]]
        assert [x for c in chunks for x in c["logprobs"]["text_offset"]] == got
        # (README) a token a chunk; one whose text is held back comes with no text
        assert all(len(c["logprobs"]["tokens"]) == 1 for c in chunks)
        assert any(c["text"] == "" and c["logprobs"]["tokens"][0].startswith("bytes:")
                   for c in chunks)


def test_a_byte_models_echoed_characters_by_hand():
    """A byte-level model's echoed "hé中 x": each byte of a character starts where the
    character does (worked by hand: h 0; é's two bytes 1; 中's three 2; the space 3; x 4;
    it was [0, 1, 1, 1, 1, 1, 1, 2])."""
    from moekit.inference.text import ByteText
    from moekit.models import MoETransformer, preset

    torch.manual_seed(0)
    service = Service(MoETransformer(preset("tiny")).eval(), ByteText(), "tiny")
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        status, r = _post(url, {"prompt": "h\u00e9\u4e2d x", "max_tokens": 0, "echo": True,
                                "logprobs": 0})
        assert status == 200
        assert r["choices"][0]["logprobs"]["text_offset"] == [0, 1, 1, 2, 2, 2, 3, 4]
    finally:
        server.shutdown()
        server.server_close()


def _fallback_offsets(tok, ids: list[int]) -> tuple[str, list[int]]:
    """(the text ``ids`` write after a prompt, each one's offset in it), worked out as a
    byte-fallback decoder writes it: a run of <0xNN> tokens is its UTF-8 where the run is
    valid (a byte at the start of the character holding it), else a U+FFFD per byte; any
    other token its piece, "▁" a space."""
    def byte(t):
        name = tok.id_to_token(t)
        return int(name[3:5], 16) if name.startswith("<0x") else None

    text, offsets, i = "", [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and byte(ids[j]) is not None:
            j += 1
        if j == i:  # not a byte
            offsets.append(len(text))
            text += tok.id_to_token(ids[i]).replace("\u2581", " ")
            i += 1
            continue
        raw = bytes(byte(t) for t in ids[i:j])
        try:
            run = raw.decode("utf-8")
            # the characters whole before byte k (a cut one's bytes ignored)
            offsets += [len(text) + len(raw[:k].decode("utf-8", "ignore"))
                        for k in range(len(raw))]
        except UnicodeDecodeError:
            run = "\ufffd" * len(raw)
            offsets += [len(text) + k for k in range(len(raw))]
        text, i = text + run, j
    return text, offsets


def test_byte_fallback_offsets_after_runs_of_invalid_bytes(tmp_path):
    """A byte-fallback (Llama-style) tokenizer writes a U+FFFD for each byte of an invalid
    run of <0xNN> tokens; the offsets had counted them as a UTF-8 decoder does (E4 B8: one
    U+FFFD), so a token after such a run pointed before its own text. Oracle: the text
    worked out above, checked against the tokenizers library's decode."""
    from moekit.inference.response import text_offsets

    tok = tg._metaspace("byte_fallback")
    text = tg._text(tok, tmp_path / "tok")
    b = [tok.token_to_id(f"<0x{v:02X}>") for v in range(256)]
    prompt = tok.encode("the").ids
    fox, x = (tok.encode(f"the {w}").ids[len(prompt):] for w in ("fox", "x"))
    for ids in ([b[0xFF], b[0xFE], *fox], [b[0xFF], b[0xE4], b[0xB8], b[0xAD], *fox, *x],
                [b[0xE4], b[0xFF], *fox], [*fox, b[0xE4], b[0xB8], b[0xAD], *x],
                [b[0x00], b[0xC0], b[0x41], *fox], [b[0xC3], b[0xA9], *fox]):
        want_text, want = _fallback_offsets(tok, ids)
        got = text_offsets(text, prompt, ids, echo=False)
        assert want_text == tok.decode(prompt + ids)[len(tok.decode(prompt)):], ids
        assert got == want, ([tok.id_to_token(t) for t in ids], got, want)
    # a special token (decode() drops it) inside a run neither ends it nor counts
    special = tok.token_to_id(tg.SPECIALS[0])
    got = text_offsets(text, prompt, [b[0xFF], special, b[0xFE], *fox], echo=False)
    assert got == [0, 1, 1, 2]
    # what a token cannot know when it comes (streamed offsets are sent with it): B8
    # after E4 may be the middle of a character, so it starts at E4's; a word after
    # them then shows the run invalid (two U+FFFDs): the word after both
    got = text_offsets(text, prompt, [b[0xE4], b[0xB8], *fox], echo=False)
    assert got == [0, 0, 2]  # the word had been at 1, the second U+FFFD
    # nor that a whole character's bytes are rewritten as U+FFFDs by a byte after them
    # that leaves the run invalid: E4 B8 AD ("中") then C3 at the end is four U+FFFDs
    ids = [b[0xE4], b[0xB8], b[0xAD], b[0xC3]]
    assert tok.decode(prompt + ids).endswith("the\ufffd\ufffd\ufffd\ufffd")
    assert text_offsets(text, prompt, ids, echo=False) == [0, 0, 0, 1]
