"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

Shape letters: T tokens (all leading dims flattened), D hidden, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.dispatch.plan import Dispatch
from moekit.dispatch.sort import sort_by_expert
from moekit.experts.experts import Experts, SharedExperts
from moekit.routing.router import Router, RouterOutput
from moekit.routing.stats import RoutingStats, routing_stats


class MoEOutput(NamedTuple):
    output: Tensor  # same shape as the input
    aux_loss: Tensor  # scalar, already weighted; zero when no loss is configured
    stats: RoutingStats


def check_input(x: Tensor, dim: int, check_finite: bool = False) -> None:
    """Raise ValueError naming the argument, its value and what is allowed."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x={type(x).__name__} is not allowed: it must be a torch.Tensor")
    if not x.is_floating_point():
        raise ValueError(f"x.dtype={x.dtype} is not allowed: it must be a floating dtype "
                         "(float32, bfloat16, float16, float64)")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x.shape={tuple(x.shape)} is not allowed: its last dimension "
                         f"must be dim={dim}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf, which is not allowed with check_finite=True")


def check_token_ids(token_ids: Tensor | None, x: Tensor, vocab: int) -> None:
    if token_ids is None:
        raise ValueError("token_ids=None is not allowed: router='hash' needs the token ids "
                         "(an integer tensor shaped like x without its last dimension)")
    if token_ids.shape != x.shape[:-1] or token_ids.is_floating_point():
        raise ValueError(f"token_ids (shape {tuple(token_ids.shape)}, {token_ids.dtype}) is "
                         f"not allowed: it must be an integer tensor of shape "
                         f"{tuple(x.shape[:-1])}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise ValueError(f"token_ids has values in [{int(token_ids.min())}, "
                         f"{int(token_ids.max())}], which is not allowed: they must lie in "
                         f"[0, hash_vocab_size={vocab})")


def route_and_sort(router: Router, x_TD: Tensor, ids_T: Tensor | None, seq_len: int | None
                   ) -> tuple[RouterOutput, Dispatch, int | None]:
    """Route T tokens with ``router`` and sort the pairs by expert under the capacity policy.

    Returns (the router's output, the Dispatch, the capacity or None when dropless).
    """
    cfg = router.cfg
    routed = router(x_TD, ids_T, seq_len)
    capacity = None if cfg.capacity_factor is None else cfg.capacity(x_TD.shape[0])
    dispatch = sort_by_expert(routed.plan, cfg.num_experts, capacity, cfg.drop_policy)
    return routed, dispatch, capacity


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    >>> moe = MoE(MoEConfig(dim=64, ffn_dim=128, num_experts=8, top_k=2))
    >>> y, aux_loss, stats = moe(torch.randn(4, 10, 64))
    """

    def __init__(self, config: MoEConfig, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config={type(config).__name__} is not allowed: it must be "
                             "a moekit.MoEConfig")
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config, backend)
        self.shared = SharedExperts(config) if config.num_shared_experts else None

    def route(self, x: Tensor, token_ids: Tensor | None = None
              ) -> tuple[Tensor, RouterOutput, Dispatch, int | None]:
        """Check x, route its tokens and sort them by expert.

        Returns (x_TD, the router's output, the Dispatch, the capacity or None).
        """
        cfg = self.config
        check_input(x, cfg.dim, cfg.check_finite)
        if cfg.router == "hash":
            assert cfg.hash_vocab_size is not None
            check_token_ids(token_ids, x, cfg.hash_vocab_size)
        x_TD = x.reshape(-1, cfg.dim)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        routed, dispatch, capacity = route_and_sort(self.router, x_TD, ids_T, seq_len)
        return x_TD, routed, dispatch, capacity

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> MoEOutput:
        x_TD, routed, dispatch, _ = self.route(x, token_ids)
        y_TD = self.experts(x_TD, dispatch)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        stats = routing_stats(routed.plan, dispatch, x_TD.shape[0], routed.z_loss,
                              routed.aux_loss)
        return MoEOutput(y_TD.view(x.shape), routed.aux_loss, stats)

    def infer(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """The layer's output alone, for generation: the routing decision without its
        losses, and no routing statistics. Same output as ``forward`` in eval mode."""
        cfg = self.config
        x_TD = x.reshape(-1, cfg.dim)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        plan = self.router.select(x_TD, ids_T)
        capacity = None if cfg.capacity_factor is None else cfg.capacity(x_TD.shape[0])
        y_TD = self.experts(x_TD, sort_by_expert(plan, cfg.num_experts, capacity,
                                                 cfg.drop_policy))
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(x.shape)

    @torch.no_grad()
    def update_bias(self, rate: float | None = None, group=None) -> None:
        """Aux-loss-free balancing step from the loads accumulated since the last call."""
        self.router.update_bias(rate, group)


def update_all_biases(model: nn.Module, group=None) -> None:
    """Call ``update_bias`` on every MoE layer in ``model`` that has a selection bias."""
    for m in model.modules():
        if isinstance(m, MoE) and m.config.bias_update_rate > 0:
            m.update_bias(group=group)


def attach_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module, group=None):
    """Run the aux-loss-free bias update after every ``optimizer.step()``.

    Returns the hook handle (``handle.remove()`` detaches it).
    """
    return optimizer.register_step_post_hook(
        lambda *_: update_all_biases(model, group))
