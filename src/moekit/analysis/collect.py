"""Collect routing decisions of every moekit MoE layer with forward hooks.

A hook on each layer's router reads the RoutingPlan it returns (which token went
to which expert, the routing distribution); a hook on the layer reads the
dropped fraction from the RoutingStats it returns. Counts accumulate in a
``RoutingCollector`` object: nothing global, hooks removed on exit.

Shape letters: T tokens, E experts, S routed (token, expert) pairs, V vocabulary,
C byte classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.config import check_positive_int, reject
from moekit.layer import MoE
from moekit.routing.hashing import check_integer_tensor

# Byte classes for "byte patterns": the class of the previous byte and of this one.
CLASS_NAMES = ("start", "newline", "space", "tab", "lower", "upper", "digit", "underscore",
               "quote", "bracket", "operator", "punct", "other")


def byte_class_table() -> Tensor:
    """int64 [256]: the class index (into CLASS_NAMES) of each byte value."""
    table = torch.full((256,), CLASS_NAMES.index("other"), dtype=torch.long)
    groups = {"newline": b"\n\r", "space": b" ", "tab": b"\t",
              "lower": bytes(range(97, 123)), "upper": bytes(range(65, 91)),
              "digit": b"0123456789", "underscore": b"_", "quote": b"'\"`",
              "bracket": b"()[]{}", "operator": b"+-*/%=<>&|^~!@", "punct": b".,:;?#$\\"}
    for name, chars in groups.items():
        table[list(chars)] = CLASS_NAMES.index(name)
    return table


@dataclass
class LayerRouting:
    """Running counts for one MoE layer."""

    name: str
    num_experts: int
    top_k: int
    vocab_size: int
    router: str = "softmax"  # MoEConfig.router: what the entropy and co-activation mean
    load_E: Tensor = field(init=False)  # pairs assigned to each expert (before drops)
    co_EE: Tensor = field(init=False)  # tokens routed to both i and j (diagonal: to i)
    token_VE: Tensor = field(init=False)  # pairs by (token id, expert)
    # pairs by (previous byte class, byte class, expert)
    pattern_CCE: Tensor = field(init=False)
    entropy_sum: float = 0.0  # sum over tokens of the routing distribution's entropy
    tokens: int = 0
    last_tokens: int = 0  # tokens of the latest forward pass
    pairs: int = 0
    dropped: int = 0  # dropped pairs (expert choice: tokens no expert took)
    drop_denominator: int = 0  # routed pairs (expert choice: tokens)
    # per-token decisions, kept only when asked (RoutingCollector(decisions=True)), for
    # comparing two checkpoints on the same tokens: one [T] / [T, E] tensor per pass
    top1_T: list[Tensor] = field(default_factory=list)  # chosen expert of largest weight
    chosen_TE: list[Tensor] = field(default_factory=list)  # bool: the token's expert set

    def __post_init__(self) -> None:
        E, V, C = self.num_experts, self.vocab_size, len(CLASS_NAMES)
        self.load_E = torch.zeros(E, dtype=torch.long)
        self.co_EE = torch.zeros(E, E, dtype=torch.long)
        self.token_VE = torch.zeros(V, E, dtype=torch.long)
        self.pattern_CCE = torch.zeros(C, C, E, dtype=torch.long)


class RoutingCollector:
    """Records routing while active::

        with RoutingCollector(model, vocab_size=256) as rc:
            for ids_BL in batches:
                rc.set_tokens(ids_BL)
                model(ids_BL)
        layers = rc.layers
    """

    def __init__(self, model: nn.Module, vocab_size: int, decisions: bool = False) -> None:
        if not isinstance(model, nn.Module):
            reject("model", model, "it must be a torch.nn.Module holding moekit.MoE layers")
        check_positive_int("vocab_size", vocab_size)
        self.modules = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
        if not self.modules:
            raise ValueError("model has no moekit.MoE layers, which is not allowed: there is "
                             "no routing to analyse")
        self.layers = [LayerRouting(n, m.config.num_experts, m.config.top_k, vocab_size,
                                    m.config.router) for n, m in self.modules]
        self.vocab_size = vocab_size
        self.decisions = decisions  # keep every token's experts (memory: T x E bools)
        self.classes = byte_class_table() if vocab_size <= 256 else None
        self.ids_T: Tensor | None = None
        self.prev_class_T: Tensor | None = None
        self.base_V = torch.zeros(vocab_size, dtype=torch.long)  # every token seen, once
        self.base_CC = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.long)
        self.handles: list = []

    def set_tokens(self, ids_BL: Tensor) -> None:
        """The token ids of the next forward pass (B sequences of L tokens)."""
        check_integer_tensor("ids_BL", ids_BL)  # floats were truncated, bools read as 0 / 1
        ids_BL = ids_BL.detach().cpu().long()
        if ids_BL.dim() != 2 or ids_BL.numel() == 0 or int(ids_BL.min()) < 0 \
                or int(ids_BL.max()) >= self.vocab_size:
            raise ValueError(f"ids_BL (shape {tuple(ids_BL.shape)}) is not allowed: it must be "
                             f"a non-empty [B, L] tensor of ids in [0, {self.vocab_size})")
        self.ids_T = ids_BL.reshape(-1)
        self.base_V += torch.bincount(self.ids_T, minlength=self.vocab_size)
        if self.classes is not None:
            C = len(CLASS_NAMES)
            cls_BL = self.classes[ids_BL]
            prev_BL = torch.full_like(cls_BL, CLASS_NAMES.index("start"))
            prev_BL[:, 1:] = cls_BL[:, :-1]
            self.prev_class_T = prev_BL.reshape(-1)
            key = self.prev_class_T * C + cls_BL.reshape(-1)
            self.base_CC += torch.bincount(key, minlength=C * C).view(C, C)

    def __enter__(self) -> RoutingCollector:
        for i, (_, moe) in enumerate(self.modules):
            self.handles.append(moe.router.register_forward_hook(self._router_hook(i)))
            self.handles.append(moe.register_forward_hook(self._layer_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _router_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            self.record_plan(i, output.plan)
        return hook

    def _layer_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            layer, plan_tokens = self.layers[i], output.stats.tokens_per_expert
            denom = layer.last_tokens if module.config.router == "expert_choice" \
                else int(plan_tokens.sum())
            # a whole count: the fp32 fraction times its size had summed to 0.42857143
            # for 12 of 28
            layer.dropped += round(float(output.stats.dropped_fraction) * denom)
            layer.drop_denominator += denom
        return hook

    @torch.no_grad()
    def record_plan(self, i: int, plan) -> None:
        """Add one RoutingPlan (a forward pass of layer i) to the counts."""
        layer = self.layers[i]
        token_S, expert_S = plan.token_S.cpu(), plan.expert_S.cpu()
        probs_TE = plan.probs_TE.detach().float().cpu()
        T, E = probs_TE.shape
        if self.ids_T is None or self.ids_T.numel() != T:
            given = 0 if self.ids_T is None else self.ids_T.numel()
            raise ValueError(f"set_tokens() was given {given} token ids, which is not "
                             f"allowed: layer {layer.name} routed {T} tokens")
        layer.load_E += torch.bincount(expert_S, minlength=E)
        hot_TE = torch.zeros(T, E)
        hot_TE[token_S, expert_S] = 1.0
        layer.co_EE += (hot_TE.T @ hot_TE).round().long()
        layer.entropy_sum += float(-(probs_TE * probs_TE.clamp_min(1e-20).log()).sum())
        layer.tokens += T
        layer.last_tokens = T
        layer.pairs += int(token_S.numel())
        if self.decisions:
            self.record_decisions(layer, plan, T, E)
        ids_S = self.ids_T[token_S]
        layer.token_VE += torch.bincount(ids_S * E + expert_S,
                                         minlength=self.vocab_size * E).view(-1, E)
        if self.classes is not None and self.prev_class_T is not None:
            C = len(CLASS_NAMES)
            key = (self.prev_class_T[token_S] * C + self.classes[ids_S]) * E + expert_S
            layer.pattern_CCE += torch.bincount(key, minlength=C * C * E).view(C, C, E)

    @staticmethod
    def record_decisions(layer: LayerRouting, plan, T: int, E: int) -> None:
        """Each token's expert set and its top-1: the chosen expert with the largest
        combine weight (ties: the lowest id; -1 for a token no expert took)."""
        token_S, expert_S = plan.token_S.cpu(), plan.expert_S.cpu()
        weight_TE = torch.full((T, E), -math.inf)
        weight_TE[token_S, expert_S] = plan.weight_S.detach().float().cpu()
        chosen_TE = weight_TE > -math.inf
        top1_T = torch.where(chosen_TE.any(1), weight_TE.argmax(1), -1)
        layer.top1_T.append(top1_T)
        layer.chosen_TE.append(chosen_TE)
