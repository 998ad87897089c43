"""Decode benchmark: moekit's generation engine against the memory roofline, dense LMs
and transformers' generate(), on the same shapes and weights.

For each model (a fine-grained "fine": D=1024, 4 layers, 64 experts top-8,
F=512; a Mixtral-like "mixtral": 8 experts top-2, F=2048) and batch size, the
anchor is moekit fp32 generating greedily. Every other variant (moekit bf16 /
int8 / int4, the dense LM of equal active parameters, the dense LM of equal
total parameters, transformers' Mixtral and OLMoE classes with the anchor's
weights) is timed in alternation with the anchor (A B B A ...), and its ratio
is the median over pairs of (variant step time / anchor step time) — the
ratios come from the same run, the absolute times drift with the machine.

A step's time is the median of the per-step intervals of one generation
(moekit: the engine's token callback; transformers: a logits processor that
only reads the clock). Roofline of a step = bytes it must read / read
bandwidth, where bytes = the distinct experts the step's rows touch (counted
per layer by a hook) + attention, router, norms and the (tied) embedding +
the KV cache filled so far, and bandwidth is a 1 GiB ``sum`` timed in the same
run, from 4 KiB pages and from huge pages (``moekit.huge_pages``), the faster taken:
moekit's engine reads its weights from huge pages, transformers' from what its
allocation got (4 KiB pages where transparent huge pages are "madvise"). Bytes
are the tensors' real bytes: quantized weights (int8 / int4 data, scales, zero points)
and bf16 weights count what they occupy, tied tensors once.
``x mk fp32`` is the step-time ratio to moekit fp32, ``tok/s x fp32`` its inverse.
``--cpu-time``: 1 thread, every interval is the main thread's CPU time
(``time.thread_time``), so other jobs on a loaded machine distort it less.
Peak RSS: a fresh process builds the model and generates (VmHWM reset
after the build, so "generate" is the generation's own peak; "process" is the larger
of it and the build's).

    PYTHONPATH=src python benchmarks/bench_decode.py --quick      # ~2 min idle
    PYTHONPATH=src python benchmarks/bench_decode.py              # everything
    PYTHONPATH=src python benchmarks/bench_decode.py --profile    # where a step's time goes
    PYTHONPATH=src python benchmarks/bench_decode.py --cpu-time --models fine --batches 1 \
        --variants bf16,int8,int4 --no-prefill --no-memory         # bytes pay, loaded box
    PYTHONPATH=src python benchmarks/bench_decode.py --breakdown  # parts of a step, CPU time
    PYTHONPATH=src python benchmarks/bench_decode.py --breakdown --breakdown-variant int4
    PYTHONPATH=src python benchmarks/bench_decode.py --step-calls --batches 1 \
        --breakdown-variant int4a8                                 # the engine's calls, wall
    PYTHONPATH=src python benchmarks/bench_decode.py --ops        # aten ops per step, by line

Shape letters: B sequences, D hidden, F expert hidden, E experts, K top-k, V vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

SHAPES = {
    "fine": dict(dim=1024, num_layers=4, num_heads=8, ffn_dim=512, num_experts=64, top_k=8),
    "mixtral": dict(dim=1024, num_layers=4, num_heads=8, ffn_dim=2048, num_experts=8, top_k=2),
}
COMMON = dict(vocab_size=256, max_seq_len=1024, aux_loss_coef=0.0, z_loss_coef=0.0)
MOEKIT_DTYPES = ("bf16", "int8", "int4", "int8a8", "int4a8")
# not in the default list: quantized experts only (attention, head in fp32), and fp32
# with every dense projection on torch's GEMM instead of the decode kernel
# with int4 groups of 128 (the default 64): a scale and a zero point per 128 weights, 12.5%
# on top of the int4 bytes instead of 25%
# int4a8-nk: W4A8 experts kept in the NK order files hold (moekit.quantize's layout="nk";
# int4a8 takes the 16-output order where AVX-512 VNNI reads it)
MOEKIT_EXTRA = ("int8-experts", "int4-experts", "int4-g128", "int4a8-g128", "int4a8-nk",
                "fp32-aten-linear")
QUANT = ("int8", "int4", "int8a8", "int4a8", "int8-experts", "int4-experts", "int4-g128",
         "int4a8-g128", "int4a8-nk")
BASELINES = ("dense-active", "dense-total", "hf-mixtral", "hf-olmoe")
# transformers' models patched with moekit.integrations.hf.apply (their own generate()),
# fp32 or quantized by moekit.quantize; each is also paired with the unpatched model
HF_PATCHED = ("hfpatch-mixtral", "hfpatch-olmoe", *(f"hfpatch-{family}-{q}" for family in
              ("mixtral", "olmoe") for q in ("int8", "int4", "int8a8", "int4a8")))
HF_IMPLS = ("grouped_mm", "batched_mm", "eager")
# --breakdown-variant: fp32 and every moekit model variant that is quantized or bf16
BREAKDOWN_VARIANTS = ("fp32", *MOEKIT_DTYPES, *(v for v in MOEKIT_EXTRA if v in QUANT))
PROMPT_LEN = 32  # prompt of each sequence while decoding (--prompt-len sets it)
PREFILL_LEN = 512
CLOCK = [time.perf_counter]  # time.thread_time under --cpu-time
# the flags whose default --quick replaces, unless given (an explicit flag wins, as in
# `moekit bench`): their parser default is None, resolved in check_args
FULL = dict(models="fine,mixtral", batches="1,4,16", hf_batches="1,8",
            variants=",".join((*MOEKIT_DTYPES, *BASELINES)), new_tokens=32, reps=4)
QUICK = dict(models="fine", batches="1,4", hf_batches="1",
             variants="bf16,int8,int4,dense-active,dense-total,hf-mixtral", new_tokens=16,
             reps=2)


# -- models ---------------------------------------------------------------------------

def lm_config(shape: str, variant: str = "fp32"):
    from moekit.models import LMConfig

    s = dict(SHAPES[shape])
    if variant == "dense-active":
        return LMConfig(**COMMON, **s, dense=True)  # FFN hidden K*F
    if variant == "dense-total":
        return LMConfig(**COMMON, **{**s, "top_k": s["num_experts"]}, dense=True)  # E*F
    return LMConfig(**COMMON, **s)


def quantize_fn():
    """moekit.quantize when this checkout has it, else None."""
    import moekit

    return getattr(moekit, "quantize", None)


def build(shape: str, variant: str, seed: int = 0):
    """The model of ``variant``; moekit variants share the fp32 anchor's weights."""
    import torch

    from moekit.models import MoETransformer

    torch.manual_seed(seed)
    if variant.startswith("dense"):
        return MoETransformer(lm_config(shape, variant)).eval()
    if variant == "fp32-aten-linear":
        variant = "fp32"
    model = MoETransformer(lm_config(shape)).eval()
    if variant == "bf16":
        return model.to(torch.bfloat16)
    if variant in QUANT:
        name, _, suffix = variant.partition("-")
        bits, scope = int(name[3]), "experts" if suffix == "experts" else "all"
        act = {"activations": "int8"} if name.endswith("a8") else {}  # W8A8, W4A8
        group = 128 if suffix == "g128" else 64
        layout = {"layout": "nk"} if suffix == "nk" else {}
        return quantize_fn()(model, bits=bits, scope=scope,
                             **({"group_size": group} if bits == 4 else {}), **act, **layout)
    if variant.startswith("hf-"):
        return hf_model(model, variant.split("-")[1])
    if variant.startswith("hfpatch-"):
        from moekit.integrations import hf

        _, family, *bits = variant.split("-")
        patched = hf.apply(hf_model(model, family))
        if not bits:
            return patched
        b = int(bits[0][3])  # int8, int4, int8a8, int4a8 (int8 activations)
        act = {"activations": "int8"} if bits[0].endswith("a8") else {}
        return quantize_fn()(patched, bits=b, **({"group_size": 64} if b == 4 else {}), **act)
    return model


def hf_model(lm, family: str):
    """transformers' Mixtral or OLMoE class holding the moekit model's weights.

    Mixtral computes the same function (moekit's converter is lossless); OLMoE
    adds RMSNorms on q and k (weights 1: same bytes and shapes, not the same function).
    """
    import transformers

    from moekit.integrations.hf.convert import mixtral_config, moekit_to_hf_tensors

    c = lm.config
    cfg_dict = mixtral_config(c.to_dict(), next(lm.parameters()).dtype)
    tensors = moekit_to_hf_tensors(cfg_dict, lm.state_dict(), layout="stacked")
    if family == "mixtral":
        cfg = transformers.MixtralConfig.from_dict(cfg_dict)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.OlmoeConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=getattr(c, "kv_heads", c.num_heads),
            max_position_embeddings=c.max_seq_len,
            num_experts=c.num_experts, num_experts_per_tok=c.top_k, norm_topk_prob=True,
            rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=None, eos_token_id=None)
        model = transformers.OlmoeForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed = {"lm_head.weight"} | {k for k in missing if k.endswith(("q_norm.weight",
                                                                       "k_norm.weight"))}
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def set_hf_impl(model, impl: str) -> None:
    model.set_experts_implementation(impl)


# -- timing one generation -------------------------------------------------------------

def prompts(B: int, L: int, seed: int = 1):
    import torch

    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def _median_step_ms(stamps: list[float]) -> float:
    deltas = [b - a for a, b in itertools.pairwise(stamps)]
    return 1e3 * statistics.median(deltas) if deltas else float("nan")


class Runner:
    """One timed generation of ``n`` new tokens per sequence for a model; returns step ms.
    A moekit model's weights are moved into huge pages first unless ``huge`` is False;
    ``kv``: its KV cache's dtype (the engine's ``kv_cache_dtype``)."""

    def __init__(self, model, ids_BL, n: int, huge: bool = True, kv: str | None = None) -> None:
        from moekit.models import MoETransformer

        self.model, self.ids, self.n = model, ids_BL, n
        self.is_moekit = isinstance(model, MoETransformer)
        if self.is_moekit:
            from moekit.hugepages import huge_pages
            from moekit.inference.engine import Engine, GenerationConfig

            if huge:  # as `moekit serve` has its weights (transformers': as allocated)
                huge_pages(model)
            self.engine = Engine(model, kv_cache_dtype=kv)
            self.cfg = GenerationConfig(max_new_tokens=n)
        self.tokens = None

    def __call__(self) -> float:
        import torch

        stamps: list[float] = []
        if self.is_moekit:
            gens, _ = self.engine.generate(
                list(self.ids), self.cfg,
                on_token=lambda s, _t: stamps.append(CLOCK[0]()) if s == 0 else None)
            self.tokens = [g.tokens for g in gens]
            return _median_step_ms(stamps)
        from transformers import LogitsProcessor, LogitsProcessorList

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(CLOCK[0]())
                return scores

        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids),
                                      max_new_tokens=self.n, min_new_tokens=self.n,
                                      do_sample=False,
                                      logits_processor=LogitsProcessorList([Clock()]))
        self.tokens = out[:, self.ids.shape[1]:].tolist()
        return _median_step_ms(stamps)


class AtenLinear(Runner):
    """A Runner whose generations run every float dense projection on torch's GEMM."""

    def __call__(self) -> float:
        from moekit.functions import decode

        keep, decode.FLOAT_KERNEL_MAX_ROWS = decode.FLOAT_KERNEL_MAX_ROWS, {}
        try:
            return super().__call__()
        finally:
            decode.FLOAT_KERNEL_MAX_ROWS = keep


def paired(anchor, other, reps: int) -> dict:
    """Alternate anchor and other (order swapped every pair); medians and the ratio."""
    anchor()
    other()  # warm-up pair
    ta, tb = [], []
    for i in range(reps):
        if i % 2:
            tb.append(other())
            ta.append(anchor())
        else:
            ta.append(anchor())
            tb.append(other())
    return {"anchor_ms": statistics.median(ta), "ms": statistics.median(tb),
            "ratio": statistics.median(b / a for a, b in zip(ta, tb, strict=True)),
            "pairs": reps}


# -- bytes a step must read --------------------------------------------------------------

def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> tuple[int, list[float]]:
    """(bytes of everything but the routed experts, bytes of one expert per MoE layer).

    Every saved tensor (parameters and quantized buffers: int8 / int4 data, scales,
    zero points) at its own element size; a tensor shared by two names (the tied
    embedding and head) once. An untied embedding table is left out: a step reads one
    row of it per sequence (negligible), not the table (at V = 151,936 it was most of
    the "bytes")."""
    from moekit.experts.experts import Experts
    from moekit.quant.layout import raw_state_dicts

    named = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    experts = [m for _, m in named]
    skip = tuple(f"{n}." for n, _ in named)
    if not getattr(model.config, "tie_embeddings", True):
        skip += ("embed.",)
    with raw_state_dicts():  # byte counts only: no NK copies of experts in the 16-output order
        state = model.state_dict()
    unique = {t.data_ptr(): t for k, t in state.items() if not k.startswith(skip)}
    rest = _bytes(unique.values())
    per = [_bytes(itertools.chain(m.parameters(), m.buffers())) / m.cfg.num_experts
           for m in experts]
    return rest, per


def distinct_experts(model, ids_BL, n: int) -> list[float]:
    """Mean distinct experts per decode step, per MoE layer (prefill excluded)."""
    from moekit.experts.experts import Experts

    seen: dict[int, list[int]] = {}
    B = ids_BL.shape[0]

    def hook(module, args):
        x_TD, dispatch = args[0], args[1]
        if x_TD.shape[0] <= B:  # a decode step (the prefill has B * prompt rows)
            seen.setdefault(id(module), []).append(int((dispatch.counts_E > 0).sum()))

    from moekit.inference.decode_plan import DecodePlan

    mods = [m for m in model.modules() if isinstance(m, Experts)]
    handles = [m.register_forward_pre_hook(hook) for m in mods]
    # the modules' path, so that the hooks see every step (DecodePlan calls the kernels
    # directly; its steps are bitwise the modules', so the same experts are routed to)
    build = DecodePlan.__dict__["build"]
    DecodePlan.build = classmethod(lambda cls, m: None)
    try:
        Runner(model, ids_BL, n)()
    finally:
        DecodePlan.build = build
        for h in handles:
            h.remove()
    return [statistics.mean(seen.get(id(m), [0])) for m in mods]


def roofline(model, ids_BL, n: int, bandwidth: float, distinct: list[float] | None) -> dict:
    """Bytes one decode step reads and the time they take at ``bandwidth`` bytes/s."""
    c = model.config
    rest, per = weight_bytes(model)
    experts = sum(d * p for d, p in zip(distinct or [], per, strict=False))
    B, S = ids_BL.shape[0], ids_BL.shape[1] + n / 2  # mean filled slots over the steps
    Dh = getattr(c, "head_size", c.dim // c.num_heads)
    width = getattr(c, "kv_heads", c.num_heads) * Dh  # J Dh per slot
    kv = c.num_layers * 2 * B * S * width * model.norm.weight.element_size()
    total = rest + experts + kv
    return {"bytes": total, "expert_bytes": experts, "other_weight_bytes": rest, "kv_bytes": kv,
            "roofline_ms": 1e3 * total / bandwidth,
            "expert_roofline_ms": 1e3 * experts / bandwidth,
            "distinct_experts_per_layer": distinct}


# -- prefill -------------------------------------------------------------------------------

def prefill_runner(model, L: int):
    import torch

    from moekit.hugepages import huge_pages
    from moekit.models.transformer import StaticKVCache

    huge_pages(model)  # as the engine has its weights
    cache = StaticKVCache.for_model(model, 1, L)
    ids = prompts(1, L, seed=2)

    def run() -> float:
        cache.reset()
        t0 = CLOCK[0]()
        with torch.inference_mode():
            model.infer(ids, cache)
        return 1e3 * (CLOCK[0]() - t0)

    return run


# -- peak RSS in a fresh process ---------------------------------------------------------

def peak_rss(shape: str, variant: str, B: int, n: int, threads: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss", shape, variant, str(B), str(n),
           "--threads", str(threads), "--prompt-len", str(PROMPT_LEN)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"  peak RSS of {variant}: subprocess failed: {out.stderr[-500:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_main(shape: str, variant: str, B: int, n: int) -> None:
    model = build(shape, variant)
    gc.collect()
    before = harness._rss_mib()
    # the build's peak from VmHWM, which exec starts afresh (ru_maxrss keeps the peak of
    # the image before exec: the benchmark's own process, several GiB, for every variant)
    build_peak = harness._peak_mib(True)
    reset = harness._reset_peak()
    Runner(model, prompts(B, PROMPT_LEN), n)()
    generate_peak = harness._peak_mib(reset)
    print(json.dumps({"resident_before_mib": round(before, 1),
                      "generate_peak_mib": round(generate_peak, 1),
                      "process_peak_mib": round(max(build_peak, generate_peak), 1)}))


# -- one model ----------------------------------------------------------------------------

BATCHED_MM_LIMIT_GIB = 1.0


def hf_impls(model, ids_BL) -> list[str]:
    """batched_mm copies one expert's weights per routed row, the prompt's rows included
    (the fine model's 16 x 32-token prefill would copy 12 GiB): only where they fit."""
    c = model.config
    E = getattr(c, "num_local_experts", None) or c.num_experts
    F = getattr(c, "moe_intermediate_size", None) or c.intermediate_size  # (Qwen3-MoE)
    per_expert = 3 * c.hidden_size * F * 4
    rows = ids_BL.numel() * c.num_experts_per_tok
    fits = rows * per_expert < BATCHED_MM_LIMIT_GIB * 2**30 and E > 0
    return [i for i in HF_IMPLS if i != "batched_mm" or fits]


def best_hf_impl(model, ids_BL, n: int) -> tuple[str, dict]:
    """transformers' fastest experts implementation here (one short generation each)."""
    times = {}
    for impl in hf_impls(model, ids_BL):
        set_hf_impl(model, impl)
        run = Runner(model, ids_BL, n)
        run()
        times[impl] = statistics.median(run() for _ in range(2))
    best = min(times, key=times.get)
    set_hf_impl(model, best)
    return best, times


def bench_model(args, shape: str, bandwidth: float, save) -> list[dict]:
    """Every row of one model; ``save(rows)`` after each batch size (a killed run keeps them)."""
    rows: list[dict] = []
    anchor_model = build(shape, "fp32")
    for B in args.batches:
        ids = prompts(B, PROMPT_LEN)
        anchor = Runner(anchor_model, ids, args.new_tokens)
        distinct = distinct_experts(anchor_model, ids, args.new_tokens)
        roof = roofline(anchor_model, ids, args.new_tokens, bandwidth, distinct)
        ms = statistics.median(anchor() for _ in range(max(2, args.reps)))
        rows.append(_row(shape, B, "moekit fp32", ms, None, roof, {}))
        for variant in args.variants:
            row = bench_variant(args, shape, B, variant, anchor_model, anchor, ids, bandwidth)
            if row is not None:
                rows.append(row)
            gc.collect()
        save(rows)
    if args.prefill:
        rows.append(bench_prefill(args, shape, anchor_model))
    return rows


def bench_variant(args, shape, B, variant, anchor_model, anchor, ids, bandwidth) -> dict | None:
    if variant in QUANT and quantize_fn() is None:
        print(f"  {variant}: skipped (moekit.quantize is not in this checkout)", flush=True)
        return None
    if variant.startswith(("hf-", "hfpatch-")) and (B not in args.hf_batches):
        return None
    model = build(shape, variant)
    extra: dict = {}
    if variant.startswith("hf-"):
        best, times = best_hf_impl(model, ids, min(8, args.new_tokens))
        extra = {"hf_impl": best, "hf_impl_ms": times}
    other = (AtenLinear if variant == "fp32-aten-linear" else Runner)(model, ids, args.new_tokens)
    r = paired(anchor, other, args.reps)
    if variant.startswith("hfpatch-"):
        extra = patched_vs_transformers(args, shape, variant, ids, other)
    roof = None
    if not variant.startswith(("hf-", "hfpatch-")):
        distinct = (distinct_experts(model, ids, args.new_tokens)
                    if not variant.startswith("dense") else [])
        roof = roofline(model, ids, args.new_tokens, bandwidth, distinct)
    if variant == "hf-mixtral" and anchor.tokens is not None and other.tokens is not None:
        extra["greedy_agreement_with_moekit"] = agreement(anchor.tokens, other.tokens)
    label = f"moekit {variant}" if variant in (*MOEKIT_DTYPES, *MOEKIT_EXTRA) else variant
    return _row(shape, B, label, r["ms"], r, roof, extra)


def patched_vs_transformers(args, shape, variant, ids, patched) -> dict:
    """The patched model against the same transformers model unpatched (its fastest
    experts implementation), paired in this run, and their greedy agreement."""
    plain = build(shape, "hf-" + variant.split("-")[1])
    best, _ = best_hf_impl(plain, ids, min(8, args.new_tokens))
    unpatched = Runner(plain, ids, args.new_tokens)
    r = paired(unpatched, patched, args.reps)
    return {"hf_impl": best, "transformers_ms": r["anchor_ms"],
            "speedup_over_transformers": 1 / r["ratio"],
            "greedy_agreement_with_transformers": agreement(unpatched.tokens, patched.tokens)}


def agreement(a_tokens: list[list[int]], b_tokens: list[list[int]]) -> float:
    """Share of positions where two generations' greedy tokens are the same."""
    same = [a == b for x, y in zip(a_tokens, b_tokens, strict=True)
            for a, b in zip(x, y, strict=False)]
    return sum(same) / max(len(same), 1)


def _row(shape, B, label, ms, pair, roof, extra) -> dict:
    row = {"model": shape, "batch": B, "variant": label, "step_ms": ms,
           "tokens_per_s": 1e3 * B / ms, **extra}
    if pair is not None:
        row.update(anchor_ms=pair["anchor_ms"], x_moekit_fp32=pair["ratio"], pairs=pair["pairs"],
                   tokens_per_s_x_fp32=1 / pair["ratio"])
    if roof is not None:
        row.update(roof)
        row["fraction_of_roofline"] = roof["roofline_ms"] / ms
    _print_row(row)
    return row


def prefill_routing(model, L: int) -> list[dict]:
    """Per MoE layer, how the prefill's routed rows spread over the experts (these
    random-weight models' routers are far from balanced)."""
    from moekit.experts.experts import Experts

    counts: dict[int, list[int]] = {}

    def hook(module, args):
        counts[id(module)] = args[1].counts_E.tolist()

    mods = [m for m in model.modules() if isinstance(m, Experts)]
    handles = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        prefill_runner(model, L)()
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in mods:
        rows = sorted(counts.get(id(m), []))
        out.append({"experts_with_rows": sum(r > 0 for r in rows),
                    "median_rows": statistics.median(rows) if rows else 0,
                    "max_rows": rows[-1] if rows else 0})
    return out


def bench_prefill(args, shape: str, anchor_model) -> dict:
    dense = build(shape, "dense-active")
    a, b = prefill_runner(anchor_model, PREFILL_LEN), prefill_runner(dense, PREFILL_LEN)
    r = paired(a, b, max(2, args.reps - 2))
    routing = prefill_routing(anchor_model, PREFILL_LEN)
    row = {"model": shape, "variant": f"prefill {PREFILL_LEN} tokens", "moekit_ms": r["anchor_ms"],
           "dense_active_ms": r["ms"], "moekit_x_dense_active": 1 / r["ratio"],
           "routing_per_layer": routing}
    print(f"{shape:8s} prefill {PREFILL_LEN} tokens, batch 1: moekit fp32 {r['anchor_ms']:.1f} ms, "
          f"dense (equal active) {r['ms']:.1f} ms, moekit x dense = {1 / r['ratio']:.2f}; "
          "rows per expert by layer (experts with rows / median / max): "
          + ", ".join(f"{x['experts_with_rows']}/{x['median_rows']:g}/{x['max_rows']}"
                      for x in routing), flush=True)
    for variant in args.prefill_variants:  # the same prefill on moekit's other weights
        other = build(shape, variant)
        p = paired(a, prefill_runner(other, PREFILL_LEN), max(2, args.reps - 2))
        row[f"{variant}_ms"], row[f"{variant}_x_fp32"] = p["ms"], p["ratio"]
        print(f"{shape:8s} prefill {PREFILL_LEN} tokens, {variant}: {p['ms']:.1f} ms against "
              f"fp32 {p['anchor_ms']:.1f} ms ({p['ratio']:.2f}x its time)", flush=True)
        del other
        gc.collect()
    return row


HEADER = (f"{'model':8s} {'B':>3s} {'variant':20s} {'step ms':>8s} {'tok/s':>8s} "
          f"{'roof ms':>8s} {'roof/step':>9s} {'x mk fp32':>9s} {'tok/s x fp32':>12s}  notes")


def _print_row(r: dict) -> None:
    roof = f"{r['roofline_ms']:8.2f} {r['fraction_of_roofline']:9.2f}" if "roofline_ms" in r \
        else f"{'-':>8s} {'-':>9s}"
    x = f"{r['x_moekit_fp32']:9.2f} {1 / r['x_moekit_fp32']:12.2f}" if "x_moekit_fp32" in r \
        else f"{'1.00':>9s} {'1.00':>12s}"
    notes = []
    if "distinct_experts_per_layer" in r and r["distinct_experts_per_layer"]:
        notes.append(f"experts/layer {statistics.mean(r['distinct_experts_per_layer']):.1f}")
    if "hf_impl" in r:
        notes.append(f"impl {r['hf_impl']}")
    if "greedy_agreement_with_moekit" in r:
        notes.append(f"tokens = moekit {100 * r['greedy_agreement_with_moekit']:.0f}%")
    if "speedup_over_transformers" in r:
        notes.append(f"{r['speedup_over_transformers']:.2f}x transformers "
                     f"({r['transformers_ms']:.2f} ms), tokens = transformers "
                     f"{100 * r['greedy_agreement_with_transformers']:.0f}%")
    print(f"{r['model']:8s} {r['batch']:3d} {r['variant']:20s} {r['step_ms']:8.2f} "
          f"{r['tokens_per_s']:8.1f} {roof} {x}  {', '.join(notes)}", flush=True)


# -- where the time goes ----------------------------------------------------------------------

def profile_step(shape: str, B: int, steps: int = 8) -> None:
    """torch.profiler over ``steps`` decode steps of moekit fp32 (prefill excluded)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moekit.models.transformer import StaticKVCache

    model = build(shape, "fp32")
    ids = prompts(B, PROMPT_LEN)
    cache = StaticKVCache.for_model(model, B, PROMPT_LEN + 2 * steps + 4)
    cache.reset()
    with torch.inference_mode():
        logits = model.infer(ids, cache)
        nxt = logits.argmax(-1)[:, None]
        for _ in range(3):
            nxt = model.infer(nxt, cache).argmax(-1)[:, None]
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                nxt = model.infer(nxt, cache).argmax(-1)[:, None]
        wall = (time.perf_counter() - t0) / steps
    print(f"profile: {shape} batch {B}, {steps} decode steps, {1e3 * wall:.2f} ms per step "
          "(profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def _timer(spent, clock):
    """timed(fn, label): fn with the ``clock`` time of each call added to spent[label]."""
    import functools

    def timed(fn, label: str):
        @functools.wraps(fn)
        def call(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += clock() - t0
        return call
    return timed


class _TimedExt:
    """The decode kernels' module with every entry timed (as ``prefix + name``)."""

    def __init__(self, ext, timed, prefix: str = "") -> None:
        self._ext, self._timed, self._prefix = ext, timed, prefix

    def __getattr__(self, name: str):
        return self._timed(getattr(self._ext, name), self._prefix + name)


def breakdown_step(shape: str, B: int, variant: str = "fp32", steps: int = 20) -> None:
    """1-thread CPU time of a decode step's parts (timers wrapped around them; a part's
    time includes the parts inside it). Small ops cost more here than alone: each
    weight stream evicts their code and data from the caches."""
    import collections

    import torch
    import torch.nn.functional as F

    import moekit.functions.decode as fd
    import moekit.layer as ly
    import moekit.models.attention as at
    import moekit.models.transformer as tr
    import moekit.routing.router as rr
    from moekit.functions import cpu_ext
    from moekit.models.transformer import StaticKVCache

    spent: collections.Counter = collections.Counter()
    timed = _timer(spent, time.thread_time_ns)
    undo = []

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        setattr(owner, name, timed(fn, label))
        undo.append((owner, name, fn))

    model = build(shape, variant)
    ids = prompts(B, PROMPT_LEN)
    cache = StaticKVCache.for_model(model, B, PROMPT_LEN + steps + 8)
    cache.reset()
    for owner, name, label in [
            (tr.RMSNorm, "forward", "RMSNorm"), (at, "apply_rotary", "rotary"),
            (tr.StaticKVCache, "write", "KV cache write"), (F, "scaled_dot_product_attention",
                                                            "attention (sdpa)"),
            (tr.Attention, "forward", "attention block (all)"),
            (torch.nn.Linear, "forward", "nn.Linear (aten)"),
            (fd, "dense_rows", "dense linears (kernel)"),  # also counted in kernel gate_up
            (rr.Router, "select", "router + top-k"), (ly, "sort_by_expert", "sort by expert"),
            (fd, "decode_rows", "experts (decode_rows)"), (ly.MoE, "infer", "MoE layer (all)")]:
        wrap(owner, name, label)
    ext = cpu_ext.get_decode()
    get = cpu_ext.get_decode
    cpu_ext.get_decode = lambda: _TimedExt(ext, timed, "kernel ")
    try:
        with torch.inference_mode():
            nxt = model.infer(ids, cache).argmax(-1)[:, None]
            for _ in range(3):
                nxt = model.infer(nxt, cache).argmax(-1)[:, None]
            spent.clear()
            t0 = time.thread_time_ns()
            for _ in range(steps):
                nxt = model.infer(nxt, cache).argmax(-1)[:, None]
            total = time.thread_time_ns() - t0
    finally:
        cpu_ext.get_decode = get
        for owner, name, fn in undo:
            setattr(owner, name, fn)
    print(f"breakdown: {shape} {variant} batch {B}, {steps} decode steps, 1 thread CPU time "
          f"{total / steps / 1e6:.2f} ms per step (load avg {os.getloadavg()[0]:.1f})")
    for label, ns in spent.most_common():
        print(f"  {label:26s} {ns / steps / 1e6:8.3f} ms  {100 * ns / total:5.1f}%")


def step_calls(shape: str, B: int, variant: str = "fp32", steps: int = 40) -> None:
    """Wall time of the parts of the engine's greedy decode steps (``DecodePlan.step``,
    what ``generate`` runs; the process's threads; each run of ``steps`` from the same
    PROMPT_LEN-token prefill, so attention reads positions PROMPT_LEN to PROMPT_LEN +
    steps): the one C++ call that runs the
    rotary rows, the embedding, the layers, the LM head and the argmax (and, from its own
    timers, the parts inside it), and the rest ("outside": Python, the timers
    themselves), beside an untimed step of the same model."""
    import collections

    import torch

    import moekit.inference.decode_plan as dp
    from moekit.hugepages import huge_pages
    from moekit.models.transformer import StaticKVCache

    model = build(shape, variant)
    huge_pages(model)  # as the engine has its weights (the Runner's and `moekit serve`'s)
    plan = dp.DecodePlan.build(model)
    if plan is None:
        print(f"step calls: {shape} {variant}: no decode plan for this model")
        return
    cache = StaticKVCache.for_model(model, B, PROMPT_LEN + steps + 1)
    ids = prompts(B, PROMPT_LEN)
    spent: collections.Counter = collections.Counter()
    timed = _timer(spent, time.perf_counter_ns)
    call = "the step's one C++ call"

    class _Native:  # DecodeStep is a C++ class: its step is wrapped, not patched
        def __init__(self, native) -> None:
            self.bind, self.step = native.bind, timed(native.step, call)

    def run_steps():  # each run from the same prefill: the steps read the same positions
        cache.reset()
        nxt = model.infer(ids, cache).argmax(-1)[:, None]
        t0 = time.perf_counter_ns()
        for _ in range(steps):
            nxt = plan.step(nxt, cache, greedy=True)[:, None]
        return (time.perf_counter_ns() - t0) / steps

    with torch.inference_mode():
        cache.reset()
        if plan.step(model.infer(ids, cache).argmax(-1)[:, None], cache, greedy=True) is None:
            print(f"step calls: {shape} {variant} batch {B}: the decode plan declines these "
                  "steps (a part leaves the kernels at this batch, e.g. bf16 projections of "
                  "more than 8 rows without AMX)")
            return
        run_steps()  # warm-up
        plain = run_steps()
        native, plan.native = plan.native, _Native(plan.native)
        native.set_timing(True)
        try:
            total = run_steps()
        finally:
            native.set_timing(False)
            plan.native = native
    inside = [(part, ns) for part, ns in native.times() if ns]
    print(f"step calls: {shape} {variant} batch {B}, {steps} steps, {torch.get_num_threads()} "
          f"threads: {plain / 1e6:.3f} ms per step untimed, {total / 1e6:.3f} ms timed")
    for label, ns in [*spent.most_common(), ("outside", total * steps - sum(spent.values()))]:
        print(f"  {label:30s} {ns / steps / 1e6:8.3f} ms  {100 * ns / steps / total:5.1f}%")
        if label == call:
            for part, part_ns in [*sorted(inside, key=lambda p: -p[1]),
                                  ("(the call's own)", ns - sum(n for _, n in inside))]:
                print(f"    {part:28s} {part_ns / steps / 1e6:8.3f} ms  "
                      f"{100 * part_ns / steps / total:5.1f}%")


# -- main ---------------------------------------------------------------------------------

def count_ops(shape: str, B: int, variant: str = "fp32") -> None:
    """The aten ops one decode step dispatches (Python and C++ callers alike), counted by
    the innermost moekit line that issued them (transformers' where no moekit line is on
    the stack: an ``hfpatch-*`` variant): a step's fixed cost, independent of load."""
    import collections
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    model = build(shape, variant)
    with torch.inference_mode():  # the prompt too (quantized experts have no backward)
        step, advance = (_hf_steps if variant.startswith("hfpatch-") else _moekit_steps)(
            model, B)
    counts: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            stack = traceback.extract_stack()
            here = ([f for f in stack if "/moekit/" in f.filename]
                    or [f for f in stack if "/transformers/" in f.filename])
            where = here[-1].filename if here else "?"
            where = (where.split("/moekit/")[-1] if "/moekit/" in where
                     else "transformers/" + where.split("/transformers/")[-1])
            site = f"{where}:{here[-1].lineno}" if here else "?"
            counts[(str(func), site)] += 1
            return func(*args, **(kwargs or {}))

    with torch.inference_mode():
        for _ in range(2):  # warm (lazy builds, caches)
            step()
            advance()
        with Count():
            step()
    print(f"ops: {shape} {variant} batch {B}: {sum(counts.values())} aten ops per decode step")
    for (func, site), n in counts.most_common():
        print(f"{n:5d}  {func:44s} {site}")


def _moekit_steps(model, B: int):
    """(step, advance) for a moekit model after a prompt: ``step`` runs one decode step
    (``model.infer``), ``advance`` feeds its greedy token to the next."""
    import torch

    from moekit.models.transformer import StaticKVCache

    with torch.inference_mode(False):  # a cache of ordinary tensors, as the engine's
        cache = StaticKVCache.for_model(model, B, PROMPT_LEN + 8)
        cache.reset()
    state = {"logits": model.infer(prompts(B, PROMPT_LEN), cache)}

    def advance():
        state["ids"] = state["logits"].argmax(-1)[:, None]

    def step():
        state["logits"] = model.infer(state["ids"], cache)
    advance()
    return step, advance


def _hf_steps(model, B: int):
    """(step, advance) for a transformers model after a prompt: ``step`` runs its forward
    with its KV cache (as generate does), ``advance`` feeds its greedy token to the next."""
    state = {"out": model(prompts(B, PROMPT_LEN), use_cache=True)}

    def advance():
        state["ids"] = state["out"].logits[:, -1:].argmax(-1)
        state["cache"] = state["out"].past_key_values

    def step():
        state["out"] = model(state["ids"], past_key_values=state["cache"], use_cache=True)
    advance()
    return step, advance


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fine model, batch 1 and 4, 16 tokens, 2 pairs, Mixtral class only "
                   "(--models, --batches, --hf-batches, --variants, --new-tokens, --reps "
                   "given as well win)")
    p.add_argument("--models", default=None,
                   help=f"comma list of fine, mixtral (default {FULL['models']})")
    p.add_argument("--batches", default=None,
                   help=f"comma list of batch sizes (default {FULL['batches']})")
    p.add_argument("--hf-batches", default=None,
                   help=f"batches that also time transformers (default {FULL['hf_batches']})")
    p.add_argument("--variants", default=None,
                   help="comma list of bf16, int8, int4, int8a8 / int4a8 (int8 activations), "
                   "int8-experts, int4-experts, int4-g128 / int4a8-g128 (groups of 128), "
                   "int4a8-nk (W4A8 experts in NK order, not the 16-output one), "
                   "fp32-aten-linear, dense-active, dense-total, "
                   "hf-mixtral, hf-olmoe, hfpatch-{mixtral,olmoe}[-int8|-int4|-int8a8|-int4a8] "
                   "(transformers patched by moekit, also paired with the unpatched model; "
                   f"default {FULL['variants']})")
    p.add_argument("--new-tokens", type=int, default=None,
                   help=f"tokens per timed generation (default {FULL['new_tokens']})")
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN,
                   help="prompt tokens of each sequence before its timed decode steps (the "
                   f"KV cache the steps read; default {PROMPT_LEN}; prompt + new tokens <= "
                   f"{COMMON['max_seq_len']})")
    p.add_argument("--reps", type=int, default=None,
                   help=f"A/B pairs per variant (median; default {FULL['reps']})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--cpu-time", action="store_true",
                   help="1 thread, steps timed by the main thread's CPU time (loaded machine)")
    p.add_argument("--no-prefill", dest="prefill", action="store_false")
    p.add_argument("--prefill-variants", default="",
                   help=f"comma list of {', '.join(MOEKIT_DTYPES)}, int4a8-nk: their prefill "
                        "against fp32's too (paired)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the fresh-process peak RSS runs")
    p.add_argument("--profile", action="store_true", help="profile decode steps and exit")
    p.add_argument("--breakdown", action="store_true",
                   help="1-thread CPU time of a decode step's parts (batch 1, 8, 16) and exit")
    p.add_argument("--breakdown-variant", default="fp32",
                   help="the moekit model --breakdown / --step-calls time, one of "
                        f"{', '.join(BREAKDOWN_VARIANTS)} (default fp32)")
    p.add_argument("--step-calls", action="store_true",
                   help="wall time of the calls in the engine's decode steps (--threads, "
                   "--batches, --models' first, --breakdown-variant's model) and exit")
    p.add_argument("--ops", action="store_true",
                   help="count the aten ops of one decode step by call site (batches; the "
                   "fp32 model and the hfpatch-* of --variants) and exit")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="moekit.tune_malloc's settings (what `moekit generate` runs with; "
                        "no page faults on either side of an A/B) or glibc's defaults")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed flags checked and resolved, in a new namespace: --quick's choices where
    no flag was given (an explicit --models, --batches, --hf-batches, --variants,
    --new-tokens or --reps wins), lists parsed, an entry given twice refused. ValueError
    naming the first bad flag, its value and what is allowed; nothing is built, timed or
    written before it returns."""
    from moekit.config import check_positive_int, reject

    a = argparse.Namespace(**vars(args))
    preset = QUICK if a.quick else FULL
    quick_variants = a.quick and a.variants is None
    for name, value in preset.items():
        if getattr(a, name) is None:  # None: not given (the parser's default)
            setattr(a, name, value)
    harness.check_flags(a.threads, a.reps, a.out)
    check_positive_int("--prompt-len", a.prompt_len, COMMON["max_seq_len"] - 1)
    check_positive_int("--new-tokens", a.new_tokens, COMMON["max_seq_len"] - a.prompt_len)
    a.models = _names("--models", a.models, tuple(SHAPES))
    if a.breakdown_variant not in BREAKDOWN_VARIANTS:
        reject("--breakdown-variant", a.breakdown_variant,
               f"it must be one of {', '.join(BREAKDOWN_VARIANTS)}")
    a.variants = _names("--variants", a.variants,
                        (*MOEKIT_DTYPES, *MOEKIT_EXTRA, *BASELINES, *HF_PATCHED))
    a.prefill_variants = (_names("--prefill-variants", a.prefill_variants,
                                 (*MOEKIT_DTYPES, "int4a8-nk"))
                          if a.prefill_variants else [])
    a.batches, a.hf_batches = _sizes("--batches", a.batches), _sizes("--hf-batches", a.hf_batches)
    a.own_batches = list(a.batches)  # --step-calls and --ops: these alone
    a.batches += [b for b in a.hf_batches if b not in a.batches]  # both lists: timed once
    # the variants whose peak RSS is measured: --quick's own list skips transformers'
    a.memory_variants = [v for v in a.variants if not (quick_variants and v.startswith("hf-"))]
    return a


def _names(flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    from moekit.bench import refuse_repeats
    from moekit.config import reject

    if any(v not in allowed for v in value.split(",")):
        reject(flag, value, f"it must be a comma list of {', '.join(allowed)}")
    refuse_repeats(flag, value, value.split(","))
    return value.split(",")


def _sizes(flag: str, value: str) -> list[int]:
    from moekit.bench import refuse_repeats
    from moekit.config import reject

    try:
        sizes = [int(b) for b in value.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        reject(flag, value, "it must be a comma list of positive ints")
    refuse_repeats(flag, value, sizes)
    return sizes


def memory_rows(args) -> list[dict]:
    rows = []
    variants = ["fp32", *[v for v in args.memory_variants
                          if not (v in QUANT and quantize_fn() is None)]]
    print("\npeak RSS, fresh process, batch 1 (generate = peak while generating, VmHWM reset "
          "after the build; process = whole-process peak)")
    for shape in args.models:
        for v in variants:
            r = peak_rss(shape, v, 1, args.new_tokens, args.threads)
            if r is not None:
                rows.append({"model": shape, "variant": v, **r})
                print(f"{shape:8s} {v:14s} generate {r['generate_peak_mib']:8.0f} MiB  "
                      f"process {r['process_peak_mib']:8.0f} MiB", flush=True)
    return rows


def read_bandwidth(reps: int = 5) -> float:
    """harness.read_bandwidth (the faster of 4 KiB and huge pages; its 4 KiB reading is
    kept in BW_4K), timed by the steps' clock (under --cpu-time the thread's CPU time)."""
    both = harness.read_bandwidths(reps, CLOCK[0])
    BW_4K.append(both["4k"])
    return max(b for b in both.values() if b is not None)


BW_4K: list[float] = []  # the 4 KiB pages' readings of read_bandwidth, in order


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for flags that ``check_args`` returned (``moekit bench --decode``
    calls it)."""
    global PROMPT_LEN
    harness.use_malloc(args.malloc)  # may re-exec this process
    import torch

    PROMPT_LEN = args.prompt_len

    if args.cpu_time:
        args.threads, CLOCK[0] = 1, time.thread_time
    torch.set_num_threads(args.threads)
    if args.breakdown:
        torch.set_num_threads(1)
        for B in (1, 8, 16):
            breakdown_step(args.models[0], B, args.breakdown_variant)
        return 0
    if args.step_calls:
        for B in args.own_batches:
            step_calls(args.models[0], B, args.breakdown_variant)
        return 0
    if args.ops:
        for B in args.own_batches:
            for variant in ("fp32", *(v for v in args.variants if v.startswith("hfpatch-"))):
                count_ops(args.models[0], B, variant)
        return 0
    if args.profile:
        for B in (1, 16):
            profile_step(args.models[0], B)
        return 0
    info = harness.machine()
    bw = [read_bandwidth()]
    print(f"bench_decode  torch {info['torch']}  {info['threads']} threads  {info['cpu']} "
          f"({info['cpu_id']})  malloc: {info['malloc']}  load avg {info['load_average_1m']}  "
          f"read bandwidth "
          f"{bw[0] / 1e9:.1f} GB/s (1 GiB sum, the faster of huge and 4 KiB pages; 4 KiB pages "
          f"{BW_4K[-1] / 1e9:.1f})  {harness.compute_phrase(info['compute'])}  "
          f"{args.new_tokens} new tokens after a "
          f"{PROMPT_LEN}-token prompt, greedy, median of {args.reps} A/B pairs"
          + ("; step times are 1-thread CPU time" if args.cpu_time else ""))
    if quantize_fn() is None:
        print("note: moekit.quantize is not in this checkout: int8 and int4 are skipped")
    print("x mk fp32 = median over pairs of (variant step / moekit fp32 step); roof/step = "
          "roofline time / step time")
    print(HEADER)
    rows, t0 = [], time.time()
    for shape in args.models:
        rows += bench_model(args, shape, bw[0], lambda new, done=rows: _write(
            args, info, bw, done + new, [], time.time() - t0))
        gc.collect()
        bw.append(read_bandwidth())
        _write(args, info, bw, rows, [], time.time() - t0)  # what there is so far
    mem = memory_rows(args) if args.memory else []
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    info["bandwidth_note"] = bandwidth_note(bw)
    info["compute_end"] = harness.compute_probe()
    info["compute_note"] = compute_note(info["compute"], info["compute_end"])
    _write(args, info, bw, rows, mem, time.time() - t0)
    print(f"\nread bandwidth over the run: {', '.join(f'{b / 1e9:.1f}' for b in bw)} GB/s; "
          f"{harness.compute_phrase(info['compute_end'])} at the end; "
          f"load avg at the end {info['load_average_1m_end']}; wrote {args.out}")
    for note in (info["bandwidth_note"], info["compute_note"]):
        if note:
            print(note)
    return 0


BW_SPREAD = 1.15  # largest / smallest bandwidth reading of a run past which it is flagged


def bandwidth_note(bw: list[float]) -> str:
    """A warning when the read bandwidth moved during the run, else "". On a VM whose
    neighbours come and go it moved 33-65 GB/s within minutes: the fp32 anchor's step
    follows it, steps bound by their instructions (int8 / int4) do not, so their ratios to
    fp32 changed by up to 1.5x between runs."""
    if len(bw) < 2 or max(bw) <= BW_SPREAD * min(bw):
        return ""
    return (f"note: the read bandwidth moved between {min(bw) / 1e9:.1f} and "
            f"{max(bw) / 1e9:.1f} GB/s during this run; ratios to fp32 of variants not "
            "bound by it (int8, int4) move with it: compare each row's anchor_ms in the "
            "JSON, or run again")


def compute_note(start: dict, end: dict) -> str:
    """A warning when the compute probe's rate on the run's threads moved by more than
    BW_SPREAD between the start and the end of the run, else ""."""
    a, b = start["gemm_gmacs"], end["gemm_gmacs"]
    if max(a, b) <= BW_SPREAD * min(a, b):
        return ""
    return (f"note: the fp32 GEMM rate moved from {a:.0f} to {b:.0f} GMAC/s during this run; "
            "rows bound by instructions (int8 / int4 at batch 16, prefill) move with it: "
            "compare each row's anchor_ms in the JSON, or run again")


def _write(args, info, bw, rows, mem, seconds) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if not args.out:
        kind = "quick" if args.quick else "full"
        args.out = str(Path(__file__).resolve().parent / "results"
                       / f"bench_decode_{kind}_{stamp}.json")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(path, {"machine": info, "command": " ".join(sys.argv),
                              "seconds": round(seconds, 1), "read_bandwidth_Bps": bw,
                              "read_bandwidth_4k_pages_Bps": BW_4K,
                              "args": vars(args), "rows": rows, "peak_rss": mem},
                       indent=1, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        args = check_args(p.parse_args(argv))
    except ValueError as e:
        print(f"bench_decode.py: error: {e}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--rss":
        import torch

        torch.set_num_threads(int(sys.argv[7]) if len(sys.argv) > 7 else 2)
        PROMPT_LEN = int(sys.argv[9]) if len(sys.argv) > 9 else PROMPT_LEN
        _rss_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
