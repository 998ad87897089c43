"""What `moekit serve` costs and what its batching gives.

1. The HTTP layer: a generation through the server against the engine called in this
process. `moekit serve` runs in its own process (generations on its main thread); this
process alternates the same greedy request three ways: the engine here
(``Service.generate`` on the main thread), the server's answer whole, and the server's
answer streamed as server-sent events (read to ``[DONE]``). Median of ``--reps`` rounds;
the ratios are each way's time over the engine's in the same round. Both sides must give
the same text.

2. Concurrent clients (``--clients C``, 0 skips it): C clients post different greedy
requests at once, to a server started with ``--parallel C`` (their sequences decode
together) and to one with ``--parallel 1`` (one sequence at a time), alternately, the
two servers side by side (the idle one waits on a queue). Wall time until the last
answer, aggregate new tokens/s, and the batched server's time over the serial one's in
the same round (median). Both servers must give the same texts.

3. Arrivals (``--rate R``, 0 skips it): ``--requests`` streamed greedy requests
arriving at random (exponential gaps, R a second on average; prompts of 16-256
characters) to the ``--parallel C`` and ``--parallel 1`` servers in turn: mean time to
the first text, mean time per later token, time until the last answer (medians over
``--reps`` rounds).

    python benchmarks/bench_serve.py [--checkpoint DIR | --model small|fine|mixtral]
        [--new-tokens 24] [--reps 5] [--clients 4] [--rate 0 --requests 16]

Default: a random moekit model of the "small" preset written to a temporary directory
(small, so the per-token cost of the HTTP layer shows at its largest); ``fine`` and
``mixtral`` are bench_decode.py's shapes (memory-bound steps, where batching pays).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import pairs_main  # noqa: E402

PROMPT = "def parse(self, text):\n"


def _checkpoint(args, tmp: Path) -> str:
    if args.checkpoint is not None:
        return args.checkpoint
    import torch

    from moekit.models import MoETransformer, preset
    from moekit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    if args.model == "small":
        model = MoETransformer(preset("small"))
    else:
        from bench_decode import lm_config

        model = MoETransformer(lm_config(args.model))
    save_checkpoint(tmp / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    return str(tmp / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moekit serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("moekit serve did not answer /health in time")


def _post(url: str, body: dict) -> str:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
    if not body.get("stream"):
        return json.loads(raw)["choices"][0]["text"]
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n")
              if e.startswith(b"data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def _serve(checkpoint: str, *flags: str) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moekit.cli", "serve", "--checkpoint",
                               checkpoint, "--port", str(port), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"http://127.0.0.1:{port}", server


def _stop(*servers: subprocess.Popen) -> None:
    for server in servers:
        server.terminate()
    for server in servers:
        server.wait(30)


def _at_once(url: str, bodies: list[dict]) -> tuple[float, list[str]]:
    """Post every body at once (a thread each, released together): the wall time until
    the last answer, and the texts."""
    gate = threading.Barrier(len(bodies) + 1)
    texts: list[str | BaseException] = [""] * len(bodies)

    def ask(i: int) -> None:
        gate.wait()
        try:
            texts[i] = _post(url, bodies[i])
        except BaseException as e:  # noqa: BLE001 (raised below, on the main thread)
            texts[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for t in texts:
        if isinstance(t, BaseException):
            raise t
    return seconds, texts


def _concurrent(args, checkpoint: str) -> list[dict]:
    C = args.clients
    bodies = [{"prompt": f"def parse_{i}(self, text):\n", "max_tokens": args.new_tokens,
               "temperature": 0} for i in range(C)]
    (batched, a), (serial, b) = _serve(checkpoint, "--parallel", str(C)), \
        _serve(checkpoint, "--parallel", "1")
    try:
        _wait(batched, a)
        _wait(serial, b)
        ways = {f"{C} clients, --parallel {C}": batched, f"{C} clients, --parallel 1": serial}
        texts = {k: _at_once(url, bodies)[1] for k, url in ways.items()}  # warm-up
        if texts[next(iter(ways))] != texts[list(ways)[1]]:
            raise RuntimeError(f"the servers disagree: {texts}")
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.reps):
            for k, url in ways.items():
                times[k].append(_at_once(url, bodies)[0])
    finally:
        _stop(a, b)
    rows, base = [], times[list(ways)[1]]
    for k, ts in times.items():
        row = {"way": k, "median_ms": 1e3 * statistics.median(ts),
               "tokens_per_s": C * args.new_tokens / statistics.median(ts),
               "vs_serial": statistics.median(t / s for t, s in zip(ts, base, strict=True))}
        rows.append(row)
        print(f"{k:28s} {row['median_ms']:8.1f} ms  {row['tokens_per_s']:7.1f} tokens/s "
              f"(all clients)  {row['vs_serial']:.3f}x the serial server's time", flush=True)
    return rows


def _timed_stream(url: str, body: dict, at: float, t0: float) -> tuple[float, float]:
    """Post ``body`` streamed at ``t0 + at``: seconds to its first text, and to its end."""
    time.sleep(max(0.0, t0 + at - time.perf_counter()))
    start, first = time.perf_counter(), None
    req = urllib.request.Request(url + "/v1/completions",
                                 data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if first is None and line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["text"]:
                    first = time.perf_counter()
    end = time.perf_counter()
    return (end if first is None else first) - start, end - start


def _arrivals(args, checkpoint: str) -> list[dict]:
    """Part 3: ``--requests`` streamed greedy requests arriving at ``--rate`` a second
    (exponential gaps, seeded; prompts of 16-256 characters), to both servers in turn:
    the mean time to the first text (TTFT), the mean time per later token (TPOT) and the
    time until the last answer, medians over rounds."""
    import random

    rng = random.Random(0)
    gaps = [rng.expovariate(args.rate) for _ in range(args.requests)]
    at = [sum(gaps[:i]) for i in range(args.requests)]
    text = PROMPT * 12  # 276 characters
    bodies = [{"prompt": text[:rng.randint(16, 256)], "max_tokens": args.new_tokens,
               "temperature": 0} for _ in range(args.requests)]
    C = args.clients or 4
    (batched, a), (serial, b) = _serve(checkpoint, "--parallel", str(C)), \
        _serve(checkpoint, "--parallel", "1")
    ways = {f"rate {args.rate:g}/s, --parallel {C}": batched,
            f"rate {args.rate:g}/s, --parallel 1": serial}
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in ways}
    try:
        _wait(batched, a)
        _wait(serial, b)
        for url in ways.values():  # warm-up
            _post(url, bodies[0])
        for _ in range(args.reps):
            for k, url in ways.items():
                t0 = time.perf_counter() + 0.05
                out: list = [None] * len(bodies)

                def ask(i: int, url: str = url, t0: float = t0, out: list = out) -> None:
                    out[i] = _timed_stream(url, bodies[i], at[i], t0)

                threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                if any(o is None for o in out):
                    raise RuntimeError(f"{k}: a request failed")
                ttft = statistics.mean(f for f, _ in out)
                tpot = statistics.mean((e - f) / (args.new_tokens - 1) for f, e in out)
                got[k].append((ttft, tpot, wall))
    finally:
        _stop(a, b)
    rows = []
    for k, runs in got.items():
        row = {"way": k, "ttft_ms": 1e3 * statistics.median(r[0] for r in runs),
               "tpot_ms": 1e3 * statistics.median(r[1] for r in runs),
               "wall_ms": 1e3 * statistics.median(r[2] for r in runs)}
        rows.append(row)
        print(f"{k:28s} mean TTFT {row['ttft_ms']:8.1f} ms  mean TPOT {row['tpot_ms']:6.1f} ms"
              f"  last answer {row['wall_ms']:8.1f} ms after the first request", flush=True)
    return rows


def run(args) -> list[dict]:
    from moekit.inference.server import Service
    from moekit.inference.text import text_for
    from moekit.quant.io import load_model

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(args, Path(tmp))
        url, server = _serve(checkpoint)
        try:
            _wait(url, server)
            service = Service(load_model(checkpoint), text_for(checkpoint), "m")
            body = {"prompt": PROMPT, "max_tokens": args.new_tokens, "temperature": 0}
            ways = {
                "engine": lambda: service.generate(service.parse(body, False))[0][0].text,
                "http": lambda: _post(url, body),
                "http stream": lambda: _post(url, {**body, "stream": True}),
            }
            texts = {k: f() for k, f in ways.items()}  # warm-up; the same text each way
            if len(set(texts.values())) != 1:
                raise RuntimeError(f"the ways disagree: {texts}")
            times: dict[str, list[float]] = {k: [] for k in ways}
            for _ in range(args.reps):
                for k, f in ways.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        finally:
            _stop(server)
        rows = _http_rows(args, times)
        if args.clients:
            rows += _concurrent(args, checkpoint)
        if args.rate:
            rows += _arrivals(args, checkpoint)
    return rows


def _http_rows(args, times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for k, ts in times.items():
        ratios = [t / e for t, e in zip(ts, times["engine"], strict=True)]
        row = {"way": k, "median_ms": 1e3 * statistics.median(ts),
               "tokens_per_s": args.new_tokens / statistics.median(ts),
               "vs_engine": statistics.median(ratios)}
        rows.append(row)
        print(f"{k:12s} {row['median_ms']:8.1f} ms  {row['tokens_per_s']:7.1f} tokens/s  "
              f"{row['vs_engine']:.3f}x the engine's time", flush=True)
    return rows


def add(p) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="what to serve (default: a random model, --model)")
    p.add_argument("--model", default="small", choices=("small", "fine", "mixtral"),
                   help="the random model's shape without --checkpoint (default small)")
    p.add_argument("--clients", type=int, default=4,
                   help="concurrent clients of part 2 (default 4; 0 skips it), and part "
                   "3's --parallel")
    p.add_argument("--rate", type=float, default=0.0,
                   help="part 3: requests a second arriving at random (default 0: skip)")
    p.add_argument("--requests", type=int, default=16, help="part 3's requests")


def check(args) -> None:
    if not 0 <= args.clients <= 64:
        raise ValueError(f"--clients={args.clients} is not allowed: it must be in [0, 64]")
    if not 0 <= args.rate <= 1000 or not 1 <= args.requests <= 1000:
        raise ValueError(f"--rate={args.rate} / --requests={args.requests} are not allowed: "
                         "a rate in [0, 1000] and 1 to 1000 requests")


if __name__ == "__main__":
    sys.exit(pairs_main(sys.argv[1:], __doc__, "bench_serve", 5, run, add, check))
