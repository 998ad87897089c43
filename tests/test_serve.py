"""`moekit serve`: the OpenAI-compatible HTTP API over a real socket.

Oracles: the slow reference generation (``moekit.models.generate`` without a cache, the
whole prefix recomputed per token) for the byte-level model, and transformers' own
``apply_chat_template`` + greedy ``generate()`` for a converted checkpoint's chat.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.inference.batcher import Group
from moekit.inference.engine import Engine, GenerationConfig
from moekit.inference.server import RequestError, Service, make_server
from moekit.inference.text import ByteText
from moekit.models import MoETransformer, preset
from moekit.models.generate import generate
from moekit.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module", params=["inline", "worker"])
def byte_server(request):
    """A server of a random tiny byte-level model; its generations on the request's
    thread ("inline") or handed to a thread in Service.work ("worker", as `moekit serve`
    runs them on its main thread)."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny")
    # a first generation here: the C++ kernels build on first use (35-60 s on 2 cores),
    # which a request's timeout should not have to cover
    service.generate(service.parse({"prompt": "a", "max_tokens": 2}, False))
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    if request.param == "worker":
        threading.Thread(target=service.work, args=(stop,), daemon=True).start()
        while service._jobs is None:
            time.sleep(0.01)
    yield model, f"http://127.0.0.1:{server.server_address[1]}", service
    stop.set()
    server.shutdown()
    server.server_close()


def _post(url: str, body: dict | bytes, path: str = "/v1/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if r.headers["Content-Type"] == "text/event-stream":
                return r.status, [_event(line) for line in r if line.startswith(b"data: ")]
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _event(line: bytes):
    data = line[6:].strip().decode()
    return data if data == "[DONE]" else json.loads(data)


def _greedy(model, prompt: str, n: int) -> str:
    """The reference: every token from the whole prefix recomputed (no cache)."""
    ids = torch.tensor([list(prompt.encode())])
    out = generate(model, ids, n, temperature=0, use_cache=False)
    return bytes(out[0, ids.shape[1]:].tolist()).decode("utf-8", errors="replace")


def test_completion_is_the_reference_greedy_text(byte_server):
    model, url, _ = byte_server
    status, r = _post(url, {"model": "x", "prompt": "def ", "max_tokens": 12,
                            "temperature": 0})
    assert status == 200 and r["object"] == "text_completion" and r["model"] == "tiny"
    assert r["choices"] == [{"index": 0, "text": _greedy(model, "def ", 12),
                             "finish_reason": "length", "logprobs": None}]
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    t = r["timings"]  # llama-server's extra field: where the time went
    assert (t["prompt_tokens"], t["new_tokens"]) == (4, 12) and t["prefill_ms"] > 0
    assert t["seconds"] * 1e3 >= t["prefill_ms"] + t["decode_ms"]
    # a list of prompts with n samples each: one batch, choices prompt-major
    status, r = _post(url, {"prompt": ["def ", "import o"], "n": 2, "max_tokens": 9,
                            "temperature": 0})
    assert status == 200
    assert [c["text"] for c in r["choices"]] == [_greedy(model, "def ", 9)] * 2 + \
        [_greedy(model, "import o", 9)] * 2
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["prompt_tokens"] == 4 + 8 and r["usage"]["completion_tokens"] == 36


def test_stream_gives_the_same_text_in_pieces(byte_server):
    model, url, _ = byte_server
    body = {"prompt": "class ", "max_tokens": 20, "temperature": 0.9, "seed": 3}
    _, whole = _post(url, body)
    status, events = _post(url, {**body, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]  # same seed: the same sample
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) > 1
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")


def test_concurrent_requests_batch_and_each_gets_its_own_answer(byte_server, monkeypatch):
    """Four clients at once, streamed and whole, greedy and seeded sampling: each answer
    is what its request generates alone (Engine), none mixed into another. With the
    worker thread the four decode together (the worker's first step waits for them)."""
    from concurrent.futures import ThreadPoolExecutor

    model, url, service = byte_server
    prompts = ["def ", "import o", "class A", "return "]
    configs = [GenerationConfig(max_new_tokens=12 + 3 * i, temperature=0.8 * (i % 2),
                                seed=7 + i) for i in range(4)]
    worker = service._jobs is not None
    most, step, deadline = [0], service.batcher.step, time.monotonic() + 20

    def counting() -> bool:
        if worker and not most[0] and service.batcher.waiting < 4 \
                and time.monotonic() < deadline:
            time.sleep(0.005)  # the others are on their way: take them first
            return True
        most[0] = max(most[0], service.batcher.running)
        return step()

    monkeypatch.setattr(service.batcher, "step", counting)

    def ask(i: int) -> str:
        cfg = configs[i]
        body = {"prompt": prompts[i], "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "seed": cfg.seed, "stream": i < 2}
        status, r = _post(url, body)
        assert status == 200
        if body["stream"]:
            return "".join(c["choices"][0]["text"] for c in r[:-1] if c["choices"])
        return r["choices"][0]["text"]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    text = service.text
    want = []
    for p, cfg in zip(prompts, configs, strict=True):
        (g,), _ = Engine(model).generate([text.encode(p)], cfg)
        want.append(text.decode_after(g.prompt, g.tokens))
    assert got == want
    assert most[0] == (4 if worker else 1)


def test_stop_string_ends_the_text_before_it(byte_server):
    model, url, _ = byte_server
    full = _greedy(model, "def ", 24)
    stop = full[10:12]
    first = full.find(stop)
    for stream in (False, True):
        status, r = _post(url, {"prompt": "def ", "max_tokens": 24, "temperature": 0,
                                "stop": [stop, "\u00e9\u00e9\u00e9"], "stream": stream})
        assert status == 200
        if stream:
            text = "".join(c["choices"][0]["text"] for c in r[:-1] if c["choices"])
            reason = r[-2]["choices"][0]["finish_reason"]
        else:
            text, reason = r["choices"][0]["text"], r["choices"][0]["finish_reason"]
        assert (text, reason) == (full[:first], "stop")


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "a", "temperature": -1}, "temperature", "temperature=-1 is not allowed"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "top_p=1.5"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": ["a", 3]}, "prompt", "list of strings"),
    ({}, "prompt", "prompt=None"),
    ({"prompt": "a", "max_tokens": 10_000}, "max_tokens", "max_tokens=10000 is not allowed: "
     "generating past the model's context"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens=0"),
    ({"prompt": "a", "n": 0}, "n", "n=0"),
    ({"prompt": "a", "logit_bias": {"5": 1}}, "logit_bias", "no-op value"),
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty", "no-op value"),
    ({"prompt": "a", "best_of": 3, "n": 1}, "best_of", "no-op value"),
    ({"prompt": "a", "mystery": 1}, "mystery", "does not read this field"),
    ({"prompt": "a", "stop": [""]}, "stop", "none of them empty"),
    ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "a", "seed": -2}, "seed", "seed=-2"),
])
def test_bad_requests_get_400_naming_the_field(byte_server, body, param, words):
    _, url, _ = byte_server
    status, r = _post(url, body)
    assert status == 400, r
    assert r["error"]["param"] == param and r["error"]["type"] == "invalid_request_error"
    assert words in r["error"]["message"]


def test_prompts_as_token_ids(byte_server):
    model, url, _ = byte_server
    want = _greedy(model, "def ", 6)
    for prompt in ([100, 101, 102, 32], [[100, 101, 102, 32], list(b"import o")]):
        status, r = _post(url, {"prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert status == 200 and r["choices"][0]["text"] == want
    assert r["choices"][1]["text"] == _greedy(model, "import o", 6)
    for bad, words in (([[1, 2], []], "non-empty lists of ints"), ([300], "prompt[0]="),
                       ([[1, 2], [3, 300]], "prompt[1]=")):
        status, r = _post(url, {"prompt": bad, "n": 3})
        assert status == 400 and r["error"]["param"] == "prompt" and words in \
            r["error"]["message"]


def test_served_context_limits_requests_and_sizes_the_cache():
    """--context: a request past it is refused naming the flag; kv_bytes is the shared
    cache's: --parallel rows of twice the context (room for sequences to join)."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny", context=20)
    with pytest.raises(ValueError, match="max_tokens=17 is not allowed: a prompt of 4 tokens "
                                         r"\+ max_tokens must fit the served context of 20"):
        service.parse({"prompt": "def ", "max_tokens": 17}, False)
    service.generate(service.parse({"prompt": "def ", "max_tokens": 16}, False))
    c = model.config  # keys and values, every layer, 4 rows (--parallel) of 2 x 20 slots
    assert service.kv_bytes() == 2 * c.num_layers * c.kv_heads * c.head_size * 4 * 40 * 4
    for bad in (0, 65, True):
        with pytest.raises(ValueError, match=f"context={bad!r} is not allowed"):
            Service(model, ByteText(), "tiny", context=bad)
    # --kv-cache-dtype bfloat16: half the bytes, and the engine's tokens over a bf16 cache
    half = Service(model, ByteText(), "tiny", context=20, kv_cache_dtype="bfloat16")
    assert 2 * half.kv_bytes() == service.kv_bytes()
    choices, _, _ = half.generate(half.parse({"prompt": "def ", "max_tokens": 8,
                                              "temperature": 0}, False))
    want, _ = Engine(model, kv_cache_dtype="bfloat16").generate(
        [list(b"def ")], GenerationConfig(max_new_tokens=8))
    assert choices[0].text == bytes(want[0].tokens).decode("utf-8", errors="replace")
    # int8: a quarter of the values, plus a float scale per slot and head
    small = Service(model, ByteText(), "tiny", context=20, kv_cache_dtype="int8")
    Dh = c.head_size
    assert small.kv_bytes() * 4 * Dh == service.kv_bytes() * (Dh + 4)


def _label(byte: int) -> str:
    """A byte-level token's label: its character where it is one (ASCII), else OpenAI's
    "bytes:\\xNN"."""
    return chr(byte) if byte < 128 else f"bytes:\\x{byte:02x}"


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_completion_logprobs_and_echo(byte_server):
    """logprobs: N gives each generated token's log-probability and the N most likely
    tokens (the float64 log-softmax of the full forward of prompt + tokens); echo with
    max_tokens 0 scores the prompt alone (its first token null), as lm-evaluation-harness
    asks for log-likelihoods."""
    model, url, _ = byte_server
    prompt = list(b"def f(x):")
    status, r = _post(url, {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                            "logprobs": 2})
    assert status == 200
    c = r["choices"][0]
    new = list(c["text"].encode())
    lp = c["logprobs"]
    logp = _log_softmax(model, prompt + new)
    assert lp["tokens"] == [_label(t) for t in new]
    assert lp["token_logprobs"] == pytest.approx(
        [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(new)], abs=1e-4)
    for j, top in enumerate(lp["top_logprobs"]):
        best = logp[len(prompt) + j - 1].topk(2)
        assert list(top) == [_label(t) for t in best.indices.tolist()]
    # each byte's offset: the whole characters before it (a character's later bytes
    # start where it does); was the ASCII bytes before it, which a character of several
    # bytes never moved on from
    assert lp["text_offset"] == [len(bytes(new[:j]).decode("utf-8", "ignore"))
                                 for j in range(len(new))]
    status, r = _post(url, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert status == 200
    c = r["choices"][0]
    logp = _log_softmax(model, prompt)
    assert c["text"] == "def f(x):" and r["usage"]["completion_tokens"] == 0
    assert c["logprobs"]["token_logprobs"][0] is None
    assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [float(logp[j - 1, t]) for j, t in enumerate(prompt) if j], abs=1e-4)
    assert c["logprobs"]["top_logprobs"][0] is None
    assert all(len(top) == 1 for top in c["logprobs"]["top_logprobs"][1:])
    # two prompts, two samples each: every choice scores its own prompt
    other = list(b"import os")
    status, r = _post(url, {"prompt": [prompt, other], "n": 2, "max_tokens": 0, "echo": True,
                            "logprobs": 1})
    assert status == 200
    scores = [c["logprobs"]["token_logprobs"] for c in r["choices"]]
    assert scores[0] == scores[1] == c["logprobs"]["token_logprobs"]
    assert scores[2] == scores[3] and scores[2][1:] == pytest.approx(
        [float(_log_softmax(model, other)[j - 1, t]) for j, t in enumerate(other) if j],
        abs=1e-4)
    # echo with new tokens: the prompt's entries, then the generated ones
    status, r = _post(url, {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 0,
                            "temperature": 0})
    c = r["choices"][0]
    assert c["text"].startswith("def f(x):") and len(c["logprobs"]["tokens"]) == 9 + 3


def test_log_likelihoods_as_evaluation_harnesses_ask_for_them(byte_server):
    """The request lm-evaluation-harness's local-completions model sends for a batch of
    (context, continuation) log-likelihoods (token ids, echo, logprobs 1, max_tokens 1):
    the continuation's log-likelihood is the sum of token_logprobs after the context,
    the generated token left out, and "greedy" whether each of those is its position's
    most likely; both against the model's own float64 log-softmax."""
    model, url, _ = byte_server
    pairs = [(list(b"def f(x):\n"), list(b"    return")), (list(b"import "), list(b"os"))]
    status, r = _post(url, {"model": "m", "prompt": [c + x for c, x in pairs],
                            "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                            "echo": True})
    assert status == 200
    for choice, (ctx, cont) in zip(sorted(r["choices"], key=lambda c: c["index"]), pairs,
                                   strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) + 1
        got = sum(lp["token_logprobs"][len(ctx):-1])
        greedy = all(t == max(top.values()) for t, top in
                     zip(lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1],
                         strict=True))
        logp = _log_softmax(model, ctx + cont)
        want = sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[len(ctx) + j - 1].argmax()) == t
                             for j, t in enumerate(cont))


@pytest.mark.parametrize("body", [
    {"prompt": ["def f(", "x = "], "max_tokens": 12, "temperature": 0, "logprobs": 2},
    {"prompt": "def f(", "max_tokens": 16, "temperature": 0.9, "seed": 7, "n": 2,
     "logprobs": 1, "stop": ["v", "W"]},
])
def test_streamed_logprobs_are_the_whole_answers(byte_server, body):
    """A stream with logprobs: its chunks' texts and log-probability entries, joined per
    choice, are the whole answer's (tokens, log-probabilities, the most likely tokens,
    text offsets), the tokens past a stop string included, as the whole answer has them."""
    _, url, _ = byte_server
    status, whole = _post(url, body)
    assert status == 200
    status, events = _post(url, {**body, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    for c in whole["choices"]:
        chunks = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == c["index"]]
        assert "".join(k["text"] for k in chunks) == c["text"]
        lps = [k["logprobs"] for k in chunks if k["logprobs"] is not None]
        assert lps
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for lp in lps for x in lp[key]] == c["logprobs"][key], key
        assert chunks[-1]["finish_reason"] == c["finish_reason"]
    if "stop" in body:  # the case of tokens past the stop string is here
        assert any(c["finish_reason"] == "stop" and len(c["logprobs"]["tokens"]) > 0
                   for c in whole["choices"])


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "a", "logprobs": 2, "echo": True, "stream": True}, "echo",
     "only with stream false"),
    ({"prompt": "a", "logprobs": 21}, "logprobs", "logprobs=21"),
    ({"prompt": "a", "top_logprobs": 2}, "top_logprobs", "completions take logprobs: N"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens=0"),
    ({"prompt": "a", "echo": "yes"}, "echo", "true or false"),
])
def test_bad_logprob_requests_are_named(byte_server, body, param, words):
    _, url, _ = byte_server
    status, r = _post(url, body)
    assert status == 400 and r["error"]["param"] == param and words in r["error"]["message"]


def test_no_op_fields_clients_send_are_accepted(byte_server):
    _, url, _ = byte_server
    status, r = _post(url, {"prompt": "a", "max_tokens": 2, "logprobs": None, "echo": False,
                            "presence_penalty": 0, "frequency_penalty": 0.0, "n": 1,
                            "user": "me", "best_of": 1})
    assert status == 200 and len(r["choices"]) == 1


def test_routes_and_protocol_errors(byte_server):
    _, url, _ = byte_server
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    assert _post(url, b"{not json")[0] == 400
    assert _post(url, [1, 2])[1]["error"]["param"] == "body"
    assert _post(url, {"prompt": "a"}, "/v1/nothing")[0] == 404
    status, r = _post(url, {"messages": [{"role": "user", "content": "hi"}]},
                      "/v1/chat/completions")
    assert status == 400 and "need a tokenizer" in r["error"]["message"]


def test_a_client_gone_mid_stream_stops_its_generation(byte_server, monkeypatch):
    """The client closes after the first chunk: its sequence stops well before
    max_tokens (each token slowed to 20 ms here) and the server keeps serving."""
    import socket

    model, url, service = byte_server
    results = []
    real = service.batcher.submit

    def slow(ids, cfg, on_token=None, **kwargs):
        def on_slow_token(i, tok):
            time.sleep(0.02)
            on_token(i, tok)
        results.append(real(ids, cfg, on_token=on_slow_token, **kwargs))
        return results[-1]

    monkeypatch.setattr(service.batcher, "submit", slow)
    cancelled = service.counts["cancelled"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "def ", "max_tokens": 60, "stream": True,
                       "temperature": 0}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:  # the headers, then the first chunk
            got += s.recv(4096)
    for _ in range(300):  # until the generation is over
        if results and results[0].done:
            break
        time.sleep(0.01)
    assert len(results) == 1 and results[0].done and 0 < len(results[0].gens[0].tokens) < 30
    assert _until(lambda: service.counts["cancelled"] == cancelled + 1)  # not "answered"
    monkeypatch.undo()
    status, r = _post(url, {"prompt": "def ", "max_tokens": 3, "temperature": 0})
    assert status == 200 and r["choices"][0]["text"] == _greedy(model, "def ", 3)


def _raw_post(url: str, body: dict):
    """A socket that has sent a POST of ``body`` to /v1/completions (read nothing)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: " + str(len(data)).encode()
              + b"\r\n\r\n" + data)
    return s


def _until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_clients_gone_before_their_answer_are_cancelled():
    """Whole answers (nothing is written until the end): a client that closes while its
    request waits for a row is dropped from the queue, never prefilled; one that closes
    while its sequence runs stops it (`Batcher.cancel`); /metrics counts both; the
    server keeps serving. One row, each step slowed to 30 ms."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny", parallel=1)
    service.generate(service.parse({"prompt": "a", "max_tokens": 2}, False))  # the build
    b = service.batcher
    step, submitted, prefilled = b.step, [], []

    def slow_step():
        time.sleep(0.03)
        return step()

    b.step = slow_step
    submit, prefill = b.submit, b._prefill
    b.submit = lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1]
    b._prefill = lambda fill: prefilled.extend(fill.groups) or prefill(fill)
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    threading.Thread(target=service.work, args=(stop,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _until(lambda: service._jobs is not None)
        running = _raw_post(url, {"prompt": "def ", "max_tokens": 56, "temperature": 0})
        assert _until(lambda: b.running == 1)
        waiting = _raw_post(url, {"prompt": "x = ", "max_tokens": 20, "temperature": 0})
        assert _until(lambda: b.waiting == 1)
        waiting.close()
        assert _until(lambda: service.counts["cancelled"] == 1, 3.0)
        assert b.waiting == 0 and b.running == 1  # the other one goes on
        assert submitted[1].done and submitted[1] not in prefilled
        assert submitted[1].gens[0].tokens == []
        running.close()
        assert _until(lambda: service.counts["cancelled"] == 2, 3.0)
        gen = submitted[0].gens[0]
        assert gen.finish_reason == "cancelled" and 0 < len(gen.tokens) < 56
        assert gen.tokens == Engine(model).generate(
            [list(b"def ")], GenerationConfig(max_new_tokens=56))[0][0].tokens[:len(gen.tokens)]
        status, r = _post(url, {"prompt": "def ", "max_tokens": 3, "temperature": 0})
        assert status == 200 and r["choices"][0]["text"] == _greedy(model, "def ", 3)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as m:
            assert "moekit_requests_cancelled_total 2" in m.read().decode()
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_connections_are_kept_alive_and_closed_after_an_unread_body(byte_server):
    """Two requests on one connection (HTTP/1.1 keep-alive); a POST answered before its
    body is read (a wrong path) closes the connection, so the body is not taken for the
    next request."""
    import http.client
    import socket

    _, url, _ = byte_server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"prompt": "def ", "max_tokens": 2, "temperature": 0})
    socks = []
    for _ in range(2):
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"]
        socks.append(conn.sock)
    assert socks[0] is socks[1] is not None  # the same connection both times
    conn.close()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        junk = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"  # a request inside the body
        s.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(junk)).encode() + b"\r\n\r\n" + junk)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    assert got.startswith(b"HTTP/1.1 404") and got.count(b"HTTP/1.1") == 1


def test_a_failed_generation_is_a_500_and_the_server_goes_on(byte_server, monkeypatch):
    model, url, service = byte_server

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "infer", broken)  # the prefill fails
    status, r = _post(url, {"prompt": "def ", "max_tokens": 3})
    assert status == 500 and "RuntimeError: out of memory" in r["error"]["message"]
    status, events = _post(url, {"prompt": "def ", "max_tokens": 3, "stream": True})
    assert status == 200 and "out of memory" in events[-2]["error"]["message"]
    assert events[-1] == "[DONE]"
    monkeypatch.undo()
    status, r = _post(url, {"prompt": "def ", "max_tokens": 3, "temperature": 0})
    assert status == 200 and r["choices"][0]["text"] == _greedy(model, "def ", 3)


def test_serve_command_refuses_bad_flags(tmp_path, capsys):
    lm = MoETransformer(preset("tiny"))
    save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 0, "model_config": lm.config.to_dict()})
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "run"), "--port", "70000"]) == 2
    assert "--port=70000 is not allowed" in capsys.readouterr().err
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "run"), "--context", "65"]) == 2
    assert "--context=65 is not allowed: it must be an int in [1, max_seq_len=64]" in \
        capsys.readouterr().err
    for flag, words in (("--parallel", "--parallel=0 is not allowed: it must be an int in "
                                       "[1, 256]"),
                        ("--prefill-chunk", "--prefill-chunk=0 is not allowed")):
        assert cli_main(["serve", "--checkpoint", str(tmp_path / "run"), flag, "0"]) == 2
        assert words in capsys.readouterr().err
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "run"), "--dtype", "bf16",
                     "--kv-cache-dtype", "float32"]) == 2
    assert "kv_cache_dtype='float32' is not allowed" in capsys.readouterr().err
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "nothing")]) == 1  # no checkpoint
    assert "moekit serve: error:" in capsys.readouterr().err


def test_chat_completion_is_transformers_chat_template_and_generate(tmp_path_factory):
    """A converted checkpoint with a tokenizer and chat template: the reply to a
    two-message conversation is transformers' greedy generate() of its
    apply_chat_template prompt, decoded without special tokens (streamed alike)."""
    from tests import test_generate_tokenizer as tg

    transformers = tg.transformers
    root = tmp_path_factory.mktemp("chat")
    tok, model = tg.convert_random_qwen3(root, seed=1, max_positions=256, moe_ffn=16,
                                         chat=True)
    messages = [{"role": "system", "content": "def hello(world"},
                {"role": "user", "content": [{"type": "text", "text": "import "},
                                             {"type": "text", "text": "torch"}]}]
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(root / "hf" / "tokenizer.json"), chat_template=tg.CHAT,
        eos_token="end")
    flat = [messages[0], {"role": "user", "content": "import torch"}]
    prompt = hf_tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    new = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                         eos_token_id=None)[0, len(ids):].tolist()
    want = tok.decode(new, skip_special_tokens=True)

    from moekit.inference.text import text_for
    from moekit.quant.io import load_model

    service = Service(load_model(root / "lm"), text_for(root / "lm"), "q", context=200)
    # without max_tokens a reply may fill the served context
    assert service.parse({"messages": messages}, True).config.max_new_tokens == 200 - len(ids)
    # a prompt that fills the context, max_tokens not sent: the error names messages
    full = Service(load_model(root / "lm"), text_for(root / "lm"), "q", context=len(ids))
    with pytest.raises(RequestError, match=f"messages: a prompt of {len(ids)} tokens leaves "
                       "no room in the served context") as e:
        full.parse({"messages": messages}, True)
    assert e.value.param == "messages"
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        body = {"messages": messages, "max_tokens": 10, "temperature": 0}
        status, r = _post(url, body, "/v1/chat/completions")
        assert status == 200 and r["object"] == "chat.completion"
        assert r["choices"][0]["message"] == {"role": "assistant", "content": want}
        assert r["usage"]["prompt_tokens"] == len(ids)
        status, events = _post(url, {**body, "stream": True}, "/v1/chat/completions")
        deltas = [c["choices"][0]["delta"] for c in events[:-1]]
        assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
        assert "".join(d.get("content", "") for d in deltas) == want
        assert {c["object"] for c in events[:-1]} == {"chat.completion.chunk"}
        bad = {"messages": [{"role": "user", "content": 5}]}
        status, r = _post(url, bad, "/v1/chat/completions")
        assert status == 400 and r["error"]["param"] == "messages[0].content"
        # logprobs: each reply token with its log-probability and the 2 most likely
        status, r = _post(url, {**body, "logprobs": True, "top_logprobs": 2},
                          "/v1/chat/completions")
        content = r["choices"][0]["logprobs"]["content"]
        with torch.no_grad():
            hf_logp = model(torch.tensor([ids + new])).logits[0].double().log_softmax(-1)
        # the tokens' bytes spell the reply (parts of characters included; this random
        # model's bytes are not all valid UTF-8: decoded alike), and a token that is not
        # whole characters is labelled by its bytes
        spelled = b"".join(bytes(e["bytes"]) for e in content)
        assert spelled.decode("utf-8", errors="replace") == tok.decode(new)
        for e, t in zip(content, new, strict=True):
            alone = tok.decode([t])
            assert e["token"] == (alone if "\ufffd" not in alone else
                                  "bytes:" + "".join(f"\\x{b:02x}" for b in e["bytes"]))
        assert any(e["token"].startswith("bytes:") for e in content)  # the case is here
        assert [e["logprob"] for e in content] == pytest.approx(
            [float(hf_logp[len(ids) + j - 1, t]) for j, t in enumerate(new)], abs=1e-4)
        assert all(len(e["top_logprobs"]) == 2 for e in content)
        # streamed: the chunks' entries, joined, are the whole answer's
        status, events = _post(url, {**body, "logprobs": True, "top_logprobs": 2,
                                     "stream": True}, "/v1/chat/completions")
        chunks = [e["choices"][0] for e in events[:-1]]
        assert "".join(c["delta"].get("content", "") for c in chunks) == want
        assert [x for c in chunks if c["logprobs"] is not None
                for x in c["logprobs"]["content"]] == content
        for bad, param in (({"logprobs": 3}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                           ({"echo": True}, "echo")):
            status, r = _post(url, {**body, **bad}, "/v1/chat/completions")
            assert status == 400 and r["error"]["param"] == param
    finally:
        server.shutdown()
        server.server_close()


def test_tool_calls_are_parsed_from_the_hermes_format():
    from moekit.inference.server import parse_tool_calls

    text, calls = parse_tool_calls('I will look.\n<tool_call>\n{"name": "get", "arguments": '
                                   '{"city": "Oslo"}}\n</tool_call>\n<tool_call>{"name": "t", '
                                   '"arguments": "{\\"a\\": 1}"}</tool_call>')
    assert text == "I will look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get", {"city": "Oslo"}), ("t", {"a": 1})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    for plain in ("no calls here", "<tool_call>not json</tool_call>", "<tool_call>{\"x\": 1}"):
        assert parse_tool_calls(plain) == (plain, [])


TOOLS_CHAT = """{%- if tools %}<|im_start|>system
# Tools
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif -%}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", \
"arguments": {{ c.function.arguments }}}</tool_call>{% endfor %}{% else %}{{ m.content }}\
{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


def test_chat_with_tools_renders_them_and_answers_tool_calls(tmp_path, monkeypatch):
    """tools go to the chat template as transformers' apply_chat_template(tools=...) gives
    them (with an earlier assistant tool call and the tool's answer in the messages); a
    reply that writes a <tool_call> is answered as tool_calls with finish_reason
    "tool_calls"; tool_choice "none" renders no tools; streamed, the text before the call
    comes as it is produced and the call as one delta at the end; "required" is refused
    by name."""
    from moekit.inference.batcher import Group
    from moekit.inference.engine import Generation, GenerationStats
    from moekit.inference.text import text_for
    from moekit.quant.io import load_model
    from tests import test_generate_tokenizer as tg

    tok, _ = tg.convert_random_qwen3(tmp_path, seed=2, max_positions=512, moe_ffn=16,
                                     chat=True)
    (tmp_path / "lm" / "tokenizer" / "chat_template.jinja").write_text(TOOLS_CHAT)
    service = Service(load_model(tmp_path / "lm"), text_for(tmp_path / "lm"), "q")
    tools = [{"type": "function", "function": {
        "name": "weather", "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                {"role": "user", "content": "and in Rome?"}]
    hf_tok = tg.transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"), chat_template=TOOLS_CHAT)
    want = tok.encode(hf_tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=True),
                      add_special_tokens=False).ids
    seen = []
    call_text = '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>'
    reply = ["Checking." + call_text]

    def scripted(ids, cfg, on_done=None, on_token=None, **kwargs):
        seen.append(ids[0])
        tokens = tok.encode(reply[0]).ids
        for t in tokens if on_token is not None else ():
            on_token(0, t)
        group = Group(ids, cfg, torch.Generator(), done=True, gens=[Generation(
            prompt=ids[0], tokens=tokens, finish_reason="stop")],
            stats=GenerationStats(1, len(ids[0]), 5, 4, 0.01, 0.02))
        on_done(group)
        return group

    monkeypatch.setattr(service.batcher, "submit", scripted)
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        body = {"messages": messages, "tools": tools, "max_tokens": 20}
        status, r = _post(url, body, "/v1/chat/completions")
        assert status == 200 and seen[-1] == want
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Checking."
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
        status, r = _post(url, {**body, "tool_choice": "none"}, "/v1/chat/completions")
        assert status == 200 and "# Tools" not in tok.decode(seen[-1])
        assert "tool_calls" not in r["choices"][0]["message"]  # no tools: the text as is
        # streamed: the same content and call, the text before the call as it comes
        for text, content in (("Checking." + call_text, "Checking."),
                              ("Checking. \n" + call_text + "\n", "Checking."),
                              (call_text, None), ("No call needed. ", "No call needed. ")):
            reply[0] = text
            status, whole = _post(url, body, "/v1/chat/completions")
            assert whole["choices"][0]["message"]["content"] == content
            status, events = _post(url, {**body, "stream": True}, "/v1/chat/completions")
            assert status == 200 and events[-1] == "[DONE]"
            deltas = [e["choices"][0]["delta"] for e in events[:-1]]
            assert "".join(d.get("content") or "" for d in deltas) == (content or "")
            calls = [c for d in deltas for c in d.get("tool_calls", [])]
            want_calls = whole["choices"][0]["message"].get("tool_calls", [])
            assert [(c["index"], c["function"]) for c in calls] == [
                (k, c["function"]) for k, c in enumerate(want_calls)]
            assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0][
                "finish_reason"]
            if calls and content:  # the text before the call came before the call
                assert deltas.index(next(d for d in deltas if "tool_calls" in d)) > 1
        for bad, param in (({"tool_choice": "required"}, "tool_choice"),
                           ({"tools": [{"type": "web"}]}, "tools")):
            status, r = _post(url, {**body, **bad}, "/v1/chat/completions")
            assert status == 400 and r["error"]["param"] == param
        status, r = _post(url, {"prompt": "a", "tools": tools})
        assert status == 400 and r["error"]["param"] == "tools"
    finally:
        server.shutdown()
        server.server_close()


def test_an_api_key_is_required_where_set(tmp_path, capsys, monkeypatch):
    """make_server(api_key=...): /v1/ paths and /metrics answer 401 without
    "Authorization: Bearer KEY" (or with another key) and serve with it; /health stays
    open; an empty key is
    refused, by `moekit serve --api-key` too."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    server = make_server(Service(model, ByteText(), "tiny"), port=0, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def call(path: str, key: str | None, body: dict | None = None, scheme: str = "Bearer"
             ) -> int:
        headers = {} if key is None else {"Authorization": f"{scheme} {key}"}
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status
        except urllib.error.HTTPError as e:
            assert e.code != 401 or "API key" in json.loads(e.read())["error"]["message"]
            return e.code

    try:
        body = {"prompt": "a", "max_tokens": 2}
        assert call("/v1/completions", None, body) == 401
        assert call("/v1/completions", "wrong", body) == 401
        assert call("/v1/models", None) == 401
        assert call("/v1/models", "s3cret", scheme="bearer") == 200  # case-insensitive
        assert call("/v1/models", "s3cret", scheme="Basic") == 401
        assert call("/v1/completions", "s3cret", body) == 200
        assert call("/v1/models", "s3cret") == 200
        assert call("/metrics", None) == 401 and call("/metrics", "s3cret") == 200
        assert call("/health", None) == 200
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="api_key='' is not allowed"):
        make_server(Service(model, ByteText(), "tiny"), port=0, api_key="")
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    monkeypatch.setenv("MOEKIT_API_KEY", " ")
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "run")]) == 2
    assert "--api-key=' ' is not allowed" in capsys.readouterr().err


def test_a_request_of_more_sequences_than_rows_runs_in_groups(byte_server):
    """n = 6 samples on a server of 4 rows: groups of 4 and 2, the second drawing from
    sequence_seed(seed, 1); each group's texts are the engine's for those samples alone,
    whole and streamed alike."""
    from moekit.inference.batcher import sequence_seed

    model, url, service = byte_server
    assert service.parallel == 4
    body = {"prompt": "def ", "max_tokens": 10, "temperature": 0.9, "seed": 11, "n": 6}
    status, r = _post(url, body)
    assert status == 200 and [c["index"] for c in r["choices"]] == list(range(6))
    ids = service.text.encode("def ")
    want = []
    for n, seed in ((4, 11), (2, sequence_seed(11, 1))):
        gens, _ = Engine(model).generate([ids] * n, GenerationConfig(
            max_new_tokens=10, temperature=0.9, seed=seed))
        want += [service.text.decode_after(ids, g.tokens) for g in gens]
    assert [c["text"] for c in r["choices"]] == want
    assert r["usage"]["completion_tokens"] == 60
    status, events = _post(url, {**body, "stream": True})
    streamed = [""] * 6
    for e in events[:-1]:
        for c in e["choices"]:
            streamed[c["index"]] += c["text"]
    assert status == 200 and streamed == want


def test_a_failed_group_cancels_the_other_groups_of_its_request(byte_server, monkeypatch):
    """10 prompts on 4 rows: groups of 4, 4 and 2. The first group's prefill fails: the
    request is answered with the error (500) and its other groups are cancelled, never
    prefilled nor decoded (they ran to max_tokens, 2 x 19 decode steps, for an answer
    already sent). A submit that fails part-way cancels the groups queued before it.
    The next request is served as before."""
    model, url, service = byte_server
    b = service.batcher
    groups, real_submit, real_infer, prefills = [], b.submit, model.infer, [0]

    def submit(*args, **kwargs):
        groups.append(real_submit(*args, **kwargs))
        return groups[-1]

    def infer(*args, **kwargs):
        prefills[0] += 1
        if prefills[0] == 1:
            raise RuntimeError("out of memory")
        return real_infer(*args, **kwargs)

    monkeypatch.setattr(b, "submit", submit)
    monkeypatch.setattr(model, "infer", infer)
    steps = b.decode_steps
    body = {"prompt": [f"p{i} " for i in range(10)], "max_tokens": 20, "temperature": 0}
    status, r = _post(url, body)
    assert status == 500 and "out of memory" in r["error"]["message"]
    assert _until(lambda: all(g.done for g in groups))
    assert [len(g.ids) for g in groups] == [4, 4, 2] and groups[0].error is not None
    for g in groups[1:]:
        assert g.error is None and g.steps == 0
        assert [(x.finish_reason, x.tokens) for x in g.gens] == [("cancelled", [])] * len(g.ids)
    assert prefills[0] == 1 and b.decode_steps == steps and b.waiting == b.running == 0

    def fails_second(*args, **kwargs):  # the second group is refused as it is queued
        if len(groups) == 4:
            raise RuntimeError("refused")
        return submit(*args, **kwargs)

    monkeypatch.setattr(b, "submit", fails_second)
    status, r = _post(url, body)
    assert status == 500 and "refused" in r["error"]["message"]
    assert len(groups) == 4 and groups[3].done and groups[3].steps == 0
    assert groups[3].gens[0].finish_reason == "cancelled"
    assert b.decode_steps == steps and b.waiting == b.running == 0
    monkeypatch.undo()
    status, r = _post(url, {"prompt": "def ", "max_tokens": 3, "temperature": 0})
    assert status == 200 and r["choices"][0]["text"] == _greedy(model, "def ", 3)


def test_metrics_count_requests_tokens_and_failures(monkeypatch):
    """GET /metrics (Prometheus text): answered requests and their usage tokens, failed
    ones, decode steps; the gauges at rest."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny")
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def metrics() -> dict[str, float]:
        with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            lines = r.read().decode().splitlines()
        assert all(line.startswith(("# HELP moekit_", "# TYPE moekit_", "moekit_"))
                   for line in lines)
        return {k: float(v) for k, v in (line.split() for line in lines
                                         if not line.startswith("#"))}

    try:
        assert metrics()["moekit_requests_total"] == 0
        status, r = _post(url, {"prompt": "def ", "max_tokens": 5, "n": 2})
        assert status == 200
        status, r2 = _post(url, {"prompt": "ab", "max_tokens": 3, "stream": True})
        assert status == 200

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(model, "infer", broken)
        assert _post(url, {"prompt": "a", "max_tokens": 2})[0] == 500
        m = metrics()
        assert m["moekit_requests_total"] == 2 and m["moekit_requests_failed_total"] == 1
        assert m["moekit_prompt_tokens_total"] == 4 + 2
        assert m["moekit_generated_tokens_total"] == 2 * 5 + 3
        assert m["moekit_decode_steps_total"] == 4 + 2  # tokens after each first
        assert m["moekit_sequences_running"] == m["moekit_requests_waiting"] == 0
        assert m["moekit_kv_cache_used_ratio"] == 0
        assert m["moekit_kv_cache_bytes"] == service.kv_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_cancelling_a_request_of_many_groups_is_linear(monkeypatch):
    """prompts x n of 25,600 sequences on one row: 25,600 groups, all cancelled (as a
    client gone does), end the request once, each group's end O(1): the service reads a
    group's ``error`` a bounded number of times, where rescanning the groups ended so far
    read it ~n^2 / 2 times (76 s for this request on the dev box, every other request
    waiting)."""
    reads = [0]

    def get(group: Group) -> BaseException | None:
        reads[0] += 1
        return group.__dict__.get("_error")

    def put(group: Group, value: BaseException | None) -> None:
        group.__dict__["_error"] = value

    monkeypatch.setattr(Group, "error", property(get, put))
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny", parallel=1, max_sequences=25_600)
    request = service.parse({"prompt": [[97]] * 400, "n": 64, "max_tokens": 4}, False)
    out: list = []
    groups = service._open(request, None, out.append)
    assert len(groups) == 25_600
    reads[0] = 0
    for g in groups:
        service.batcher.cancel(g)
    assert len(out) == 1 and service.batcher.waiting == 0
    choices, usage, _ = out[0]
    assert len(choices) == 25_600 and {c.finish_reason for c in choices} == {"cancelled"}
    assert usage["completion_tokens"] == 0 and service.counts["cancelled"] == 1
    assert reads[0] <= 4 * len(groups), f"{reads[0]} reads of a group's error"


def test_a_request_of_too_many_sequences_is_refused_naming_the_field():
    """--max-sequences caps prompts x n: past it a 400 names n (or prompt where n is 1)."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny", max_sequences=8)
    assert len(service.parse({"prompt": ["a", "b"], "n": 4}, False).ids) == 8
    for body, param in (({"prompt": ["a", "b", "c"], "n": 3}, "n"),
                        ({"prompt": [[97]] * 9}, "prompt")):
        with pytest.raises(RequestError, match=r"= 9 sequences is more than one request may "
                           r"ask for here, 8 \(moekit serve --max-sequences\)") as e:
            service.parse(body, False)
        assert e.value.param == param
    with pytest.raises(ValueError, match="max_sequences=0 is not allowed"):
        Service(model, ByteText(), "tiny", max_sequences=0)


@pytest.mark.parametrize("context", [20, 64])  # served below max_seq_len=64, and at it
def test_echo_scores_a_prompt_that_fills_the_context(context):
    """echo with max_tokens 0 (lm-evaluation-harness' scoring) takes a prompt of exactly
    the context, scored as the model's own log-softmax; one token more is refused naming
    prompt (not max_tokens); with tokens to generate, a full prompt names prompt where
    max_tokens was not sent, max_tokens where it was and is what does not fit."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    service = Service(model, ByteText(), "tiny", context=context)
    ids = [(7 * i) % 200 + 32 for i in range(context)]
    choices, _, _ = service.generate(service.parse(
        {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0}, False))
    logp = _log_softmax(model, ids)
    got = [lp for _, lp, _ in choices[0].logprobs]
    assert got[0] is None and got[1:] == pytest.approx(
        [float(logp[j - 1, t]) for j, t in enumerate(ids) if j], abs=1e-4)
    cases = [({"prompt": ids + [97], "echo": True, "max_tokens": 0}, "prompt",
              f"prompt: a prompt of {context + 1} tokens is longer than the "),
             ({"prompt": ids}, "prompt", f"a prompt of {context} tokens leaves no room"),
             ({"prompt": ids[:-4], "max_tokens": 5}, "max_tokens", "max_tokens=5 is not "
              "allowed"),
             ({"prompt": ids[:-4]}, "max_tokens", "max_tokens was not sent: 16 is its "
              "default")]
    for body, param, words in cases:
        with pytest.raises(RequestError, match=re.escape(words)) as e:
            service.parse(body, False)
        assert e.value.param == param and "at most 0" not in str(e.value)


def test_sigterm_ends_streams_and_exits_0(tmp_path):
    """`moekit serve` given SIGTERM while a long stream runs and a keep-alive connection
    idles: the stream ends with an error chunk and [DONE], the idle connection is closed,
    and the process exits 0 (it was killed at once, streams cut)."""
    import http.client
    import os
    import signal
    import subprocess
    import sys

    import moekit

    lm = MoETransformer(preset("tiny"))
    save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 0, "model_config": lm.config.to_dict()})
    src = str(Path(moekit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moekit.cli", "serve", "--checkpoint", str(tmp_path / "run"),
         "--port", "0", "--parallel", "1", "--threads", "1"], env=env,
        stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # "moekit serve: run on http://127.0.0.1:PORT/v1 ..."
            if " on http://" in line:
                port = int(line.split(" on http://")[1].split("/")[0].rsplit(":", 1)[1])
                break
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        idle.request("GET", "/health")
        assert idle.getresponse().read() == b'{"status": "ok"}'
        # 1,024 sequences of 40 tokens, one row: a stream that runs for many seconds
        stream = _raw_post(f"http://127.0.0.1:{port}", {
            "prompt": [[97]] * 16, "n": 64, "max_tokens": 40, "stream": True})
        got = b""
        while b'"text": "' not in got:
            got += stream.recv(4096)
        proc.send_signal(signal.SIGTERM)
        stream.settimeout(60)
        while chunk := stream.recv(65536):
            got += chunk
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [line for line in got.split(b"\r\n\r\n", 1)[1].split(b"\n\n") if line]
    assert all(e.startswith(b"data: ") for e in events)
    assert json.loads(events[-2][6:])["error"]["message"] == "the server is shutting down"
    assert events[-1] == b"data: [DONE]"
    assert idle.sock.recv(1) == b""  # the idle connection was closed
    assert "SIGTERM: stopping" in err and "Traceback" not in err


@pytest.mark.parametrize("second", ["while_working", "while_shutting_down"])
def test_a_second_signal_exits_at_once_without_a_traceback(tmp_path, monkeypatch, capsys,
                                                          second):
    """`moekit serve` given SIGINT, then SIGINT again while it still generates or while
    it shuts down: the second exits at once (os._exit, status 130, stdout and stderr
    flushed). It raised KeyboardInterrupt: during the shutdown that escaped with a
    traceback (status -2), its joins and closes skipped and threads left running into
    the interpreter's teardown (where one inside a torch call aborts: "terminate called
    without an active exception"); while generating it was taken as the first. In
    process: both signals are sent to this process (run's handler takes them), os._exit
    recorded instead of run."""
    import os
    import signal

    from moekit.inference import http_server, service

    lm = MoETransformer(preset("tiny"))
    save_checkpoint(tmp_path / "run", lm, torch.optim.SGD(lm.parameters(), lr=0.0),
                    {"step": 0, "model_config": lm.config.to_dict()})
    exits, events = [], []
    monkeypatch.setattr(os, "_exit", exits.append)

    def work(self, stop):
        os.kill(os.getpid(), signal.SIGINT)  # (the handler runs before the next line)
        events.append(("first", stop.is_set(), list(exits)))
        if second == "while_working":
            os.kill(os.getpid(), signal.SIGINT)
            events.append(("second", list(exits)))

    def end_connections(self, timeout):
        if second == "while_shutting_down":
            os.kill(os.getpid(), signal.SIGINT)
            events.append(("second", list(exits)))

    monkeypatch.setattr(service.Service, "work", work)
    monkeypatch.setattr(http_server._Server, "end_connections", end_connections)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "run"), "--port", "0",
                     "--no-huge-pages"]) == 0  # (os._exit recorded, not run)
    assert events == [("first", True, []), ("second", [130])]
    err = capsys.readouterr().err
    assert "SIGINT: stopping" in err and "SIGINT again: exiting now" in err
    assert "Traceback" not in err
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # restored


def test_routes_ignore_the_query_and_other_methods_get_json(byte_server):
    """A query string does not change the route; /v1/models/{id} is OpenAI's
    models.retrieve; HEAD is GET without a body; OPTIONS answers 204 with Allow; PUT,
    DELETE and a wrong method get a JSON 405 with Allow (404 where no such path)."""
    import http.client

    model, url, _ = byte_server
    with urllib.request.urlopen(url + "/v1/models?x=1", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    status, r = _post(url, {"prompt": "def ", "max_tokens": 3, "temperature": 0},
                      "/v1/completions?x=1")
    assert status == 200 and r["choices"][0]["text"] == _greedy(model, "def ", 3)
    with urllib.request.urlopen(url + "/v1/models/tiny", timeout=10) as r:
        assert json.loads(r.read()) == {"id": "tiny", "object": "model", "created": 0,
                                        "owned_by": "moekit"}
    host, port = url.removeprefix("http://").split(":")

    def call(method: str, path: str) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, dict(r.headers), r.read()
        finally:
            conn.close()

    status, _, body = call("GET", "/v1/models/other")
    assert status == 404 and json.loads(body)["error"]["param"] == "model"
    status, headers, body = call("HEAD", "/v1/models")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, headers, body = call("OPTIONS", "/v1/completions")
    assert (status, headers["Allow"], body) == (204, "POST, OPTIONS", b"")
    assert call("OPTIONS", "/v1/models")[1]["Allow"] == "GET, HEAD, OPTIONS"
    for method, path, allow in (("PUT", "/v1/completions", "POST, OPTIONS"),
                                ("DELETE", "/v1/models", "GET, HEAD, OPTIONS"),
                                ("GET", "/v1/completions", "POST, OPTIONS"),
                                ("POST", "/v1/models", "GET, HEAD, OPTIONS")):
        status, headers, body = call(method, path)
        assert (status, headers["Allow"]) == (405, allow), (method, path)
        assert headers["Content-Type"] == "application/json"
        assert path in json.loads(body)["error"]["message"]
    status, headers, body = call("DELETE", "/nothing")
    assert status == 404 and json.loads(body)["error"]["message"] == "no such path: /nothing"


def test_endpoint_fields_and_empty_stop(byte_server):
    """Each endpoint refuses the other's prompt field by name; stop: [] is no stop
    strings (as OpenAI's)."""
    model, url, _ = byte_server
    status, r = _post(url, {"messages": [{"role": "user", "content": "hi"}], "prompt": "a"})
    assert status == 400 and r["error"]["param"] == "messages"
    assert "messages is for /v1/chat/completions" in r["error"]["message"]
    status, r = _post(url, {"messages": [{"role": "user", "content": "hi"}], "prompt": "a"},
                      "/v1/chat/completions")
    assert status == 400 and r["error"]["param"] == "prompt"
    status, r = _post(url, {"prompt": "def ", "max_tokens": 6, "temperature": 0, "stop": []})
    assert status == 200 and r["choices"][0]["text"] == _greedy(model, "def ", 6)


def _exchange(url: str, head: bytes, body: bytes = b"", end: bool = False
              ) -> tuple[int, dict]:
    """Send a POST to /v1/completions with the header lines ``head`` and the raw
    ``body`` (``end``: then shut the sending side, as a client cut off); its status and
    JSON answer."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  + head + b"\r\n" + body)
        if end:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    status = int(got.split(b" ", 2)[1])
    return status, json.loads(got.split(b"\r\n\r\n", 1)[1])


def test_chunked_bodies_are_read_as_bodies_with_a_length(byte_server, monkeypatch):
    """Transfer-Encoding: chunked (curl from a pipe; http.client's encode_chunked) is
    answered as the same body with a Content-Length (was: 411); extensions and trailers
    are read past; the size limit holds from the chunk sizes, before their data; bad
    chunking is a 400, other transfer codings 501; 411 only where neither header came."""
    import http.client

    from moekit.inference import http_server

    model, url, _ = byte_server
    want = _greedy(model, "def ", 5)
    body = json.dumps({"prompt": "def ", "max_tokens": 5, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for _ in range(2):  # the connection kept alive after a chunked body
            conn.request("POST", "/v1/completions", iter([body[:7], body[7:20], body[20:]]),
                         {"Content-Type": "application/json"}, encode_chunked=True)
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] == want
    finally:
        conn.close()
    te = b"Transfer-Encoding: chunked\r\n"
    status, r = _exchange(url, te, b"a;name=value\r\n" + body[:10] + b"\r\n"
                          + f"{len(body) - 10:X}".encode() + b"\r\n" + body[10:]
                          + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert status == 200 and r["choices"][0]["text"] == want
    malformed = [b"zz\r\n" + body + b"\r\n0\r\n\r\n",  # not hexadecimal
                 b"+5\r\n" + body + b"\r\n0\r\n\r\n",  # int(x, 16) would take it
                 f"{len(body):x}".encode() + b"\r\n" + body + b"XX0\r\n\r\n",  # no CRLF
                 f"{len(body):x}".encode() + b"\r\n" + body[:-3],  # ends inside a chunk
                 f"{len(body):x}".encode() + b"\r\n" + body + b"\r\n",  # no last chunk
                 b"0\r\n\r\n"]  # no data: empty
    for raw in malformed:  # (the sending side shut: the body ends where it stops)
        status, r = _exchange(url, te, raw, end=True)
        assert status == 400 and r["error"]["param"] == "body", (raw, r)
    assert "the body must hold 1 to" in r["error"]["message"]
    monkeypatch.setattr(http_server, "MAX_BODY", 40)  # (read in do_POST)
    status, r = _exchange(url, te, b"20\r\n" + body[:32] + b"\r\n", end=True)  # 32 of 40
    assert status == 400 and "malformed chunked body" in r["error"]["message"]
    # past the limit: answered from the second size line, its data never sent
    status, r = _exchange(url, te, b"20\r\n" + body[:32] + b"\r\n9\r\n")
    assert status == 413 and "1 to 40 bytes" in r["error"]["message"]
    status, r = _exchange(url, b"Content-Length: 41\r\n")
    assert status == 413 and "got 41" in r["error"]["message"]
    monkeypatch.undo()
    status, r = _exchange(url, b"Transfer-Encoding: gzip, chunked\r\n")
    assert status == 501 and "chunked is the only transfer coding" in r["error"]["message"]
    status, r = _exchange(url, b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n")
    assert status == 400 and "both Content-Length and Transfer-Encoding" in \
        r["error"]["message"]
    status, r = _exchange(url, b"Content-Length: 1_0\r\n")
    assert status == 400 and "Content-Length='1_0' is not allowed" in r["error"]["message"]
    status, r = _exchange(url, b"")
    assert status == 411 and "Content-Length header (or Transfer-Encoding: chunked)" in \
        r["error"]["message"]


def _raw_server(request_timeout: float):
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    server = make_server(Service(model, ByteText(), "tiny"), port=0,
                         request_timeout=request_timeout)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _until_closed(sock, timeout: float = 20.0) -> bytes:
    """All the server sends until it closes (a socket.timeout where it does not)."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


STALLS = [
    # what the client sends before it stalls            what is missing
    (b"GET /heal", "the request line and headers"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nAccept:", "the request line and headers"),
    (b'POST /v1/completions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{"prompt": ',
     "the request body"),
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n{\"pr",
     "the request body"),
]


@pytest.mark.parametrize("sent,missing", STALLS)
def test_a_client_stalling_part_way_through_its_request_gets_408(sent, missing):
    """make_server(request_timeout=...): a client that stops sending part-way through
    its request line, headers or body gets 408 and its connection closes, its handler
    thread ended (before: no read timeout, the thread waited until shutdown)."""
    import socket

    server = _raw_server(0.3)
    try:
        with socket.create_connection(server.server_address[:2]) as sock:
            sock.sendall(sent)
            answer = _until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert f"{missing} did not arrive within 0.3 s" in body["error"]["message"]
        deadline = time.monotonic() + 20
        while server._live and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server._live  # the handler thread is done
    finally:
        server.shutdown()
        server.server_close()


TRICKLES = [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200, b"",
     "the request line and headers"),
    (b'POST /v1/completions HTTP/1.1\r\nContent-Length: 400\r\n\r\n{"prompt": "',
     b"a" * 400, "the request body"),
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"1\r\na\r\n" * 100, "the request body"),
]


@pytest.mark.parametrize("head,tail,missing", TRICKLES,
                         ids=["headers", "body by length", "chunked body"])
def test_a_client_trickling_its_request_gets_408_at_the_request_timeout(head, tail, missing):
    """A client that sends its request a few bytes at a time, each well within the
    timeout of the one before (a "slowloris"), gets 408 once request_timeout has passed
    since the request's first byte: every wait for data had been timed alone, so such a
    client held its handler thread for as long as it kept sending."""
    import socket

    server = _raw_server(0.6)
    try:
        with socket.create_connection(server.server_address[:2]) as sock:
            start = time.monotonic()
            data = head if not tail else tail  # a body's headers go at once
            if tail:
                sock.sendall(head)
            answer = b""
            for i in range(0, len(data), 4):  # 4 bytes every 0.05 s: >= 2.5 s for the lot
                try:
                    sock.sendall(data[i:i + 4])
                except OSError:  # closed by the server after its 408
                    break
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable:
                    answer = _until_closed(sock)
                    break
            took = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert f"{missing} did not arrive within 0.6 s" in body["error"]["message"]
        assert took < 2.0, took  # the whole request would have taken 2.5 s or more
    finally:
        server.shutdown()
        server.server_close()


def test_a_burst_of_connections_waits_for_accept_instead_of_being_dropped():
    """Clients that connect while the accepting thread is busy (generation on the main
    thread holds it off) wait in the listen queue: with socketserver's default of 5, the
    7th connection of a burst was never accepted (its SYN dropped) and, under load,
    clients got ConnectionResetError. Here 32 clients connect before the server accepts
    anything; every connection is queued and answered."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    server = make_server(Service(model, ByteText(), "tiny"), port=0)
    address = server.server_address
    socks = [socket.socket() for _ in range(32)]
    try:
        for s in socks:  # non-blocking: a connect the queue has no room for stays pending
            s.setblocking(False)
            s.connect_ex(address)
        deadline = time.monotonic() + 2.0
        pending = list(socks)
        while pending and time.monotonic() < deadline:
            _, ready, _ = select.select([], pending, [], 0.1)
            pending = [s for s in pending if s not in ready]
    finally:  # (started before any assert: shutdown() waits for serve_forever)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert not pending, f"{len(pending)} of 32 connections were not queued"
        for s in socks:
            s.setblocking(True)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = [_until_closed(s, timeout=10.0) for s in socks]
        assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b'{"status": "ok"}')
                   for a in answers), answers
    finally:
        for s in socks:
            s.close()
        server.shutdown()
        server.server_close()


def test_an_idle_keep_alive_connection_closes_after_the_request_timeout():
    """A connection that sends nothing (or nothing after a whole request) is closed
    quietly: no request began, so no 408."""
    import socket

    server = _raw_server(0.3)
    try:
        with socket.create_connection(server.server_address[:2]) as sock:
            assert _until_closed(sock) == b""
        with socket.create_connection(server.server_address[:2]) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_reader_of_a_stream_is_not_cut_by_the_request_timeout():
    """The request timeout is for reading the request: a stream to a client that reads
    nothing for 5x the timeout while the server's sends wait on full buffers still
    arrives whole (a socket timeout applies to sends too; before it was cleared for the
    answer, the stream ended at the first send that waited that long)."""
    import socket

    server = _raw_server(0.3)
    # small buffers both ways (the accepted socket takes the listener's): the ~300 KB
    # of the stream cannot wait in them
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = json.dumps({"prompt": "a", "max_tokens": 60, "n": 8, "logprobs": 5,
                       "temperature": 1.0, "seed": 1, "stream": True}).encode()
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(server.server_address[:2])
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(1.5)
            answer = _until_closed(sock, 300)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert len(answer) > 100_000 and answer.endswith(b"data: [DONE]\n\n")
        assert answer.count(b'"finish_reason": "length"') == 8
    finally:
        server.shutdown()
        server.server_close()


def test_the_request_timeout_must_be_a_positive_number(tmp_path, capsys):
    model = MoETransformer(preset("tiny")).eval()
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match=f"request_timeout={bad!r} is not allowed: it "
                           "must be a positive, finite number of seconds"):
            make_server(Service(model, ByteText(), "tiny"), port=0, request_timeout=bad)
    assert cli_main(["serve", "--checkpoint", str(tmp_path / "none"),
                     "--request-timeout", "0"]) == 2
    assert "--request-timeout=0.0 is not allowed" in capsys.readouterr().err


def test_metrics_of_an_offloaded_models_expert_cache(tmp_path, monkeypatch):
    """--expert-memory: /metrics has the expert cache's requests, hits, loads and bytes
    read, checked against the reads counted at os.preadv and the experts asked of the
    cache (no prefetch: every read is a miss); a resident model has no such rows."""
    import os

    from moekit.models.config import LMConfig
    from moekit.offload import load_offloaded

    cfg = LMConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=24, num_experts=8, top_k=2,
                   max_seq_len=64)
    expert_bytes = (32 * 48 + 24 * 32) * 4  # w_in [D, 2F] + w_out [F, D], fp32
    torch.manual_seed(0)
    net = MoETransformer(cfg).eval()
    save_checkpoint(tmp_path, net, torch.optim.AdamW(net.parameters()),
                    {"step": 1, "model_config": cfg.to_dict()})
    model = load_offloaded(tmp_path, 3 * expert_bytes, prefetch=False)
    read, asked = [0], [0]
    pread, get = os.preadv, model.expert_offload.cache.get

    def counted_pread(fd, bufs, offset):
        n = pread(fd, bufs, offset)
        read[0] += n
        return n

    def counted_get(layer, experts, **kwargs):
        asked[0] += len(experts)
        return get(layer, experts, **kwargs)

    monkeypatch.setattr(os, "preadv", counted_pread)
    monkeypatch.setattr(model.expert_offload.cache, "get", counted_get)
    service = Service(model, ByteText(), "tiny")
    server = make_server(service, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _post(url, {"prompt": "def f(x):", "max_tokens": 6, "n": 2})[0] == 200
        with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
            m = {k: float(v) for k, v in (line.split() for line in r.read().decode()
                                          .splitlines() if not line.startswith("#"))}
        assert read[0] > 0 and read[0] % expert_bytes == 0
        assert m["moekit_expert_cache_read_bytes_total"] == read[0]
        assert m["moekit_expert_cache_loads_total"] == read[0] // expert_bytes
        assert m["moekit_expert_cache_requests_total"] == asked[0]
        assert m["moekit_expert_cache_hits_total"] == asked[0] - read[0] // expert_bytes
        assert m["moekit_expert_cache_budget_bytes"] == 3 * expert_bytes
        assert 0 < m["moekit_expert_cache_used_bytes"] <= 3 * expert_bytes
    finally:
        server.shutdown()
        server.server_close()
        model.expert_offload.close()
    resident = Service(MoETransformer(cfg).eval(), ByteText(), "tiny").metrics()
    assert "expert_cache" not in resident


def test_an_expert_choice_model_is_served_one_sequence_at_a_time():
    """Expert choice routes over every token of a call: with several sequences decoded
    together one client's tokens changed which experts another's got. --parallel above 1
    is refused for such a model, naming the flag; at 1 it serves, and a request's tokens
    are those it gets generated alone by the engine."""
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", router="expert_choice")).eval()
    with pytest.raises(ValueError, match=r"parallel=4 is not allowed: it must be 1 for an "
                                         "expert-choice model"):
        Service(model, ByteText(), "tiny", parallel=4)
    service = Service(model, ByteText(), "tiny", parallel=1, context=32)
    choices, _, _ = service.generate(service.parse({"prompt": "def ", "max_tokens": 8,
                                                    "temperature": 0}, False))
    want, _ = Engine(model).generate([list(b"def ")], GenerationConfig(max_new_tokens=8))
    assert choices[0].text == bytes(want[0].tokens).decode("utf-8", errors="replace")
