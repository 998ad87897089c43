"""What a bf16 or int8 KV cache under fp32 (or quantized) weights, or an int8 one under
bf16 weights, gives a decode step, and what it costs in quality.

Speed: for each model variant, batch size and prompt length, one model generates greedily
through the engine with its KV cache in float32, bfloat16 and int8 (``kv_cache_dtype``;
the bf16 variant: bfloat16 and int8), in rounds (each round runs them in a rotated order).
The ratio is the median over rounds of (step with that cache / step with the activations'
own cache, the first). Beside it, the bytes of
cache a step reads (the mean filled slots over the steps, keys and values of every layer
and row) and the time the smaller cache would save at the read bandwidth measured in the
same run (a 1 GiB ``sum``, the faster of 4 KiB and huge pages).

Quality (``--checkpoint``, a trained `moekit train` run, in ``--quality-dtype`` fp32 or
bf16): teacher-forced decode steps (one token per step, the cache filled by the steps
before) over ``--bytes`` held-out bytes in windows of the model's context, with each
cache: the mean next-byte loss (nats/byte), the share of positions where it picks the
first cache's argmax byte, the mean KL divergence of its distribution from the first
cache's, and each position's largest logit difference from the first cache's (median,
99th percentile, largest).

    PYTHONPATH=src python benchmarks/bench_kv_cache.py [--models fine] [--variants fp32,int4]
        [--batches 1,8] [--prompt-lens 32,960] [--reps 7] [--new-tokens 32]
        [--checkpoint RUN --bytes 2048 --quality-dtype fp32]
"""

from __future__ import annotations

import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import harness  # noqa: E402

VARIANTS = ("fp32", "int8", "int4", "bf16")


def caches_for(variant: str) -> tuple[str, ...]:
    """The caches a variant's model takes (``moekit.functions.decode.CACHES_UNDER``), its
    activations' own first: fp32 activations float32, bfloat16, int8; bf16 ones bfloat16,
    int8."""
    import torch

    from moekit.functions.decode import CACHES_UNDER

    act = torch.bfloat16 if variant == "bf16" else torch.float32
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int8: "int8"}
    return tuple(names[d] for d in (act, *CACHES_UNDER[act]))


def cache_bytes(model, B: int, slots: float, kv: str) -> float:
    """Bytes of keys and values a decode step reads: every layer, row and filled slot (per
    slot as ``moekit plan --decode`` counts them: int8 rows carry their float scale)."""
    from moekit.plan.decode import decode_cost
    from moekit.plan.hf import from_lm_config

    return B * slots * decode_cost(from_lm_config(model.config),
                                   kv_cache_dtype=kv).kv_bytes_per_token


def rounds(runners: dict, reps: int) -> dict:
    """Each runner once per round, the order rotated every round (after a warm-up round);
    per runner the median step ms and the median ratio to the first runner's."""
    names = list(runners)
    for name in names:
        runners[name]()
    ms: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            ms[name].append(runners[name]())
    first = names[0]
    return {n: {"ms": statistics.median(ms[n]),
                "ratio": statistics.median(b / a for a, b in zip(ms[first], ms[n], strict=True))}
            for n in names}


def speed(args, bandwidth: float) -> list[dict]:
    rows = []
    for shape in args.models.split(","):
        for variant in args.variants.split(","):
            model = bd.build(shape, variant)
            for L in (int(x) for x in args.prompt_lens.split(",")):
                for B in (int(b) for b in args.batches.split(",")):
                    ids = bd.prompts(B, L)
                    caches = caches_for(variant)
                    first = caches[0]
                    runners = {kv: bd.Runner(model, ids, args.new_tokens, huge=i == 0, kv=kv)
                               for i, kv in enumerate(caches)}
                    r = rounds(runners, args.reps)
                    slots = L + args.new_tokens / 2
                    base = cache_bytes(model, B, slots, first)
                    row = {"model": shape, "variant": variant, "B": B, "prompt_len": L,
                           "rounds": args.reps, "first_cache": first,
                           "first_cache_bytes_per_step": base}
                    line = [f"{shape:8s} {variant:5s} B={B:<3d} prompt {L:4d}  {first} cache "
                            f"{r[first]['ms']:7.2f} ms ({base / 2**20:6.1f} MiB a step)"]
                    for kv in caches[1:]:
                        size = cache_bytes(model, B, slots, kv)
                        saved = 1e3 * (base - size) / bandwidth
                        row[kv] = {"ms": r[kv]["ms"], "x_first_cache": r[kv]["ratio"],
                                   "cache_bytes_per_step": size,
                                   "saved_ms": r[first]["ms"] - r[kv]["ms"],
                                   "saved_ms_at_bandwidth": saved,
                                   "token_agreement": _agreement(runners[first].tokens,
                                                                 runners[kv].tokens)}
                        line.append(f"{kv} {r[kv]['ms']:7.2f} ms x {r[kv]['ratio']:.3f} "
                                    f"(saved {row[kv]['saved_ms']:5.2f} ms, its bytes at the "
                                    f"bandwidth {saved:5.2f}; same tokens "
                                    f"{100 * row[kv]['token_agreement']:.0f}%)")
                    print("  ".join(line), flush=True)
                    rows.append(row)
                    del runners
            del model
            gc.collect()
    return rows


def _agreement(x: list[list[int]], y: list[list[int]]) -> float:
    pairs = [(s, t) for u, v in zip(x, y, strict=True) for s, t in zip(u, v, strict=True)]
    return sum(s == t for s, t in pairs) / max(len(pairs), 1)


def quality(args) -> dict:
    """Teacher-forced decode over held-out bytes with each cache."""
    import torch

    from moekit.models.transformer import StaticKVCache
    from moekit.quant.io import load_model
    from moekit.train.data import load_corpus

    model = load_model(args.checkpoint).eval()
    if args.quality_dtype == "bf16":
        model = model.to(torch.bfloat16)
    caches = caches_for(args.quality_dtype)
    first = caches[0]
    data = load_corpus().val[: args.bytes + 1].long()
    M = model.config.max_seq_len
    nll: dict[str, list[float]] = {kv: [] for kv in caches}
    logits: dict[str, list] = {kv: [] for kv in caches}
    with torch.inference_mode():
        for start in range(0, args.bytes, M):
            window = data[start:start + min(M, args.bytes - start) + 1]
            for kv in caches:
                cache = StaticKVCache.for_model(model, 1, M, kv)
                cache.reset()
                for t in range(len(window) - 1):
                    out = model.infer(window[t:t + 1].view(1, 1), cache)[0].float()
                    nll[kv].append(float(-out.log_softmax(-1)[window[t + 1]]))
                    logits[kv].append(out)
    ref = torch.stack(logits[first])
    res: dict = {"checkpoint": str(args.checkpoint), "dtype": args.quality_dtype,
                 "bytes": len(nll[first]), "first_cache": first,
                 f"loss_{first}": statistics.mean(nll[first])}
    print(f"quality ({args.quality_dtype} model) over {res['bytes']} held-out bytes "
          f"(teacher-forced decode steps): {first} cache loss {res[f'loss_{first}']:.4f} "
          "nats/byte", flush=True)
    for kv in caches[1:]:
        b = torch.stack(logits[kv])
        per_position = (ref - b).abs().amax(-1)  # each position's largest logit difference
        lp, lq = ref.log_softmax(-1), b.log_softmax(-1)
        q = {"loss": statistics.mean(nll[kv]),
             "argmax_agreement": float((ref.argmax(-1) == b.argmax(-1)).float().mean()),
             "mean_kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
             "median_position_max_abs_logit_difference": float(per_position.median()),
             "p99_position_max_abs_logit_difference": float(per_position.quantile(0.99)),
             "max_abs_logit_difference": float(per_position.max())}
        q["loss_change"] = q["loss"] / res[f"loss_{first}"] - 1
        res[kv] = q
        print(f"  {kv}: loss {q['loss']:.4f} ({100 * q['loss_change']:+.3f}%), the {first} "
              f"cache's argmax {100 * q['argmax_agreement']:.2f}%, KL({first} || {kv}) "
              f"{q['mean_kl']:.2e} nats; a position's largest logit difference: median "
              f"{q['median_position_max_abs_logit_difference']:.4f}, 99th percentile "
              f"{q['p99_position_max_abs_logit_difference']:.4f}, largest "
              f"{q['max_abs_logit_difference']:.4f}", flush=True)
    return res


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(2)
    rows = speed(args, harness.read_bandwidth()) if args.variants else []
    if args.checkpoint:
        rows.append({"quality": quality(args)})
    return rows


def add(p) -> None:
    p.add_argument("--models", default="fine")
    p.add_argument("--variants", default="fp32,int4", help="empty: quality only")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-lens", default="32,960")
    p.add_argument("--checkpoint", default=None, help="a trained run: quality too")
    p.add_argument("--bytes", type=int, default=2048, help="held-out bytes for quality")
    p.add_argument("--quality-dtype", default="fp32",
                   help="the checkpoint's model for quality: fp32 (fp32 / bf16 / int8 "
                   "caches) or bf16 (bf16 / int8)")


def check(args) -> None:
    bd._names("--models", args.models, tuple(bd.SHAPES))
    if args.variants:
        bd._names("--variants", args.variants, VARIANTS)
    bd._sizes("--batches", args.batches)
    bd._sizes("--prompt-lens", args.prompt_lens)
    longest = max(int(x) for x in args.prompt_lens.split(","))
    limit = bd.COMMON["max_seq_len"]
    if longest + args.new_tokens > limit:
        raise ValueError(f"--prompt-lens={args.prompt_lens} is not allowed with --new-tokens="
                         f"{args.new_tokens}: prompt + new tokens must be <= {limit}")
    bd._names("--quality-dtype", args.quality_dtype, ("fp32", "bf16"))
    if args.bytes < 2:
        raise ValueError(f"--bytes={args.bytes} is not allowed: at least 2")


if __name__ == "__main__":
    sys.exit(harness.pairs_main(sys.argv[1:], __doc__, "bench_kv_cache", 7, run, add, check))
