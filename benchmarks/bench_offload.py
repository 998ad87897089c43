"""Experts larger than memory: moekit's expert cache vs all-resident vs accelerate offloading.

Sections (all by default; ``--only`` picks some):

  make      write a random-weight OLMoE-shaped transformers checkpoint (bf16,
            save_pretrained, 500 MB shards) unless ``--ckpt`` already holds one
  speed     decode tokens/s in one process, rounds alternating: all-resident
            (from_pretrained + hf.apply), offloaded with a warm page cache, and
            offloaded with the shards' pages dropped (posix_fadvise DONTNEED)
            before every round; the ratios are per round, then the median
  peak      peak RSS (VmHWM) of load + generate in a fresh process, resident and
            offloaded, with the RSS after imports for reference
  accel     transformers + accelerate (device_map="auto", max_memory = the same
            total budget, the rest offloaded to disk) in a fresh process; needs
            accelerate importable (e.g. PYTHONPATH=/tmp/offload-accel:src).
            ``--memory-limit budget`` runs both sides in a memory cgroup of the
            same size (RSS after imports + 1.15 x the total budget + slack), so
            the budget is the kernel's, page cache included: without it
            accelerate's offloaded weights stay in the page cache and count in no
            budget (needs a writable cgroup v1 or v2 memory controller, e.g. root)
  hits      hit rates on a trained moekit checkpoint (``--trained``): LRU, LFU,
            each with and without prefetch, against Belady on the same trace

The expert budget is 2x the active experts of every layer (2 * K * L experts),
the total budget that plus the non-expert weights.

    PYTHONPATH=/tmp/offload-accel:src python benchmarks/bench_offload.py \\
        --ckpt /tmp/offload-bench/olmoe --trained /tmp/offload-trained

Shape letters: D hidden, F expert hidden, E experts, K experts per token, L layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_json  # noqa: E402

SHAPE = dict(L=8, D=1024, F=512, E=64, K=8, V=8192)  # 1.7 GB in bf16, see README
PROMPT = 4  # prompt tokens: a short prefill, so decode dominates


def olmoe_config(L, D, F, E, K, V):
    import transformers

    return transformers.OlmoeConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=D // 64, num_key_value_heads=D // 64, num_experts=E,
        num_experts_per_tok=K, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, dtype="bfloat16")


def make(path: Path) -> None:
    """The random checkpoint in ``path``, unless it holds one. Written whole or not at
    all: ``save_pretrained`` writes config.json first, so a make killed in its shards
    (1.7 GB) left a directory the next run took as made, and measured a model with
    shards missing. Now it goes to a temporary directory beside ``path`` that is renamed
    into place when complete (``rundir.write_dir``, which removes a killed make's
    temporary, ``temps.remove_dead_temps``)."""
    import transformers

    from moekit.train.rundir import write_dir

    if (path / "config.json").exists():
        return
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SystemExit(f"bench_offload: --ckpt {path} exists without a config.json (a "
                         "make killed before this version wrote into it?): remove it or "
                         "pass another --ckpt")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_config(olmoe_config(**SHAPE),
                                                          dtype=torch.bfloat16)
    # overwrite=False: a --ckpt another make filled meanwhile is kept, not replaced
    write_dir(path, lambda tmp: model.save_pretrained(tmp, max_shard_size="500MB"),
              overwrite=False)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


def sizes(path: Path) -> dict:
    """Bytes of the checkpoint, its experts, one expert; the budgets."""
    from moekit.integrations.hf.offload import shard_headers

    locs = shard_headers(path)
    expert = sum(loc.nbytes for n, loc in locs.items() if ".experts." in n)
    total = sum(loc.nbytes for loc in locs.values())
    cfg = json.loads((path / "config.json").read_text())
    L, E, K = cfg["num_hidden_layers"], cfg["num_experts"], cfg["num_experts_per_tok"]
    per_expert = expert // (L * E)
    expert_budget = 2 * K * L * per_expert
    return {"checkpoint": total, "experts": expert, "non_expert": total - expert,
            "per_expert": per_expert, "expert_budget": expert_budget,
            "total_budget": total - expert + expert_budget}


def prompt_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 8000, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def decode_s(model, tokens: int, seed: int) -> float:
    return decode_times(model, tokens, seed)[0]


def decode_times(model, tokens: int, seed: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one generate call. CPU time counts this process's
    threads only (the prefetch thread's reads included), so on a shared, loaded box
    its ratio at 1 thread is the fairer one; wall time counts the waits."""
    ids = prompt_ids(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - t0, time.process_time() - c0


def load_resident(path: Path):
    import transformers

    from moekit.integrations import hf

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return hf.apply(model).eval()


def speed(path: Path, tokens: int, rounds: int) -> dict:
    from moekit.integrations import hf
    from moekit.offload import drop_page_cache

    sz = sizes(path)
    resident = load_resident(path)
    warm = hf.load_offloaded(path, expert_memory=sz["expert_budget"])
    cold = hf.load_offloaded(path, expert_memory=sz["expert_budget"])
    files = cold.expert_offload.cache.store.files
    same = torch.equal(resident.generate(prompt_ids(), max_new_tokens=8, do_sample=False),
                       warm.generate(prompt_ids(), max_new_tokens=8, do_sample=False))

    def run_cold(seed):
        drop_page_cache(files)
        return decode_times(cold, tokens, seed)

    variants = {"resident": lambda s: decode_times(resident, tokens, s),
                "offload_warm": lambda s: decode_times(warm, tokens, s),
                "offload_cold": run_cold}
    for fn in variants.values():  # warm-up round
        fn(0)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(variants[name](r + 1))
    out = {"tokens_per_round": tokens, "rounds": rounds, "threads": torch.get_num_threads(),
           "greedy_tokens_equal": same, "load_average": os.getloadavg()}
    for name, ts in times.items():
        out[f"{name}_tok_s"] = tokens / statistics.median(w for w, _ in ts)
        for i, what in ((0, "wall"), (1, "cpu")):
            out[f"{name}_vs_resident_{what}"] = statistics.median(
                [b[i] / a[i] for a, b in zip(ts, times["resident"], strict=True)])
    for name, m in (("warm", warm), ("cold", cold)):
        out[f"{name}_stats"] = m.expert_offload.stats.to_dict()
        m.expert_offload.close()
    return out


# -- fresh processes: peak RSS and accelerate -----------------------------------------


def _vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(kind: str, path: Path, tokens: int, threads: int) -> None:
    """Run in a fresh process: load ``kind``, decode ``tokens``; print a JSON line."""
    import transformers  # (imports count in the baseline, not the model)

    import moekit.integrations.hf  # noqa: F401

    torch.set_num_threads(threads)
    # the model's modeling module is an import too (transformers' modeling_olmoe: 208 MiB
    # of RSS on this box), paid alike by every variant: counted in the baseline
    config = transformers.AutoConfig.from_pretrained(path)
    transformers.AutoModelForCausalLM._model_mapping[type(config)]
    base = _rss_mib()
    if kind == "imports":
        print(json.dumps({"kind": kind, "rss_after_imports_mib": base}))
        return
    sz = sizes(path)
    t0 = time.perf_counter()
    if kind == "resident":
        model = load_resident(path)
    elif kind == "offload":
        from moekit.integrations import hf
        model = hf.load_offloaded(path, expert_memory=sz["expert_budget"])
    else:  # accelerate
        import tempfile

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map="auto",
            max_memory={"cpu": sz["total_budget"]}, offload_folder=tempfile.mkdtemp())
        model.eval()
    load_s = time.perf_counter() - t0
    decode_s(model, 2, 0)  # warm-up
    dt, cpu = decode_times(model, tokens, 1)
    print(json.dumps({"kind": kind, "rss_after_imports_mib": base, "peak_rss_mib": _vmhwm_mib(),
                      "load_s": load_s, "tok_s": tokens / dt, "cpu_s_per_token": cpu / tokens,
                      "tokens": tokens, "threads": threads, "load_average": os.getloadavg()}))


class MemoryCgroup:
    """A memory cgroup of ``limit`` bytes (v2 unified hierarchy, else v1) that a child
    process joins before it execs; ``peak()`` is the most it was charged (RSS and page
    cache). Removed on exit."""

    V2, V1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")

    def __init__(self, name: str, limit: int) -> None:
        v2 = (self.V2 / "cgroup.controllers").exists() and "memory" in (
            self.V2 / "cgroup.controllers").read_text().split()
        root = self.V2 if v2 else self.V1
        if not (root / "cgroup.procs").exists():
            raise RuntimeError("memory-limit=budget is not possible here: no cgroup memory "
                               "controller at /sys/fs/cgroup (v2) or /sys/fs/cgroup/memory (v1)")
        self.dir = root / f"moekit-bench-{os.getpid()}-{name}"
        self.dir.mkdir(exist_ok=True)
        (self.dir / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        self.peak_file = self.dir / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
        self.limit = limit

    def join(self) -> None:  # runs in the child between fork and exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        return int(self.peak_file.read_text()) if self.peak_file.exists() else None

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


def fresh(kind: str, path: Path, tokens: int, threads: int, timeout: float = 1800,
          limit: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--ckpt", str(path),
           "--tokens", str(tokens), "--threads", str(threads)]
    if limit is None:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        peak = None
    else:
        with MemoryCgroup(kind, limit) as cg:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 preexec_fn=cg.join)
            peak = cg.peak()
    if out.returncode != 0:
        killed = " (killed: over the memory limit)" if out.returncode == -9 else ""
        return {"kind": kind, "returncode": out.returncode, "cgroup_peak": peak,
                "error": out.stderr.strip().splitlines()[-1:] or [f"no output{killed}"]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if limit is not None:
        row.update(cgroup_limit=limit, cgroup_peak=peak)
    return row


def peak(path: Path, tokens: int, threads: int) -> dict:
    """Peak RSS above the post-import RSS, resident and offloaded, against the target
    expert budget + non-expert weights + 15%."""
    sz = sizes(path)
    runs = [fresh(k, path, tokens, threads) for k in ("resident", "offload")]
    out = {"runs": runs, "target_mib": 1.15 * sz["total_budget"] / 2**20}
    for r in runs:
        if "peak_rss_mib" in r:
            out[f"{r['kind']}_above_imports_mib"] = r["peak_rss_mib"] - r["rss_after_imports_mib"]
    return out


def budget_limit(path: Path, threads: int, slack_mib: int) -> dict:
    """The memory cgroup size both sides get: the RSS after imports (a fresh child that
    loads nothing), plus the issue's peak-RSS target (1.15 x the total budget), plus
    ``slack_mib`` for allocator and staging buffers."""
    base = fresh("imports", path, 0, threads)["rss_after_imports_mib"]
    target = 1.15 * sizes(path)["total_budget"]
    limit = int(base * 2**20 + target + slack_mib * 2**20)
    return {"limit": limit, "imports_mib": base, "target_mib": target / 2**20,
            "slack_mib": slack_mib}


def versus_accelerate(path: Path, tokens: int, pairs: int, threads: int,
                      memory_limit: str = "none", slack_mib: int = 256) -> dict:
    """moekit's offloading and accelerate's, fresh processes back to back (alternating
    order, same load), the same tokens each; ratios per pair, then the median.
    ``memory_limit="budget"``: both in a memory cgroup of the same size."""
    cap = budget_limit(path, threads, slack_mib) if memory_limit == "budget" else None
    rows = []
    for i in range(pairs):
        order = ("offload", "accelerate") if i % 2 == 0 else ("accelerate", "offload")
        rows.append({k: fresh(k, path, tokens, threads, limit=cap and cap["limit"])
                     for k in order})
    ok = [r for r in rows if all("tok_s" in v for v in r.values())]
    out: dict = {"pairs": rows, "tokens": tokens, "threads": threads, "memory_limit": cap}
    if ok:
        out["wall_speedup"] = statistics.median(
            r["offload"]["tok_s"] / r["accelerate"]["tok_s"] for r in ok)
        out["cpu_speedup"] = statistics.median(
            r["accelerate"]["cpu_s_per_token"] / r["offload"]["cpu_s_per_token"] for r in ok)
    return out


# -- hit rates on a trained moekit model ----------------------------------------------


def hits(trained: Path, tokens: int) -> list[dict]:
    from moekit.models.generate import generate
    from moekit.offload import load_offloaded
    from moekit.train.data import encode

    prompts = ["def ", "import os\n", "class Foo:\n    ", "    return self."]
    # hit rates do not depend on speed: one thread, since a second OpenMP thread
    # only spins at barriers on this shared machine at these tiny shapes
    torch.set_num_threads(1)
    probe = load_offloaded(trained, "1GiB", prefetch=False, threaded=False)
    cfg = probe.config
    per_expert = max(probe.expert_offload.cache.store.nbytes(k)
                     for k in probe.expert_offload.cache.store.experts)
    probe.expert_offload.close()
    rows = []
    for per_layer in (cfg.top_k, 2 * cfg.top_k):
        budget = per_layer * cfg.num_layers * per_expert
        for policy in ("lru", "lfu"):
            for prefetch in (False, True):
                model = load_offloaded(trained, budget, policy, prefetch=prefetch,
                                       threaded=False)
                for p in prompts:
                    generate(model, encode(p)[None], tokens, temperature=0)
                s = model.expert_offload.stats
                rows.append({"experts_per_layer": per_layer, "budget": budget,
                             "policy": policy, "prefetch": prefetch, "hit_rate": s.hit_rate,
                             "belady": s.belady_hit_rate(),
                             "bytes_loaded": int(s.total("bytes_loaded")),
                             "precision": s.prefetch_precision, "recall": s.prefetch_recall})
                model.expert_offload.close()
    return rows


def print_hits(rows: list[dict]) -> None:
    print(f"{'experts/layer':>13s} {'policy':>6s} {'prefetch':>8s} {'hit rate':>8s} "
          f"{'Belady':>7s} {'MiB read':>9s} {'prec':>5s} {'recall':>6s}")
    for r in rows:
        print(f"{r['experts_per_layer']:>13d} {r['policy']:>6s} {str(r['prefetch']):>8s} "
              f"{r['hit_rate']:8.3f} {r['belady']:7.3f} {r['bytes_loaded'] / 2**20:9.1f} "
              f"{r['precision']:5.2f} {r['recall']:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/offload-bench/olmoe"))
    p.add_argument("--trained", type=Path, default=None, help="moekit run for the hit rates")
    p.add_argument("--only", nargs="*", default=["make", "speed", "peak", "accel", "hits"])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--accel-tokens", type=int, default=3)
    p.add_argument("--accel-pairs", type=int, default=2)
    p.add_argument("--memory-limit", choices=["none", "budget"], default="none",
                   help="accel: run both sides in a memory cgroup of the budget's size")
    p.add_argument("--limit-slack-mib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; 1 makes the CPU-time ratios meaningful on a loaded box")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/offload.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.ckpt, args.tokens, args.threads)
    result = {"machine": machine(), "shape": SHAPE}
    if "make" in args.only:
        make(args.ckpt)
    if any(s in args.only for s in ("speed", "peak", "accel")):
        result["sizes"] = sizes(args.ckpt)
        print(json.dumps(result["sizes"]))
    if "speed" in args.only:
        result["speed"] = speed(args.ckpt, args.tokens, args.rounds)
        print(json.dumps({k: v for k, v in result["speed"].items() if "stats" not in k}))
    if "peak" in args.only:
        result["peak"] = peak(args.ckpt, args.tokens, args.threads)
        print(json.dumps(result["peak"]))
    if "accel" in args.only:
        key = "accelerate" if args.memory_limit == "none" else "accelerate_cgroup"
        result[key] = versus_accelerate(args.ckpt, args.accel_tokens, args.accel_pairs,
                                        args.threads, args.memory_limit, args.limit_slack_mib)
        print(json.dumps(result[key]))
    if "hits" in args.only and args.trained is not None:
        result["hits"] = hits(args.trained, args.tokens * 8)
        print_hits(result["hits"])
    result["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    write_json(args.out, {**old, **result}, indent=1)


if __name__ == "__main__":
    main()
