"""Key/value caches of the MoE language model: the growing ``KVCache`` (``torch.cat`` per
step), the preallocated ``StaticKVCache`` the generation engine uses (left padding, row
joins and shifts, fp32 / bf16 / int8 slots), the choice of its dtype (``kv_cache_dtype``)
and the int8 rows' quantization (``quantize_kv`` / ``dequantize_kv``).

Shape letters: B batch (cache rows), R rows in use (sequences still generating), S rows
joined from another cache, J key/value heads, P cached positions, L new tokens, M cache
slots, Dh (d) head size.
"""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.config import check_positive_int, reject
from moekit.functions import decode
from moekit.functions.row_buffers import RowBuffers
from moekit.inference.concurrency import OneCall

if TYPE_CHECKING:
    from moekit.models.transformer import MoETransformer


def _in_use_message(name: str) -> str:
    return (f"{name} is being written by another forward (another "
            "thread's, or one this thread is running): two forwards on one KV cache write "
            "each other's keys, values and mask; give each thread its own cache (or "
            "Engine)")


def _one_at_a_time(method: Callable) -> Callable:
    """``method`` refused (``ConcurrentUseError``) while a forward writes the cache."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._use:
            return method(self, *args, **kwargs)
    return guarded


class KVCache:
    """Keys and values seen so far, one (k, v) pair per layer, each [B, J, P, Dh]. One
    generation's, one forward at a time (as ``StaticKVCache``: a second raises
    ``ConcurrentUseError``)."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * num_layers
        self._use = OneCall(_in_use_message(f"KVCache({num_layers} layers)"))

    def writing(self) -> OneCall:
        """Held by a forward that appends to this cache (``MoETransformer.forward``)."""
        return self._use

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
    that use this cache (``row_buffers.RowBuffers``; ``row_buffers.nbytes`` says how
    much, ``row_buffers.clear()`` frees them). ``dtype`` int8: each slot's row is its
    Dh quantized values and their float scale, [B, J, M, Dh + 4] (``quantize_kv``), and
    attention reads them dequantized.

    One generation's: one forward at a time (each thread of a server its own cache, or an
    ``Engine`` each). A forward, ``DecodePlan.step`` or a change of rows (``reset``,
    ``keep_rows``, ``shift``, ``join``) while another runs on this cache raises
    ``ConcurrentUseError`` naming it, before anything is written: the two wrote each
    other's slots, mask and row buffers, with no error. The cost: one uncontended
    non-blocking lock acquire per forward (``writing``), none per layer.
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
        self._use = OneCall(_in_use_message(
            f"StaticKVCache(batch={batch}, max_len={max_len}, {num_layers} layers)"))

    def writing(self) -> OneCall:
        """Held by a forward that writes this cache (``MoETransformer.forward``, ``infer``,
        ``infer_pair``, ``DecodePlan.step``) and by the row changes: a second one at once
        raises ``ConcurrentUseError``."""
        return self._use

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

    @_one_at_a_time
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

    @_one_at_a_time
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

    @_one_at_a_time
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

    @_one_at_a_time
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
