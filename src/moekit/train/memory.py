"""Refuse a training run whose step cannot fit in this machine's memory, before it starts.

``moekit train --seq-len 100000`` used to be accepted and grow for ten minutes
before anything happened. The estimate is the planner's (``moekit.plan``):
activations saved for backward plus fp32 logits and their gradient for one
micro-batch, plus 16 bytes per parameter (fp32 weights, gradients, two AdamW
moments). The planner counts what a fused implementation keeps; moekit's eager
path saved 1.3-1.45x that in ``benchmarks/plan_activation_check.py`` (planner
0.69-0.78 of the measured bytes), so activations are divided by EAGER_RATIO.
Checked against the growth of ru_maxrss over one fp32 step of the small preset
(B=16, Python-loop experts, 2026-12-02): L=512 measured 0.54 GiB, estimated
0.62; L=2048 measured 1.76 GiB, estimated 2.32. The default (L=128) is 0.19.

``check_model_memory`` comes first and names the model flags: the parameters alone
(``moekit train --dim 100000``: 154B of them, ~2.4 TiB with AdamW) had been blamed on
--seq-len, or, off the CPU, built in this machine's memory until the OS killed it.
"""

from __future__ import annotations

import os
import sys

from moekit.models.config import LMConfig

EAGER_RATIO = 0.69  # planner bytes / measured saved bytes, the lowest measured ratio
PARAM_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
WEIGHT_BYTES = 4  # fp32 weight: the model is built here before it moves to --device
WARN_FRACTION = 0.5  # warn above this share of the available memory
GIB = 2**30


def estimate_step_bytes(model: LMConfig, batch_size: int, seq_len: int) -> float:
    """Peak bytes of one fp32 training micro-batch on CPU (an estimate, see the module doc)."""
    from moekit.plan.cluster import PRECISIONS, Layout, TrainSetup
    from moekit.plan.cost import memory
    from moekit.plan.hf import from_lm_config
    from moekit.plan.params import count_params

    spec = from_lm_config(model)
    counts = count_params(spec)
    setup = TrainSetup(seq_len=seq_len, global_batch=batch_size, precision=PRECISIONS["fp32"])
    mem = memory(spec, counts, setup, Layout(micro_batch=batch_size))
    return (mem.activations + mem.logits) / EAGER_RATIO + PARAM_BYTES * counts.total_params


def model_bytes(model: LMConfig, device: str, processes: int = 1) -> tuple[float, str]:
    """(bytes, how they were counted): the least this machine's memory must hold for the
    model alone, from the planner's parameter count P. Each process builds the whole
    model in fp32 here, whatever --device (4 P each); on the CPU the weights, gradients and
    AdamW moments of (at least) one copy stay here while it trains (16 P)."""
    from moekit.plan.hf import from_lm_config
    from moekit.plan.params import count_params

    P = count_params(from_lm_config(model)).total_params
    built = processes * WEIGHT_BYTES * P
    trained = PARAM_BYTES * P if device.split(":")[0] == "cpu" else 0
    if trained >= built:
        return trained, (f"{P:,} parameters x {PARAM_BYTES} bytes: fp32 weights, gradients "
                         "and two AdamW moments")
    if processes == 1:
        return built, (f"{P:,} parameters x {WEIGHT_BYTES} bytes: its fp32 weights, built "
                       f"in this machine's memory before they move to {device}")
    return built, (f"{P:,} parameters x {WEIGHT_BYTES} bytes x {processes} processes: each "
                   "builds the whole model's fp32 weights in this machine's memory")


def check_model_memory(model: LMConfig, flags: str, device: str, processes: int = 1,
                       available: float | None = None) -> None:
    """ValueError naming ``flags`` (the model flags given) when the model alone cannot fit
    in this machine's available memory, before anything is built: `moekit train --dim
    100000` allocated until the OS killed it (or, on the CPU, was blamed on --seq-len)."""
    need, how = model_bytes(model, device, processes)
    have = available_bytes() if available is None else available
    if have is not None and need > have:
        raise ValueError(f"{flags} is not allowed here: the model needs about "
                         f"{need / GIB:,.1f} GiB ({how}; estimated with moekit.plan) and "
                         f"this machine has {have / GIB:.1f} GiB available; pick a smaller "
                         "model")


def available_bytes() -> float | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_step_memory(model: LMConfig, batch_size: int, seq_len: int,
                      available: float | None = None) -> str | None:
    """Raise ValueError when a step cannot fit; return a warning line when it is tight."""
    need = estimate_step_bytes(model, batch_size, seq_len)
    have = available_bytes() if available is None else available
    if have is None:
        return None
    what = (f"one training step needs about {need / GIB:.1f} GiB (estimated) and this "
            f"machine has {have / GIB:.1f} GiB available")
    if need > have:
        raise ValueError(f"--seq-len={seq_len} with --batch-size={batch_size} is not allowed "
                         f"here: {what}; lower --seq-len or --batch-size (--grad-accum keeps "
                         "the tokens per step)")
    if need > WARN_FRACTION * have:
        return (f"warning: --seq-len={seq_len} with --batch-size={batch_size}: {what}, "
                f"more than {WARN_FRACTION:.0%} of it")
    return None


def warn_step_memory(model: LMConfig, batch_size: int, seq_len: int, device: str) -> None:
    """CPU runs only (a GPU's memory is not this machine's); raises ValueError, prints warnings."""
    if device.split(":")[0] != "cpu":
        return
    line = check_step_memory(model, batch_size, seq_len)
    if line:
        print(f"moekit train: {line}", file=sys.stderr, flush=True)
