"""FLOPs, memory, communication, roofline time and energy of one training step.

The model of the run (each assumption is stated where it is used):
- dp * tp * pp GPUs; tensor parallelism with sequence parallelism inside a node,
  pipeline 1F1B, experts split over ep ranks of each data-parallel group and
  over tp (each expert's hidden dimension F is split tp ways);
- routing is balanced (every expert gets T*K/E rows): the best case for time;
- compute is a roofline per GEMM group: max(FLOPs / peak, bytes / HBM bandwidth).

Shape letters: T tokens, D hidden, F expert hidden, E experts, K experts per token,
H heads, V vocabulary, L layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from moekit.plan.cluster import Cluster, Layout, TrainSetup, usable_memory
from moekit.plan.params import ParamCounts, count_params
from moekit.plan.spec import ModelSpec, fail, glu_matrices

FP32 = 4
PLAN_ARGS: dict[str, type] = {"spec": ModelSpec, "cluster": Cluster, "setup": TrainSetup,
                              "layout": Layout}


# -- FLOPs ---------------------------------------------------------------------------


def attention_score_flops(spec: ModelSpec, seq_len: int, causal: bool) -> float:
    """Forward FLOPs per token of q.k and p.v over all attention blocks (flash-style:
    causal attention skips the masked half)."""
    if not spec.num_heads:
        return 0.0
    ctx = seq_len / 2 if causal else seq_len
    per_block = 2 * ctx * spec.num_heads * (spec.qk_head_dim + spec.value_head_dim)
    blocks = spec.num_layers * (2 if spec.num_encoder_layers else 1) + spec.num_encoder_layers
    return per_block * blocks


@dataclass(frozen=True)
class Flops:
    forward_per_token: float  # 2 * active params + attention scores
    train_per_token: float  # forward + backward (2x forward) (+ forward again if recomputed)
    attention_share: float  # part of forward spent on attention scores
    dense_equal_total_train: float  # a dense model with the same total parameters
    passes: int  # forward-equivalents per step: 3, or 4 with full recompute


def flops(spec: ModelSpec, counts: ParamCounts, setup: TrainSetup,
          recompute: str = "none") -> Flops:
    attn = attention_score_flops(spec, setup.seq_len, setup.causal)
    fwd = 2 * counts.active_params + attn
    passes = 4 if recompute == "full" else 3
    # every parameter multiplies each token except the embedding table's lookup; the head
    # does, tied or not (tied, it was left out with the table: a dense moekit LM read
    # "0.8x the MoE" against itself)
    dense_total = (counts.total_params - counts.total.get("embedding", 0)
                   - counts.total.get("lm_head", 0) + counts.active.get("lm_head", 0))
    # Stated as the usual "6N": the contrast ignores recomputation.
    return Flops(forward_per_token=fwd, train_per_token=passes * fwd,
                 attention_share=attn / fwd if fwd else 0.0,
                 dense_equal_total_train=3 * (2 * dense_total + attn), passes=passes)


# -- memory --------------------------------------------------------------------------


def attention_activation_bytes(spec: ModelSpec, a: int) -> float:
    """Bytes per token one attention block saves for backward (flash attention: no
    T x T scores, an fp32 log-sum-exp per head instead)."""
    if not spec.num_heads:
        return 0.0
    H, D = spec.num_heads, spec.dim
    q, v = H * spec.qk_head_dim, H * spec.value_head_dim
    k = q if spec.is_mla else spec.kv_heads * spec.head_size
    vv = v if spec.is_mla else spec.kv_heads * spec.head_size
    latent = 2 * (spec.q_lora_rank + spec.kv_lora_rank + spec.qk_rope_head_dim)
    # norm input, projection input, q, k, v, attention output (= o-proj input)
    return a * (2 * D + q + k + vv + v + latent) + FP32 * H


def ffn_activation_bytes(spec: ModelSpec, hidden: int, a: int) -> float:
    """One FFN per token: its up-projection output (gate and up) and the activation."""
    g = (glu_matrices(spec.ffn_kind) - 1) * hidden
    return a * (g + hidden)


def capacity_rows(spec: ModelSpec, tokens: float) -> int:
    """E * C: the rows of capacity mode's [E, C, D] buffers for ``tokens`` tokens on a
    rank, C as MoEConfig.capacity counts it."""
    C = max(1, math.ceil(spec.capacity_factor * tokens * spec.top_k / spec.num_experts))
    return spec.num_experts * C


def routed_rows_per_token(spec: ModelSpec, tokens: float, ep: int) -> float:
    """Expert rows per token, routing balanced: K dropless. Capacity mode under expert
    parallelism sends and computes the whole [E, C, D] buffers, padding included
    (padded_all_to_all), E * C / T rows (1.25 K at factor 1.25); without it nothing is
    padded and only the rows past C are dropped, min(K, E * C / T)."""
    if spec.capacity_factor is None:
        return spec.top_k
    rows = capacity_rows(spec, tokens) / tokens
    return rows if ep > 1 else min(spec.top_k, rows)


def moe_activation_bytes(spec: ModelSpec, a: int, rows: float) -> float:
    """One MoE block per token: norm in/out, fp32 router logits, ``rows`` routed copies
    (gathered input, expert FFN, expert output before the weighted combine), shared
    experts."""
    D = spec.dim
    routed = rows * (a * 2 * D + ffn_activation_bytes(spec, spec.expert_ffn_dim, a))
    shared = ffn_activation_bytes(spec, spec.shared_dim, a) if spec.shared_dim else 0
    return a * 2 * D + FP32 * spec.num_experts + routed + shared


def mean_layer_activation_bytes(spec: ModelSpec, a: int, rows: float) -> float:
    """Saved bytes per token averaged over all layers (no recomputation); ``rows``: routed
    rows per token (routed_rows_per_token)."""
    attn = attention_activation_bytes(spec, a)
    moe = moe_activation_bytes(spec, a, rows)
    dense = a * 2 * spec.dim + ffn_activation_bytes(spec, spec.dense_ffn_dim, a)
    L, n_moe = spec.total_layers, spec.num_moe_layers
    cross = spec.num_layers if spec.num_encoder_layers else 0
    total = attn * (L + cross) + moe * n_moe + dense * (L - n_moe)
    return total / L


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the heaviest pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    zero3_buffer: float  # gathered weights of one layer (ZeRO-3)
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations
                + self.zero3_buffer + self.logits)


def local_params(counts: ParamCounts, spec: ModelSpec, lay: Layout) -> tuple[float, float]:
    """(dense, expert) parameters held by one GPU of the heaviest stage before ZeRO:
    the layers split evenly over pp, the embedding or head extra on an end stage."""
    emb, head = counts.total.get("embedding", 0), counts.total.get("lm_head", 0)
    body = counts.dense_params - emb - head
    ends = emb + head if lay.pp == 1 else max(emb, head)
    dense = (body / lay.pp + ends) / lay.tp
    return dense, counts.expert_params / (lay.pp * lay.ep * lay.tp)


def microbatches(setup: TrainSetup, lay: Layout) -> int:
    per_rank = setup.global_batch / lay.dp
    m = per_rank / lay.micro_batch
    if m != int(m) or m < 1:
        fail("global_batch", setup.global_batch, f"it must be a multiple of dp * micro_batch "
             f"= {lay.dp * lay.micro_batch}")
    return int(m)


def memory(spec: ModelSpec, counts: ParamCounts, setup: TrainSetup, lay: Layout) -> Memory:
    p = setup.precision
    dense, expert = local_params(counts, spec, lay)
    edp = lay.dp // lay.ep  # replicas of each expert shard: the ZeRO group for experts

    def sharded(stage: int, nbytes: int) -> float:
        return (dense / (lay.dp if lay.zero >= stage else 1)
                + expert / (edp if lay.zero >= stage else 1)) * nbytes

    t_mb = lay.micro_batch * setup.seq_len
    a = p.activation_bytes
    L_stage = math.ceil(spec.total_layers / lay.pp)
    rows = routed_rows_per_token(spec, t_mb / lay.tp, lay.ep)
    per_layer = mean_layer_activation_bytes(spec, a, rows)
    in_flight = min(lay.pp, microbatches(setup, lay))  # 1F1B: the first stage holds pp
    if lay.recompute == "full":
        kept = a * spec.dim * L_stage * in_flight + per_layer  # inputs + one layer redone
    else:
        kept = per_layer * L_stage * in_flight
    # ZeRO-3 gathers one layer's weights at a time, as this GPU holds them after tp and
    # ep: attention, norms, router and shared experts split tp ways only, the routed
    # experts tp * ep ways (the whole layer over tp * ep had counted a 1/ep share of the
    # dense part). A mean layer: with moe_every > 1 an MoE layer holds more than this.
    body = (counts.dense_params - counts.total.get("embedding", 0)
            - counts.total.get("lm_head", 0)) / spec.total_layers
    layer_bytes = (body / lay.tp + counts.expert_params / spec.total_layers
                   / (lay.tp * lay.ep)) * p.weight_bytes
    return Memory(
        weights=sharded(3, p.weight_bytes), grads=sharded(2, p.grad_bytes),
        optimizer=sharded(1, p.optimizer_bytes),
        activations=kept * t_mb / lay.tp,  # sequence parallel splits every saved tensor
        zero3_buffer=layer_bytes if lay.zero == 3 else 0.0,
        # fp32 logits and their gradient on the last stage, vocabulary split over tp
        logits=2 * FP32 * t_mb * spec.vocab_size / lay.tp)


# -- communication and time ----------------------------------------------------------


def group_bandwidth(cluster: Cluster, stride: int, size: int) -> tuple[float, float]:
    """(fraction of peers inside the node, slowest bandwidth) for a group of ``size``
    ranks spaced ``stride`` apart (tp is innermost, then ep/dp, then pp)."""
    g = cluster.gpus_per_node
    in_node = max(1, min(size, g // stride)) if stride <= g else 1
    return (in_node - 1) / max(size - 1, 1), (
        cluster.gpu.intra_node_bandwidth if in_node == size else cluster.gpu.inter_node_bandwidth)


def all_to_all_time(cluster: Cluster, nbytes_out: float, stride: int, size: int) -> float:
    """Uniform all-to-all: each peer gets an equal share; NVLink and NICs work in parallel."""
    if size == 1:
        return 0.0
    frac_in, _ = group_bandwidth(cluster, stride, size)
    gpu = cluster.gpu
    return max(nbytes_out * frac_in / gpu.intra_node_bandwidth,
               nbytes_out * (1 - frac_in) / gpu.inter_node_bandwidth)


def ring_time(cluster: Cluster, nbytes: float, stride: int, size: int, factor: float) -> float:
    """A ring collective moving factor * (n-1)/n * nbytes over its slowest link."""
    if size == 1:
        return 0.0
    _, bw = group_bandwidth(cluster, stride, size)
    return factor * (size - 1) / size * nbytes / bw


@dataclass(frozen=True)
class Comm:
    all_to_all_bytes: float  # per GPU per step, sent
    all_to_all_s: float
    tensor_parallel_bytes: float
    tensor_parallel_s: float
    data_parallel_bytes: float
    data_parallel_s: float
    pipeline_bytes: float
    pipeline_s: float


def remote_rows_per_token(spec: ModelSpec, ep: int, dispatcher: str = "all_to_all",
                          tokens: float = 1.0) -> float:
    """Rows a token sends to other EP ranks, routing uniform over the experts. all_to_all:
    one per routed expert on another rank, K (ep - 1) / ep; in capacity mode the
    (ep - 1) / ep of the [E, C, D] buffer for ``tokens`` tokens not kept on this rank,
    padding included: E * C / T (ep - 1) / ep. all_to_all_dedup: one per other rank
    holding any of its K experts: (ep - 1) (1 - C(E - E/ep, K) / C(E, K)), a rank missed
    by all K draws without replacement. (Group-limited routing, which puts a token's
    experts on fewer ranks, is not modelled: an upper bound for it.)"""
    E, K = spec.num_experts, spec.top_k
    if ep == 1:
        return 0.0
    if dispatcher == "all_to_all":
        return routed_rows_per_token(spec, tokens, ep) * (ep - 1) / ep
    return (ep - 1) * (1 - math.comb(E - E // ep, K) / math.comb(E, K))


def communication(spec: ModelSpec, counts: ParamCounts, setup: TrainSetup, lay: Layout,
                  cluster: Cluster) -> Comm:
    a, m = setup.precision.activation_bytes, microbatches(setup, lay)
    t_mb = lay.micro_batch * setup.seq_len
    moe_layers = spec.num_moe_layers / lay.pp
    # dispatch + combine, forward and backward (+ forward again when recomputing); sequence
    # parallel: each tp rank dispatches its 1/tp of the tokens, remote_rows_per_token
    # copies each
    transfers = 6 if lay.recompute == "full" else 4
    tokens = t_mb / lay.tp
    rows = remote_rows_per_token(spec, lay.ep, setup.dispatcher, tokens)
    out = tokens * rows * spec.dim * a
    a2a_b = transfers * out * moe_layers * m
    a2a_s = transfers * moe_layers * m * all_to_all_time(cluster, out, lay.tp, lay.ep)
    # Megatron TP + SP: per layer 2 all-gathers + 2 reduce-scatters forward, same backward.
    layers = spec.total_layers / lay.pp
    tp_vol = t_mb * spec.dim * a
    tp_n = 8 * layers * m
    tp_b = tp_n * tp_vol * (lay.tp - 1) / lay.tp
    tp_s = tp_n * ring_time(cluster, tp_vol, 1, lay.tp, 1.0)
    dp_b, dp_s = grad_sync(counts, spec, setup, lay, cluster)
    pp_vol = t_mb * spec.dim * a / lay.tp if lay.pp > 1 else 0.0
    pp_s = 2 * m * pp_vol / group_bandwidth(cluster, lay.tp * lay.dp, lay.pp)[1]
    return Comm(a2a_b, a2a_s, tp_b, tp_s, dp_b, dp_s, 2 * m * pp_vol, pp_s)


def grad_sync(counts: ParamCounts, spec: ModelSpec, setup: TrainSetup, lay: Layout,
              cluster: Cluster) -> tuple[float, float]:
    """Gradient reduction per step: all-reduce (2x) for ZeRO 0/1, reduce-scatter (1x) for
    ZeRO-2, reduce-scatter + two weight all-gathers (3x) for ZeRO-3 (ZeRO paper §7)."""
    factor = {0: 2.0, 1: 2.0, 2: 1.0, 3: 3.0}[lay.zero]
    dense, expert = local_params(counts, spec, lay)
    g = setup.precision.grad_bytes
    edp = lay.dp // lay.ep
    nbytes = (factor * (lay.dp - 1) / lay.dp * dense * g
              + factor * (edp - 1) / edp * expert * g)
    secs = (ring_time(cluster, dense * g, lay.tp, lay.dp, factor)
            + ring_time(cluster, expert * g, lay.tp * lay.ep, edp, factor))
    return nbytes, secs


def gemm_time(flop: float, nbytes: float, cluster: Cluster, eff: float) -> float:
    return max(flop / (cluster.gpu.peak_flops * eff), nbytes / cluster.gpu.hbm_bandwidth)


def compute_time_per_microbatch(spec: ModelSpec, counts: ParamCounts, setup: TrainSetup,
                                lay: Layout, cluster: Cluster, fl: Flops) -> float:
    """Roofline over three GEMM groups of one stage: dense weights, expert weights
    (memory-bound when few rows reach each expert), attention scores."""
    t_mb = lay.micro_batch * setup.seq_len
    eff, wb = setup.compute_efficiency, setup.precision.weight_bytes
    dense, expert = local_params(counts, spec, lay)
    dense_active = (counts.active_params - counts.active.get("experts", 0)) / (lay.pp * lay.tp)
    # Each pass reads every weight once (forward, backward-data, backward-weight...).
    t_dense = gemm_time(fl.passes * 2 * dense_active * t_mb, fl.passes * dense * wb,
                        cluster, eff)
    # balanced: the ep group's rows spread evenly over its GPUs
    rows = t_mb * routed_rows_per_token(spec, t_mb / lay.tp, lay.ep)
    per_row = 2 * counts.active.get("experts", 0) / max(spec.top_k, 1) / (lay.pp * lay.tp)
    t_expert = gemm_time(fl.passes * per_row * rows, fl.passes * expert * wb, cluster, eff)
    attn = attention_score_flops(spec, setup.seq_len, setup.causal) / (lay.pp * lay.tp)
    t_attn = fl.passes * attn * t_mb / (cluster.gpu.peak_flops * eff)
    return t_dense + t_expert + t_attn


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # per step, all micro-batches, without bubble
    exposed_comm_s: float
    bubble_s: float
    step_s: float
    tokens_per_s: float
    mfu: float  # model FLOPs (3 x forward: recomputation not counted) / s / cluster peak


def step_time(spec: ModelSpec, counts: ParamCounts, setup: TrainSetup, lay: Layout,
              cluster: Cluster, fl: Flops, comm: Comm) -> StepTime:
    """TP and pipeline sends sit on the critical path, the all-to-all too except the
    ``setup.a2a_overlap`` fraction hidden behind compute; the gradient reduction
    overlaps the last micro-batch's backward (2/3 of its compute)."""
    m = microbatches(setup, lay)
    c_mb = compute_time_per_microbatch(spec, counts, setup, lay, cluster, fl)
    a2a = comm.all_to_all_s * (1 - setup.a2a_overlap)
    busy = m * c_mb + a2a + comm.tensor_parallel_s + comm.pipeline_s
    bubble = busy * (lay.pp - 1) / m
    dp_exposed = max(0.0, comm.data_parallel_s - c_mb * 2 / 3)
    step = busy + bubble + dp_exposed
    tokens = setup.global_batch * setup.seq_len
    tps = tokens / step
    mfu = 3 * fl.forward_per_token * tps / (cluster.num_gpus * cluster.gpu.peak_flops)
    return StepTime(m * c_mb, step - m * c_mb - bubble, bubble, step, tps, mfu)


# -- the whole plan ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    cluster: Cluster
    setup: TrainSetup
    layout: Layout
    params: ParamCounts
    flops: Flops
    memory: Memory
    memory_recompute: Memory  # the same layout with the other recompute setting
    comm: Comm
    time: StepTime
    joules_per_flop: float
    energy_per_token_flops_j: float  # train FLOPs/token x joules/FLOP
    energy_per_token_wall_j: float  # GPUs x board power x step time / tokens

    @property
    def fits(self) -> bool:
        return self.memory.total <= usable_memory(self.cluster, self.setup)

    def to_dict(self) -> dict:
        out = {k: asdict(getattr(self, k)) for k in ("flops", "comm", "time")}
        for k in ("memory", "memory_recompute"):
            out[k] = {**asdict(getattr(self, k)), "total": getattr(self, k).total}
        return {
            "model": self.spec.to_dict(), "cluster": self.cluster.to_dict(),
            "setup": {**asdict(self.setup)}, "layout": asdict(self.layout),
            "params": {"total": self.params.total, "active": self.params.active,
                       "total_params": self.params.total_params,
                       "active_params": self.params.active_params,
                       "active_with_embedding": self.params.active_with_embedding},
            **out, "fits": self.fits, "joules_per_flop": self.joules_per_flop,
            "energy_per_token_flops_j": self.energy_per_token_flops_j,
            "energy_per_token_wall_j": self.energy_per_token_wall_j,
        }


def check_types(**args: Any) -> None:
    """Each argument of make_plan / search is its class (not a dict, a name or None)."""
    for name, value in args.items():
        cls = PLAN_ARGS[name]
        if not isinstance(value, cls):
            fail(name, value, f"it must be a moekit.plan.{cls.__name__}")


def check_dispatcher(spec: ModelSpec, setup: TrainSetup) -> None:
    """all_to_all_dedup is dropless: capacity mode sends fixed buffers (all_to_all only),
    as ExpertParallelMoE refuses the pair."""
    if spec.capacity_factor is not None and setup.dispatcher == "all_to_all_dedup":
        fail("dispatcher", setup.dispatcher, f"capacity_factor={spec.capacity_factor!r} "
             "(capacity mode) sends fixed [E, C, D] buffers with all_to_all only; the "
             "deduplicated all-to-all is dropless")


def check_layout(spec: ModelSpec, cluster: Cluster, lay: Layout) -> None:
    if spec.num_experts % lay.ep:
        fail("ep", lay.ep, f"it must divide num_experts={spec.num_experts}")
    if spec.num_heads and spec.num_heads % lay.tp:
        fail("tp", lay.tp, f"it must divide num_heads={spec.num_heads}")
    if lay.pp > spec.total_layers:
        fail("pp", lay.pp, f"it must be <= the number of layers ({spec.total_layers})")
    if lay.world != cluster.num_gpus:
        fail("layout", lay.short(), f"dp * tp * pp = {lay.world} must equal "
             f"num_gpus={cluster.num_gpus}")


def make_plan(spec: ModelSpec, cluster: Cluster, setup: TrainSetup, lay: Layout,
              counts: ParamCounts | None = None) -> Plan:
    """Every estimate for ``spec`` trained on ``cluster`` with layout ``lay``."""
    check_types(spec=spec, cluster=cluster, setup=setup, layout=lay)
    check_dispatcher(spec, setup)
    check_layout(spec, cluster, lay)
    counts = counts or count_params(spec)
    fl = flops(spec, counts, setup, lay.recompute)
    other = Layout(**{**asdict(lay), "recompute": "none" if lay.recompute == "full"
                      else "full"})
    comm = communication(spec, counts, setup, lay, cluster)
    st = step_time(spec, counts, setup, lay, cluster, fl, comm)
    jpf = setup.joules_per_flop or cluster.gpu.power_watts / cluster.gpu.peak_flops
    tokens = setup.global_batch * setup.seq_len
    return Plan(spec, cluster, setup, lay, counts, fl, memory(spec, counts, setup, lay),
                memory(spec, counts, setup, other), comm, st, jpf,
                fl.train_per_token * jpf,
                cluster.num_gpus * cluster.gpu.power_watts * st.step_s / tokens)
