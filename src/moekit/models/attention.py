"""Attention of the MoE language model: rotary position tables and their application, and
``Attention`` (fused qkv projection, optional q / k norms, grouped-query heads) over no
cache, a growing ``KVCache`` or a ``StaticKVCache`` (a decode step's rows on the C++
``attend_one`` kernel).

Shape letters: B batch, L sequence (new tokens), D model size, H heads, J key/value heads
(J = H unless grouped-query), Dh (d) head size, S keys attended (cached + new), R rows of a
static cache in use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.functions import decode
from moekit.models.config import LMConfig
from moekit.models.kv_cache import KVCache, StaticKVCache
from moekit.models.layers import Linear, RMSNorm


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
                and decode.attend_one_ok(x_BLD, cache.k[self.layer], *self._step_weights())
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

    def _step_weights(self) -> tuple[Tensor | None, ...]:
        """What a decode step's kernels (``qk_norm_``, ``attend_one``, which have no
        backward) compute from besides x: the qkv projection's parameters and the q / k
        norms' weights."""
        norms = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None \
            and self.k_norm is not None else ()
        return self.qkv.weight, self.qkv.bias, *norms
