"""Stop strings matched in generated text (``moekit generate --stop``, ``moekit serve``'s
"stop"): ``cut_stream`` ends a stream of text at the first one, ``cut_text`` a whole
text, ``finish_reason`` says "stop" for a sequence whose text holds one. The names stay
importable from ``moekit.inference.text``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def finish_reason(reason: str, text: str, stops: Sequence[str]) -> str:
    """A sequence's ``reason`` ("length", "stop" or "cancelled") as its whole ``text``
    shows it: "stop" where one ran to its length yet the text holds a stop string (cut
    there): the last bytes of a sequence that begin a character turn U+FFFD only once
    it ends (``stop_in_text`` holds them back till then). The answer said "length" for a
    text cut at the stop."""
    return "stop" if reason == "length" and stop_span(text, stops) is not None else reason


def stop_span(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) in ``text`` of the stop string occurrence that ends first; None where
    none is in it."""
    spans = [(i, i + len(s)) for s in stops if (i := text.find(s)) >= 0]
    return min(spans, key=lambda span: span[1], default=None)


def _held(text: str, stops: Sequence[str]) -> int:
    """How many of ``text``'s last characters begin a stop string (they may be one
    when the next text comes)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
               default=0)


def cut_stream(emit: Callable[[int | None], str], stops: Sequence[str],
               keep_stop: bool = True) -> Callable[[int | None], str]:
    """``emit`` (a ``stream``) whose text ends at the first stop string, after it
    (``keep_stop``, as ``moekit generate`` writes it) or before it (as OpenAI's API
    returns it). A tokenizer's sequence stops at the token whose text completes a stop
    string (``stop_in_text``): that token's text after the string is not written. Text
    that may begin a stop string is held back until the next text tells (and written at
    the end, ``emit(None)``, where none came)."""
    if not stops:
        return emit
    held, done = "", False  # held: text not written yet

    def out(t: int | None) -> str:
        nonlocal held, done
        if done:
            return ""
        text = held + emit(t)
        span = stop_span(text, stops)
        if span is not None:
            done = True
            return text[:span[1] if keep_stop else span[0]]
        n = 0 if t is None else _held(text, stops)
        held = text[len(text) - n:]
        return text[:len(text) - n]

    return out


def cut_text(text: str, stops: Sequence[str], keep_stop: bool = True) -> str:
    """``text`` up to the end (``keep_stop``) or start of its first stop string (all of it
    where it has none)."""
    span = stop_span(text, stops)
    return text if span is None else text[:span[1] if keep_stop else span[0]]
