"""A decoder-only transformer language model with MoE feed-forward blocks: ``Block``
(attention + MoE or dense FFN), ``MoETransformer`` (training forward, ``infer`` and
``infer_pair`` on a ``StaticKVCache``), ``LMOutput`` and ``check_token_ids``. Attention
lives in ``attention.py``, the KV caches in ``kv_cache.py``, ``Linear`` / ``RMSNorm`` /
``DenseFFN`` and the fused norms in ``layers.py``; their names stay importable from here.

Shape letters: B batch, L sequence (new tokens), V vocabulary, R rows of a static cache
in use (sequences still generating), U / N rows and new tokens of ``infer_pair``'s second
batch, T tokens of both batches flattened.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import reject
from moekit.functions.row_buffers import reuse_row_buffers
from moekit.layer import MoE
from moekit.models.attention import Attention, apply_rotary, rotary_table
from moekit.models.config import LMConfig
from moekit.models.kv_cache import (
    KV_CACHE_DTYPES,
    KV_SCALE_BYTES,
    KVCache,
    StaticKVCache,
    dequantize_kv,
    kv_cache_dtype,
    quantize_kv,
)
from moekit.models.layers import DenseFFN, Linear, RMSNorm, add_norm, first_norm
from moekit.routing.hashing import check_id_range, check_integer_tensor
from moekit.routing.stats import RoutingStats

# the pieces moved to attention.py, kv_cache.py and layers.py, importable from here as before
__all__ = [
    "KV_CACHE_DTYPES", "KV_SCALE_BYTES", "Attention", "Block", "DenseFFN", "KVCache", "LMOutput",
    "Linear", "MoETransformer", "RMSNorm", "StaticKVCache", "add_norm", "apply_rotary",
    "check_token_ids", "dequantize_kv", "first_norm", "kv_cache_dtype", "quantize_kv",
    "rotary_table",
]


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
        if torch.get_default_device().type == "meta":
            # built to be loaded into (the loaders compute the tables): their shapes only,
            # as the arithmetic on meta tensors runs torch's Python references, which
            # import torch._dynamo (see moekit.meta)
            cos, sin = (torch.empty(config.max_seq_len, config.head_size) for _ in "cs")
        else:
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
        with _writing(cache):  # a second forward on the cache meanwhile: ConcurrentUseError
            return self._forward(ids_BL, targets_BL, cache)

    def _forward(self, ids_BL: Tensor, targets_BL: Tensor | None,
                 cache: KVCache | StaticKVCache | None) -> LMOutput:
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
        last position only. Call under ``torch.inference_mode()``. Threads may call it
        on one model at once, each with its own cache (README, "Threads"); a second
        forward on ``cache`` while this one runs raises ``ConcurrentUseError``.
        """
        with cache.writing():
            return self._infer(ids_BL, cache)

    def _infer(self, ids_BL: Tensor, cache: StaticKVCache) -> Tensor:
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
        with cache.writing(), other.writing():
            return self._infer_pair(ids_RL, cache, ids_UN, other)

    def _infer_pair(self, ids_RL: Tensor, cache: StaticKVCache, ids_UN: Tensor,
                    other: StaticKVCache) -> tuple[Tensor, Tensor]:
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


def _writing(cache: KVCache | StaticKVCache | None) -> AbstractContextManager:
    """The cache's guard against two forwards at once (``writing``); none without a cache
    or under torch.compile (a training forward: no cache; the lock would break the graph)."""
    if cache is None or torch.compiler.is_compiling():
        return nullcontext()
    return cache.writing()


def _check_rows(cache: StaticKVCache, B: int) -> None:
    if B != cache.rows:
        raise ValueError(f"batch of {B} sequences is not allowed: the cache is set up for "
                         f"rows={cache.rows} (StaticKVCache.reset)")
