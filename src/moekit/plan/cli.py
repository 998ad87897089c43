"""`moekit plan`: parameters, FLOPs, memory, communication, time and energy of a run."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from moekit.config import check_number, flag_message, reject
from moekit.plan.cluster import (
    GPUS,
    PLAN_DISPATCHERS,
    PRECISIONS,
    RECOMPUTE,
    Cluster,
    Layout,
    TrainSetup,
    get_gpu,
)
from moekit.plan.cost import Plan, make_plan
from moekit.plan.decode import (
    KV_CACHE_DTYPES,
    decode_cost,
    decode_table,
    expert_shares_from_routing,
)
from moekit.plan.decode import SCOPES as DECODE_SCOPES
from moekit.plan.decode import WEIGHTS as DECODE_WEIGHTS
from moekit.plan.hf import model_file, read_spec_file, spec_from_dict
from moekit.plan.presets import PRESETS, get_preset, longest_context
from moekit.plan.report import plan_table, search_table
from moekit.plan.search import search
from moekit.plan.spec import ModelSpec, check_int, fail

# A realistic default instead of 100% of peak: DeepSeek reported 180K H800 GPU-hours per
# trillion tokens for DeepSeek-V3, 39% of the bf16 peak at the planner's FLOPs per token.
DEFAULT_EFFICIENCY = 0.39
# --seq-len and --context where not given (or the model's longest context, if shorter)
DEFAULT_LENGTH = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a JSON file (a "
                   "transformers config.json, a ModelSpec, a moekit LMConfig or MoEConfig), "
                   "a moekit checkpoint directory or a transformers model directory (its "
                   "config.json)")
    g = p.add_argument_group("cluster")
    g.add_argument("--gpu", default="h100", help=f"GPU preset: {', '.join(GPUS)}")
    g.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    g.add_argument("--gpus-per-node", type=int, default=8)
    for flag, what in (("--peak-tflops", "dense bf16 TFLOP/s"), ("--memory-gb", "GB per GPU"),
                       ("--hbm-tbps", "HBM TB/s"), ("--intra-gbps", "GB/s per direction"),
                       ("--inter-gbps", "GB/s per direction"), ("--power-w", "W per GPU")):
        g.add_argument(flag, type=float, default=None, help=f"override the preset's {what}")
    lay = p.add_argument_group(
        "layout", "default: tp 1, pp 1, dp = GPUs / (tp * pp), ep = gcd(dp, E), ZeRO 1, no "
        "recomputation, micro-batch 1. With --search, every layout flag given restricts the "
        "search to layouts with that value (e.g. --search --tp 8 ranks only tp 8 layouts); "
        "a value no searched layout can have is an error")
    for flag in ("--dp", "--tp", "--pp", "--ep"):
        lay.add_argument(flag, type=int, default=None)
    lay.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 (default 1)")
    lay.add_argument("--recompute", default=None,
                     help=f"one of {', '.join(RECOMPUTE)} (default none)")
    lay.add_argument("--micro-batch", type=int, default=None,
                     help="sequences per forward (default 1; --search: 1, 2, 4, 8)")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence: at most the model's longest context (its "
                   "config's max_seq_len or max_position_embeddings, where it says); "
                   f"default {DEFAULT_LENGTH}, or that longest where it is shorter")
    t.add_argument("--global-batch", type=int, default=1024, help="sequences per step")
    t.add_argument("--precision", default="bf16-mixed", help=", ".join(PRECISIONS))
    t.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                   help=f"fraction of peak FLOP/s reached (default {DEFAULT_EFFICIENCY}: "
                   "DeepSeek-V3's reported 1,543 tokens/s per H800 at 2.5e11 FLOPs/token; "
                   "1.0 = roofline)")
    t.add_argument("--joules-per-flop", type=float, default=None,
                   help="default: the GPU's board power / peak FLOP/s")
    t.add_argument("--a2a-overlap", type=float, default=0.0,
                   help="fraction of the all-to-all hidden behind compute (0-1)")
    t.add_argument("--dispatcher", default="all_to_all", choices=PLAN_DISPATCHERS,
                   help="all_to_all: a row per routed expert (default); all_to_all_dedup: a "
                        "row per token and destination rank")
    t.add_argument("--capacity-factor", default=None, metavar="FACTOR",
                   help="capacity mode: each expert takes C = ceil(FACTOR * T * K / E) of a "
                   "rank's T tokens, and expert parallelism sends and computes the whole "
                   "[E, C, D] buffers, padding included (all_to_all only); 'none': dropless. "
                   "Default: the model's own (a moekit config's capacity_factor), else "
                   "dropless")
    t.add_argument("--memory-headroom", type=float, default=0.1,
                   help="fraction of GPU memory kept free (context, buffers, fragmentation)")
    p.add_argument("--search", action="store_true",
                   help="rank the layouts that fit; the layout flags given (--dp, --tp, "
                   "--pp, --ep, --zero, --recompute, --micro-batch) restrict it to layouts "
                   "with those values")
    p.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    d = p.add_argument_group(
        "decode", "--decode: the memory of decoding on one machine (weights and KV cache) "
        "and the bytes a decode step reads, with its time at --bandwidth-gbs (instead of "
        "the training plan)")
    d.add_argument("--decode", action="store_true")
    d.add_argument("--weights", default=None, help=f"one of {', '.join(DECODE_WEIGHTS)} "
                   "(int8 / int4: moekit.quantize's, every projection unless --scope "
                   "experts; default fp32, or a `moekit quantize` directory's own)")
    d.add_argument("--group-size", type=int, default=None,
                   help="int4's inputs per scale and zero point, as `moekit quantize "
                   "--group-size` takes it: 32, 64 (default) or 128; default: a `moekit "
                   "quantize` directory's own")
    d.add_argument("--scope", default=None, choices=DECODE_SCOPES,
                   help="what int8 / int4 cover, as `moekit quantize --scope` takes it: all "
                   "(every projection, the default) or experts (the routed experts only, "
                   "the rest fp32); default: a `moekit quantize` directory's own")
    d.add_argument("--float-embeddings", action="store_true",
                   help="as `moekit quantize --float-embeddings`: an embedding table that "
                   "is not the LM head's stays fp32 under scope all")
    d.add_argument("--kv-cache-dtype", default="auto",
                   help=f"one of {', '.join(KV_CACHE_DTYPES)} (auto: the activations')")
    d.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    d.add_argument("--context", type=int, default=None,
                   help="positions each sequence holds in the KV cache: at most the model's "
                   "longest (its config's max_seq_len or max_position_embeddings, where it "
                   f"says); default {DEFAULT_LENGTH}, or that longest where it is shorter")
    d.add_argument("--expert-load", default=None, metavar="ROUTING_JSON",
                   help="the routing.json of `moekit analyze` on this model: the step's "
                   "distinct experts from the experts' measured shares of tokens, not from "
                   "uniform routing")
    d.add_argument("--bandwidth-gbs", default=None, metavar="GBS",
                   help="memory read bandwidth in GB/s, or 'measure': this machine's, a 1 GiB "
                   "sum timed now (moekit.bandwidth; ~2 s and 1 GiB of memory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def read_json(name: str, path: str) -> Any:
    """The JSON in the file at ``path``, or a ValueError naming ``name`` and the path."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(name, path, f"it must be a readable JSON file ({type(e).__name__}: {e})")


def load_model(name: str) -> ModelSpec:
    if name.lower() in PRESETS:
        return get_preset(name).spec
    if not (name.endswith(".json") or Path(name).is_dir()):
        fail("model", name, f"it must be a preset ({', '.join(PRESETS)}), a .json file, "
             "a moekit checkpoint directory or a transformers model directory")
    return read_spec_file(name)


OVERRIDES = {"peak_tflops": ("peak_flops", 1e12), "memory_gb": ("memory_bytes", 1e9),
             "hbm_tbps": ("hbm_bandwidth", 1e12), "intra_gbps": ("intra_node_bandwidth", 1e9),
             "inter_gbps": ("inter_node_bandwidth", 1e9), "power_w": ("power_watts", 1.0)}


# config field -> the flag that sets it, so an error names what the user typed
FIELD_FLAGS = {"num_gpus": "--gpus", "gpus_per_node": "--gpus-per-node",
               "compute_efficiency": "--efficiency", "a2a_overlap": "--a2a-overlap",
               "memory_headroom": "--memory-headroom", "joules_per_flop": "--joules-per-flop",
               "seq_len": "--seq-len", "global_batch": "--global-batch",
               "micro_batch": "--micro-batch", "gpu": "--gpu", "precision": "--precision",
               "weights": "--weights", "kv_cache_dtype": "--kv-cache-dtype", "batch": "--batch",
               "context": "--context", "bandwidth": "--bandwidth-gbs",
               "expert_load": "--expert-load", "scope": "--scope",
               "group_size": "--group-size", "dispatcher": "--dispatcher",
               "capacity_factor": "--capacity-factor",
               "float_embeddings": "--float-embeddings",
               **{name: f"--{name}" for name in ("dp", "tp", "pp", "ep", "zero", "recompute",
                                                  "top")}}


def cluster_from_args(args: argparse.Namespace) -> Cluster:
    gpu = get_gpu(args.gpu)
    for arg in OVERRIDES:  # checked before scaling, so the error shows the typed value
        if getattr(args, arg) is not None:
            check_number("--" + arg.replace("_", "-"), getattr(args, arg), 0, math.inf,
                         low_open=True)
    changes = {field: getattr(args, arg) * scale for arg, (field, scale) in OVERRIDES.items()
               if getattr(args, arg) is not None}
    return Cluster(gpu=replace(gpu, **changes), num_gpus=args.gpus,
                   gpus_per_node=args.gpus_per_node)


def layout_from_args(args: argparse.Namespace, spec: ModelSpec, cluster: Cluster) -> Layout:
    for name in ("dp", "tp", "pp", "ep"):  # a given 0 is an error, not "the default"
        if getattr(args, name) is not None:
            check_int(name, getattr(args, name), 1)
    tp = 1 if args.tp is None else args.tp
    pp = 1 if args.pp is None else args.pp
    dp = max(cluster.num_gpus // (tp * pp), 1) if args.dp is None else args.dp
    ep = math.gcd(dp, spec.num_experts) if args.ep is None else args.ep
    given = fixed_layout(args)
    return Layout(dp=dp, tp=tp, pp=pp, ep=ep, zero=given.get("zero", 1),
                  recompute=given.get("recompute", "none"),
                  micro_batch=given.get("micro_batch", 1))


LAYOUT_FLAGS = {"dp": "--dp", "tp": "--tp", "pp": "--pp", "ep": "--ep", "zero": "--zero",
                "recompute": "--recompute", "micro_batch": "--micro-batch"}


def fixed_layout(args: argparse.Namespace) -> dict:
    """The layout flags given on the command line: Layout field -> value."""
    return {name: getattr(args, name) for name in LAYOUT_FLAGS
            if getattr(args, name) is not None}


def given_flags(args: argparse.Namespace) -> str:
    return " ".join(f"{LAYOUT_FLAGS[name]} {value}" for name, value in fixed_layout(args).items())


def length_within(flag: str, value: int | None, longest: int | None, model: str) -> int:
    """--seq-len / --context: the value given, at most the model's longest context (a
    ValueError naming the flag past it), or DEFAULT_LENGTH capped at that longest."""
    if value is None:
        return DEFAULT_LENGTH if longest is None else min(DEFAULT_LENGTH, longest)
    if longest is not None and isinstance(value, int) and value > longest:
        reject(flag, value, f"it must be at most {longest}, the longest context of {model} "
               "(its config's max_seq_len or max_position_embeddings)")
    return value


def setup_from_args(args: argparse.Namespace, longest: int | None = None) -> TrainSetup:
    if args.precision not in PRECISIONS:
        fail("precision", args.precision, f"it must be one of {', '.join(PRECISIONS)}")
    seq_len = length_within("--seq-len", args.seq_len, longest, args.model)
    return TrainSetup(seq_len=seq_len, global_batch=args.global_batch,
                      precision=PRECISIONS[args.precision],
                      compute_efficiency=args.efficiency, joules_per_flop=args.joules_per_flop,
                      memory_headroom=args.memory_headroom, a2a_overlap=args.a2a_overlap,
                      dispatcher=args.dispatcher)


def with_capacity(spec: ModelSpec, value: str | None) -> ModelSpec:
    """--capacity-factor: the model's own factor where not given, 'none' dropless."""
    if value is None:
        return spec
    if value.lower() == "none":
        return replace(spec, capacity_factor=None)
    try:
        factor = float(value)
    except ValueError:
        factor = math.nan  # refused below with the allowed range
    if not math.isfinite(factor) or not 0 < factor <= spec.num_experts:
        reject("--capacity-factor", value, f"it must be a number in (0, {spec.num_experts}] "
               f"(num_experts={spec.num_experts} already keeps every row) or 'none'")
    return replace(spec, capacity_factor=factor)


def plans_from_args(args: argparse.Namespace) -> list[Plan]:
    """The plan (or, with --search, the ranked plans); raises ValueError on bad input."""
    # a `moekit quantize` directory plans training too: its float model's parameters
    spec, longest, _ = model_source(args.model)
    spec = with_capacity(spec, args.capacity_factor)
    cluster = cluster_from_args(args)
    setup = setup_from_args(args, longest)
    if args.search:
        check_int("top", args.top, 1)
        return search(spec, cluster, setup, top=args.top, fixed=fixed_layout(args))
    return [make_plan(spec, cluster, setup, layout_from_args(args, spec, cluster))]


def bandwidth_from(value: str | None) -> float | None:
    """--bandwidth-gbs: GB/s as bytes/s, 'measure' (this machine's, now) or None."""
    if value is None:
        return None
    if value == "measure":
        from moekit.bandwidth import read_bandwidth
        return read_bandwidth()
    try:
        gbs = float(value)
    except ValueError:
        gbs = None
    if gbs is None or not math.isfinite(gbs) or gbs <= 0:
        raise ValueError(f"--bandwidth-gbs={value!r} is not allowed: it must be a number of "
                         "GB/s > 0 or 'measure'")
    return gbs * 1e9


def check_flags_apply(args: argparse.Namespace) -> None:
    """A flag given with a value other than its default that this plan would ignore (a
    training flag with --decode, a decode flag without): a ValueError naming it, as
    ``moekit bench`` does (`plan --decode --tp 4` ignored --tp)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    for group in parser._action_groups:
        for action in group._group_actions:
            value = getattr(args, action.dest, None)
            if action.dest in ("model", "json", "decode") or value == action.default:
                continue
            if group.title != "decode" and args.decode:
                allowed = ("it plans training; with --decode only the decode flags apply "
                           "(--weights, --group-size, --scope, --float-embeddings, "
                           "--kv-cache-dtype, --batch, --context, --expert-load, "
                           "--bandwidth-gbs) and --json")
            elif group.title == "decode" and not args.decode:
                allowed = "it applies to a decode plan only: add --decode"
            else:
                continue
            flag = action.option_strings[-1]
            if action.nargs == 0:  # a switch (--search): no value to show
                raise ValueError(f"{flag} is not allowed: {allowed}")
            reject(flag, value, allowed)


def model_source(name: str) -> tuple[ModelSpec, int | None, dict | None]:
    """(the model's spec, the longest context its source allows or None where it does not
    say: a moekit config's max_seq_len, a transformers config's max_position_embeddings;
    a `moekit quantize` directory's quantized.json or None)."""
    from moekit.quant import io as qio

    if name.lower() not in PRESETS and Path(name).is_dir() and qio.is_quantized_checkpoint(name):
        meta = qio.read_meta(qio.located(name))
        return spec_from_dict(meta), longest_context(meta["model_config"]), meta
    return load_model(name), source_longest(name), None


def source_longest(name: str) -> int | None:
    """The longest context a model's source states (``longest_context`` of a preset's
    config, a checkpoint's model_config, a JSON file's contents), None where it does not;
    ``name`` already read by ``load_model``."""
    if name.lower() in PRESETS:
        data = get_preset(name).hf_config
    else:
        data = read_json("model", str(model_file(name)))
    model_config = data.get("model_config") if isinstance(data, dict) else None
    data = model_config if isinstance(model_config, dict) else data
    return longest_context(data) if isinstance(data, dict) else None


def _decode_weights(args: argparse.Namespace, meta: dict | None) -> tuple[str, dict]:
    """(--weights, decode_cost's keywords: int4 group size, scope, float embeddings): a
    quantized directory's own (another --weights, --scope or --float-embeddings is
    refused), else the flags (fp32 by default). A scope "experts" or --float-embeddings
    directory had been refused, or planned as if its embedding table were quantized."""
    if meta is None:
        if args.group_size is not None and args.weights != "int4":
            reject("--group-size", args.group_size, "it applies to --weights int4 only")
        group = {} if args.group_size is None else {"group_size": args.group_size}
        return args.weights or "fp32", {**group, "scope": args.scope or "all",
                                        "float_embeddings": args.float_embeddings}
    own = f"int{meta['bits']}"
    kept_float = not meta["embeddings"]  # a tied table is the head's: quantized as it
    for flag, given, has in (("--weights", args.weights, own), ("--scope", args.scope,
                                                                 meta["scope"]),
                             ("--group-size", args.group_size, meta["group_size"])):
        if given not in (None, has):
            reject(flag, given, f"{args.model} is already quantized ({own}, scope "
                   f"{meta['scope']}: its quantized.json): leave {flag} out, or plan the "
                   "float run it came from")
    if args.float_embeddings and not kept_float:
        raise ValueError(f"--float-embeddings is not allowed: {args.model} quantized its "
                         "embedding table (its quantized.json): leave the flag out, or plan "
                         "the float run it came from")
    group = {"group_size": meta["group_size"]} if own == "int4" else {}
    return own, {**group, "scope": meta["scope"],
                 "float_embeddings": kept_float and meta["scope"] == "all"}


def _decode_plan(args: argparse.Namespace):
    """The decode plan of the flags; every flag checked before --bandwidth-gbs measure
    reads 1 GiB."""
    check_flags_apply(args)
    spec, longest, meta = model_source(args.model)
    weights, quant = _decode_weights(args, meta)
    context = length_within("--context", args.context, longest, args.model)
    shares = (expert_shares_from_routing(read_json("expert_load", args.expert_load))
              if args.expert_load else None)
    cost = decode_cost(spec, weights, args.kv_cache_dtype, args.batch, context,
                       expert_shares=shares, **quant)
    return replace(cost, bandwidth=bandwidth_from(args.bandwidth_gbs))


def run(args: argparse.Namespace) -> int:
    if args.decode:
        try:
            cost = _decode_plan(args)
        except ValueError as e:
            print(f"moekit plan: error: {flag_message(e, FIELD_FLAGS)}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(cost.to_dict(), indent=1))
        else:
            print(decode_table(cost))
            if args.bandwidth_gbs == "measure":
                print("  (the bandwidth measured now: a 1 GiB sum on this machine, the faster "
                      "of 4 KiB and huge pages)")
        return 0
    try:
        check_flags_apply(args)
        plans = plans_from_args(args)
    except ValueError as e:
        print(f"moekit plan: error: {flag_message(e, FIELD_FLAGS)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([p.to_dict() for p in plans] if args.search else plans[0].to_dict(),
                         indent=1))
    elif args.search:
        given = given_flags(args)
        if not plans:
            mbs = "micro-batches 1-8" if args.micro_batch is None else "the micro-batch"
            print(f"no layout{f' with {given}' if given else ''} fits in memory on "
                  f"{args.gpus} x {args.gpu} (searched tp, pp, ep, ZeRO 0-3, recomputation "
                  f"and {mbs} at that GPU count); try "
                  f"{'without some of those flags, ' if given else ''}more --gpus, or a GPU "
                  "with more memory")
            return 1
        print(plan_table(plans[0]))
        print(f"\nlayouts that fit{f' with {given}' if given else ''}, fastest first "
              f"(top {len(plans)}):")
        print(search_table(plans))
    else:
        print(plan_table(plans[0]))
    return 0
