"""What a bf16 KV cache under fp32 (or quantized) weights gives a decode step, and what it
costs in quality.

Speed: for each model variant, batch size and prompt length, one model generates greedily
through the engine with its KV cache in float32 and in bfloat16 (``kv_cache_dtype``),
alternating (A B B A ...). The ratio is the median over pairs of (bf16 step / fp32 step).
Beside it, the bytes of cache a step reads (the mean filled slots over the steps, keys
and values of every layer and row) and the time the halved bytes would save at the read
bandwidth measured in the same run (a 1 GiB ``sum``, the faster of 4 KiB and huge pages).

Quality (``--checkpoint``, a trained `moekit train` run): teacher-forced decode steps
(one token per step, the cache filled by the steps before) over ``--bytes`` held-out
bytes in windows of the model's context, with each cache: the mean next-byte loss
(nats/byte) of each, the share of positions where both pick the same argmax byte, the
mean KL divergence of the bf16-cache distribution from the fp32-cache one, and each
position's largest logit difference (median, 99th percentile, largest).

    PYTHONPATH=src python benchmarks/bench_kv_cache.py [--models fine] [--variants fp32,int4]
        [--batches 1,8] [--prompt-lens 32,960] [--reps 7] [--new-tokens 32]
        [--checkpoint RUN --bytes 2048]
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import harness  # noqa: E402

VARIANTS = ("fp32", "int8", "int4")


def cache_bytes(model, B: int, slots: float, element: int) -> float:
    """Bytes of keys and values a decode step reads: every layer, row and filled slot."""
    c = model.config
    return c.num_layers * 2 * B * slots * c.kv_heads * c.head_size * element


def speed(args, bandwidth: float) -> list[dict]:
    rows = []
    for shape in args.models.split(","):
        for variant in args.variants.split(","):
            model = bd.build(shape, variant)
            for L in (int(x) for x in args.prompt_lens.split(",")):
                for B in (int(b) for b in args.batches.split(",")):
                    ids = bd.prompts(B, L)
                    a = bd.Runner(model, ids, args.new_tokens, kv="float32")
                    b = bd.Runner(model, ids, args.new_tokens, huge=False, kv="bfloat16")
                    p = bd.paired(a, b, args.reps)
                    slots = L + args.new_tokens / 2
                    fp32_bytes = cache_bytes(model, B, slots, 4)
                    saved = 1e3 * fp32_bytes / 2 / bandwidth
                    row = {"model": shape, "variant": variant, "B": B, "prompt_len": L,
                           "fp32_cache_ms": p["anchor_ms"], "bf16_cache_ms": p["ms"],
                           "bf16_x_fp32": p["ratio"], "pairs": p["pairs"],
                           "fp32_cache_bytes_per_step": fp32_bytes,
                           "saved_ms": p["anchor_ms"] - p["ms"],
                           "saved_ms_at_bandwidth": saved,
                           "same_tokens": a.tokens == b.tokens,
                           "token_agreement": _agreement(a.tokens, b.tokens)}
                    print(f"{shape:8s} {variant:5s} B={B:<3d} prompt {L:4d}  fp32 cache "
                          f"{p['anchor_ms']:7.2f} ms  bf16 cache {p['ms']:7.2f} ms  x "
                          f"{p['ratio']:.3f}  saved {row['saved_ms']:5.2f} ms (halved bytes "
                          f"at the bandwidth: {saved:5.2f} ms; cache {fp32_bytes / 2**20:6.1f} "
                          f"-> {fp32_bytes / 2**21:6.1f} MiB a step)  same tokens "
                          f"{100 * row['token_agreement']:.0f}%", flush=True)
                    rows.append(row)
                    del a, b
            del model
            gc.collect()
    return rows


def _agreement(x: list[list[int]], y: list[list[int]]) -> float:
    pairs = [(s, t) for u, v in zip(x, y, strict=True) for s, t in zip(u, v, strict=True)]
    return sum(s == t for s, t in pairs) / max(len(pairs), 1)


def quality(args) -> dict:
    """Teacher-forced decode over held-out bytes with a float32 and a bfloat16 cache."""
    import torch

    from moekit.models.transformer import StaticKVCache
    from moekit.quant.io import load_model
    from moekit.train.data import load_corpus

    model = load_model(args.checkpoint).eval()
    data = load_corpus().val[: args.bytes + 1].long()
    M = model.config.max_seq_len
    nll = {"float32": [], "bfloat16": []}
    logits = {"float32": [], "bfloat16": []}
    with torch.inference_mode():
        for start in range(0, args.bytes, M):
            window = data[start:start + min(M, args.bytes - start) + 1]
            for kv in nll:
                cache = StaticKVCache.for_model(model, 1, M, kv)
                cache.reset()
                for t in range(len(window) - 1):
                    out = model.infer(window[t:t + 1].view(1, 1).long(), cache)[0].float()
                    nll[kv].append(float(-out.log_softmax(-1)[window[t + 1]]))
                    logits[kv].append(out)
    a, b = torch.stack(logits["float32"]), torch.stack(logits["bfloat16"])
    res = {"checkpoint": str(args.checkpoint), "bytes": len(nll["float32"]),
           "loss_fp32_cache": sum(nll["float32"]) / len(nll["float32"]),
           "loss_bf16_cache": sum(nll["bfloat16"]) / len(nll["bfloat16"]),
           "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
           "max_abs_logit_difference": float((a - b).abs().max())}
    per_position = (a - b).abs().amax(-1)  # each position's largest logit difference
    res["median_position_max_abs_logit_difference"] = float(per_position.median())
    res["p99_position_max_abs_logit_difference"] = float(per_position.quantile(0.99))
    # how far the two next-byte distributions are: KL(fp32 || bf16) per position, mean
    res["mean_kl"] = float((a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1)))
                           .sum(-1).mean())
    res["loss_change"] = res["loss_bf16_cache"] / res["loss_fp32_cache"] - 1
    print(f"quality over {res['bytes']} held-out bytes (teacher-forced decode steps): loss "
          f"{res['loss_fp32_cache']:.4f} -> {res['loss_bf16_cache']:.4f} nats/byte "
          f"({100 * res['loss_change']:+.3f}%), same argmax "
          f"{100 * res['argmax_agreement']:.2f}%, KL(fp32 || bf16) {res['mean_kl']:.2e} "
          f"nats; a position's largest logit difference: median "
          f"{res['median_position_max_abs_logit_difference']:.4f}, 99th percentile "
          f"{res['p99_position_max_abs_logit_difference']:.4f}, largest "
          f"{res['max_abs_logit_difference']:.4f}", flush=True)
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
    if args.bytes < 2:
        raise ValueError(f"--bytes={args.bytes} is not allowed: at least 2")


if __name__ == "__main__":
    sys.exit(harness.pairs_main(sys.argv[1:], __doc__, "bench_kv_cache", 7, run, add, check))
