"""Human-readable tables for a plan and a layout search."""

from __future__ import annotations

from moekit.plan.cluster import usable_memory
from moekit.plan.cost import Memory, Plan, capacity_rows

GIB = 2**30


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def params_lines(plan: Plan) -> list[str]:
    c = plan.params
    lines = [f"{'parameters':24s}{'total':>12s}{'active/token':>14s}"]
    for name, total in c.total.items():
        active = "(lookup)" if name == "embedding" else human(c.active[name])
        if total or c.active[name]:
            lines.append(f"  {name:22s}{human(total):>12s}{active:>14s}")
    lines.append(f"  {'all':22s}{human(c.total_params):>12s}{human(c.active_params):>14s}"
                 f"   ({human(c.active_with_embedding)} counting the embedding table)")
    return lines


def flops_lines(plan: Plan) -> list[str]:
    f = plan.flops
    ratio = f.dense_equal_total_train / (f.train_per_token * 3 / f.passes)
    return [f"training FLOPs/token    {f.train_per_token:.3e}  (forward {f.forward_per_token:.3e},"
            f" attention scores {f.attention_share:.1%} of it, x{f.passes} passes)",
            f"dense, same total params {f.dense_equal_total_train:.3e}  ({ratio:.1f}x the MoE, "
            "forward + backward)"]


def memory_lines(plan: Plan) -> list[str]:
    lay = plan.layout
    a, b = plan.memory, plan.memory_recompute
    if lay.recompute == "full":
        a, b = b, a  # columns: without, with recomputation
    head = f"memory per GPU, GiB ({lay.short().replace('+rc', '')}, ZeRO-{lay.zero})"
    lines = [f"{head:46s}{'no recompute':>14s}{'full recompute':>16s}"]
    for name in ("weights", "grads", "optimizer", "activations", "logits", "zero3_buffer"):
        lines.append(f"  {name:44s}{getattr(a, name) / GIB:14.2f}{getattr(b, name) / GIB:16.2f}")
    cap = usable_memory(plan.cluster, plan.setup)

    def verdict(m: Memory) -> str:
        return "fits" if m.total <= cap else "OOM"

    label = (f"total (usable {cap / GIB:.1f} GiB of {plan.cluster.gpu.memory_bytes / 1e9:.0f}"
             f" GB, {plan.setup.memory_headroom:.0%} kept free)")
    lines.append(f"  {label:44s}{a.total / GIB:9.2f} {verdict(a):>4s}"
                 f"{b.total / GIB:11.2f} {verdict(b):>4s}")
    return lines


def speed_lines(plan: Plan) -> list[str]:
    """Step time and throughput, or why there is none (a layout that does not fit)."""
    t, eff = plan.time, plan.setup.compute_efficiency
    if not plan.fits:
        other = "fits" if plan.memory_recompute.total <= usable_memory(plan.cluster, plan.setup) \
            else "does not fit either"
        flag = "--recompute none" if plan.layout.recompute == "full" else "--recompute full"
        return [f"does not fit in memory: no step time or throughput for this layout "
                f"({flag} {other}; try --search, more --gpus or --zero 3)"]
    return [f"step {seconds(t.step_s)} = compute {seconds(t.compute_s)} at {eff:.0%} of peak "
            f"(--efficiency) + exposed communication {seconds(t.exposed_comm_s)} + pipeline "
            f"bubble {seconds(t.bubble_s)}",
            f"  {t.tokens_per_s:,.0f} tokens/s, model FLOPs utilisation {t.mfu:.1%}"]


A2A_ROWS = {"all_to_all": "K rows per token: one per routed expert, no per-rank dedup",
            "all_to_all_dedup": "one row per token and rank holding any of its experts, "
                                "uniform routing"}


def a2a_rows(plan: Plan) -> str:
    """What the all-to-all line counts: a row per routed expert, per (token, rank), or
    capacity mode's padded buffers."""
    spec, lay = plan.spec, plan.layout
    if spec.capacity_factor is None:
        return A2A_ROWS[plan.setup.dispatcher]
    if lay.ep == 1:
        return f"capacity factor {spec.capacity_factor:g}, no expert parallelism: none sent"
    tokens = lay.micro_batch * plan.setup.seq_len / lay.tp
    rows = capacity_rows(spec, tokens)
    return (f"capacity factor {spec.capacity_factor:g}: [E, C, D] buffers of C = "
            f"{rows // spec.num_experts:,} rows per expert, padding included, "
            f"{rows / (tokens * spec.top_k):.2f}x the routed rows")


def time_lines(plan: Plan) -> list[str]:
    c = plan.comm
    gpu = plan.cluster.gpu
    return [
        "communication per GPU per step",
        f"  all-to-all (expert parallel) {c.all_to_all_bytes / 1e9:10.2f} GB  "
        f"{seconds(c.all_to_all_s)}  ({a2a_rows(plan)})",
        f"  tensor parallel              {c.tensor_parallel_bytes / 1e9:10.2f} GB  "
        f"{seconds(c.tensor_parallel_s)}",
        f"  data parallel (gradients)    {c.data_parallel_bytes / 1e9:10.2f} GB  "
        f"{seconds(c.data_parallel_s)}",
        f"  pipeline sends               {c.pipeline_bytes / 1e9:10.2f} GB  "
        f"{seconds(c.pipeline_s)}",
        *speed_lines(plan),
        f"energy per token  {plan.energy_per_token_flops_j:.3g} J from FLOPs at "
        f"{plan.joules_per_flop * 1e12:.3g} pJ/FLOP"
        + (f" (= {gpu.power_watts:.0f} W / peak)" if plan.setup.joules_per_flop is None else "")
        + (f";  {plan.energy_per_token_wall_j:.3g} J wall-clock "
           f"({plan.cluster.num_gpus} GPUs x {gpu.power_watts:.0f} W x step time)"
           if plan.fits else ""),
    ]


def plan_table(plan: Plan) -> str:
    cl, s = plan.cluster, plan.setup
    head = (f"moekit plan: {plan.spec.name} on {cl.num_gpus} x {cl.gpu.name} "
            f"({cl.gpus_per_node} per node), seq {s.seq_len}, batch {s.global_batch} "
            f"sequences, {s.precision.name}")
    return "\n".join([head, *params_lines(plan), *flops_lines(plan), *memory_lines(plan),
                      *time_lines(plan)])


def search_table(plans: list[Plan]) -> str:
    lines = [f"{'rank':>4s}  {'layout':30s}{'GiB/GPU':>9s}{'step':>11s}{'tokens/s':>13s}"
             f"{'MFU':>7s}{'all-to-all':>12s}"]
    for i, p in enumerate(plans, 1):
        lines.append(f"{i:4d}  {p.layout.short():30s}{p.memory.total / GIB:9.1f}"
                     f"{seconds(p.time.step_s):>11s}{p.time.tokens_per_s:13,.0f}"
                     f"{p.time.mfu:7.1%}{seconds(p.comm.all_to_all_s):>12s}")
    return "\n".join(lines)
