"""What `moekit serve`'s HTTP layer costs: a generation through the server against the
engine called in this process.

`moekit serve` runs in its own process (generations on its main thread); this process
alternates the same greedy request three ways: the engine here (``Service.generate`` on
the main thread), the server's answer whole, and the server's answer streamed as
server-sent events (read to ``[DONE]``). Median of ``--reps`` rounds; the ratios are
each way's time over the engine's in the same round. Both sides must give the same text.

    python benchmarks/bench_serve.py [--checkpoint DIR] [--new-tokens 24] [--reps 5]

Default checkpoint: a random moekit model of the "small" preset written to a temporary
directory (small, so the per-token cost of the HTTP layer shows at its largest).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
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
    model = MoETransformer(preset("small"))
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


def run(args) -> list[dict]:
    from moekit.inference.server import Service
    from moekit.inference.text import text_for
    from moekit.quant.io import load_model

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _checkpoint(args, Path(tmp))
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "moekit.cli", "serve", "--checkpoint",
                                   checkpoint, "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
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
            server.terminate()
            server.wait(30)
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
                   help="what to serve (default: a random 'small' preset model)")


if __name__ == "__main__":
    sys.exit(pairs_main(sys.argv[1:], __doc__, "bench_serve", 5, run, add))
