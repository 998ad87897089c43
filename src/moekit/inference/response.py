"""`moekit serve`'s answers in OpenAI's shapes: whole answers and streamed chunks
(completions and chat completions), log-probability entries, tool calls parsed from a
reply (the Hermes format), and the usage and timings of a request."""

from __future__ import annotations

import codecs
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moekit.inference.engine import GenerationStats
from moekit.inference.request import Request
from moekit.inference.text import TAIL_IDS, cut_stream, token_label

if TYPE_CHECKING:
    from moekit.inference.service import Service


@dataclass
class Choice:
    text: str
    finish_reason: str
    tokens: int
    # with logprobs: per token (the echoed prompt's first), its id, log-probability
    # (None: the prompt's first token) and the most likely (id, log-probability) there
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] | None = None


def until_tool_call(emit: Callable[[int | None], str]) -> Callable[[int | None], str]:
    """A streamed reply to a request with tools: its text before the first
    ``<tool_call>``, trailing whitespace held (the parsed content strips it); what is left,
    and the calls, the handler sends once the whole reply is parsed (``_stream``)."""
    cut = cut_stream(emit, ("<tool_call>",), keep_stop=False)
    held = ""

    def out(t: int | None) -> str:
        nonlocal held
        if t is None:
            return ""
        text = held + cut(t)
        body = text.rstrip()
        held = text[len(body):]
        return body

    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the text outside tool calls, the calls) of a reply that writes each call as
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes format Qwen's
    chat templates ask for); a block that is not such JSON stays in the text."""
    calls, kept, at = [], [], 0
    while (start := text.find("<tool_call>", at)) >= 0:
        end = text.find("</tool_call>", start)
        if end < 0:
            break
        try:
            call = json.loads(text[start + len("<tool_call>"):end])
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            args = call.get("arguments", {})
            calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                          "function": {"name": call["name"], "arguments": args
                                       if isinstance(args, str) else json.dumps(args)}})
            kept.append(text[at:start])
        else:
            kept.append(text[at:end + len("</tool_call>")])
        at = end + len("</tool_call>")
    kept.append(text[at:])
    return "".join(kept).strip() if calls else text, calls


def merged_stats(stats: list[GenerationStats]) -> GenerationStats:
    """The stats of a request's groups as one: counts and prefill time summed; its decode
    time and steps the longest group's."""
    longest = max(stats, key=lambda s: s.decode_s)
    return GenerationStats(
        sequences=sum(s.sequences for s in stats), prompt_tokens=sum(s.prompt_tokens
                                                                     for s in stats),
        new_tokens=sum(s.new_tokens for s in stats), decode_steps=longest.decode_steps,
        prefill_s=sum(s.prefill_s for s in stats), decode_s=longest.decode_s,
        reused_tokens=sum(s.reused_tokens for s in stats))


def timing_fields(stats, seconds: float) -> dict:
    """Where a request's time went (as llama-server's ``timings``): the engine's prefill
    and decode, the prompt tokens its cache already held, tokens per second of decode."""
    if stats is None:  # the prompts scored, nothing generated
        return {"seconds": seconds}
    return {"seconds": seconds, "prompt_tokens": stats.prompt_tokens,
            "cached_tokens": stats.reused_tokens, "prefill_ms": 1e3 * stats.prefill_s,
            "new_tokens": stats.new_tokens, "decode_ms": 1e3 * stats.decode_s,
            "decode_tokens_per_s": stats.decode_steps / max(stats.decode_s, 1e-9),
            "tokens_per_s": stats.new_tokens / max(seconds, 1e-9)}


def answer_payload(service: Service, request: Request, rid: str, created: int,
            choices: list[Choice], usage: dict) -> dict:
    head = {"id": rid, "created": created, "model": service.name}
    token = token_labeller(service)
    if request.chat:
        out = []
        for i, c in enumerate(choices):
            message = _message(c.text, request.tools)
            out.append({"index": i, "message": message, "finish_reason": "tool_calls"
                        if "tool_calls" in message else c.finish_reason,
                        "logprobs": None if c.logprobs is None
                        else chat_logprobs(c.logprobs, token)})
        return {**head, "object": "chat.completion", "usage": usage, "choices": out}
    return {**head, "object": "text_completion", "usage": usage, "choices": [
        {"index": i, "text": c.text, "finish_reason": c.finish_reason,
         "logprobs": None if c.logprobs is None else completion_logprobs(
             c.logprobs, token, text_offsets(service.text, request.ids[i],
                                             [t for t, _, _ in c.logprobs], request.echo))}
        for i, c in enumerate(choices)]}


def token_labeller(service: Service) -> Callable[[int], tuple[str, bytes]]:
    """A token id's label (its text, or ``bytes:\\xNN`` for part of a character) and bytes."""
    def token(t: int) -> tuple[str, bytes]:
        raw = service.text.token_bytes(t)
        return token_label(raw), raw

    return token


def chat_logprobs(entries: list[tuple], token: Callable[[int], tuple[str, bytes]]) -> dict:
    """Chat's ``logprobs`` object: each token's entry with the most likely tokens there."""
    return {"refusal": None, "content": [
        {**_token_entry(*token(t), lp),
         "top_logprobs": [_token_entry(*token(u), v) for u, v in top]}
        for t, lp, top in entries]}


def _message(text: str, tools: bool) -> dict:
    """A chat reply: its text, and with tools the calls it writes (their text taken out;
    content null where nothing else is left, as OpenAI's)."""
    content, calls = parse_tool_calls(text) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


def _token_entry(label: str, raw: bytes, logprob: float) -> dict:
    return {"token": label, "logprob": logprob, "bytes": list(raw)}


def completion_logprobs(entries: list[tuple], token: Callable[[int], tuple[str, bytes]],
                        offsets: list[int]) -> dict:
    """The legacy completions ``logprobs`` object: tokens, their log-probabilities, the
    most likely tokens at each (a dict by token label) and each token's ``offsets`` in
    the text (``TextOffsets``)."""
    return {"tokens": [token(t)[0] for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {token(u)[0]: v for u, v in top}
                             for _, _, top in entries],
            "text_offset": offsets}


def _utf8(raw: bytes, final: bool) -> str:
    return codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final)


class TextOffsets:
    """Each token's ``text_offset``: the characters of the text whose bytes all come
    before the token's, in the text the tokenizer writes (``text.stream(context)``, which
    holds back a character's first bytes until its last arrives); a token inside a
    character starts where that character does, one after invalid bytes after their
    U+FFFD. (Offsets had summed the tokens' own texts, a part of a character counting 0,
    so every token after a character cut over tokens, or after an invalid byte, pointed
    before its text: text[offset] was not where the token's text is.) Exact where the
    text is the tokens' bytes decoded as UTF-8 (bytes, byte-level BPE). A byte-fallback
    decoder writes a U+FFFD for each byte of an invalid run of ``<0xNN>`` tokens
    (``_in_byte_run``; the offsets after such a run had been a character or more short
    of their text); what a token cannot know when it comes stays as it was then: a byte
    inside a character's first bytes starts where that character does, though the run
    turns invalid later (each byte then a U+FFFD of its own), and a run that a byte turns
    invalid after a whole character was written (中, then 0xFF) rewrites that character
    as U+FFFDs, which the offsets of the bytes after it do not count."""

    def __init__(self, text, context: Sequence[int] = (), at: int = 0) -> None:
        self._text, self._emit = text, text.stream(context)
        self._dropped = getattr(text, "dropped", frozenset())  # decode() leaves them out
        self._byte = text.fallback_byte if getattr(text, "byte_fallback", False) else None
        self._at = at  # the characters written so far
        self._before = list(context[-2 * TAIL_IDS:])  # the last ids before the run
        self._run: list[int] = []  # the ids since the last text written

    def __call__(self, token: int) -> int:
        offset = self._at + self._settled(token) if self._run else self._at
        self._run.append(token)
        piece = self._emit(token)
        if piece:
            self._at += len(piece)
            self._before = (self._before + self._run)[-2 * TAIL_IDS:]
            self._run = []
        return offset

    def _settled(self, token: int) -> int:
        """The characters the run's bytes make before ``token``'s: whole ones, and the
        U+FFFD of a held character's bytes where ``token``'s first byte cannot go on
        with them; at most what the tokenizer writes for the run (a SentencePiece
        decoder drops the space of a text's first token)."""
        written = len(self._text.decode_after(self._before, self._run))
        if self._byte is not None:
            return min(self._in_byte_run(token, written), written)
        raw = b"".join(self._text.token_bytes(t) for t in self._run if t not in self._dropped)
        own = b"" if token in self._dropped else self._text.token_bytes(token)
        held, ended = _utf8(raw, False), _utf8(raw, True)
        settled = ended if own and _utf8(raw + own[:1], False).startswith(ended) else held
        return min(len(settled), written)

    def _in_byte_run(self, token: int, written: int) -> int:
        """``_settled`` for a byte-fallback decoder, whose run of byte tokens is one text
        (special tokens, which decode() drops, do not end it): a token that ends the run
        comes after all of the run's text (``written``, as the tokenizer writes it);
        a byte that leaves the run's bytes valid UTF-8 starts where the character it
        begins or goes on does; one that makes them invalid after its run's n bytes,
        at the run's n-th U+FFFD (one per byte)."""
        kept = [t for t in self._run if t not in self._dropped]
        n = next((i for i, t in enumerate(reversed(kept)) if self._byte(t) is None), len(kept))
        tail = bytes(self._byte(t) for t in kept[len(kept) - n:])
        own = self._byte(token)
        if own is None and token not in self._dropped:
            return written
        head = len(self._text.decode_after(self._before, kept[:len(kept) - n]))
        try:  # strict: a run's bytes are a U+FFFD each once any of them is invalid
            codecs.getincrementaldecoder("utf-8")().decode(
                tail + (b"" if own is None else bytes([own])))
        except UnicodeDecodeError:
            return head + len(tail)
        return head + len(_utf8(tail, False))


def text_offsets(text, prompt: Sequence[int], tokens: Sequence[int], echo: bool
                 ) -> list[int]:
    """The ``text_offset`` of each of ``tokens`` generated after ``prompt``, the prompt's
    own tokens first where it is echoed (its text first in the answer)."""
    if not echo:
        after = TextOffsets(text, prompt)
        return [after(t) for t in tokens]
    before = TextOffsets(text)
    head = [before(t) for t in prompt]
    after = TextOffsets(text, prompt, len(text.decode(prompt)))
    return head + [after(t) for t in tokens[len(prompt):]]


def stream_chunk(request: Request, head: dict, i: int, piece: str | None,
           finish: str | None = None, logprobs: dict | None = None) -> dict:
    if request.chat:
        delta = {} if piece is None else {"content": piece}
        return {**head, "object": "chat.completion.chunk", "choices": [
            {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
    return {**head, "object": "text_completion", "choices": [
        {"index": i, "text": piece or "", "finish_reason": finish, "logprobs": logprobs}]}


def stream_end_chunks(request: Request, head: dict, i: int, choice: Choice, streamed: str
                ) -> list[dict]:
    """A streamed sequence's last chunks: with tools, the rest of the parsed reply's
    content (after ``streamed``, the text sent so far) and its calls (one delta); then
    the finish reason."""
    chunks, finish = [], choice.finish_reason
    if request.tools:  # the rest of the content, then the calls (one delta)
        message = _message(choice.text, True)
        content = message["content"] or ""
        if content.startswith(streamed) and len(content) > len(streamed):
            chunks.append(stream_chunk(request, head, i, content[len(streamed):]))
        if "tool_calls" in message:
            chunk = stream_chunk(request, head, i, None)
            chunk["choices"][0]["delta"] = {"tool_calls": [
                {"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
            chunks.append(chunk)
            finish = "tool_calls"
    return [*chunks, stream_chunk(request, head, i, None, finish)]
