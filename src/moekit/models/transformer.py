"""A decoder-only transformer language model with MoE feed-forward blocks.

Shape letters: B batch, L sequence (new tokens), P cached positions, S = P + L,
D model size, H heads, J key/value heads (J = H unless grouped-query), Dh head size,
V vocabulary, A dense FFN hidden size, R rows of a static cache in use (sequences still
generating), M cache slots.
"""

from __future__ import annotations

import math
import mmap
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import check_positive_int, reject
from moekit.functions import decode
from moekit.functions.moe_experts import RowBuffers, reuse_row_buffers
from moekit.layer import MoE
from moekit.models.config import LMConfig
from moekit.routing.hashing import check_id_range, check_integer_tensor
from moekit.routing.stats import RoutingStats


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state_dict) whose few-row inference (decode,
    no autograd, CPU) runs on the decode kernel: one [1024 -> 3072] projection at 1
    row takes 0.65x (fp32) / 0.46x (bf16) the time of torch's GEMM (see
    ``functions/decode.py``), the bias added after it. Everything else is ``F.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        x_TK = x.reshape(-1, x.shape[-1])
        if decode.dense_kernel_ok(x, self.weight, x_TK.shape[0]):
            y = decode.dense_rows(x_TK, self.weight[None].transpose(1, 2))
            if self.bias is not None:  # as QuantizedLinear adds it (DecodePlan: the same)
                y = y + self.bias.to(y.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and x.dtype == self.weight.dtype == torch.float32:
            # one op instead of seven: generation runs 2 per layer + 1 per step
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in fp32: under bf16 autocast the mean of squares loses ~3 digits
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotary_table(max_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """The rotary tables ``apply_rotary`` takes, each [max_len, head_dim]: cos(p w_i) on
    both halves, and sin(p w_i) negated on the first half, [-sin | sin]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rotary(x_BHLd: Tensor, cos_Ld: Tensor, sin_Ld: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) by the position angle (half-split layout):
    [x1 cos - x2 sin | x2 cos + x1 sin] = x * cos + [x2 | x1] * [-sin | sin].

    Four ops instead of eight (a decode step runs one per layer); the same values
    bit for bit as the split form. ``cos_Ld`` / ``sin_Ld`` from ``rotary_table``
    broadcast against x's trailing [L, Dh] (per-row positions: [B, 1, L, Dh]);
    leading dimensions of x (e.g. q and k stacked) are free.
    """
    x = x_BHLd if x_BHLd.dtype == torch.float32 else x_BHLd.float()
    out = x * cos_Ld + x.roll(x.shape[-1] // 2, -1) * sin_Ld
    return out if out.dtype == x_BHLd.dtype else out.to(x_BHLd.dtype)


class KVCache:
    """Keys and values seen so far, one (k, v) pair per layer, each [B, J, P, Dh]."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device=None) -> Tensor:
    """Zeros in an anonymous memory map: its pages become resident when first written, so
    a cache sized for the worst case costs what its sequences fill (``lazy=True``)."""
    n = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=torch.uint8)[:n].view(dtype).view(
        shape)


KV_CACHE_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
                   "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "int8": torch.int8}


def kv_cache_dtype(model: MoETransformer, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype of ``model``'s KV cache for ``dtype``: None or "auto" the activations'
    (``model.norm.weight``'s: the embedding may be quantized). Where the activations are
    fp32 also "bfloat16" (half the bytes: keys and values rounded once as they are
    stored); under fp32 or bf16 activations "int8" (a quarter of fp32's bytes plus a float
    scale per slot and head: each slot's key or value of a head quantized symmetrically by
    its largest magnitude, ``quantize_kv``). The scores and sums stay fp32."""
    act = model.norm.weight.dtype
    if dtype is None or dtype == "auto":
        return act
    kv = KV_CACHE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    under = decode.CACHES_UNDER.get(act, ())
    if kv != act and kv not in under:
        allowed = ['"auto"'] + [f'"{n}"' for n, d in KV_CACHE_DTYPES.items()
                                if d == act or d in under]
        reject("kv_cache_dtype", dtype, f"this model's activations are {act}: it must be "
               f"one of {', '.join(allowed)} (or the torch dtype)")
    return kv


KV_SCALE_BYTES = decode.KV_SCALE_BYTES  # an int8 cache row's float scale, after its Dh values


def quantize_kv(x: Tensor) -> Tensor:
    """Keys or values [..., Dh] (float) as an int8 cache holds them, [..., Dh + 4]: each
    row's Dh values q = round(x / scale) (half to even) with scale = its largest magnitude
    / 127, then the scale's 4 bytes (a zero row: scale 0; a non-finite value makes the
    row's scale NaN or inf, so the row dequantizes to NaN). attend_one's store_row
    (moekit/csrc/cpu_decode.cpp) quantizes a decode step's new row the same way."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = (x / torch.where(scale > 0, scale, 1.0)).round().clamp(-127, 127)
    out = torch.empty((*x.shape[:-1], x.shape[-1] + KV_SCALE_BYTES), dtype=torch.int8,
                      device=x.device)
    out[..., :-KV_SCALE_BYTES] = q.nan_to_num(0.0).to(torch.int8)
    out[..., -KV_SCALE_BYTES:] = scale.view(torch.int8)
    return out


def dequantize_kv(packed: Tensor) -> Tensor:
    """An int8 cache's rows [..., Dh + 4] as float32 [..., Dh]: q * scale."""
    scale = packed[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32)
    return packed[..., :-KV_SCALE_BYTES].float() * scale


class StaticKVCache:
    """Keys and values preallocated per layer, [B, J, M, Dh], written in place.

    The generation engine's cache: no ``torch.cat`` per step, attention reads a
    view of the filled slots. Sequences of different lengths are left-padded:
    row r's prompt starts at slot ``pad_B[r]``, ``valid_BM`` marks the slots
    that hold real tokens, and row r's rotary position of slot s is
    ``s - pad_B[r]``, so a padded sequence computes what it computes alone.
    Rows ``[0, rows)`` are in use; ``keep_rows`` drops finished sequences.
    ``lazy=True`` (CPU): the keys and values start as untouched zero pages, resident as
    slots are written (``Batcher`` sizes its shared cache for the worst case).
    ``row_buffers`` keeps the fused expert path's row buffers between the forwards
    that use this cache (``moe_experts.RowBuffers``; ``row_buffers.nbytes`` says how
    much, ``row_buffers.clear()`` frees them). ``dtype`` int8: each slot's row is its
    Dh quantized values and their float scale, [B, J, M, Dh + 4] (``quantize_kv``), and
    attention reads them dequantized.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, lazy: bool = False) -> None:
        self.quantized = dtype == torch.int8
        shape = (batch, kv_heads, max_len, head_dim + (KV_SCALE_BYTES if self.quantized else 0))
        zeros = _lazy_zeros if lazy and torch.device(device or "cpu").type == "cpu" \
            else torch.zeros
        self.k = [zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid_BM = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.pad_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots_M = torch.arange(max_len, device=device)
        self.length, self.rows, self.padded = 0, batch, False
        # set by begin() for the forward in progress; read by every layer
        self.mask: Tensor | None = None
        self.is_causal = False
        # the expert layers' row buffers, kept from one prefill (and layer) to the next
        self.row_buffers = RowBuffers()

    @classmethod
    def for_model(cls, model: MoETransformer, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | str | None = None) -> StaticKVCache:
        """A cache for ``model``: ``max_len`` positions (default its max_seq_len), keys and
        values in ``dtype`` (``kv_cache_dtype``: default the activations')."""
        cfg = model.config
        kv = kv_cache_dtype(model, dtype)
        max_len = cfg.max_seq_len if max_len is None else max_len
        check_positive_int("batch", batch)  # -1 / 2.5 were torch.zeros errors
        if isinstance(max_len, bool) or not isinstance(max_len, int) \
                or not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len={max_len!r} is not allowed: it must be an int between "
                             f"1 and max_seq_len={cfg.max_seq_len}")
        return cls(cfg.num_layers, batch, cfg.kv_heads, max_len, cfg.head_size, kv,
                   model.norm.weight.device)

    @property
    def batch(self) -> int:
        return self.valid_BM.shape[0]

    @property
    def max_len(self) -> int:
        return self.valid_BM.shape[1]

    def reset(self, pad_B: Tensor | None = None) -> None:
        """Empty the cache for ``len(pad_B)`` rows left-padded by ``pad_B`` (default: all
        rows, no padding). Slots are overwritten, not cleared: the mask hides stale ones."""
        rows = self.batch if pad_B is None else pad_B.shape[0]
        if not 1 <= rows <= self.batch:
            raise ValueError(f"{rows} rows are not allowed: this cache holds 1 to "
                             f"{self.batch} sequences")
        self.length, self.rows = 0, rows
        self.pad_B[:rows] = 0 if pad_B is None else pad_B
        self.valid_BM[:rows] = self.slots_M[None] >= self.pad_B[:rows, None]
        self.padded = pad_B is not None and bool(pad_B.any())

    def keep_rows(self, rows_R: Tensor) -> None:
        """Keep only sequences ``rows_R`` (indices into the rows in use), moved to the front.

        Runs once per finished sequence, not per step; copies the filled slots only.
        """
        n, s = rows_R.shape[0], self.length
        for t in (*self.k, *self.v):
            t[:n, :, :s] = t[:, :, :s].index_select(0, rows_R)
        self.pad_B[:n] = self.pad_B.index_select(0, rows_R)
        self.valid_BM[:n] = self.valid_BM.index_select(0, rows_R)
        self.rows, self.padded = n, bool(self.pad_B[:n].any())

    def shift(self, d: int) -> None:
        """Move every row's filled slots by ``d`` (< 0: toward slot 0, over slots no row
        uses; > 0: away from it), with their padding: what each row computes is
        unchanged (its positions count from its own first slot). ``Batcher`` makes room
        this way for a joining sequence; one copy of the filled slots."""
        R, s = self.rows, self.length
        if not -int(self.pad_B[:R].min()) <= d <= self.max_len - s:
            raise ValueError(f"shift d={d} is not allowed: the rows' filled slots must stay "
                             f"in [0, max_len={self.max_len}) (d in "
                             f"[{-int(self.pad_B[:R].min())}, {self.max_len - s}])")
        if d:
            src, dst = (slice(-d, s), slice(0, s + d)) if d < 0 else \
                (slice(0, s), slice(d, s + d))
            for t in (*self.k, *self.v):
                t[:R, :, dst] = t[:R, :, src].clone()  # (the ranges overlap)
            self.pad_B[:R] += d
            self.valid_BM[:R] = self.slots_M[None] >= self.pad_B[:R, None]
            self.length = s + d
            self.padded = bool(self.pad_B[:R].any())

    def join(self, src: StaticKVCache, rows_S: Tensor, lengths: list[int]) -> None:
        """Append rows ``rows_S`` of ``src`` (a prefill's cache, its prompts right-aligned
        at ``src.length``; ``lengths`` their real tokens) as new rows, right-aligned at this
        cache's length: their positions are what they were in ``src``."""
        n, s = rows_S.shape[0], self.length
        R = self.rows
        if not (R + n <= self.batch and all(1 <= p <= min(s, src.length) for p in lengths)
                and len(lengths) == n):
            raise ValueError(f"joining {n} rows of lengths {lengths} is not allowed: this "
                             f"cache has {self.batch - R} free rows and its sequences fill "
                             f"{s} slots (each joining prompt must fit in them)")
        m = min(s, src.length)  # the slots copied, padding included (masked)
        for dst_t, src_t in zip((*self.k, *self.v), (*src.k, *src.v), strict=True):
            dst_t[R:R + n, :, s - m:s] = src_t[:, :, src.length - m:src.length].index_select(
                0, rows_S)
        self.pad_B[R:R + n] = torch.tensor([s - p for p in lengths], device=self.pad_B.device)
        self.valid_BM[R:R + n] = self.slots_M[None] >= self.pad_B[R:R + n, None]
        self.rows = R + n
        self.padded = bool(self.pad_B[:R + n].any())

    def begin(self, L: int, cos_M: Tensor, sin_M: Tensor) -> tuple[Tensor, Tensor]:
        """Prepare a forward of L new tokens per row: set the attention mask, return the
        rotary cos, sin ([L, Dh], or [R, 1, L, Dh] with per-row positions)."""
        P, R = self.length, self.rows
        if P + L > self.max_len:
            raise ValueError(f"sequence length {P + L} is not allowed: this cache holds "
                             f"max_len={self.max_len} positions")
        self.is_causal, self.mask = False, None
        if not self.padded:
            if P == 0 and L > 1:
                self.is_causal = True
            elif L > 1:  # a chunk after a prefix: causal with an offset
                self.mask = self.slots_M[P:P + L, None] >= self.slots_M[None, :P + L]
            return cos_M[P:P + L], sin_M[P:P + L]
        valid_R11S = self.valid_BM[:R, None, None, :P + L]
        if L == 1:  # decode: a view, nothing allocated
            self.mask = valid_R11S
        else:  # causal over real keys; a padding query sees itself (no all-masked row, no NaN)
            query_L1 = self.slots_M[P:P + L, None]
            keys_1S = self.slots_M[None, :P + L]
            self.mask = (valid_R11S & (query_L1 >= keys_1S)) | (query_L1 == keys_1S)
        pos_RL = (self.slots_M[P:P + L][None] - self.pad_B[:R, None]).clamp_min(0)
        return cos_M[pos_RL][:, None], sin_M[pos_RL][:, None]

    def write(self, layer: int, k_RJLd: Tensor, v_RJLd: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys and values at the next L slots; views of the filled slots."""
        P, L, R = self.length, k_RJLd.shape[2], self.rows
        k_all, v_all = self.k[layer], self.v[layer]
        if self.quantized:  # int8 rows and their scales; attention reads them as floats
            k_all[:R, :, P:P + L] = quantize_kv(k_RJLd)
            v_all[:R, :, P:P + L] = quantize_kv(v_RJLd)
            return dequantize_kv(k_all[:R, :, :P + L]), dequantize_kv(v_all[:R, :, :P + L])
        k_all[:R, :, P:P + L] = k_RJLd
        v_all[:R, :, P:P + L] = v_RJLd
        return k_all[:R, :, :P + L], v_all[:R, :, :P + L]

    def advance(self, L: int) -> None:
        self.length += L
        self.mask, self.is_causal = None, False


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        H, J, Dh = cfg.num_heads, cfg.kv_heads, cfg.head_size
        self.num_heads, self.kv_heads, self.head_dim = H, J, Dh
        # [q | k | v]: H query heads, then J key and J value heads, Dh each
        self.qkv = Linear(cfg.dim, (H + 2 * J) * Dh, bias=cfg.qkv_bias)
        self.out = Linear(H * Dh, cfg.dim, bias=False)
        # RMSNorms of q and k before rotary: over each head ("head"), or all heads ("full")
        self.qk_norm = cfg.qk_norm
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(Dh if per_head else H * Dh, cfg.norm_eps)
            self.k_norm = RMSNorm(Dh if per_head else J * Dh, cfg.norm_eps)

    def forward(self, x_BLD: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | StaticKVCache | None, past: int) -> Tensor:
        B, L, _ = x_BLD.shape
        H, J, Dh = self.num_heads, self.kv_heads, self.head_dim
        if (L == 1 and isinstance(cache, StaticKVCache)
                and decode.attend_one_ok(x_BLD, cache.k[self.layer])
                and (self.q_norm is None or self.q_norm.weight.dtype == x_BLD.dtype)):
            # a decode step: (the q / k norms,) rotary, cache write and attention in one call
            qkv = self.qkv(x_BLD).view(B, -1)
            if self.q_norm is not None:
                decode.qk_norm_(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                H * Dh, J * Dh)
            y = decode.attend_one(qkv, cos, sin, cache.k[self.layer], cache.v[self.layer],
                                  cache.length, cache.valid_BM if cache.padded else None)
            return self.out(y.view(B, 1, H * Dh))
        if J == H and self.q_norm is None:
            qkv = self.qkv(x_BLD).view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)  # [3, B, H, L, Dh]
            # q and k rotated in one call: half the small ops of a decode step's rotary
            q, k = apply_rotary(qkv[:2], cos, sin).unbind(0)
            v = qkv[2]
        else:  # grouped-query (attention repeats none of the J heads) or q / k norms
            q, k, v = self.qkv(x_BLD).split([H * Dh, J * Dh, J * Dh], dim=-1)
            if self.q_norm is not None and self.k_norm is not None:
                if self.qk_norm == "head":
                    q, k = q.unflatten(-1, (H, Dh)), k.unflatten(-1, (J, Dh))
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = (t.reshape(B, L, -1, Dh).transpose(1, 2) for t in (q, k, v))  # [B, *, L, Dh]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = {"enable_gqa": True} if J != H else {}
        if isinstance(cache, StaticKVCache):
            k, v = cache.write(self.layer, k, v)
            if k.dtype != q.dtype:  # its values, as decode reads them: a bf16 cache under
                # fp32 widened, an int8 one under bf16 dequantized in fp32 with q widened
                # (fp32 scores and sums; the output rounded once)
                wide = torch.promote_types(k.dtype, q.dtype)
                k, v = k.to(wide), v.to(wide)
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=cache.mask,
                                               is_causal=cache.is_causal, **gqa).to(q.dtype)
            return self.out(y.transpose(1, 2).reshape(B, L, H * Dh))
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        elif L == 1:  # one new token attends to everything before it
            y = F.scaled_dot_product_attention(q, k, v, **gqa)
        else:  # a chunk after a prefix: causal with an offset
            mask_LS = (torch.arange(L, device=q.device)[:, None] + past
                       >= torch.arange(past + L, device=q.device)[None, :])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LS, **gqa)
        return self.out(y.transpose(1, 2).reshape(B, L, H * Dh))


class DenseFFN(nn.Module):
    """SwiGLU with hidden size A; ``w_in`` is [gate | up] like the MoE experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = Linear(dim, 2 * hidden, bias=False)
        self.w_out = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn: nn.Module = (MoE(cfg.moe_config(layer)) if self.is_moe
                               else DenseFFN(cfg.dim, cfg.active_ffn_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | StaticKVCache | None,
                past: int, token_ids: Tensor) -> tuple[Tensor, Tensor | None, RoutingStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, past)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None, None
        y, aux, stats = self.ffn(h, token_ids=token_ids)
        return x + y, aux, stats

    def infer(self, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, cache: StaticKVCache,
              token_ids: Tensor, next_norm: RMSNorm) -> tuple[Tensor, Tensor]:
        """Generation (no losses, no routing statistics): from the residual stream x and
        h = attn_norm(x), the block's output and ``next_norm`` of it."""
        x, h = add_norm(x, self.attn(h, cos, sin, cache, cache.length), self.ffn_norm)
        return add_norm(x, self.ffn.infer(h, token_ids) if self.is_moe else self.ffn(h),
                        next_norm)


def first_norm(x: Tensor, norm: RMSNorm) -> Tensor:
    """norm(x) for a generation step: for a decode step's rows the rms_norm kernel
    (torch's fused rms_norm of one row took ~15 us hot and ~60 inside a step, after the
    weights' stream; the kernel ~2 hot), else the module."""
    if decode.add_norm_ok(x, norm.weight):
        return decode.rms_norm(x, norm.weight, norm.eps)
    return norm(x)


def add_norm(x: Tensor, y: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor]:
    """(x + y, norm(x + y)): one C++ call for a decode step's few rows."""
    if decode.add_norm_ok(x, norm.weight):
        return decode.add_rms_norm(x, y, norm.weight, norm.eps)
    x = x + y
    return x, norm(x)


class LMOutput(NamedTuple):
    logits: Tensor  # [B, L, V]
    loss: Tensor | None  # mean next-token cross-entropy (nats), without aux loss
    aux_loss: Tensor  # sum of the MoE layers' weighted auxiliary losses
    stats: list[RoutingStats]  # one per MoE layer, in layer order


class MoETransformer(nn.Module):
    """Decoder-only LM. ``model(ids_BL, targets_BL)`` -> LMOutput."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"config={type(config).__name__} is not allowed: it must be "
                             "a moekit.models.LMConfig")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_table(config.max_seq_len, config.head_size, config.rope_theta)
        # derived from the config: not saved in checkpoints
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        std, out_scale = cfg.init_std, 1.0 / math.sqrt(2 * cfg.num_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            if block.attn.qkv.bias is not None:
                nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=std * out_scale)
            # dense and MoE FFNs get the same per-weight scales so the comparison is fair
            if block.is_moe:
                experts = block.ffn.experts
                nn.init.normal_(experts.w_in, std=std)
                nn.init.normal_(experts.w_out, std=std * out_scale)
                if (shared := block.ffn.shared) is not None:
                    nn.init.normal_(shared.w_in, std=std)
                    nn.init.normal_(shared.w_out, std=std * out_scale)
                    if shared.gate is not None:
                        nn.init.normal_(shared.gate, std=std)
            else:
                nn.init.normal_(block.ffn.w_in.weight, std=std)
                nn.init.normal_(block.ffn.w_out.weight, std=std * out_scale)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, ids_BL: Tensor, targets_BL: Tensor | None = None,
                cache: KVCache | StaticKVCache | None = None) -> LMOutput:
        self._check_forward(ids_BL, targets_BL, cache)
        B, L = ids_BL.shape
        past = 0 if cache is None else cache.length
        if past + L > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + L} is not allowed: it must be <= "
                             f"max_seq_len={self.config.max_seq_len}")
        if isinstance(cache, StaticKVCache):
            _check_rows(cache, B)
            cos, sin = cache.begin(L, self.rope_cos, self.rope_sin)
        else:
            cos, sin = self.rope_cos[past:past + L], self.rope_sin[past:past + L]
        x = self.embed(ids_BL)
        aux = x.new_zeros((), dtype=torch.float32)
        stats: list[RoutingStats] = []
        for block in self.blocks:
            x, aux_i, stats_i = block(x, cos, sin, cache, past, ids_BL)
            if aux_i is not None and stats_i is not None:
                aux = aux + aux_i.float()
                stats.append(stats_i)
        if isinstance(cache, StaticKVCache):
            cache.advance(L)
        logits = self.head(self.norm(x))
        loss = None
        if targets_BL is not None:
            # .long(): no copy for int64; int32 targets (int32 ids work) were a torch error
            loss = F.cross_entropy(logits.float().view(B * L, -1),
                                   targets_BL.reshape(-1).long())
        return LMOutput(logits, loss, aux, stats)

    def _check_forward(self, ids_BL: Any, targets_BL: Any, cache: Any) -> None:
        """Shapes, dtypes and the cache's type always (free); the id values on CPU
        tensors only, outside torch.compile (on CUDA a host sync every step)."""
        check_token_ids("ids_BL", ids_BL, self.config.vocab_size)
        if targets_BL is not None:
            check_integer_tensor("targets_BL", targets_BL)
            # same numel, other shape (e.g. [L, B]) gave a silently wrong loss
            if targets_BL.shape != ids_BL.shape:
                reject("targets_BL.shape", tuple(targets_BL.shape),
                       f"it must be ids_BL's shape {tuple(ids_BL.shape)}")
        if cache is None:
            return
        if not isinstance(cache, (KVCache, StaticKVCache)):
            reject("cache", type(cache).__name__, "it must be None, a KVCache or a "
                   "StaticKVCache")
        n = len(cache.layers) if isinstance(cache, KVCache) else len(cache.k)
        if n != self.config.num_layers:
            reject("cache", f"{type(cache).__name__} of {n} layers",
                   f"it must hold num_layers={self.config.num_layers}")

    def infer(self, ids_BL: Tensor, cache: StaticKVCache) -> Tensor:
        """Logits of each row's last position, [B, V], appending ``ids_BL`` to ``cache``.

        The generation step: no losses, no routing statistics, the head on the
        last position only. Call under ``torch.inference_mode()``.
        """
        _check_rows(cache, ids_BL.shape[0])
        cos, sin = cache.begin(ids_BL.shape[1], self.rope_cos, self.rope_sin)
        x = self.embed(ids_BL)
        h = first_norm(x, self.blocks[0].attn_norm)
        with reuse_row_buffers(cache.row_buffers):
            for i, block in enumerate(self.blocks):
                last = i + 1 == len(self.blocks)
                x, h = block.infer(x, h, cos, sin, cache, ids_BL,
                                   self.norm if last else self.blocks[i + 1].attn_norm)
        cache.advance(ids_BL.shape[1])
        return self.head(h[:, -1])

    def infer_pair(self, ids_RL: Tensor, cache: StaticKVCache, ids_UN: Tensor,
                   other: StaticKVCache) -> tuple[Tensor, Tensor]:
        """``infer`` of two batches, each with its own cache, in one pass: attention
        apart, every other layer (embedding, norms, experts, head) over the tokens of both,
        so the experts a step touches are read once for both (``Batcher``: a decode step
        and a joining prompt's prefill chunk). Logits [R, V] and [U, V]: those of two
        ``infer`` calls up to the kernels' rounding for a different number of rows."""
        _check_rows(cache, ids_RL.shape[0])
        _check_rows(other, ids_UN.shape[0])
        pairs = ((ids_RL, cache, cache.begin(ids_RL.shape[1], self.rope_cos, self.rope_sin)),
                 (ids_UN, other, other.begin(ids_UN.shape[1], self.rope_cos, self.rope_sin)))
        ids_T = torch.cat([ids_RL.reshape(-1), ids_UN.reshape(-1)])
        sizes = [ids_RL.numel(), ids_UN.numel()]
        x = self.embed(ids_T)
        h = first_norm(x, self.blocks[0].attn_norm)
        with reuse_row_buffers(cache.row_buffers):
            for i, block in enumerate(self.blocks):
                attn = [block.attn(part.view(*ids.shape, -1), cos, sin, c, c.length).flatten(0, 1)
                        for part, (ids, c, (cos, sin)) in zip(h.split(sizes), pairs, strict=True)]
                x, h = add_norm(x, torch.cat(attn), block.ffn_norm)
                last = i + 1 == len(self.blocks)
                x, h = add_norm(x, block.ffn.infer(h, ids_T) if block.is_moe else block.ffn(h),
                                self.norm if last else self.blocks[i + 1].attn_norm)
        for ids, c, _ in pairs:
            c.advance(ids.shape[1])
        R, L = ids_RL.shape
        U, N = ids_UN.shape
        rows = torch.cat([torch.arange(R) * L + L - 1, sizes[0] + torch.arange(U) * N + N - 1])
        logits = self.head(h.index_select(0, rows.to(h.device)))
        return logits[:R], logits[R:]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self) -> int:
        """Parameters one token touches: all but the experts it is not routed to.

        The tied embedding is counted once; embedding rows are counted in full.
        """
        total = self.num_params()
        for moe in self.moe_layers():
            cfg = moe.config
            per_expert = sum(p[0].numel() for p in moe.experts.parameters())
            total -= (cfg.num_experts - cfg.top_k) * per_expert
        return total


def check_token_ids(name: str, ids_BL: Any, vocab_size: int) -> None:
    """An int64 / int32 [B, L] tensor (the embedding's index types) of ids in
    [0, vocab_size); the values are read on CPU tensors only, outside torch.compile."""
    if not isinstance(ids_BL, Tensor):
        reject(name, type(ids_BL).__name__, "it must be a torch.Tensor of token ids")
    if ids_BL.dtype not in (torch.int64, torch.int32):
        reject(f"{name}.dtype", ids_BL.dtype, "it must be int64 or int32 (the embedding's "
               "index types); cast with .long()")
    if ids_BL.dim() != 2:
        reject(f"{name}.shape", tuple(ids_BL.shape), "it must be [batch, length]")
    if ids_BL.device.type == "cpu" and not torch.compiler.is_compiling():
        check_id_range(name, ids_BL, vocab_size, "vocab_size")


def _check_rows(cache: StaticKVCache, B: int) -> None:
    if B != cache.rows:
        raise ValueError(f"batch of {B} sequences is not allowed: the cache is set up for "
                         f"rows={cache.rows} (StaticKVCache.reset)")
