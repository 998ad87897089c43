"""Whole-block forwards for transformers MoE models whose experts are not stacked tensors,
or whose block does not hand its experts the routing.

DBRX keeps gate and up as two [E*F, D] matrices; Switch Transformers keeps one
``nn.Linear`` pair per expert. Both are gathered into moekit's [E, D, G] layout
inside the forward (a copy of the weights, differentiable, so gradients reach
the original Parameters and the state_dict is untouched). Llama 4's experts are
stacked, but its block runs them on every token scaled by its router score; its
forward here builds the routed rows instead.

Shape letters: B sequences, L tokens per sequence, T = B*L tokens, D hidden,
F expert hidden, E experts, K experts per token, S routed rows (T*K).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch.plan import RoutingPlan
from moekit.dispatch.sort import capacity_keep
from moekit.functions import decode
from moekit.integrations.hf.experts import GluAct, dispatch_from_topk, run_experts, run_experts_topk


class DbrxBlock:
    """DBRX ``DbrxFFN``: the router module gives logits (and records them); softmax in the
    logits' dtype, top K of those probabilities (the same ops as transformers, so the same
    experts where probabilities tie), weights divided by their p-norm
    (``moe_normalize_expert_weights``)."""

    _moekit_backend: str = "auto"

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits_TE = self.router(hidden_states)  # jitter, if any, scales hidden_states in place
        # Top K of the probabilities, not of the logits: in bf16 distinct logits often round
        # to equal probabilities and topk's tie order then picks the expert (2 tokens of 200
        # got another expert set when ranked by logits).
        probs_TE = logits_TE.softmax(-1, dtype=logits_TE.dtype)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        p = self.moe_normalize_expert_weights
        if p is not None:
            weights_TK = weights_TK / weights_TK.norm(p=p, dim=-1, keepdim=True)
        mlp = self.experts.mlp
        E, D = self.experts.num_experts, self.experts.hidden_size
        gate_EFD, up_EFD = mlp.w1.view(E, -1, D), mlp.v1.view(E, -1, D)
        w_in_EDG = torch.cat([gate_EFD, up_EFD], dim=1).transpose(1, 2)
        x_TD = hidden_states.reshape(-1, D)
        # nothing to differentiate (frozen experts, grad mode on): no_grad's backend and
        # kernels, no_grad's output bit for bit (it took the fused GEMMs)
        with decode.no_grad_unless_wanted(x_TD, weights_TK, modules=(mlp,)):
            y_TD = run_experts_topk(x_TD, experts_TK, weights_TK, E, w_in_EDG,
                                    mlp.w2.view(E, -1, D), None, None,
                                    GluAct(mlp.activation_fn), self._moekit_backend)
        return y_TD.view(hidden_states.shape[0], -1, D)


class SwitchRouter:
    """Switch Transformers top-1 router; same outputs as the original: the one-hot expert
    mask with tokens over capacity zeroed [B, L, E], the chosen probability [B, L, 1] and
    the logits [B, L, E] (recorded for the z-loss and the balance loss)."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.dtype)
        if self.training and self.jitter_noise > 0:
            # In place, like the original: the experts then see the jittered input too.
            hidden_states *= torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        self.classifier = self.classifier.to(self.dtype)
        logits_BLE = self.classifier(hidden_states)
        B, L, E = logits_BLE.shape
        # Probabilities in the input dtype before the choice, as the original does.
        probs_TE = logits_BLE.reshape(-1, E).softmax(-1, dtype=self.dtype).to(self.input_dtype)
        experts_T1 = probs_TE.argmax(-1, keepdim=True)  # argmax: ties go to the lowest id
        keep_T1 = per_sequence_keep(experts_T1, probs_TE, L, self.expert_capacity)
        mask_TE = torch.zeros_like(probs_TE, dtype=torch.long).scatter_(1, experts_T1,
                                                                        keep_T1.long())
        return mask_TE.view(B, L, E), probs_TE.gather(1, experts_T1).view(B, L, 1), logits_BLE


def per_sequence_keep(experts_T1: Tensor, probs_TE: Tensor, seq_len: int,
                      capacity: int) -> Tensor:
    """Switch's capacity counts per sequence, earlier tokens first. moekit's capacity
    policy counts per expert, so each sequence gets its own copy of the E experts."""
    T, E = probs_TE.shape
    arange_T = torch.arange(T, device=experts_T1.device)
    virtual_T = (arange_T // seq_len) * E + experts_T1[:, 0]
    plan = RoutingPlan(token_S=arange_T, expert_S=virtual_T, weight_S=probs_TE.gather(
        1, experts_T1)[:, 0].float(), probs_TE=probs_TE, logits_TE=None, top_k=1)
    return capacity_keep(plan, (T // seq_len) * E, capacity, "position")[:, None]


class SwitchSparseMLP:
    """Switch Transformers ``SparseMLP``: moekit's dispatch drops the tokens over capacity
    (they get no expert output, as in the original) and runs the experts grouped."""

    _moekit_backend: str = "auto"

    def forward(self, hidden_states: Tensor) -> Tensor:
        B, L, D = hidden_states.shape
        mask_BLE, probs_BL1, _ = self.router(hidden_states)
        E = mask_BLE.shape[-1]
        experts_T1 = mask_BLE.view(-1, E).argmax(-1, keepdim=True)
        keep_T1 = mask_BLE.view(-1, E).sum(-1, keepdim=True) > 0
        # Rows weighted 1 and the probability applied after, in its own dtype: transformers
        # multiplies the expert output by the fp32 probability, in fp32, where autocast runs
        # the experts in bf16; a combine in the experts' dtype rounded both the probability
        # and the product to bf16 (the router's gradient too): the tiny test model's loss
        # moved 1.6603 -> 1.6582 and a decoder expert's wi gradient by 36% of its max.
        # Top-1, so the unit weight is exact and the sum has one term: the same ops as
        # transformers, in fp32 and under autocast (bitwise, tests/test_hf.py).
        probs_T1 = probs_BL1.view(-1, 1)
        dispatch = dispatch_from_topk(experts_T1, torch.ones_like(probs_T1), E, keep_T1)
        mlps = [self.experts[f"expert_{e}"] for e in range(E)]
        w_in_EDF = torch.stack([m.wi.weight for m in mlps]).transpose(1, 2)
        w_out_EFD = torch.stack([m.wo.weight for m in mlps]).transpose(1, 2)
        first = mlps[0]

        def act(h_SF: Tensor) -> Tensor:
            return first.dropout(first.act(h_SF))

        # as DbrxBlock: with no gradient wanted, no_grad's backend and kernels
        with decode.no_grad_unless_wanted(hidden_states, modules=(self.experts,)):
            y_TD = run_experts(hidden_states.view(-1, D), dispatch, w_in_EDF, w_out_EFD, None,
                               None, act, self._moekit_backend)
        return (y_TD * probs_T1).to(hidden_states.dtype).view(B, L, D)


class Llama4Block:
    """Llama 4 ``Llama4TextMoe``. transformers runs every expert on every token: each token
    repeated E times, scaled by its router score (sigmoid of its top-K logits, 0 for the
    other experts), through all E experts, the E outputs summed: E/K times the routed
    work. Here only the T*K chosen (token, expert) pairs run. The score multiplies the
    expert's *input* (act(s x W) != s act(x W)), so row (t, k) is x_t times its score,
    routed top-1 to its expert with weight 1 (moekit's dispatch and backends, through the
    patched ``Llama4Experts``); a token's K outputs are summed in expert order, as
    transformers' sum over E meets them; the shared expert runs as transformers' MLP and
    the routed sum is added to it. Gradients reach the router through the scaling, as in
    the original."""

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        scores_TE, logits_TE = self.router(x_TD)  # a module call: the logits are recorded
        experts_TK = logits_TE.topk(self.top_k, dim=1).indices  # the router's own choice
        if self.top_k > 1:
            experts_TK = experts_TK.sort(dim=1).values
        T, K = experts_TK.shape
        scores_TK = scores_TE.gather(1, experts_TK)
        x_SD = (x_TD[:, None, :] * scores_TK[:, :, None]).view(T * K, -1)
        ones_S1 = torch.ones(T * K, 1, dtype=x_SD.dtype, device=x_SD.device)
        y_SD = self.experts(x_SD, experts_TK.view(T * K, 1), ones_S1)
        out_TD = self.shared_expert(x_TD)
        out_TD.add_(y_SD if K == 1 else y_SD.view(T, K, -1).sum(1))
        return out_TD, logits_TE
