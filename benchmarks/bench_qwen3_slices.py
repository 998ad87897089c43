"""Qwen3-30B-A3B's (or Qwen1.5-MoE-A2.7B's) decode step on this machine, from slices of
its layers.

moekit language models with Qwen3-30B-A3B's shapes (D=2048; 32 query and 4 key/value
heads of 128 with per-head q / k norms; 128 experts top-8 of F=768, renormalized;
V=151,936, untied head; 48 layers) or, with ``--model qwen1.5-moe-a2.7b``, Qwen1.5-MoE-
A2.7B's (Qwen2-MoE: D=2048; 16 heads of 128 with q / k / v biases; 60 experts top-4 of
F=1408, not renormalized, and a gated shared expert of 5632; V=151,936, untied head; 24
layers), and L = 2 and 4 of their layers, random weights; int4 (g64, fp32
activations: what `moekit quantize` writes and `moekit generate` runs) then bf16. Per
dtype: the decode step at batch 1 after a 32-token prompt (the generation engine; the two
slices alternate, the order swapped every pair, medians), the cost of one layer (the
median over pairs of (4-layer step - 2-layer step) / 2) and of the rest (embedding,
final norm, LM head: the 2-layer step less 2 layers), and the full model's step
extrapolated as rest + all its layers, beside its bytes per step (bench_decode's
``roofline``: top-k experts per layer at batch 1, the shared expert whole) at the mean of
the read bandwidth
measured before and after the dtype's pairs; and where the 4-layer step's time goes
(DecodeStep's timers, ms per step by part). An extrapolation, not a run of the real
model: its bf16 weights (61 GB; Qwen1.5-MoE-A2.7B 29 GB) do not fit this machine, and
random weights route differently from trained ones (at batch 1 each layer reads top-k
experts either way).

    python benchmarks/bench_qwen3_slices.py [--model qwen3-30b-a3b] [--reps 9]
        [--new-tokens 24] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import moekit  # noqa: E402
from harness import pairs_main, read_bandwidth  # noqa: E402
from moekit.models import LMConfig, MoETransformer  # noqa: E402
from moekit.models.transformer import rotary_table  # noqa: E402

SLICES = (2, 4)
COMMON = dict(vocab_size=151_936, dim=2048, head_dim=128, max_seq_len=4096, rope_theta=1e6,
              tie_embeddings=False, aux_loss_coef=0.0, z_loss_coef=0.0)
# name: (LMConfig fields, the model's layers); from each model's config.json on the Hub
MODELS = {
    "qwen3-30b-a3b": (dict(COMMON, num_heads=32, num_kv_heads=4, qk_norm="head", ffn_dim=768,
                           num_experts=128, top_k=8), 48),
    "qwen1.5-moe-a2.7b": (dict(COMMON, num_heads=16, qkv_bias=True, ffn_dim=1408,
                               num_experts=60, top_k=4, renormalize=False,
                               num_shared_experts=1, shared_ffn_dim=5632,
                               shared_expert_gate=True), 24),
}


def build(num_layers: int, seed: int = 0, model: str = "qwen3-30b-a3b") -> MoETransformer:
    """A bf16 model of the shapes, random normal(0, 0.02) weights (norms 1), made in bf16
    (an fp32 model of 4 layers would take 12 GB)."""
    cfg = LMConfig(**MODELS[model][0], num_layers=num_layers)
    with torch.device("meta"):
        model = MoETransformer(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    model.rope_cos, model.rope_sin = rotary_table(cfg.max_seq_len, cfg.head_size,
                                                  cfg.rope_theta)
    return model.eval()


def parts(model: MoETransformer, ids, steps: int = 30) -> dict[str, float]:
    """Wall ms per decode step of each part of the one-call step (DecodeStep's own timers:
    attention projections, attend_one, experts gate_up / down_combine, LM head, ...)."""
    from moekit.inference.decode_plan import DecodePlan
    from moekit.models.transformer import StaticKVCache

    cache = StaticKVCache.for_model(model, 1, ids.shape[1] + steps + 8)
    cache.reset()
    with torch.inference_mode():
        plan = DecodePlan.build(model)
        nxt = model.infer(ids, cache).argmax(-1)[:, None]
        for _ in range(3):
            nxt = plan.step(nxt, cache, greedy=True)[:, None]
        plan.native.set_timing(True)
        for _ in range(steps):
            nxt = plan.step(nxt, cache, greedy=True)[:, None]
        plan.native.set_timing(False)
    return {part: ns / steps / 1e6 for part, ns in plan.native.times() if ns}


def run(args: argparse.Namespace) -> list[dict]:
    fields, LAYERS = MODELS[args.model]
    models = {L: build(L, model=args.model) for L in SLICES}
    ids = bd.prompts(1, bd.PROMPT_LEN)
    rows = []
    for dtype in ("int4", "bf16"):
        if dtype == "int4":
            # fp32 activations, as `moekit quantize` writes a model and `moekit generate`
            # loads it by default (the unquantized norms and router back in fp32)
            models = {L: moekit.quantize(m, bits=4, group_size=64).float()
                      for L, m in models.items()}
        else:  # the bf16 models again (quantize replaced their weights)
            del models
            models = {L: build(L, model=args.model) for L in SLICES}
        bws = [read_bandwidth()]
        a, b = (bd.Runner(models[L], ids, args.new_tokens) for L in SLICES)
        a(), b()  # warm-up pair
        ta, tb = [], []
        for i in range(args.reps):  # alternating, the order swapped every pair
            for run_one, times in ((a, ta), (b, tb))[::-1 if i % 2 else 1]:
                times.append(run_one())
        bws.append(read_bandwidth())
        bw = statistics.mean(bws)
        steps = {SLICES[0]: statistics.median(ta), SLICES[1]: statistics.median(tb)}
        # a layer's cost from each pair's difference (the slices ran side by side)
        per_layer = statistics.median((y - x) / (SLICES[1] - SLICES[0])
                                      for x, y in zip(ta, tb, strict=True))
        roofs = {L: bd.roofline(models[L], ids, args.new_tokens, bw, [float(fields["top_k"])] * L)
                 for L in SLICES}
        rest = steps[2] - 2 * per_layer
        roof_layer = (roofs[4]["roofline_ms"] - roofs[2]["roofline_ms"]) / 2
        roof_rest = roofs[2]["roofline_ms"] - 2 * roof_layer
        full = rest + LAYERS * per_layer
        full_roof = roof_rest + LAYERS * roof_layer
        rows.append({"model": args.model, "layers": LAYERS, "dtype": dtype,
                     "read_bandwidth_Bps": bws,
                     "step_ms": steps,
                     "roofline_ms": {L: roofs[L]["roofline_ms"] for L in SLICES},
                     "bytes": {L: roofs[L]["bytes"] for L in SLICES},
                     "per_layer_ms": per_layer, "rest_ms": rest,
                     "per_layer_roofline_ms": roof_layer, "rest_roofline_ms": roof_rest,
                     "full_model_ms": full, "full_model_roofline_ms": full_roof,
                     "full_tokens_per_s": 1e3 / full,
                     "full_fraction_of_roofline": full_roof / full,
                     "pairs": args.reps,
                     "parts_ms_4_layers": parts(models[SLICES[1]], ids)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--model", choices=tuple(MODELS), default="qwen3-30b-a3b")
    return pairs_main(argv, __doc__, "bench_qwen3_slices", 9, run, add)


if __name__ == "__main__":
    sys.exit(main())
