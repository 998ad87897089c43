"""Text <-> token ids for ``moekit generate``.

moekit's own language models read UTF-8 bytes (``ByteText``). A checkpoint converted
from transformers (``moekit convert``) reads its tokenizer's ids: the convert step copies
the tokenizer's files (``tokenizer.json`` and the configs that name its special tokens)
into ``RUN_DIR/tokenizer``, and ``TokenizerText`` reads them with the ``tokenizers``
library (installed with transformers: ``pip install 'moekit[hf]'``). Its end-of-sequence
ids (``generation_config.json``, else the tokenizer config's ``eos_token``) stop a
sequence; a ``--stop`` string is matched in the text, the sequence ends at the token
whose text completes it, and the text written ends with the string (``cut_stream``, in
``stop_text.py`` with the other stop-string functions; importable from here).
With ``--chat`` a prompt is a user message rendered by the tokenizer's chat template
(``chat_template.jinja`` or tokenizer_config.json's ``chat_template``), as transformers'
``apply_chat_template(..., add_generation_prompt=True)`` renders it: a sandboxed jinja2
environment (trim_blocks, lstrip_blocks, loop controls, a ``tojson`` that keeps
non-ASCII text, ``raise_exception``, ``strftime_now``), the special tokens by name.
"""

from __future__ import annotations

import codecs
import functools
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moekit.config import reject
from moekit.inference.engine import stop_sequences_from_text

# re-exported (the redundant aliases say so): callers import these from here as before
from moekit.inference.stop_text import cut_stream as cut_stream
from moekit.inference.stop_text import cut_text as cut_text
from moekit.inference.stop_text import finish_reason as finish_reason
from moekit.inference.stop_text import stop_span as stop_span

# (the prompt's ids, the ids generated so far) -> does the text those add after the
# prompt's hold a stop string? (``stop_in_text``; the caller binds the prompt)
StopText = Callable[[Sequence[int], list[int]], bool]

TOKENIZER_DIR = "tokenizer"  # beside a run's step_* directories
# prompt ids the new text is decoded behind (text-generation-inference and vLLM take 5)
CONTEXT_IDS = 5
TAIL_IDS = CONTEXT_IDS + 4  # the most of them decoded behind: back to a character's start
# what is copied where a transformers directory has it (tokenizer.json is what is read)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


class ByteText:
    """UTF-8 bytes as token ids (moekit's byte-level models)."""

    stop_ids: tuple[int, ...] = ()
    bos_id: int | None = None  # no token starts a text

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """``encode`` as a uint8 tensor: a byte an id, where a list holds 8 (a pointer)."""
        if not text:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(text, "utf-8"), dtype=torch.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes."""
        return bytes([token])

    def stop_sequences(self, texts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """The stop strings as byte sequences, but those that hold U+FFFD: invalid bytes
        decode to that character too, which its own bytes (EF BF BD) do not match; the
        text matches them (``stop_in_text``)."""
        return stop_sequences_from_text([t for t in texts if "\ufffd" not in t])

    def stop_in_text(self, texts: Sequence[str]) -> StopText | None:
        """The stop strings that hold U+FFFD, matched in the text of the last bytes (as
        ``stream`` writes it: not a character's first bytes before its last has come).
        None where there are none: the byte sequences match the others exactly (the
        text holds one only where the bytes do)."""
        texts = [t for t in texts if "\ufffd" in t]
        if not texts:
            return None
        # a character is at most 4 bytes (U+FFFD stands for at most 3), +1 the byte that
        # shows the bytes before it are no character, +3 the bytes _settled_text skips
        window = 4 * max(map(len, texts)) + 4
        return lambda _, tokens: any(t in _settled_text(tokens, window) for t in texts)

    def decode_after(self, context: Sequence[int], ids: Sequence[int]) -> str:
        """The text ``ids`` add after ``context`` (the prompt's): bytes need none."""
        del context
        return self.decode(ids)

    def stream(self, context: Sequence[int] = ()) -> Callable[[int | None], str]:
        """A decoder of one generation's new ids as they come: ``emit(id)`` the text they
        complete, ``emit(None)`` the rest at the end (``context``: the prompt's ids, which
        a tokenizer's text may depend on; bytes need none)."""
        del context
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda t: utf8.decode(b"", final=True) if t is None else utf8.decode(bytes([t]))


class TokenizerText:
    """A transformers tokenizer's ``tokenizer.json`` in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"tokenizer={str(directory)!r} is not allowed here: reading it "
                             "needs the tokenizers library (pip install 'moekit[hf]')") from None
        path = Path(directory) / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own Exception types
            reject("tokenizer", str(directory), f"its {path} is not a readable tokenizers "
                   f"file: {e}")
        self.directory = Path(directory)
        # read once, not per --chat prompt (its special tokens, its template)
        self.config = _json_object(self.directory / "tokenizer_config.json")
        self.stop_ids = self._eos_ids()
        # ids decode() drops wherever they stand (special tokens): once, not per stream
        self.dropped = frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items()
                                 if t.special)

    def _eos_ids(self) -> tuple[int, ...]:
        for config in (_json_object(self.directory / "generation_config.json"), self.config):
            eos = config.get("eos_token_id")
            if isinstance(eos, int):
                return (eos,)
            if isinstance(eos, list) and all(isinstance(e, int) for e in eos):
                return tuple(eos)
            token = config.get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return (self.tokenizer.token_to_id(token),)
        return ()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids  # with the tokenizer's own special tokens

    @functools.cached_property
    def bos_id(self) -> int | None:
        """The special token the tokenizer puts before every text (Mistral's and Llama's
        "<s>"), else None."""
        ids = self.encode("a")
        return ids[0] if len(ids) > 1 and ids[0] in self.dropped else None

    def encode_tensor(self, text: str) -> torch.Tensor:
        """``encode`` as an int32 tensor: 4 bytes an id, where a list's ids past 256 are
        36 (an int object and its pointer; the list is a moment's, the tensor stays)."""
        return torch.tensor(self.encode(text), dtype=torch.int32)

    def encode_chat(self, text: str, system: str | None = None) -> list[int]:
        """``text`` as a user message in the chat template (after a ``system`` message
        where given), followed by the assistant's turn; the template writes the special
        tokens itself."""
        messages = [] if system is None else [{"role": "system", "content": system}]
        return self.encode_messages([*messages, {"role": "user", "content": text}])

    def encode_messages(self, messages: list[dict], tools: list[dict] | None = None
                        ) -> list[int]:
        """A conversation (dicts of "role" and "content", and what the template reads
        besides: an assistant's "tool_calls", a tool's "tool_call_id") in the chat
        template, followed by the assistant's turn; ``tools`` (function schemas, as
        transformers' ``apply_chat_template(tools=...)`` takes them) where given."""
        extra = {} if tools is None else {"tools": tools}
        rendered = render_chat(self._chat_template(), messages, **self._special_tokens(),
                               **extra)
        return self.tokenizer.encode(rendered, add_special_tokens=False).ids

    def _chat_template(self) -> str:
        file = self.directory / "chat_template.jinja"
        if file.is_file():
            return file.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(template, str):
            reject("--chat", True, f"the tokenizer in {self.directory} has no chat template "
                   "(chat_template.jinja, or chat_template in tokenizer_config.json)")
        return template

    def _special_tokens(self) -> dict[str, str]:
        out = {}
        for key, value in self.config.items():
            if key.endswith("_token"):
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    out[key] = value
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes (special tokens' text included) from its spelling in the
        vocabulary: byte-level characters mapped back to bytes (a piece of a character
        gives its bytes, not the U+FFFD its decode would), a ``<0xNN>`` byte-fallback
        token its byte, SentencePiece's "▁" a space (a decode of the token alone drops a
        first word's space); else its decode."""
        raw = self.tokenizer.id_to_token(token) or ""
        kinds = self._decoder_kinds
        if "ByteLevel" in kinds:
            table = _byte_level_decoder()
            if raw and all(c in table for c in raw):
                return bytes(table[c] for c in raw)
        if (b := self.fallback_byte(token)) is not None:
            return bytes([b])
        if kinds & {"Metaspace", "Replace"} and "\u2581" in raw:
            return raw.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def byte_fallback(self) -> bool:
        """Whether the decoder reads ``<0xNN>`` tokens as bytes (ByteFallback: a run of
        them is one text, its UTF-8 where valid, else a U+FFFD per byte)."""
        return "ByteFallback" in self._decoder_kinds

    def fallback_byte(self, token: int) -> int | None:
        """The byte of a byte-fallback token ``<0xNN>``; None for any other token."""
        raw = self.tokenizer.id_to_token(token) or ""
        if not (self.byte_fallback and len(raw) == 6 and raw.startswith("<0x")
                and raw.endswith(">") and all(c in "0123456789abcdefABCDEF" for c in raw[3:5])):
            return None
        return int(raw[3:5], 16)

    @functools.cached_property
    def _decoder_kinds(self) -> frozenset[str]:
        """The types of the tokenizer's decoders (a Sequence's members too)."""
        spec = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        parts = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
        return frozenset(d.get("type", "") for d in parts if isinstance(d, dict))

    def stop_sequences(self, texts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """None as id sequences: a tokenizer's stop strings are matched in the text
        (``stop_in_text``), where the ids of a string alone may not be those generated (a
        merged token such as ".\n\n" holds "\n\n")."""
        if any(not t for t in texts):
            reject("stop", "", "a stop string must hold at least one character")
        return ()

    def stop_in_text(self, texts: Sequence[str]) -> StopText | None:
        """Does the text a sequence's ids add after its prompt's (``decode_after``) hold
        one of ``texts``? A sequence stops at the token whose text completes one. The
        text of a window of the last ids (enough for the longest string, 4 ids a
        character) decoded behind the ids before it: alone, a SentencePiece decoder
        drops its first token's space (a stop " fox" never matched a first token "▁fox",
        though the text written held it). Its trailing U+FFFD is left out while the last
        bytes may begin a character (``_may_go_on``: "<0xE4>" had matched a stop
        "\ufffd" in "中"), as ``stream`` holds it back; one that no later byte can
        change (a byte 0xFF, a stray continuation byte) is matched at once (it had waited
        for the next text, or ``finish_reason`` at the end). None without strings."""
        if not texts:
            return None
        window = 4 * max(len(t) for t in texts) + 8

        def hit(context: Sequence[int], tokens: list[int]) -> bool:
            k = min(window, len(tokens))
            before = tokens[max(0, len(tokens) - k - 2 * TAIL_IDS):len(tokens) - k]
            before = [*context[-2 * TAIL_IDS:], *before][-2 * TAIL_IDS:]
            text = self.decode_after(before, tokens[len(tokens) - k:])
            if text.endswith("\ufffd") and self._may_go_on([*before, *tokens[-k:]]):
                text = text.rstrip("\ufffd")
            return any(t in text for t in texts)

        return hit

    def _may_go_on(self, ids: Sequence[int]) -> bool:
        """Whether the bytes of ``ids``' last tokens (those decode() keeps) end with the
        first bytes of a character a later byte could complete: only then may the
        decode's trailing U+FFFD still change (byte-level and byte-fallback decoders
        alike: an invalid run stays invalid whatever follows)."""
        kept = [t for t in ids[-TAIL_IDS:] if t not in self.dropped
                and self.tokenizer.id_to_token(t) is not None]
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.decode(b"".join(self.token_bytes(t) for t in kept[-4:]))  # a character: <= 4
        return bool(utf8.getstate()[0])  # the bytes it holds for what comes next

    def _tail(self, context: Sequence[int]) -> list[int]:
        """The last CONTEXT_IDS of ``context`` that decode() keeps: what the text of the
        ids after them is decoded behind (a SentencePiece decoder drops the leading space
        of a text's first token, so the first generated word would lose it alone)."""
        kept = [t for t in context if t not in self.dropped]
        n = min(CONTEXT_IDS, len(kept))
        # not from inside a character (byte tokens): back to where its first byte is
        while n < len(kept) and n < TAIL_IDS and self.decode(kept[-n:])[:1] == "\ufffd":
            n += 1
        return kept[len(kept) - n:]

    def decode_after(self, context: Sequence[int], ids: Sequence[int]) -> str:
        """The text ``ids`` add after ``context`` (the prompt's ids): decoded behind the
        context's last ids, that text taken off (``decode(ids)`` where the context's text
        is not a prefix of it)."""
        tail = self._tail(context)
        base, text = self.decode(tail), self.decode([*tail, *ids])
        return text[len(base):] if text.startswith(base) else self.decode(ids)

    def stream(self, context: Sequence[int] = ()) -> Callable[[int | None], str]:
        """As ``ByteText.stream``: the new text once it no longer ends inside a character
        (a byte-level token can hold part of one) and extends what was written; decoded
        behind the last ids of ``context`` (the prompt's), as ``decode_after``.

        Incremental (as text-generation-inference and vLLM detokenize): an id costs a
        decode of the few ids from those of the last piece written on, not of the whole
        generation."""
        # what decode() drops wherever it stands (special tokens, ids outside the
        # vocabulary) never enters the window, so that a run of them does not grow it
        special = self.dropped
        # window[:read]: the ids that wrote the last piece (written: their own decode);
        # window[read:]: those since. The new text is what decode(window) adds to
        # written: both decodes start at the same token, so a decoder that treats its
        # first token apart (Metaspace, Strip: no leading space) treats it alike in both
        window = self._tail(context)
        read = len(window)
        written = self.decode(window)

        def emit(t: int | None) -> str:
            nonlocal read, written
            if t is not None:
                if t in special or self.tokenizer.id_to_token(t) is None:
                    return ""
                window.append(t)
            text = self.decode(window)
            # "\ufffd" last: maybe a character whose remaining bytes are still to come
            if len(text) <= len(written) or (t is not None and text.endswith("\ufffd")):
                return ""
            new = text[len(written):]
            del window[:read]
            read = len(window)
            written = self.decode(window)
            return new

        return emit


def token_label(raw: bytes) -> str:
    """A token's bytes as text: the text where they are whole UTF-8 characters, else
    ``bytes:\\xNN...`` (OpenAI's spelling of such tokens)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (as tokenizers' ByteLevel pre-tokenizer spells bytes)
    back to bytes: printable Latin-1 bytes stand for themselves, the other bytes for
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _settled_text(ids: Sequence[int], window: int) -> str:
    """The text of the last ``window`` of the bytes ``ids`` that no later byte changes:
    not the bytes at the end that may begin a character still to come (U+FFFD only once
    a byte shows they do not), nor, where the window leaves bytes out before it, up to 3
    continuation bytes at its start (those of a character begun before it; a 4th is no
    character's, U+FFFD in both)."""
    start = max(0, len(ids) - window)
    if start:
        start += next((i for i in range(3) if not 0x80 <= ids[start + i] <= 0xBF), 3)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return utf8.decode(bytes(ids[start:]))


def render_chat(template: str, messages: list[dict], **variables) -> str:
    """A chat template rendered for ``messages`` with the assistant's turn opened."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=True,
                                          **variables)
    except jinja2.exceptions.TemplateError as e:
        reject("--chat", True, f"the chat template failed: {e}")


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
    """The template compiled once (not per prompt) in a sandboxed environment with what
    transformers' chat templates use."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(template)


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``; {} where it is missing, unreadable or not an object."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def find_tokenizer(checkpoint: str | Path) -> Path | None:
    """The tokenizer directory of a run (``checkpoint``: the run, one of its step_*
    directories, or a quantized directory), or None."""
    path = Path(checkpoint)
    for where in (path, path / TOKENIZER_DIR, path.parent / TOKENIZER_DIR):
        if (where / "tokenizer.json").is_file():
            return where
    return None


def text_for(checkpoint: str | Path, tokenizer: str | Path | None = None
             ) -> ByteText | TokenizerText:
    """``tokenizer``'s text (a directory holding tokenizer.json), else the checkpoint's
    own tokenizer, else bytes."""
    if tokenizer is not None:
        if not (Path(tokenizer) / "tokenizer.json").is_file():
            reject("--tokenizer", str(tokenizer), "it must be a directory holding "
                   "tokenizer.json (a transformers checkpoint's, or a converted run's "
                   f"{TOKENIZER_DIR}/)")
        return TokenizerText(tokenizer)
    found = find_tokenizer(checkpoint)
    return ByteText() if found is None else TokenizerText(found)


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path | None:
    """``src``'s tokenizer files (those of TOKENIZER_FILES it has; None where it has no
    tokenizer.json) into ``dst / TOKENIZER_DIR``, whole or not at all: written to a new
    temporary directory beside it, fsynced, then swapped in (``rundir.write_dir``: a
    tokenizer there before waits aside until the new one is in place). It had been
    deleted before the rename, so a failed rename or fsync left no tokenizer at all; and
    its one fixed temporary name let two copies into ``dst`` delete each other's."""
    from moekit.train.rundir import write_dir  # lazy, as other inference/ modules do

    src, out = Path(src), Path(dst) / TOKENIZER_DIR
    if not (src / "tokenizer.json").is_file():
        return None

    def fill(tmp: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)

    shutil.rmtree(Path(dst) / f".{TOKENIZER_DIR}.tmp", ignore_errors=True)  # the old name's
    return write_dir(out, fill)  # a killed copy's temporary is removed there
