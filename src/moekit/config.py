"""Frozen, validated configuration for the MoE layer.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError``
naming the field, the value and what is allowed, before any module is built.

Shape letters: D hidden size, F expert hidden size, E experts, K experts per token.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

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
# Upper bounds that only an error reaches: typical values are 1e-3..1e-2 for loss
# coefficients, 1e-3 for the bias step (scores lie in [0, 1]), 1..16 for the routed
# scaling (DeepSeek-V2 16, V3 2.5), 7 for the GPT-OSS clamp. 1e308 made the loss inf.
MAX_LOSS_COEF = 100.0
MAX_SCALING = 1e3
MAX_SWIGLU = 1e4
# hash table rows: 4M ids x K int64 = 256 MiB at K=8; real vocabularies are < 300k
MAX_HASH_VOCAB = 1 << 22
MAX_SEED = 2**63 - 1

_C = TypeVar("_C", bound="FrozenConfig")


class FrozenConfig:
    """``replace``, ``to_dict`` and ``from_dict`` for moekit's frozen config dataclasses."""

    __slots__ = ()

    def replace(self: _C, **changes: Any) -> _C:
        type(self)._check_keys(changes)
        return replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        cls._check_keys(data)
        return cls(**data)

    @classmethod
    def _check_keys(cls, data: dict[str, Any]) -> None:
        """ValueError naming the unknown keys and the allowed ones (not a TypeError)."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown keys {unknown}; "
                             f"allowed: {sorted(known)}")


def reject(name: str, value: Any, allowed: str) -> None:
    """Raise the house ValueError: the argument, its value, and what is allowed."""
    raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


def check_writable_folder(flag: str, out: str | Path, candidates: list[Path]) -> None:
    """The nearest existing path of ``candidates`` (``out`` and / or its parents, nearest
    first) is a directory this process can write into; else a ValueError naming ``flag``."""
    here = next((p for p in candidates if p.exists()), Path("."))
    if not here.is_dir():
        where = "it" if here == Path(out) else f"{str(here)!r} in its path"
        reject(flag, str(out), f"{where} is a file, not a directory; pick a directory")
    if not os.access(here, os.W_OK | os.X_OK):
        reject(flag, str(out), f"{str(here)!r} is not writable; pick a directory you can "
               "write to")


def check_out_dir(flag: str, out: str | Path) -> None:
    """``out`` can become a directory that this process writes into: it is named, it is
    not a file, no file stands in its path, and its nearest existing parent is writable."""
    if str(out) == "":  # Path("") is the current directory
        reject(flag, str(out), "it must name a directory")
    path = Path(out)
    check_writable_folder(flag, out, [path, *path.parents])


def check_positive_int(name: str, value: Any, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        reject(name, value, "it must be a positive int" + (
            "" if maximum is None else f" <= {maximum}"))
    if maximum is not None and value > maximum:
        reject(name, value, f"it must be a positive int <= {maximum}")


def check_int_range(name: str, value: Any, low: int, high: int | None = None) -> None:
    """An int (not a bool) in [low, high]; ``high=None``: no upper bound.

    A torch.SymInt (a shape under symbolic tracing) counts as an int.
    """
    is_int = isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        reject(name, value, f"it must be an int >= {low}" if high is None else
               f"it must be an int in [{low}, {high}]")


def check_bool(name: str, value: Any) -> None:
    """Only True or False: a truthy string such as "False" must not switch a feature on."""
    if not isinstance(value, bool):
        reject(name, value, "it must be True or False")


def is_number_in(value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> bool:
    """A real number (not a bool), finite, in [low, high]; ``*_open`` excludes that end
    (``check_number``'s test, for a check that words its own error)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high))


def check_number(name: str, value: Any, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A real number (not a bool), finite, in [low, high]; ``*_open`` excludes that end."""
    if not is_number_in(value, low, high, low_open=low_open, high_open=high_open):
        span = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
        reject(name, value, f"it must be a finite number {span}")


def flag_message(err: Exception, flags: dict[str, str]) -> str:
    """One line for a command: ``field=value is not allowed: ...`` led by the field's flag."""
    msg = " ".join(str(err).split())
    field = msg.split("=", 1)[0]
    return f"{flags[field]}: {msg}" if field in flags else msg


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
    # renormalise the chosen K weights to sum to 1 (Mixtral, Qwen3-MoE); False: the chosen
    # experts' softmax (sigmoid: sigmoid) probabilities as they are (OLMoE, Qwen2-MoE's
    # norm_topk_prob=False). switch and expert_choice always take the raw probabilities
    # (a renormalised top-1 weight is 1.0: the gate would get no gradient); hash weights
    # are 1/K by construction, so False is refused there.
    renormalize: bool = True
    num_groups: int = 1  # G, group-limited routing: experts split into G groups
    topk_groups: int = 1  # groups kept per token when num_groups > 1
    routed_scaling_factor: float = 1.0  # multiplies the routed weights (DeepSeek-V3)
    jitter_eps: float = 0.0  # switch: router input *= U(1-eps, 1+eps) in training
    hash_vocab_size: int | None = None  # hash router: size of the token-id table (it has no
    #                                       learned gate, so balance and z losses are 0)
    hash_seed: int = 0  # hash router: seeds the table (a random K-subset per id); the LM
    #                     gives MoE layer l the seed LMConfig.hash_seed + l

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
        check_int_range("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_ffn_dim is not None:
            check_positive_int("shared_ffn_dim", self.shared_ffn_dim)
            if not self.num_shared_experts:  # no shared FFN is built, but the plan counted one
                reject("shared_ffn_dim", self.shared_ffn_dim,
                       f"it must be None when num_shared_experts={self.num_shared_experts} "
                       "(it sizes the shared experts; set num_shared_experts >= 1 to use it)")
        if self.hash_vocab_size is not None:  # unused by other routers, but never garbage
            check_positive_int("hash_vocab_size", self.hash_vocab_size, MAX_HASH_VOCAB)
        for name in ("expert_bias", "shared_expert_gate", "renormalize", "check_finite"):
            check_bool(name, getattr(self, name))
        if self.shared_expert_gate and not self.num_shared_experts:  # no shared FFN to gate
            reject("shared_expert_gate", self.shared_expert_gate,
                   f"it must be False when num_shared_experts={self.num_shared_experts} "
                   "(it gates the shared experts; set num_shared_experts >= 1 to use it)")
        self._check_numbers()
        self._check_router()

    def _check_numbers(self) -> None:
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef"):
            check_number(name, getattr(self, name), 0, MAX_LOSS_COEF)
        check_number("bias_update_rate", self.bias_update_rate, 0, 1)
        check_number("jitter_eps", self.jitter_eps, 0, 1, high_open=True)
        check_number("swiglu_limit", self.swiglu_limit, 0, MAX_SWIGLU)
        check_number("swiglu_alpha", self.swiglu_alpha, 0, MAX_SWIGLU)
        check_number("routed_scaling_factor", self.routed_scaling_factor, 0, MAX_SCALING,
                     low_open=True)
        # capacity_factor = E already lets every expert hold all T*K pairs (expert
        # choice: all T tokens); more only inflates buffers (1e308 overflowed to inf)
        if self.capacity_factor is not None:
            check_number("capacity_factor", self.capacity_factor, 0, self.num_experts,
                         low_open=True)
        check_int_range("hash_seed", self.hash_seed, 0, MAX_SEED)

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
        if self.jitter_eps and self.router != "switch":  # only the switch router jitters
            reject("jitter_eps", self.jitter_eps,
                   f"it must be 0 with router={self.router!r} (the input jitter is the "
                   "Switch router's; use router='switch' to use it)")
        if self.router == "switch" and self.top_k != 1:
            reject("top_k", self.top_k, "router='switch' routes each token to exactly 1 expert")
        if self.router == "hash":
            if not self.renormalize:  # had been ignored: the weights stayed 1/K
                reject("renormalize", self.renormalize,
                       "router='hash' has no scores to leave unnormalised (its K weights "
                       "are 1/K each); use True")
            if self.hash_vocab_size is None:
                reject("hash_vocab_size", None, "router='hash' needs the token-id vocabulary size")
            check_positive_int("hash_vocab_size", self.hash_vocab_size, MAX_HASH_VOCAB)
        if self.bias_update_rate and self.router in ("hash", "expert_choice"):
            # these routers never read the selection bias nor count a load: the step was 0
            reject("bias_update_rate", self.bias_update_rate,
                   f"router={self.router!r} has no token scores for a selection bias to "
                   "shift (aux-loss-free balancing needs a token-choice router); use 0")
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
        check_int_range("num_tokens", num_tokens, 0)  # -1 gave C=-2, 2.5 gave 5.0
        if self.router == "expert_choice":
            factor = self.top_k if self.capacity_factor is None else self.capacity_factor
            # min(T, .) last: zero tokens give C = 0, not a top-1 of an empty set
            return min(num_tokens, max(1, math.ceil(factor * num_tokens / self.num_experts)))
        if self.capacity_factor is None:
            return num_tokens * self.top_k
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k
                                / self.num_experts))

