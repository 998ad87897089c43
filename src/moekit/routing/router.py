"""The router module: parameters and buffers around the pure routing functions.

Router math runs in fp32 for fp32 / bf16 / fp16 input, and in fp64 for fp64 input.
Shape letters: T tokens,
D hidden, E experts, K experts per token, B sequences, L tokens per sequence.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moekit.config import MoEConfig, check_int_range, check_number, reject
from moekit.dispatch.plan import RoutingPlan
from moekit.routing import losses
from moekit.routing.expert_choice import expert_choice
from moekit.routing.hashing import (
    check_hash_table,
    check_table_rows,
    check_token_ids,
    hash_table,
)
from moekit.routing.token_choice import (
    jitter,
    noisy_logits,
    sigmoid_topk,
    softmax_over_topk,
    softmax_topk,
)


@dataclass(frozen=True)
class RouterOutput:
    plan: RoutingPlan
    aux_loss: Tensor  # weighted sum of the configured balance losses (scalar, router_dtype)
    z_loss: Tensor  # unweighted z-loss value (scalar, router_dtype; 0 without logits)


def _token_plan(experts_TK: Tensor, weights_TK: Tensor, probs_TE: Tensor,
                logits_TE: Tensor) -> RoutingPlan:
    """Token-major (token, expert, weight) pairs of a token-choice decision."""
    T, K = experts_TK.shape
    return RoutingPlan(
        token_S=torch.arange(T, device=experts_TK.device).repeat_interleave(K),
        expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
        probs_TE=probs_TE, logits_TE=logits_TE, top_k=K)


def router_dtype(x: Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 input: an fp64 layer (gradcheck, a float64 pipeline) had
    its routing weights and router gradients rounded to fp32 (relative error ~1e-7 where
    the experts' path was exact to 1e-16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fp32_linear(x_TD: Tensor, w_ED: Tensor) -> Tensor:
    """``F.linear`` of fp32 operands kept in fp32 under autocast, which would run it in
    bf16: the routing (documented as fp32) then chose other experts for 0.4% of the
    tokens (T=4096, D=64, E=8, K=2), its combine weights were bf16, and ``infer``'s fp32
    decode kernel disagreed with ``forward``. The [D -> E] GEMM is E / (3 K F) of the
    experts' FLOPs."""
    with torch.autocast(x_TD.device.type, enabled=False):
        return F.linear(x_TD, w_ED)


def _in_backward() -> bool:
    """True while autograd runs a backward on this thread: the forward running then is
    activation checkpointing's recompute (torch.utils.checkpoint, either use_reentrant),
    whose tokens the first forward already counted; counted again, ``load`` held twice
    each checkpointed layer's tokens. Under torch.compile the check is not traced (the
    compiled backward replays no Python forward)."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # private in torch
    return callable(task_id) and task_id() != -1  # without it: counted, as before


class _DDPNote:
    """The DistributedDataParallel that ran a router's last counting forward: its process
    group (None: it ran outside DDP) and a weak reference to the wrapper whose buffers were
    last scanned. Per router, not global (DESIGN.md §2); a copy or an unpickled router
    starts empty, since a process group can be neither copied nor pickled and belongs to
    the run that made it."""

    __slots__ = ("group", "seen")

    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None
        self.seen: weakref.ref | None = None

    def __deepcopy__(self, memo: dict) -> _DDPNote:
        return _DDPNote()

    def __reduce__(self) -> tuple[type, tuple]:
        return _DDPNote, ()

    def live_group(self) -> dist.ProcessGroup | None:
        """The remembered group while it is still registered: after
        ``dist.destroy_process_group()`` (and a new ``init_process_group``) the old group
        object is dead, and a collective over it would fail or hang."""
        group = self.group
        if group is None or not dist.is_available() or not dist.is_initialized():
            return None
        try:
            dist.get_process_group_ranks(group)  # KeyError once the group is destroyed
        except (KeyError, ValueError, RuntimeError):
            return None
        return group


def _stop_ddp_syncing(ddp: DistributedDataParallel, load: Tensor) -> None:
    """Take ``load`` out of the buffers ``ddp`` broadcasts from rank 0 before each
    forward (its default, forward_sync_buffers=True): the broadcast replaced every rank's
    count of its earlier micro-batches with rank 0's, so the load summed over ranks held
    rank 0's earlier micro-batches world times and the other ranks' not at all. DDP
    re-reads its buffer list, minus ``parameters_to_ignore``, at every sync.
    ``expert_bias`` stays synced."""
    if not getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", False)):
        return
    ignore = getattr(ddp, "parameters_to_ignore", None)
    name = next((n for n, b in ddp.module.named_buffers() if b is load), None)
    reassign = getattr(ddp, "_assign_modules_buffers", None)
    if isinstance(ignore, set) and callable(reassign) and name is not None \
            and name not in ignore:
        ignore.add(name)
        reassign()


class Router(nn.Module):
    """Scores tokens against experts and returns a RoutingPlan plus its losses.

    ``weight`` [E, D] is the gate; ``expert_bias`` [E] (aux-loss-free balancing)
    shifts selection only; ``load`` [E] accumulates assignments in training
    until ``update_bias()`` consumes them (a forward recomputed in backward by activation
    checkpointing is not counted again; inside DistributedDataParallel, see ``_note_ddp``).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        if not isinstance(cfg, MoEConfig):
            raise ValueError(f"cfg={type(cfg).__name__} is not allowed: it must be a "
                             "moekit.MoEConfig")
        super().__init__()
        self.cfg = cfg
        self._ddp = _DDPNote()  # a plain attribute: no buffer, not in the state_dict
        E, D = cfg.num_experts, cfg.dim
        self.weight = None if cfg.router == "hash" else nn.Parameter(torch.empty(E, D))
        self.noise_weight = (nn.Parameter(torch.zeros(E, D))
                             if cfg.router == "noisy_topk" else None)
        if cfg.uses_selection_bias:
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("load", torch.zeros(E, dtype=torch.float32))
        else:
            self.expert_bias = self.load = None
        if cfg.router == "hash":
            assert cfg.hash_vocab_size is not None  # validated by MoEConfig
            self.register_buffer("hash_table", torch.empty(  # filled by reset_parameters
                cfg.hash_vocab_size, cfg.top_k, dtype=torch.int64), persistent=True)
            self.register_load_state_dict_pre_hook(_check_loaded_table)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # module.to(bfloat16) would cast the balancing buffers too: bias steps of
        # 1e-3 vanish in bf16 and the load accumulator stops counting past 256. Put back
        # from before the cast (moved where it moved them): cast back to fp32 after it,
        # they had kept the rounding (a load of 257 came back 256)
        kept = {name: getattr(self, name) for name in ("expert_bias", "load")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(self, name, old.to(buf.device, torch.float32))
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A router pickled whole before it had ``_ddp`` (``torch.save(model)``) loads
        with an empty one, rather than failing its first training forward."""
        super().__setstate__(state)
        self.__dict__.setdefault("_ddp", _DDPNote())

    def reset_parameters(self) -> None:
        """A fresh router's state: the gate drawn anew, the noise gate, the selection bias
        and the load zero, the hash table rebuilt from its seed (after to_empty() on a
        meta-built model they held uninitialised memory)."""
        if self.weight is not None:
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.cfg.dim))
        for t in (self.noise_weight, self.expert_bias, self.load):
            if t is not None:
                nn.init.zeros_(t)
        if self.cfg.router == "hash" and not self.hash_table.is_meta:
            cfg = self.cfg
            assert cfg.hash_vocab_size is not None  # validated by MoEConfig
            with torch.no_grad():
                self.hash_table.copy_(hash_table(cfg.hash_vocab_size, cfg.num_experts,
                                                 cfg.top_k, cfg.hash_seed))

    # -- forward -----------------------------------------------------------------

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None,
                seq_len: int | None = None) -> RouterOutput:
        """Route T tokens. ``seq_len`` (L) lets the sequence-level loss see sequences."""
        cfg = self.cfg
        self._check_x(x_TD)
        if seq_len is not None:  # 0 only for zero tokens: [B, 0, D] has L = 0
            T = x_TD.shape[0]
            check_int_range("seq_len", seq_len, 0 if T == 0 else 1)
            if seq_len and T % seq_len:
                reject("seq_len", seq_len,
                       f"it must divide the number of tokens T={T} (B sequences of L tokens)")
        if cfg.router == "hash":
            return self._hash(x_TD, token_ids_T)
        logits_TE = self._logits(x_TD)
        if cfg.router == "expert_choice":
            return self._expert_choice(logits_TE)
        experts_TK, weights_TK, probs_TE = self._token_choice(logits_TE, x_TD)
        if self.training and self.load is not None and not _in_backward():
            self._note_ddp()
            with torch.no_grad():
                self.load.scatter_add_(0, experts_TK.reshape(-1),
                                       torch.ones_like(experts_TK.reshape(-1), dtype=torch.float32))
        aux = self._balance_loss(probs_TE, experts_TK, seq_len)
        z = losses.z_loss(logits_TE)
        plan = _token_plan(experts_TK, weights_TK, probs_TE, logits_TE)
        return RouterOutput(plan, aux + cfg.z_loss_coef * z, z)

    def _note_ddp(self) -> None:
        """Inside a DistributedDataParallel forward: keep DDP from overwriting ``load``
        and remember its group, over which ``update_bias`` then sums the loads by default
        (each rank had stepped its bias from its own tokens, and DDP's broadcast kept
        rank 0's bias). Not traced by torch.compile, nor seen with DDP's python reducer."""
        if torch.compiler.is_compiling():
            return
        active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
        ddp = active() if callable(active) else None  # private in torch: looked up gently
        note = self._ddp
        if ddp is None:
            note.group = None
            return
        if note.seen is None or note.seen() is not ddp:  # the buffer scan once per DDP wrapper
            _stop_ddp_syncing(ddp, self.load)
            note.seen = weakref.ref(ddp)
        note.group = ddp.process_group

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> RoutingPlan:
        """The routing decision alone, for inference: no balance loss, no z-loss.

        Same plan as ``forward`` (in training mode it is ``forward``, which also
        counts the load for the bias update).
        """
        if self.training or self.cfg.router in ("hash", "expert_choice"):
            return self(x_TD, token_ids_T).plan
        self._check_x(x_TD)
        logits_TE = self._logits(x_TD)
        experts_TK, weights_TK, probs_TE = self._token_choice(logits_TE, x_TD)
        return _token_plan(experts_TK, weights_TK, probs_TE, logits_TE)

    def kernel_spec(self) -> tuple[int, bool, Tensor | None] | None:
        """What the decode step's one-call routing (``decode.route_sort``) takes for this
        router in eval mode, (mode, renormalize, selection bias): mode 0 softmax, 1
        sigmoid; None where it has no such kernel (training, hash, expert choice,
        group-limited, a softmax router with a selection bias)."""
        cfg = self.cfg
        if self.training or cfg.num_groups > 1:
            return None
        if cfg.router == "sigmoid":
            return 1, cfg.renormalize, self.expert_bias
        if self.expert_bias is not None:
            return None
        if cfg.router in ("softmax_topk", "noisy_topk"):  # softmax over the top-k logits
            # (= the renormalised top-k of the full softmax), or the full softmax's
            return 0, cfg.renormalize, None
        if cfg.router in ("softmax", "switch"):
            return 0, cfg.renormalize and cfg.router != "switch", None
        return None

    def _check_x(self, x_TD: Tensor) -> None:
        """Shape only (no host sync); the MoE layer checks dtype, device and values."""
        if not isinstance(x_TD, Tensor):
            raise ValueError(f"x_TD={type(x_TD).__name__} is not allowed: it must be a "
                             "torch.Tensor")
        if x_TD.dim() != 2 or x_TD.shape[1] != self.cfg.dim:
            reject("x_TD.shape", tuple(x_TD.shape),
                   f"it must be [T, dim={self.cfg.dim}] (reshape x to (-1, {self.cfg.dim}))")

    def _logits(self, x_TD: Tensor) -> Tensor:
        dtype = router_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        if self.cfg.router == "switch" and self.training and self.cfg.jitter_eps > 0:
            x_TD = jitter(x_TD, self.cfg.jitter_eps)
        w_ED = self.weight
        assert w_ED is not None
        return fp32_linear(x_TD, w_ED.to(dtype))

    def _token_choice(self, logits_TE: Tensor, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        bias_E = self.expert_bias
        if cfg.router == "sigmoid":
            return sigmoid_topk(logits_TE, cfg.top_k, bias_E=bias_E, renormalize=cfg.renormalize,
                                num_groups=cfg.num_groups, topk_groups=cfg.topk_groups,
                                scale=cfg.routed_scaling_factor)
        if cfg.router in ("softmax_topk", "noisy_topk"):
            if cfg.router == "noisy_topk" and self.training:
                assert self.noise_weight is not None
                dtype = logits_TE.dtype
                logits_TE = noisy_logits(logits_TE, fp32_linear(
                    x_TD.to(dtype), self.noise_weight.to(dtype)))
            return softmax_over_topk(logits_TE, cfg.top_k, bias_E=bias_E,
                                     scale=cfg.routed_scaling_factor,
                                     renormalize=cfg.renormalize)
        # Switch's top-1 gate is the raw probability p_i (Fedus et al. 2021): renormalised,
        # one weight is always 1.0 and the router would learn from the aux loss only
        renormalize = cfg.renormalize and cfg.router != "switch"
        return softmax_topk(logits_TE, cfg.top_k, renormalize=renormalize, bias_E=bias_E,
                            num_groups=cfg.num_groups, topk_groups=cfg.topk_groups,
                            scale=cfg.routed_scaling_factor)

    def _balance_loss(self, probs_TE: Tensor, experts_TK: Tensor,
                      seq_len: int | None) -> Tensor:
        cfg = self.cfg
        aux = probs_TE.new_zeros(())
        if cfg.aux_loss_coef:
            aux = aux + cfg.aux_loss_coef * losses.switch_aux_loss(probs_TE, experts_TK)
        if cfg.seq_aux_loss_coef:
            T, E = probs_TE.shape
            L = seq_len or T or 1  # zero tokens: any L > 0 gives an empty [0, L, E] view
            aux = aux + cfg.seq_aux_loss_coef * losses.seq_aux_loss(
                probs_TE.view(T // L, L, E), experts_TK.view(T // L, L, experts_TK.shape[-1]))
        return aux

    def _expert_choice(self, logits_TE: Tensor) -> RouterOutput:
        cfg = self.cfg
        T, E = logits_TE.shape
        C = cfg.capacity(T)
        tokens_EC, weights_EC, probs_TE = expert_choice(logits_TE, C)
        plan = RoutingPlan(
            token_S=tokens_EC.reshape(-1),
            expert_S=torch.arange(E, device=logits_TE.device).repeat_interleave(C),
            weight_S=weights_EC.reshape(-1) * cfg.routed_scaling_factor,
            probs_TE=probs_TE, logits_TE=logits_TE, top_k=cfg.top_k, expert_choice=True)
        z = losses.z_loss(logits_TE)
        aux = probs_TE.new_zeros(())
        if cfg.aux_loss_coef:  # uniform by construction; kept so the coefficient means the same
            aux = cfg.aux_loss_coef * losses.switch_aux_loss(probs_TE, plan.expert_S[:, None])
        return RouterOutput(plan, aux + cfg.z_loss_coef * z, z)

    def _hash(self, x_TD: Tensor, token_ids_T: Tensor | None) -> RouterOutput:
        cfg = self.cfg
        check_token_ids(token_ids_T, x_TD.shape[0], cfg.hash_vocab_size)
        # int64 ids: a uint8 index tensor would be read as a mask
        experts_TK = self.hash_table[token_ids_T.long()]
        check_table_rows(self.hash_table, experts_TK, cfg.num_experts)
        experts_TK = experts_TK.long()  # a table assigned as int32 (scatter_ takes int64)
        T, K = experts_TK.shape
        dtype = router_dtype(x_TD)  # 1/K in fp32 was inexact in an fp64 layer (K=3)
        weights_TK = torch.full((T, K), cfg.routed_scaling_factor / K, device=x_TD.device,
                                dtype=dtype)
        probs_TE = torch.zeros(T, cfg.num_experts, device=x_TD.device, dtype=dtype)
        probs_TE.scatter_(1, experts_TK, 1.0 / K)
        plan = RoutingPlan(
            token_S=torch.arange(T, device=x_TD.device).repeat_interleave(K),
            expert_S=experts_TK.reshape(-1), weight_S=weights_TK.reshape(-1),
            probs_TE=probs_TE, logits_TE=None, top_k=K)
        zero = probs_TE.new_zeros(())
        return RouterOutput(plan, zero, zero)

    # -- aux-loss-free balancing ---------------------------------------------------

    @torch.no_grad()
    def update_bias(self, rate: float | None = None,
                    group: dist.ProcessGroup | None = None, *,
                    reduce: Callable[[Tensor], object] | None = None) -> None:
        """DeepSeek-V3 bias step: b_e += rate * sign(mean load - load_e), then reset load.

        With ``group`` the loads are summed over its ranks first, so every rank
        moves its bias the same way; ``reduce(load)`` sums them in place instead (an
        expert-parallel layer's, which names a dead peer as its other collectives do).
        Without either, a router whose last counting forward ran inside
        DistributedDataParallel sums over DDP's process group: every replica must then
        call it (as an optimizer-step hook or ``update_all_biases`` after each step does).
        """
        rate = self.cfg.bias_update_rate if rate is None else rate
        check_number("rate", rate, 0, 1)  # nan or inf here would reach every bias
        if self.load is None or self.expert_bias is None:
            return
        if reduce is not None:
            reduce(self.load)
        elif group is not None:
            dist.all_reduce(self.load, group=group)
        elif (ddp_group := self._ddp.live_group()) is not None:
            dist.all_reduce(self.load, group=ddp_group)
        step_E = torch.sign(self.load.mean() - self.load)
        # a non-finite load (a corrupted count or all-reduce) skips the step on the
        # device, without a host sync, instead of writing NaN into every bias
        self.expert_bias += rate * torch.where(self.load.isfinite().all(), step_E, 0.0)
        self.load.zero_()


def _check_loaded_table(router: Router, state_dict: Mapping[str, Any], prefix: str,
                        *_: Any) -> None:
    """load_state_dict pre-hook: refuse a bad hash table before this router copies
    anything. An id >= E or < 0 failed inside scatter_ at the first forward (CPU; a
    device assert on CUDA) and a float table was truncated by copy_ without a word.
    One host sync, at load time only."""
    name = prefix + "hash_table"
    if name in state_dict:
        check_hash_table(state_dict[name], tuple(router.hash_table.shape),
                         router.cfg.num_experts, name)
