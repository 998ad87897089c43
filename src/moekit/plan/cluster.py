"""Hardware and run layout: GPU presets, a cluster, a parallel layout, a training setup.

Bandwidths are bytes/s in ONE direction per GPU (what an all-to-all can send),
FLOP/s are dense (no 2:4 sparsity) bf16 tensor-core peaks from vendor data sheets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moekit.config import check_bool, check_number
from moekit.plan.spec import check_int, fail

GB = 1e9
TB = 1e12


@dataclass(frozen=True, kw_only=True, slots=True)
class GPUSpec:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_bytes: float  # HBM capacity
    hbm_bandwidth: float  # bytes/s
    intra_node_bandwidth: float  # bytes/s per direction per GPU (NVLink / Infinity Fabric)
    inter_node_bandwidth: float  # bytes/s per direction per GPU (its share of the NICs)
    power_watts: float  # board power (TDP), used for the wall-clock energy estimate

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bytes", "hbm_bandwidth", "intra_node_bandwidth",
                     "inter_node_bandwidth", "power_watts"):
            check_number(name, getattr(self, name), 0, math.inf, low_open=True)


GPUS: dict[str, GPUSpec] = {
    # NVIDIA H100 data sheet (SXM5): 1979 TFLOP/s bf16 with sparsity = 989 dense, 80 GB
    # HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total (450 per direction), up to 700 W. DGX H100:
    # one 400 Gb/s ConnectX-7 NIC per GPU = 50 GB/s.
    "h100": GPUSpec(name="H100 SXM 80GB", peak_flops=989 * TB, memory_bytes=80 * GB,
                    hbm_bandwidth=3.35 * TB, intra_node_bandwidth=450 * GB,
                    inter_node_bandwidth=50 * GB, power_watts=700),
    # NVIDIA H200 data sheet (SXM): same compute and NVLink as H100, 141 GB HBM3e at
    # 4.8 TB/s, up to 700 W; 400 Gb/s NIC per GPU.
    "h200": GPUSpec(name="H200 SXM 141GB", peak_flops=989 * TB, memory_bytes=141 * GB,
                    hbm_bandwidth=4.8 * TB, intra_node_bandwidth=450 * GB,
                    inter_node_bandwidth=50 * GB, power_watts=700),
    # NVIDIA A100 data sheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 2.04 TB/s HBM2e, NVLink 3
    # 600 GB/s total (300 per direction), 400 W. DGX A100: one 200 Gb/s HDR NIC per GPU.
    "a100-80gb": GPUSpec(name="A100 SXM 80GB", peak_flops=312 * TB, memory_bytes=80 * GB,
                         hbm_bandwidth=2.039 * TB, intra_node_bandwidth=300 * GB,
                         inter_node_bandwidth=25 * GB, power_watts=400),
    # NVIDIA DGX/HGX B200 data sheet: 2.25 PFLOP/s bf16 dense per GPU, 180 GB HBM3e
    # (1440 GB per 8 GPUs) at 8 TB/s, NVLink 5 1.8 TB/s total (900 per direction), 1000 W;
    # one 400 Gb/s ConnectX-7 per GPU.
    "b200": GPUSpec(name="B200 180GB", peak_flops=2250 * TB, memory_bytes=180 * GB,
                    hbm_bandwidth=8 * TB, intra_node_bandwidth=900 * GB,
                    inter_node_bandwidth=50 * GB, power_watts=1000),
    # AMD Instinct MI300X data sheet: 1307 TFLOP/s bf16 dense, 192 GB HBM3 at 5.3 TB/s,
    # Infinity Fabric 896 GB/s peer-to-peer total (448 per direction), 750 W; 400 Gb/s NIC.
    "mi300x": GPUSpec(name="MI300X 192GB", peak_flops=1307 * TB, memory_bytes=192 * GB,
                      hbm_bandwidth=5.3 * TB, intra_node_bandwidth=448 * GB,
                      inter_node_bandwidth=50 * GB, power_watts=750),
    # NVIDIA L40S data sheet: 362 TFLOP/s bf16 dense (733 with sparsity), 48 GB GDDR6 at
    # 864 GB/s, no NVLink: PCIe Gen4 x16, 64 GB/s total (32 per direction), 350 W;
    # assumed 200 Gb/s networking per GPU.
    "l40s": GPUSpec(name="L40S 48GB", peak_flops=362 * TB, memory_bytes=48 * GB,
                    hbm_bandwidth=864 * GB, intra_node_bandwidth=32 * GB,
                    inter_node_bandwidth=25 * GB, power_watts=350),
}


def get_gpu(name: str) -> GPUSpec:
    if not isinstance(name, str) or name.lower() not in GPUS:
        fail("gpu", name, f"known GPUs are {', '.join(GPUS)}")
    return GPUS[name.lower()]


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    gpu: GPUSpec
    num_gpus: int
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.gpu, GPUSpec):
            fail("gpu", self.gpu, "it must be a GPUSpec")
        check_int("num_gpus", self.num_gpus, 1)
        check_int("gpus_per_node", self.gpus_per_node, 1)
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            fail("num_gpus", self.num_gpus, f"a multi-node cluster needs a multiple of "
                 f"gpus_per_node={self.gpus_per_node}")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return {"gpu": asdict(self.gpu), "num_gpus": self.num_gpus,
                "gpus_per_node": self.gpus_per_node}


@dataclass(frozen=True, kw_only=True, slots=True)
class Precision:
    """Bytes per element. bf16-mixed: bf16 weights and grads, fp32 master weights and
    Adam moments = 2 + 2 + 12 = 16 bytes/parameter (Rajbhandari et al. 2020, ZeRO, §3.1)."""

    name: str
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # master weights + Adam m and v
    activation_bytes: int

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "grad_bytes", "activation_bytes"):
            check_int(name, getattr(self, name), 1)
        check_int("optimizer_bytes", self.optimizer_bytes, 0)  # 0: plain SGD


PRECISIONS: dict[str, Precision] = {
    "bf16-mixed": Precision(name="bf16-mixed", weight_bytes=2, grad_bytes=2,
                            optimizer_bytes=12, activation_bytes=2),
    "fp32": Precision(name="fp32", weight_bytes=4, grad_bytes=4, optimizer_bytes=8,
                      activation_bytes=4),
}

RECOMPUTE = ("none", "full")


def usable_memory(cluster: Cluster, setup: TrainSetup) -> float:
    return cluster.gpu.memory_bytes * (1 - setup.memory_headroom)


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """How the GPUs split the work: dp * tp * pp = GPUs; ep splits the experts across
    ep ranks of each data-parallel group (expert weights are replicated dp / ep times)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 0  # ZeRO stage over the data-parallel group: 0, 1, 2 or 3
    recompute: str = "none"  # "full": keep only each layer's input, redo forward in backward
    micro_batch: int = 1  # sequences per GPU per forward pass

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep", "micro_batch"):
            check_int(name, getattr(self, name), 1)
        if isinstance(self.zero, bool) or self.zero not in (0, 1, 2, 3):
            fail("zero", self.zero, "it must be 0, 1, 2 or 3")
        if self.recompute not in RECOMPUTE:
            fail("recompute", self.recompute, f"it must be one of {', '.join(RECOMPUTE)}")
        if self.dp % self.ep:
            fail("ep", self.ep, f"it must divide dp={self.dp} (experts are split across "
                 "the ranks of a data-parallel group)")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def short(self) -> str:
        rc = "+rc" if self.recompute == "full" else ""
        return (f"dp{self.dp} tp{self.tp} pp{self.pp} ep{self.ep} z{self.zero}{rc} "
                f"mb{self.micro_batch}")


PLAN_DISPATCHERS = ("all_to_all", "all_to_all_dedup")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainSetup:
    seq_len: int = 4096
    global_batch: int = 1024  # sequences per optimizer step
    precision: Precision = field(default_factory=lambda: PRECISIONS["bf16-mixed"])
    causal: bool = True  # causal attention does half the score FLOPs
    compute_efficiency: float = 1.0  # fraction of peak FLOP/s reached (1.0 = roofline)
    joules_per_flop: float | None = None  # None: power_watts / peak_flops of the GPU
    # Memory kept free for the CUDA context, communication buffers and allocator
    # fragmentation: a layout "fits" when its estimate is under (1 - headroom) x capacity.
    memory_headroom: float = 0.1
    # Fraction of the expert-parallel all-to-all hidden behind compute (0 = none, as in a
    # plain dispatcher; DeepSeek-V3's DualPipe overlaps nearly all of it).
    a2a_overlap: float = 0.0
    # "all_to_all": a row per routed (token, expert) pair; "all_to_all_dedup": a row per
    # (token, rank owning any of its experts), under uniform routing (moekit's dispatchers)
    dispatcher: str = "all_to_all"

    def __post_init__(self) -> None:
        if not isinstance(self.precision, Precision):
            fail("precision", self.precision, "it must be a Precision, e.g. "
                 f"PRECISIONS['bf16-mixed'] (known: {', '.join(PRECISIONS)})")
        check_int("seq_len", self.seq_len, 1)
        check_int("global_batch", self.global_batch, 1)
        check_number("compute_efficiency", self.compute_efficiency, 0, 1, low_open=True)
        check_number("a2a_overlap", self.a2a_overlap, 0, 1)
        check_number("memory_headroom", self.memory_headroom, 0, 1, high_open=True)
        if self.joules_per_flop is not None:
            check_number("joules_per_flop", self.joules_per_flop, 0, math.inf, low_open=True)
        check_bool("causal", self.causal)
        if self.dispatcher not in PLAN_DISPATCHERS:
            fail("dispatcher", self.dispatcher,
                 f"it must be one of {', '.join(PLAN_DISPATCHERS)}")
