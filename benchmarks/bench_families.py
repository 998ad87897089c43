"""Converted Qwen3-MoE, OLMoE and Qwen2-MoE checkpoints: moekit's engine against
transformers' generate().

A random transformers model of each family, saved with ``save_pretrained`` (as a
downloaded checkpoint is read) and converted by ``moekit convert`` (``hf_to_moekit``:
the same function, q / k norms and all). Per family and batch: decode ms/token of
moekit's generation engine and of transformers' ``generate()`` (its fastest experts
implementation here), alternating (bench_decode's ``paired``, median of the per-pair
ratios), and the share of greedy tokens the two agree on; and what the family's extras
cost a moekit decode step (q / k norms; Qwen2-MoE's shared expert, its gate and the q / k
/ v biases): the converted model against its twin without them (the same other weights;
not the same function), alternating likewise.

    python benchmarks/bench_families.py [--reps 5] [--new-tokens 24] [--families ...]
        [--out FILE]

Shapes: bench_decode's fine model (D=1024, 4 layers, 64 experts top-8, F=512, V=256),
fp32, prompts of 32 tokens. Qwen3-MoE as Qwen3-30B-A3B lays it out: 16 query heads and
4 key/value heads of 128 (q is 2D wide), per-head q / k norms, top-k weights
renormalized. OLMoE: 16 heads of 64, q / k norms over all heads, top-k weights as the
softmax gives them. Qwen2-MoE as Qwen1.5-MoE-A2.7B lays it out: 16 heads of 64 with q / k
/ v biases, a gated shared expert 4 F wide, top-k weights as the softmax gives them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
from harness import pairs_main  # noqa: E402
from moekit.integrations.hf.convert import hf_to_moekit  # noqa: E402
from moekit.models import LMConfig, MoETransformer  # noqa: E402
from moekit.train.checkpoint import load_checkpoint, restore  # noqa: E402

BATCHES = (1, 8)
SHAPE = dict(vocab_size=256, hidden_size=1024, num_hidden_layers=4, num_experts=64,
             num_experts_per_tok=8, max_position_embeddings=1024, pad_token_id=0,
             bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)


def hf_family(name: str):
    """The transformers model (fp32, random, norms not ones)."""
    import transformers

    torch.manual_seed(0)
    if name == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**SHAPE, num_attention_heads=16, num_key_value_heads=16,
                                          moe_intermediate_size=512, intermediate_size=4096,
                                          shared_expert_intermediate_size=2048,
                                          norm_topk_prob=False)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    elif name == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**SHAPE, num_attention_heads=16, num_key_value_heads=4,
                                          head_dim=128, moe_intermediate_size=512,
                                          intermediate_size=4096, norm_topk_prob=True)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.OlmoeConfig(**SHAPE, num_attention_heads=16, num_key_value_heads=16,
                                       intermediate_size=512, norm_topk_prob=False)
        model = transformers.OlmoeForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("proj.bias"):  # zeros would hide a bias left out
                p.uniform_(-0.5, 0.5)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def converted(hf_model, root: Path) -> tuple[MoETransformer, float]:
    """(moekit's model of the saved directory, seconds the conversion took)."""
    hf_model.save_pretrained(root / "hf")
    t0 = time.perf_counter()
    hf_to_moekit(root / "hf", root / "lm")
    seconds = time.perf_counter() - t0
    ckpt = load_checkpoint(root / "lm", optimizer=False)
    model = MoETransformer(LMConfig.from_dict(ckpt.state["model_config"]))
    restore(ckpt, model, rng=False)
    return model.eval(), seconds


# what each family's twin leaves out (LMConfig changes), and the tensors that go with it
EXTRAS = {
    "qwen3_moe": (dict(qk_norm="none"), ("q_norm.weight", "k_norm.weight")),
    "olmoe": (dict(qk_norm="none"), ("q_norm.weight", "k_norm.weight")),
    "qwen2_moe": (dict(qkv_bias=False, num_shared_experts=0, shared_ffn_dim=None,
                       shared_expert_gate=False), ("qkv.bias", "shared.w_in", "shared.w_out",
                                                   "shared.gate")),
}


def twin_without_extras(model: MoETransformer, name: str) -> MoETransformer:
    changes, names = EXTRAS[name]
    twin = MoETransformer(model.config.replace(**changes))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(names)})
    return twin.eval()


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.families:
        hf = hf_family(name)
        with tempfile.TemporaryDirectory() as tmp:
            lm, seconds = converted(hf, Path(tmp))
        twin = twin_without_extras(lm, name)
        for B in BATCHES:
            ids = bd.prompts(B, bd.PROMPT_LEN)
            impl, _ = bd.best_hf_impl(hf, ids, min(8, args.new_tokens))
            theirs, ours = bd.Runner(hf, ids, args.new_tokens), bd.Runner(lm, ids, args.new_tokens)
            r = bd.paired(theirs, ours, args.reps)
            bare = bd.Runner(twin, ids, args.new_tokens)
            q = bd.paired(bare, ours, args.reps)
            rows.append({"family": name, "B": B, "convert_s": round(seconds, 2),
                         "hf_impl": impl, "transformers_ms": r["anchor_ms"], "moekit_ms": r["ms"],
                         "speedup_over_transformers": 1 / r["ratio"],
                         "greedy_agreement": bd.agreement(theirs.tokens, ours.tokens),
                         "without": "+".join(EXTRAS[name][1]), "without_ms": q["anchor_ms"],
                         "with_over_without": q["ratio"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--families", nargs="+", choices=tuple(EXTRAS), default=tuple(EXTRAS),
                       help="which (default: all)")
    return pairs_main(argv, __doc__, "bench_families", 5, run, add)


if __name__ == "__main__":
    sys.exit(main())
