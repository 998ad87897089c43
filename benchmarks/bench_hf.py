"""One training step (forward + backward) of transformers MoE models, moekit-patched vs not.

For each size, the unpatched model runs transformers' experts implementations
(grouped_mm always; eager up to 32 experts, batched_mm where its per-row weight
copies fit in 1 GiB) and the patched model runs moekit with each ``--backends``
entry ("auto" = the fastest moekit backend for the shapes). Steps alternate
within one process (each moekit backend, then each transformers
implementation, round after round); a printed speedup is the median over
rounds of (transformers time / moekit time), against the transformers
implementation with the lowest median time.

    PYTHONPATH=src python benchmarks/bench_hf.py            # all sizes
    PYTHONPATH=src python benchmarks/bench_hf.py --quick    # 2 small sizes, few rounds
    PYTHONPATH=src python benchmarks/bench_hf.py --dtype bf16 # bf16 parameters throughout

Shape letters: B sequences, L tokens per sequence, T = B*L, D hidden, F expert
hidden, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from moekit.integrations import hf


@dataclass(frozen=True)
class Size:
    arch: str
    D: int
    F: int
    E: int
    K: int
    B: int = 2
    L: int = 512

    @property
    def label(self) -> str:
        return f"{self.arch} T{self.B * self.L} D{self.D} F{self.F} E{self.E} K{self.K}"


SIZES = [
    Size("mixtral", D=256, F=512, E=8, K=2),  # coarse-grained
    Size("gpt_oss", D=256, F=256, E=32, K=4),  # biases, interleaved clamped SwiGLU
    Size("qwen3_moe", D=256, F=128, E=64, K=8),  # fine-grained
    Size("olmoe", D=256, F=128, E=64, K=8),
    Size("deepseek_v3", D=256, F=128, E=64, K=8),  # sigmoid, 8 groups, shared expert
    Size("qwen3_moe", D=256, F=64, E=128, K=8),
    Size("llama4", D=256, F=512, E=16, K=1),  # transformers runs all E experts on every token
]
ONLY_HELP = "run only the sizes whose label contains this text (e.g. deepseek)"
QUICK = [Size("mixtral", D=128, F=256, E=8, K=2, L=256),
         Size("qwen3_moe", D=128, F=64, E=64, K=8, L=256)]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(s: Size, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    common = dict(vocab_size=512, hidden_size=s.D, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=s.D // 4, max_position_embeddings=s.L,
                  num_experts_per_tok=s.K, pad_token_id=0, eos_token_id=None)
    if s.arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=s.F, num_local_experts=s.E)
    elif s.arch == "gpt_oss":
        cfg = transformers.GptOssConfig(**common, intermediate_size=s.F, num_local_experts=s.E,
                                        layer_types=["full_attention"] * 2,
                                        rope_parameters={"rope_type": "default",
                                                         "rope_theta": 1e4})
    elif s.arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=4 * s.D,
                                          moe_intermediate_size=s.F, num_experts=s.E)
    elif s.arch == "olmoe":
        cfg = transformers.OlmoeConfig(**common, intermediate_size=s.F, num_experts=s.E)
    elif s.arch == "llama4":  # every layer MoE, the shared expert as wide as an expert
        cfg = transformers.Llama4TextConfig(**common, intermediate_size=s.F,
                                            intermediate_size_mlp=s.F, num_local_experts=s.E,
                                            interleave_moe_layer_step=1)
    else:
        cfg = transformers.DeepseekV3Config(  # MLA: head_dim is the rotary part of a head
            **{**common, "head_dim": 32}, intermediate_size=4 * s.D, moe_intermediate_size=s.F,
            n_routed_experts=s.E, n_shared_experts=1, n_group=8, topk_group=4,
            first_k_dense_replace=0, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=32,
            qk_nope_head_dim=32, v_head_dim=64)
    cls = {"mixtral": transformers.MixtralForCausalLM, "gpt_oss": transformers.GptOssForCausalLM,
           "qwen3_moe": transformers.Qwen3MoeForCausalLM, "olmoe": transformers.OlmoeForCausalLM,
           "deepseek_v3": transformers.DeepseekV3ForCausalLM,
           "llama4": transformers.Llama4ForCausalLM}[s.arch]
    torch.manual_seed(0)
    return cls(cfg).to(dtype).train()


def step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(wall, process CPU) seconds for forward + loss + backward.

    CPU time is printed beside wall time: on a shared 2-core machine a step
    that loses the cores for a while shows it in wall time only.
    """
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def hf_impls(s: Size) -> list[str]:
    """grouped_mm is transformers' default and its fastest here. eager loops over experts in
    Python (29.9 s vs grouped_mm's 15.0 s at gpt_oss E32 in this benchmark; 5-112x a dense
    FFN at 64 experts in DESIGN.md), so it is timed only up to 32 experts; batched_mm
    copies one weight matrix per routed row, so only where those fit in 1 GiB. Llama 4's
    experts have one implementation ("eager" here: a bmm of every expert over every token)."""
    if s.arch == "llama4":
        return ["eager"]
    gathered = s.B * s.L * s.K * 3 * s.D * s.F * 4
    return (["grouped_mm"] + (["eager"] if s.E <= 32 else [])
            + (["batched_mm"] if gathered < 2**30 else []))


def bench(s: Size, rounds: int, backends: list[str], dtype: torch.dtype) -> dict:
    base = build(s, dtype)
    ids = torch.randint(3, 512, (s.B, s.L), generator=torch.Generator().manual_seed(0))
    models = {f"moekit:{b}": hf.apply(copy.deepcopy(base), backend=b) for b in backends}
    for impl in hf_impls(s):
        m = copy.deepcopy(base)
        if s.arch != "llama4":
            m.set_experts_implementation(impl)
        models[f"hf:{impl}"] = m
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        step(m, ids)
    for _ in range(rounds):
        for k, m in models.items():
            w, c = step(m, ids)
            wall[k].append(w)
            cpu[k].append(c)

    def ratio(t: dict[str, list[float]], mine: str, theirs: str) -> float:
        return statistics.median(b / a for a, b in zip(t[mine], t[theirs], strict=True))

    hf_keys = [k for k in models if k.startswith("hf:")]
    best = min(hf_keys, key=lambda k: statistics.median(wall[k]))
    return {"size": s.label, "median_ms": {k: 1e3 * statistics.median(v) for k, v in wall.items()},
            "best_hf": best,
            "speedup_vs_best": {b: ratio(wall, f"moekit:{b}", best) for b in backends},
            "cpu_speedup_vs_best": {b: ratio(cpu, f"moekit:{b}", best) for b in backends}}


def machine(dtype: str = "fp32") -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if ln.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor()
    return (f"torch {torch.__version__}  transformers {transformers.__version__}  "
            f"{torch.get_num_threads()} threads  {cpu}  {dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds (default 7; 3 with --quick)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated moekit backends to time (e.g. auto,grouped_mm)")
    parser.add_argument("--only", default="", help=ONLY_HELP)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="parameter dtype of every model (bf16: a pure bf16 step)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    backends = args.backends.split(",")
    sizes, rounds = (QUICK, 3) if args.quick else (SIZES, 7)
    if args.rounds is not None:  # given: it wins over --quick's 3 (it had been ignored)
        if args.rounds < 1:
            parser.error(f"--rounds={args.rounds} is not allowed: it must be >= 1")
        rounds = args.rounds
    sizes = [s for s in sizes if args.only in s.label]
    print(f"bench_hf  {machine(args.dtype)}  fwd+bwd, 2 layers, "
          f"median of {rounds} alternating rounds")
    head = "".join(f" {'moekit ' + b:>16} {'x best':>6} {'(cpu)':>6}" for b in backends)
    print(f"{'config':<36} {'hf grouped':>10} {'hf eager':>9} {'hf batched':>10}{head}")
    results = []
    for s in sizes:
        r = bench(s, rounds, backends, DTYPES[args.dtype])
        results.append(r)
        ms = r["median_ms"]
        cols = [ms.get(f"hf:{k}") for k in ("grouped_mm", "eager", "batched_mm")]
        hf_s = " ".join(f"{c:{w}.0f}" if c is not None else f"{'-':>{w}}"
                        for c, w in zip(cols, (10, 9, 10), strict=True))
        mine = "".join(f" {ms[f'moekit:{b}']:16.0f} {r['speedup_vs_best'][b]:6.2f} "
                       f"{r['cpu_speedup_vs_best'][b]:6.2f}" for b in backends)
        print(f"{r['size']:<36} {hf_s}{mine}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from harness import write_json  # benchmarks/harness.py, beside this file

        write_json(args.json, {"machine": machine(args.dtype), "rounds": rounds,
                               "results": results}, indent=1)


if __name__ == "__main__":
    main()
