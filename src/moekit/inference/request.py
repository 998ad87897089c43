"""`moekit serve`'s requests: a POST body read and checked, every field before anything
runs (``parse_request``), into a ``Request``; a field refused raises ``RequestError``
naming it (HTTP 400, OpenAI's error shape)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from moekit.config import MAX_SEED
from moekit.inference.engine import (
    MAX_LOGPROBS,
    ContextLengthError,
    GenerationConfig,
    checked_prompts,
)
from moekit.inference.text import ByteText, TokenizerText

MAX_N = 64  # samples per prompt
# fields that change nothing at these values (clients send them by default)
NO_OP = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
         "repetition_penalty": (None, 1, 1.0), "best_of": (None, 1), "logit_bias": (None, {}),
         "suffix": (None, ""), "response_format": (None, {"type": "text"}),
         "parallel_tool_calls": (None, True, False)}
READ = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options", "user", "logprobs",
        "top_logprobs", "echo", "tools", "tool_choice"}
# what a message may carry besides its role and content (the chat template reads them)
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), naming the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def reject_field(param: str, value: object, allowed: str) -> None:
    raise RequestError(param, f"{param}={value!r} is not allowed: {allowed}")


def _number(body: dict, name: str, default, kind: type, low: float, high: float | None = None):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (
        kind is float or isinstance(value, int)) and value >= low and (high is None
                                                                        or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        reject_field(name, value, f"it must be {'a number' if kind is float else 'an integer'} "
                f"{bound}")
    return kind(value)


def _strings(name: str, value: object, allow_empty: bool) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(s, str) and (s or allow_empty) for s in items):
        reject_field(name, value, "it must be a string or a non-empty list of strings"
                + ("" if allow_empty else ", none of them empty"))
    return items


def _prompts(text: ByteText | TokenizerText, value: object) -> list[list[int]]:
    """``prompt`` as token ids: a string, a list of strings, a list of token ids or a list
    of such lists (as OpenAI's API takes them)."""
    def ids(x: object) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if ids(value):
        return [value]
    if isinstance(value, list) and value and all(ids(x) for x in value):
        return value
    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        reject_field("prompt", value, "a list of token-id lists must hold non-empty lists of ints")
    return [text.encode(p) for p in _strings("prompt", value, False)]


def _content(i: int, content: object) -> str:
    """A message's text: a string, or a list of text parts (as newer clients send); none
    (an assistant's message that only calls tools) is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    reject_field(f"messages[{i}].content", content, "it must be a string or a list of "
            "{\"type\": \"text\", \"text\": ...} parts")



def _tools(body: dict) -> list[dict] | None:
    """The request's function tools for the chat template (None: none, or
    ``tool_choice: "none"``); "required" or a named function is not supported."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        reject_field("tool_choice", choice, "moekit serve supports \"auto\" and \"none\" (the "
                "model decides; nothing forces a call)")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        reject_field("tools", tools, "it must be a list of {\"type\": \"function\", \"function\": "
                "{\"name\": ..., \"parameters\": ...}}")
    return None if choice == "none" else tools



def _logprob_fields(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(how many most likely tokens to give per position, None: no log-probabilities;
    echo): completions' ``logprobs: N`` and ``echo``, chat's ``logprobs: true`` and
    ``top_logprobs: N``."""
    if chat:
        if body.get("echo") not in (None, False):
            reject_field("echo", body["echo"], "chat completions do not echo (completions do)")
        wants = body.get("logprobs")
        if wants is not None and not isinstance(wants, bool):
            reject_field("logprobs", wants, "for chat completions it must be true or false (how "
                    "many likely tokens: top_logprobs)")
        top = _number(body, "top_logprobs", None, int, 0, MAX_LOGPROBS)
        if top is not None and not wants:
            reject_field("top_logprobs", top, "it needs logprobs: true")
        return (top or 0) if wants else None, False
    if body.get("top_logprobs") is not None:
        reject_field("top_logprobs", body["top_logprobs"], "completions take logprobs: N (chat "
                "completions take top_logprobs)")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        reject_field("echo", echo, "it must be true or false")
    return _number(body, "logprobs", None, int, 0, MAX_LOGPROBS), echo


def _param(message: str, max_name: str) -> str:
    """The request field a config or engine error is about."""
    for field, param in ((max_name, max_name), ("temperature", "temperature"),
                         ("top_k", "top_k"), ("top_p", "top_p"), ("seed", "seed"),
                         ("stop", "stop"), ("prompt[", "prompt")):
        if field in message:
            return param
    return "body"


@dataclass(frozen=True)
class Request:
    """A checked request: the prompts' ids (each repeated n times), the generation config,
    the stop strings, and how to answer."""

    chat: bool
    ids: list[list[int]]
    n: int
    config: GenerationConfig | None  # None: echo with max_tokens 0 (the prompt scored)
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # the most likely tokens per position; None: none asked
    echo: bool = False
    tools: bool = False  # the reply's tool calls parsed (chat with tools)



def parse_request(body: object, chat: bool, text: ByteText | TokenizerText, model,
                  context: int, max_sequences: int) -> Request:
    """The request ``body`` checked (every field before anything runs) for ``model``
    served with ``context`` tokens a sequence and ``max_sequences`` sequences a request."""
    _check_fields(body, chat)
    prompts, tools = _chat_prompts(text, body) if chat else _completion_prompts(text, body)
    n = _number(body, "n", 1, int, 1, MAX_N)
    if len(prompts) * n > max_sequences:
        raise RequestError("n" if n > 1 else "prompt", (
            f"{len(prompts)} prompts x n={n} = {len(prompts) * n} sequences is more "
            f"than one request may ask for here, {max_sequences} (moekit serve "
            "--max-sequences): send fewer prompts or samples per request"))
    logprobs, echo = _logprob_fields(body, chat)
    longest = max(len(p) for p in prompts)
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    default = max(context - longest, 1) if chat else 16
    max_tokens = _number(body, name, default, int, 0 if echo else 1)
    _check_context(model.config.max_seq_len, context, longest, max_tokens, name,
                   body.get(name) is not None, "messages" if chat else "prompt")
    stop = body.get("stop")  # [] as none, as OpenAI's and vLLM's
    stops = () if stop is None or stop == [] else tuple(_strings("stop", stop, False))
    stream, include_usage = _stream_fields(body, echo)
    config = _config(body, text, model, prompts, max_tokens, name, stops)
    ids = [p for p in prompts for _ in range(n)]
    return Request(chat, ids, n, config if max_tokens else None, stops, stream,
                   include_usage, logprobs, echo, bool(tools))


def _check_fields(body: object, chat: bool) -> None:
    """Refuse a body that is not an object, a field moekit does not read, the other
    endpoint's prompt field, and a no-op field holding another value."""
    if not isinstance(body, dict):
        reject_field("body", type(body).__name__, "it must be a JSON object")
    unknown = sorted(k for k in body if k not in READ and k not in NO_OP)
    if unknown:
        reject_field(unknown[0], body[unknown[0]], "moekit serve does not read this field")
    other = "prompt" if chat else "messages"  # the other endpoint's
    if other in body:
        reject_field(other, body[other], f"{other} is for /v1/{'' if chat else 'chat/'}"
                f"completions; this endpoint takes {'messages' if chat else 'prompt'}")
    for key, values in NO_OP.items():
        if key in body and not any(type(body[key]) is type(v) and body[key] == v
                                   for v in values):
            reject_field(key, body[key], "moekit serve supports only its no-op value"
                    + ("s " if len(values) > 1 else " ")
                    + ", ".join(json.dumps(v) for v in values))


def _chat_prompts(text: ByteText | TokenizerText, body: dict
                  ) -> tuple[list[list[int]], list[dict] | None]:
    """(the chat's one prompt: its messages rendered by the chat template, its tools)."""
    if not isinstance(text, TokenizerText):
        raise RequestError("messages", "chat completions need a tokenizer with a chat "
                           "template (a converted checkpoint's); this model reads "
                           "UTF-8 bytes: use /v1/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        reject_field("messages", messages, "it must be a non-empty list of objects with "
                "a \"role\" and a \"content\"")
    convo = [{"role": m["role"], "content": _content(i, m.get("content")),
              **{k: m[k] for k in MESSAGE_KEYS if k in m}}
             for i, m in enumerate(messages)]
    tools = _tools(body)
    try:
        return [text.encode_messages(convo, tools)], tools
    except ValueError as e:
        raise RequestError("messages", str(e)) from None


def _completion_prompts(text: ByteText | TokenizerText, body: dict
                        ) -> tuple[list[list[int]], None]:
    """(the prompts, no tools: completions take none)."""
    for key in ("tools", "tool_choice"):
        if body.get(key) is not None:
            reject_field(key, body[key], "tools are for chat completions")
    return _prompts(text, body.get("prompt")), None


def _stream_fields(body: dict, echo: bool) -> tuple[bool, bool]:
    """(``stream``, ``stream_options.include_usage``)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        reject_field("stream", stream, "it must be true or false")
    if stream and echo:
        reject_field("echo", True, "moekit serve echoes prompts only with stream false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                       bool):
        reject_field("stream_options", options, "it must be an object whose include_usage is "
                "true or false")
    return stream, options.get("include_usage", False)


def _config(body: dict, text: ByteText | TokenizerText, model, prompts: list[list[int]],
            max_tokens: int, name: str, stops: tuple[str, ...]) -> GenerationConfig:
    """The sampling fields as a ``GenerationConfig``, the prompts checked against it;
    their errors in the API's names (``name``: the field that asks for ``max_tokens``)."""
    seed = body.get("seed")
    try:
        config = GenerationConfig(
            max_new_tokens=max(max_tokens, 1),
            temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
            top_k=_number(body, "top_k", None, int, 1),
            top_p=_number(body, "top_p", None, float, 0.0, 1.0),
            stop_ids=text.stop_ids, stop_sequences=text.stop_sequences(stops),
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed)
        try:
            checked_prompts(model, prompts, config)  # (its errors index the prompts)
        except ContextLengthError:  # (checked above: echo's max_tokens 0 fills it all)
            if max_tokens:
                raise
    except ValueError as e:  # the config's and the engine's errors, in the API's names
        message = str(e).replace("max_new_tokens", name).replace("prompts[", "prompt[")
        raise RequestError(_param(message, name), message) from None
    return config


def _check_context(limit: int, context: int, longest: int, new: int, name: str, sent: bool,
                   field: str) -> None:
    """Refuse a request past the served ``context`` (the model's ``limit``, max_seq_len,
    at most): naming the prompt's field where the prompt alone leaves no room (for a new
    token; with echo and ``max_tokens: 0``, for itself), else ``name`` (the field that
    asks for ``new`` tokens)."""
    where = (f"the served context of {context} tokens (moekit serve --context)"
             if context < limit else f"the model's context, max_seq_len={limit}")
    room = context - longest
    if room < min(new, 1):
        raise RequestError(field, (
            f"{field}: a prompt of {longest} tokens is longer than {where}" if not new
            else f"{field}: a prompt of {longest} tokens leaves no room in {where} for "
            "a new token: send a shorter prompt"))
    if new > room:
        default = "" if sent else f" ({name} was not sent: {new} is its default)"
        if context < limit:
            reject_field(name, new, f"a prompt of {longest} tokens + {name} must fit the "
                    f"served context of {context} tokens (moekit serve --context; "
                    f"use at most {room}){default}")
        reject_field(name, new, f"generating past the model's context, max_seq_len={limit} "
                f"(a prompt of {longest} tokens leaves room for at most {room}){default}")
