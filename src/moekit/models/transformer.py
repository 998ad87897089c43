"""A decoder-only transformer language model with MoE feed-forward blocks.

Shape letters: B batch, L sequence (new tokens), P cached positions, S = P + L,
D model size, H heads, Dh head size, V vocabulary, A dense FFN hidden size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layer import MoE
from moekit.models.config import LMConfig
from moekit.routing.stats import RoutingStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32: under bf16 autocast the mean of squares loses ~3 digits
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotary_table(max_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [max_len, head_dim // 2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHLd: Tensor, cos_Lh: Tensor, sin_Lh: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) by the position angle (half-split layout)."""
    x1, x2 = x_BHLd.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_Lh - x2 * sin_Lh, x1 * sin_Lh + x2 * cos_Lh], dim=-1)
    return out.to(x_BHLd.dtype)


class KVCache:
    """Keys and values seen so far, one (k, v) pair per layer, each [B, H, P, Dh]."""

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


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BLD: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | None, past: int) -> Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif L == 1:  # one new token attends to everything before it
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after a prefix: causal with an offset
            mask_LS = (torch.arange(L, device=q.device)[:, None] + past
                       >= torch.arange(past + L, device=q.device)[None, :])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LS)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class DenseFFN(nn.Module):
    """SwiGLU with hidden size A; ``w_in`` is [gate | up] like the MoE experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None,
                past: int, token_ids: Tensor) -> tuple[Tensor, Tensor | None, RoutingStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, past)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None, None
        y, aux, stats = self.ffn(h, token_ids=token_ids)
        return x + y, aux, stats


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
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_table(config.max_seq_len, config.dim // config.num_heads,
                                config.rope_theta)
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
            nn.init.normal_(block.attn.out.weight, std=std * out_scale)
            # dense and MoE FFNs get the same per-weight scales so the comparison is fair
            if block.is_moe:
                experts = block.ffn.experts
                nn.init.normal_(experts.w_in, std=std)
                nn.init.normal_(experts.w_out, std=std * out_scale)
            else:
                nn.init.normal_(block.ffn.w_in.weight, std=std)
                nn.init.normal_(block.ffn.w_out.weight, std=std * out_scale)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, ids_BL: Tensor, targets_BL: Tensor | None = None,
                cache: KVCache | None = None) -> LMOutput:
        B, L = ids_BL.shape
        past = 0 if cache is None else cache.length
        if past + L > self.config.max_seq_len:
            raise ValueError(f"sequence length {past + L} is not allowed: it must be <= "
                             f"max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[past:past + L], self.rope_sin[past:past + L]
        x = self.embed(ids_BL)
        aux = x.new_zeros((), dtype=torch.float32)
        stats: list[RoutingStats] = []
        for block in self.blocks:
            x, aux_i, stats_i = block(x, cos, sin, cache, past, ids_BL)
            if aux_i is not None and stats_i is not None:
                aux = aux + aux_i.float()
                stats.append(stats_i)
        logits = self.head(self.norm(x))
        loss = None
        if targets_BL is not None:
            loss = F.cross_entropy(logits.float().view(B * L, -1), targets_BL.reshape(-1))
        return LMOutput(logits, loss, aux, stats)

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
