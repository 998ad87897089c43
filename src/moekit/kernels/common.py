"""Pieces shared by the kernels: activations and their derivatives, the dot product.

Activation ids (``ACT_IDS``) follow ``moekit.experts.activations``: GLU kinds
take a gate and an up value (gate first in the fused projection); the others
use only the first argument. Shape letters: S rows, E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Decided when this module is imported, like triton.jit itself decides.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

ACT_IDS = {"swiglu": 0, "geglu": 1, "swiglu_oai": 2, "relu2": 3, "gelu": 4}
GLU_ACTS = frozenset({"swiglu", "geglu", "swiglu_oai"})


def needs_upcast(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot on bf16 returns wrong values (error ~1e10 on a
    16x16 product with triton 3.9), so under TRITON_INTERPRET bf16 tiles are
    upcast to fp32 before the dot. Compiled GPU kernels use bf16 tensor cores."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 dots follow torch's matmul setting (TF32 only when torch allows it)."""
    if dtype != torch.float32 or INTERPRET:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def rows_bucket(S: int, E: int) -> int:
    """Autotune bucket: rows per expert on average, rounded up to a power of two."""
    return min(triton.next_power_of_2(max(1, -(-S // E))), 1 << 14)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(
        -0.5 * x * x)


@triton.jit
def act_fwd(g, u, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
    """fp32 in, fp32 out."""
    if ACT == 0:  # swiglu
        out = g * tl.sigmoid(g) * u
    elif ACT == 1:  # geglu
        out = _gelu(g) * u
    elif ACT == 2:  # swiglu_oai (GPT-OSS): clamped gate and up, slope ALPHA, (up + 1)
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = gc * tl.sigmoid(ALPHA * gc) * (uc + 1.0)
    elif ACT == 3:  # relu2
        r = tl.maximum(g, 0.0)
        out = r * r
    else:  # gelu
        out = _gelu(g)
    return out


@triton.jit
def act_bwd(g, u, d, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
    """Gradients (d_gate, d_up) of act_fwd given the output gradient ``d`` (fp32)."""
    if ACT == 0:
        s = tl.sigmoid(g)
        d_g = d * u * s * (1.0 + g * (1.0 - s))
        d_u = d * g * s
    elif ACT == 1:
        d_g = d * u * _gelu_grad(g)
        d_u = d * _gelu(g)
    elif ACT == 2:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        s = tl.sigmoid(ALPHA * gc)
        # torch.clamp passes the gradient where the input lies inside the bounds, inclusive
        d_g = tl.where(g <= LIMIT, d * (uc + 1.0) * s * (1.0 + ALPHA * gc * (1.0 - s)), 0.0)
        d_u = tl.where((u >= -LIMIT) & (u <= LIMIT), d * gc * s, 0.0)
    elif ACT == 3:
        d_g = d * 2.0 * tl.maximum(g, 0.0)
        d_u = d_g
    else:
        d_g = d * _gelu_grad(g)
        d_u = d_g
    return d_g, d_u
