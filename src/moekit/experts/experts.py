"""Stacked expert weights and the dense shared experts.

Shape letters: D hidden, F expert hidden, G = 2F for GLU activations (gate and
up fused, gate first) else F, E experts, T tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.dispatch.plan import Dispatch
from moekit.experts.activations import activate
from moekit.experts.backends import (
    BACKENDS,
    decode_supported,
    fused_supported,
    grouped_mm_supported,
    triton_supported,
)
from moekit.functions import decode
from moekit.quant.tensor import QuantizedTensor

BACKEND_NAMES = ("auto", *BACKENDS)


def resolve_backend(name: str, x_TD: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor,
                    rows: int | None = None):
    """The backend function for ``name``; "auto" picks the fastest that supports the shapes.

    Shared by ``Experts`` and the Hugging Face integration, so both follow the same choice.
    ``rows`` (routed rows S) lets "auto" pick the decode kernels for few rows.
    Quantized weights (``moekit.quantize``) always run the "decode" backend, which
    dequantizes blocks of experts for the fused path when rows are many.
    """
    if name == "auto" or isinstance(w_in_EDG, QuantizedTensor):
        name = auto_backend_name(x_TD, w_in_EDG, w_out_EFD, rows)
    check_backend(name, x_TD, w_in_EDG, w_out_EFD)
    return BACKENDS[name]


def check_backend(name: str, x_TD: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor) -> None:
    """ValueError where an explicitly chosen backend cannot take these tensors: grouped_mm
    needs float32 / bfloat16 and 16-byte aligned sizes (torch said 'strides should be
    multiple of 16 bytes' or 'Expected mat_a to be Float32, ...' from inside the GEMM)."""
    if (name != "grouped_mm" or isinstance(w_in_EDG, QuantizedTensor)
            or grouped_mm_supported(x_TD, w_in_EDG, w_out_EFD)):
        return
    per16 = max(1, 16 // x_TD.element_size())
    _, D, G = w_in_EDG.shape
    raise ValueError(
        f"backend='grouped_mm' is not allowed for x.dtype={x_TD.dtype}, dim={D}, "
        f"expert hidden sizes {w_out_EFD.shape[1]} / {G}: torch._grouped_mm takes float32 "
        f"or bfloat16 with every size a multiple of {per16} elements (16 bytes); use "
        "backend='auto' (or 'loop' / 'fused') for these")


def auto_backend_name(x_TD: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor,
                      rows: int | None = None) -> str:
    """triton on CUDA (grouped_mm for training wide experts: ``grouped_mm_trains_faster``);
    on CPU "decode" for few rows without autograd (or quantized weights), else "fused"
    (benchmarks/bench_cpu.py); else grouped_mm or loop."""
    if decode_supported(x_TD, w_in_EDG, w_out_EFD, rows):
        return "decode"
    if triton_supported(x_TD):
        return "grouped_mm" if grouped_mm_trains_faster(x_TD, w_in_EDG, w_out_EFD) else "triton"
    # fused reads the expert counts on the host, so torch.compile(fullgraph=True)
    # gets the host-sync-free grouped_mm path instead
    if (x_TD.device.type == "cpu" and not torch.compiler.is_compiling()
            and fused_supported(x_TD, w_in_EDG, w_out_EFD)):
        return "fused"
    if grouped_mm_supported(x_TD, w_in_EDG, w_out_EFD):
        return "grouped_mm"
    return "loop"


# Expert hidden size from which a CUDA training step runs grouped_mm rather than the
# Triton kernels. One H200, bf16, fwd+bwd ms triton / grouped_mm (benchmarks/
# bench_triton.py, 2026-12-04): T=4096 D=2048 F=1408 E=8 K=2 (Mixtral-like) 1.26, 1.22
# and, after dW_out's rewrite, 1.17; F=768 E=64 K=8 at T=1024 / 4096 / 16384 1.08-1.12,
# 1.02-1.04 and 0.99-1.02 before it, which took 5-10% off the T=4096 step
# (bench_triton_bwd.py). Triton's GEMMs run at half grouped_mm's TFLOP/s there and its
# gain is the fused gather, activation and combine, whose traffic per FLOP falls as F
# grows: so wide experts train on grouped_mm, narrow ones on triton. The forward alone
# (no autograd) stays on triton: 0.67-0.94x grouped_mm's time at the fine-grained
# shapes, 0.90-1.03x at the Mixtral-like one.
GROUPED_MM_TRAIN_MIN_HIDDEN = 1024


def grouped_mm_trains_faster(x_TD: Tensor, w_in_EDG: Tensor, w_out_EFD: Tensor) -> bool:
    """Whether "auto" should train experts on grouped_mm instead of triton (asked for
    tensors triton serves, i.e. on a GPU): autograd recording through the experts, bf16
    on an sm_90+ GPU (torch._grouped_mm's fast path), and experts at least
    ``GROUPED_MM_TRAIN_MIN_HIDDEN`` wide."""
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, w_in_EDG, w_out_EFD))
    return (training and x_TD.dtype == torch.bfloat16
            and w_out_EFD.dtype == torch.bfloat16 and w_in_EDG.dtype == torch.bfloat16
            and w_out_EFD.shape[1] >= GROUPED_MM_TRAIN_MIN_HIDDEN
            and grouped_mm_supported(x_TD, w_in_EDG, w_out_EFD)
            and torch.cuda.get_device_capability(x_TD.device) >= (9, 0))


def autocast_experts(x_TD: Tensor, params: tuple) -> tuple[Tensor, tuple]:
    """Under CPU autocast, the input and the weights in the autocast dtype, as autocast
    casts nn.Linear's: its rules do not reach into the fused Function, whose GEMMs
    otherwise stay fp32 (and the bf16 kernels unused) in `moekit train --bf16`. Also
    the Hugging Face integration's experts (``integrations.hf.experts``)."""
    device = x_TD.device.type
    if device != "cpu" or not torch.is_autocast_enabled(device):
        return x_TD, params
    dtype = torch.get_autocast_dtype(device)
    return x_TD.to(dtype), tuple(p.to(dtype) if isinstance(p, Tensor) else p for p in params)


class Experts(nn.Module):
    """E feed-forward experts stored as stacked tensors.

    ``w_in`` [E, D, G] holds gate and up fused; ``w_out`` [E, F, D]; optional
    biases ``b_in`` [E, G] and ``b_out`` [E, D].
    """

    def __init__(self, cfg: MoEConfig, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend={backend!r} is not allowed: it must be one of "
                             f"{', '.join(BACKEND_NAMES)}")
        self.cfg, self.backend = cfg, backend
        E, D, F_ = cfg.num_experts, cfg.dim, cfg.ffn_dim
        G = 2 * F_ if cfg.is_glu else F_
        self.w_in = nn.Parameter(torch.empty(E, D, G))
        self.w_out = nn.Parameter(torch.empty(E, F_, D))
        self.b_in = nn.Parameter(torch.zeros(E, G)) if cfg.expert_bias else None
        self.b_out = nn.Parameter(torch.zeros(E, D)) if cfg.expert_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.cfg.dim))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.cfg.ffn_dim))
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def _act(self, h: Tensor) -> Tensor:
        return activate(h, self.cfg)

    def forward(self, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
        """Weighted sum over each token's routed experts, [T, D]."""
        x_TD, params = autocast_experts(x_TD, (self.w_in, self.w_out, self.b_in, self.b_out))
        w_in, w_out, b_in, b_out = params
        # nothing to differentiate (a frozen layer with grad mode on): "auto" chose the
        # fused GEMMs where no_grad chose the decode kernels, another output by ~5e-7
        with decode.no_grad_unless_wanted(x_TD, dispatch.weight_S, *params):
            fn = resolve_backend(self.backend, x_TD, w_in, w_out, dispatch.num_rows)
            return fn(x_TD, dispatch, w_in, w_out, b_in, b_out, self._act)

    def check_input(self, x_TD: Tensor) -> None:
        """ValueError where the chosen backend cannot take x's dtype (under CPU autocast:
        the autocast dtype) at these sizes; for the layers to call before routing."""
        if self.backend != "grouped_mm":  # (the only one refused; nothing per call else)
            return
        device = x_TD.device.type
        dtype = (torch.get_autocast_dtype(device) if device == "cpu"
                 and torch.is_autocast_enabled(device) else x_TD.dtype)
        check_backend(self.backend, x_TD.new_empty(0, dtype=dtype), self.w_in, self.w_out)

    def auto_backend(self, x_TD: Tensor, rows: int | None = None) -> str:
        """The backend name ``backend="auto"`` runs for this input (and routed rows)."""
        return auto_backend_name(x_TD, self.w_in, self.w_out, rows)


class SharedExperts(nn.Module):
    """A dense FFN every token goes through, optionally scaled by sigmoid(x @ gate)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, F_ = cfg.dim, cfg.shared_dim
        G = 2 * F_ if cfg.is_glu else F_
        self.w_in = nn.Parameter(torch.empty(D, G))
        self.w_out = nn.Parameter(torch.empty(F_, D))
        self.b_in = nn.Parameter(torch.zeros(G)) if cfg.expert_bias else None
        self.b_out = nn.Parameter(torch.zeros(D)) if cfg.expert_bias else None
        self.gate = nn.Parameter(torch.zeros(1, D)) if cfg.shared_expert_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # a method, as on Experts and Router: a model built on the meta device and
        # materialised with to_empty() calls it per module; without it the shared
        # weights kept uninitialised memory (NaN outputs)
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.cfg.dim))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.cfg.shared_dim))
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)
        if self.gate is not None:
            nn.init.normal_(self.gate, std=1.0 / math.sqrt(self.cfg.dim))

    def forward(self, x_TD: Tensor) -> Tensor:
        if self._kernel_ok(x_TD):  # a decode step's rows: two kernel calls
            cfg = self.cfg
            return decode.shared_rows(x_TD, self.w_in, self.w_out, self.b_in, self.b_out,
                                      self.gate, (cfg.activation, cfg.swiglu_limit,
                                                  cfg.swiglu_alpha))
        # project: the decode kernel for few rows without autograd, and quantized weights
        h = decode.project(x_TD, self.w_in)
        h = activate(h if self.b_in is None else h + self.b_in, self.cfg)
        y = decode.project(h, self.w_out)
        if self.b_out is not None:
            y = y + self.b_out
        if self.gate is not None:
            y = torch.sigmoid(F.linear(x_TD, self.gate)) * y
        return y

    def _kernel_ok(self, x_TD: Tensor) -> bool:
        """Whether ``decode.shared_rows`` runs: few rows on the CPU with no gradient wanted
        (none of the tensors requires one, or grad mode is off), of a dtype
        ``kernel_takes``."""
        return (not decode.grad_wanted(x_TD, self.w_in, self.w_out, self.b_in, self.b_out,
                                       self.gate)
                and self.kernel_takes(x_TD.dtype)
                and decode.dense_kernel_ok(x_TD, self.w_in, x_TD.shape[0]))

    def kernel_takes(self, dtype: torch.dtype) -> bool:
        """Whether ``decode.shared_rows`` takes activations of ``dtype`` (fp32 / bf16)
        for these weights (quantized or of that dtype) and activation (one the kernels
        fuse)."""
        return (self.cfg.activation in decode.ACT_CODES and dtype in decode.STEP_DTYPES
                and all(isinstance(w, QuantizedTensor) or w.dtype == dtype
                        for w in (self.w_in, self.w_out)))
