"""Multi-gate MoE (MMoE, Ma et al. 2018): one router per task over shared experts.

Each task routes the same tokens through the same experts with its own gate
(any router of MoEConfig; ``top_k = num_experts`` gives the original dense
softmax mixture). Shape letters: T tokens, D hidden.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.experts import Experts
from moekit.layer import check_input, check_state_dict, route_and_sort
from moekit.routing.router import Router
from moekit.routing.stats import RoutingStats, routing_stats


class MultiGateOutput(NamedTuple):
    outputs: list[Tensor]  # one per task, each shaped like the input
    aux_loss: Tensor  # sum over tasks, already weighted
    stats: list[RoutingStats]


class MultiGateMoE(nn.Module):
    def __init__(self, config: MoEConfig, num_tasks: int, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config={type(config).__name__} is not allowed: it must be "
                             "a moekit.MoEConfig")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks!r} is not allowed: it must be an int >= 1")
        if config.router == "hash" or config.num_shared_experts:
            raise ValueError(f"router={config.router!r}, num_shared_experts="
                             f"{config.num_shared_experts} is not allowed in MultiGateMoE: "
                             "use a learned router and no shared experts")
        self.config = config
        self.experts = Experts(config, backend)
        self.gates = nn.ModuleList(Router(config) for _ in range(num_tasks))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a state dict that does not fit (another config
        or number of tasks) raises ValueError before any tensor is written."""
        check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict, assign)

    def forward(self, x: Tensor) -> MultiGateOutput:
        cfg = self.config
        check_input(x, cfg.dim, cfg.check_finite, self.experts.w_in)
        self.experts.check_input(x)  # before the gates count the tokens
        x_TD = x.reshape(-1, cfg.dim)
        T = x_TD.shape[0]
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        outputs, stats, aux = [], [], x_TD.new_zeros((), dtype=torch.float32)
        for gate in self.gates:
            routed, dispatch, _ = route_and_sort(gate, x_TD, None, seq_len)
            outputs.append(self.experts(x_TD, dispatch).view(x.shape))
            stats.append(routing_stats(routed.plan, dispatch, T, routed.z_loss, routed.aux_loss))
            aux = aux + routed.aux_loss
        return MultiGateOutput(outputs, aux, stats)

    @torch.no_grad()
    def update_bias(self, rate: float | None = None, group=None) -> None:
        """Aux-loss-free balancing step of every task's gate, each from its own loads."""
        for gate in self.gates:
            gate.update_bias(rate, group)
