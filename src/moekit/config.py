"""Frozen, validated configuration for the MoE layer.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError``
naming the field, the value and what is allowed, before any module is built.

Shape letters: D hidden size, F expert hidden size, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, TypeVar

Router = Literal[
    "softmax",  # softmax over all E, take top-K (optionally renormalised)
    "softmax_topk",  # top-K of the logits, softmax over those K only
    "sigmoid",  # sigmoid scores, selection-only bias, routed scaling (DeepSeek-V3)
    "switch",  # top-1 softmax with multiplicative jitter in training (Switch)
    "noisy_topk",  # Shazeer et al. 2017 noisy top-K gating
    "hash",  # fixed token-id -> expert map (Roller et al. 2021)
    "expert_choice",  # each expert takes its top-C tokens (Zhou et al. 2022)
]
ROUTERS: tuple[str, ...] = Router.__args__  # type: ignore[attr-defined]

Activation = Literal["swiglu", "geglu", "relu2", "gelu", "swiglu_oai"]
ACTIVATIONS: tuple[str, ...] = Activation.__args__  # type: ignore[attr-defined]
GLU_ACTIVATIONS = frozenset({"swiglu", "geglu", "swiglu_oai"})

DropPolicy = Literal["position", "probability"]
DROP_POLICIES: tuple[str, ...] = DropPolicy.__args__  # type: ignore[attr-defined]

MAX_EXPERTS = 512

_C = TypeVar("_C", bound="FrozenConfig")


class FrozenConfig:
    """``replace``, ``to_dict`` and ``from_dict`` for moekit's frozen config dataclasses."""

    __slots__ = ()

    def replace(self: _C, **changes: Any) -> _C:
        return replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown keys {unknown}; "
                             f"allowed: {sorted(known)}")
        return cls(**data)


def reject(name: str, value: Any, allowed: str) -> None:
    """Raise the house ValueError: the argument, its value, and what is allowed."""
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        reject(name, value, "it must be a positive int")


def check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        reject(name, value, "it must be a finite number >= 0")
    if not math.isfinite(value):
        reject(name, value, "it must be a finite number >= 0")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        reject(name, value, f"it must be one of {', '.join(allowed)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig(FrozenConfig):
    """Everything that defines one MoE layer.

    The defaults give a dropless, softmax top-2 SwiGLU MoE with no auxiliary loss.
    """

    dim: int  # D, model hidden size
    ffn_dim: int  # F, hidden size of one expert
    num_experts: int = 8  # E
    top_k: int = 2  # K, experts per token (expert_choice: average experts per token)

    # experts
    activation: Activation = "swiglu"
    expert_bias: bool = False  # biases on both expert projections
    swiglu_limit: float = 7.0  # clamp for activation="swiglu_oai" (GPT-OSS)
    swiglu_alpha: float = 1.702  # sigmoid slope for activation="swiglu_oai"

    # shared experts: a dense FFN every token goes through
    num_shared_experts: int = 0
    shared_ffn_dim: int | None = None  # default: num_shared_experts * ffn_dim
    shared_expert_gate: bool = False  # scale the shared output by sigmoid(x @ w), Qwen2-MoE

    # router
    router: Router = "softmax"
    renormalize: bool = True  # renormalise the chosen K weights to sum to 1 (Mixtral)
    num_groups: int = 1  # G, group-limited routing: experts split into G groups
    topk_groups: int = 1  # groups kept per token when num_groups > 1
    routed_scaling_factor: float = 1.0  # multiplies the routed weights (DeepSeek-V3)
    jitter_eps: float = 0.0  # switch: router input *= U(1-eps, 1+eps) in training
    hash_vocab_size: int | None = None  # hash router: size of the token-id table (it has no
    #                                       learned gate, so balance and z losses are 0)
    hash_seed: int = 0

    # balancing (all coefficients 0 = off)
    aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss
    seq_aux_loss_coef: float = 0.0  # sequence-level balancing loss (DeepSeek-V3)
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE)
    bias_update_rate: float = 0.0  # aux-loss-free balancing: selection-bias step size

    # capacity: None = dropless
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "position"

    check_finite: bool = False  # raise on NaN/inf input (costs a host sync)

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_experts", "top_k", "num_groups", "topk_groups"):
            check_positive_int(name, getattr(self, name))
        if self.num_experts > MAX_EXPERTS:
            reject("num_experts", self.num_experts, f"it must be between 1 and {MAX_EXPERTS}")
        if self.top_k > self.num_experts:
            reject("top_k", self.top_k,
                  f"it must be between 1 and num_experts={self.num_experts}")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("router", self.router, ROUTERS)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if isinstance(self.num_shared_experts, bool) or not isinstance(
                self.num_shared_experts, int) or self.num_shared_experts < 0:
            reject("num_shared_experts", self.num_shared_experts, "it must be an int >= 0")
        if self.shared_ffn_dim is not None:
            check_positive_int("shared_ffn_dim", self.shared_ffn_dim)
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
                     "bias_update_rate", "jitter_eps", "swiglu_limit", "swiglu_alpha"):
            check_non_negative(name, getattr(self, name))
        if not (isinstance(self.routed_scaling_factor, (int, float))
                and math.isfinite(self.routed_scaling_factor)
                and self.routed_scaling_factor > 0):
            reject("routed_scaling_factor", self.routed_scaling_factor,
                  "it must be a finite number > 0")
        if self.jitter_eps >= 1:
            reject("jitter_eps", self.jitter_eps, "it must be in [0, 1)")
        if self.capacity_factor is not None and not (
                isinstance(self.capacity_factor, (int, float))
                and not isinstance(self.capacity_factor, bool)
                and math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            reject("capacity_factor", self.capacity_factor,
                  "it must be None (dropless) or a finite number > 0")
        self._check_router()

    def _check_router(self) -> None:
        if self.num_experts % self.num_groups:
            reject("num_groups", self.num_groups,
                  f"it must divide num_experts={self.num_experts}")
        if self.topk_groups > self.num_groups:
            reject("topk_groups", self.topk_groups,
                  f"it must be between 1 and num_groups={self.num_groups}")
        if self.num_groups > 1:
            if self.router not in ("softmax", "sigmoid"):
                reject("num_groups", self.num_groups,
                      "group-limited routing needs router='softmax' or 'sigmoid'")
            reachable = self.topk_groups * (self.num_experts // self.num_groups)
            if self.top_k > reachable:
                reject("top_k", self.top_k,
                      f"it must be <= topk_groups * experts per group = {reachable}")
        if self.router == "switch" and self.top_k != 1:
            reject("top_k", self.top_k, "router='switch' routes each token to exactly 1 expert")
        if self.router == "hash":
            if self.hash_vocab_size is None:
                reject("hash_vocab_size", None, "router='hash' needs the token-id vocabulary size")
            check_positive_int("hash_vocab_size", self.hash_vocab_size)
        if self.router == "expert_choice" and self.seq_aux_loss_coef:
            reject("seq_aux_loss_coef", self.seq_aux_loss_coef,
                  "expert_choice is balanced by construction; use 0")

    # -- derived -----------------------------------------------------------------

    @property
    def is_glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS

    @property
    def shared_dim(self) -> int:
        return self.shared_ffn_dim or self.num_shared_experts * self.ffn_dim

    @property
    def uses_selection_bias(self) -> bool:
        """A per-expert bias added to scores for selection only (aux-loss-free)."""
        return self.router == "sigmoid" or self.bias_update_rate > 0

    def capacity(self, num_tokens: int) -> int:
        """Rows each expert may take (C) for ``num_tokens`` tokens; T*K when dropless."""
        if self.router == "expert_choice":
            factor = self.top_k if self.capacity_factor is None else self.capacity_factor
            return max(1, min(num_tokens, math.ceil(factor * num_tokens / self.num_experts)))
        if self.capacity_factor is None:
            return num_tokens * self.top_k
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k
                                / self.num_experts))

