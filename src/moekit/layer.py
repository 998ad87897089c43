"""The MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

Shape letters: T tokens (all leading dims flattened), D hidden, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig, reject
from moekit.dispatch.plan import Dispatch
from moekit.dispatch.sort import sort_by_expert
from moekit.experts.experts import Experts, SharedExperts
from moekit.functions import decode
from moekit.quant.layout import raw_state_dicts
from moekit.routing.hashing import check_id_range, check_integer_tensor
from moekit.routing.router import Router, RouterOutput
from moekit.routing.stats import RoutingStats, routing_stats


class MoEOutput(NamedTuple):
    output: Tensor  # same shape as the input
    aux_loss: Tensor  # scalar, already weighted; zero when no loss is configured
    stats: RoutingStats


AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def check_input(x: Tensor, dim: int, check_finite: bool = False,
                weight: Tensor | None = None) -> None:
    """Raise ValueError naming the argument, its value and what is allowed.

    With ``weight`` (a parameter of the layer), x must also sit on its device
    and have its dtype: we refuse rather than cast, because a silent cast would
    hide a float64 pipeline losing precision (or double the memory of a bf16
    one), and a mismatch found inside the GEMM comes after the router has
    already counted the tokens into its load buffer. Under autocast any of
    float32/bfloat16/float16 is fine: autocast casts for the GEMMs.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x={type(x).__name__} is not allowed: it must be a torch.Tensor")
    if not x.is_floating_point():
        raise ValueError(f"x.dtype={x.dtype} is not allowed: it must be a floating dtype "
                         "(float32, bfloat16, float16, float64)")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x.shape={tuple(x.shape)} is not allowed: its last dimension "
                         f"must be dim={dim}")
    if weight is not None:
        check_like_weight(x, weight)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf, which is not allowed with check_finite=True")


def reference_weight(layer: nn.Module) -> Tensor | None:
    """The parameter whose dtype and device the input must match: the stacked expert
    weight, or the router's where the experts hold no plain tensor (quantized experts,
    experts streamed from disk)."""
    w_in = getattr(layer.experts, "w_in", None)
    return w_in if isinstance(w_in, Tensor) else getattr(layer.router, "weight", None)


def check_like_weight(x: Tensor, weight: Tensor) -> None:
    if x.device != weight.device:
        raise ValueError(f"x.device={x.device} is not allowed: it must be the layer's device "
                         f"({weight.device}); move one of them with .to()")
    autocast = torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not (autocast and x.dtype in AUTOCAST_INPUTS):
        raise ValueError(f"x.dtype={x.dtype} is not allowed: it must be the layer's dtype "
                         f"({weight.dtype}), or float32/bfloat16/float16 under autocast; "
                         f"cast with x.to({weight.dtype}) or the layer with .to({x.dtype})")


def check_token_ids(token_ids: Tensor | None, x: Tensor, vocab: int) -> None:
    """Hash routing's ids: integers shaped like x without its last dimension, in
    [0, vocab). The values are read on every device (one host sync per step on CUDA,
    where an id out of range would be a device-side assert rather than an error), but
    under torch.compile: a value read on the host cannot be traced (fullgraph=True
    failed with 'Could not guard on data-dependent expression' for every hash layer),
    so the graph carries an assert that raises a RuntimeError saying the same."""
    if token_ids is None:
        raise ValueError("token_ids=None is not allowed: router='hash' needs the token ids "
                         "(an integer tensor shaped like x without its last dimension)")
    check_integer_tensor("token_ids", token_ids)
    if token_ids.shape != x.shape[:-1]:
        raise ValueError(f"token_ids (shape {tuple(token_ids.shape)}, {token_ids.dtype}) is "
                         f"not allowed: it must be an integer tensor of shape "
                         f"{tuple(x.shape[:-1])}")
    if not torch.compiler.is_compiling():
        check_id_range("token_ids", token_ids, vocab, "hash_vocab_size")
        return
    torch._assert_async(((token_ids >= 0) & (token_ids < vocab)).all(),
                        f"token_ids has values outside [0, hash_vocab_size={vocab}), "
                        "which is not allowed")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    """Raise ValueError before ``load_state_dict`` writes anything where ``state_dict``
    does not fit ``module`` (nn.Module copies the tensors that fit, then raises for the
    rest, so a state dict of another config left a half-loaded layer)."""
    if not isinstance(state_dict, Mapping):
        return  # nn.Module.load_state_dict raises its TypeError before any write
    with raw_state_dicts():  # shapes only: o16 experts' NK copies had doubled their memory
        own = module.state_dict()
    missing = sorted(set(own) - set(state_dict)) if strict else []
    unexpected = sorted(set(state_dict) - set(own)) if strict else []
    wrong = [f"{k}: {_shape(state_dict[k])} where the layer's is {tuple(v.shape)}"
             for k, v in own.items()
             if k in state_dict and _shape(state_dict[k]) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"state_dict (missing keys {missing[:5]}, unexpected keys "
                         f"{unexpected[:5]}, mismatches {wrong[:5]}) is not allowed: it must "
                         f"hold this {type(module).__name__}'s tensors with their shapes "
                         "(a state dict of another config does not fit)")


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


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

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a state dict that does not fit (another config)
        raises ValueError before any tensor is written."""
        check_state_dict(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict, assign)

    def route(self, x: Tensor, token_ids: Tensor | None = None
              ) -> tuple[Tensor, RouterOutput, Dispatch, int | None]:
        """Check x, route its tokens and sort them by expert.

        Returns (x_TD, the router's output, the Dispatch, the capacity or None).
        """
        x_TD, ids_T = self._checked(x, token_ids)
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        routed, dispatch, capacity = route_and_sort(self.router, x_TD, ids_T, seq_len)
        return x_TD, routed, dispatch, capacity

    def _checked(self, x: Tensor, token_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Check x (and the token ids of router='hash') before anything runs.

        Returns (x_TD, the ids as int64 [T], None for routers that take no ids).
        """
        cfg = self.config
        check_input(x, cfg.dim, cfg.check_finite, reference_weight(self))
        if isinstance(self.experts, Experts):  # before the router counts the tokens
            self.experts.check_input(x)
        if cfg.router != "hash":
            return x.reshape(-1, cfg.dim), None
        assert cfg.hash_vocab_size is not None
        check_token_ids(token_ids, x, cfg.hash_vocab_size)
        assert token_ids is not None
        # int64 ids: a uint8 index tensor would be read as a mask, int8/int16 ids give
        # index errors in the table lookup
        return x.reshape(-1, cfg.dim), token_ids.reshape(-1).long()

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> MoEOutput:
        """Route x [..., D] and run the experts. ``token_ids`` (shaped like x without D)
        are read by router='hash' only, which requires them; every other router ignores
        them, so a model can hand its ids to every layer whatever each layer's router
        (refusing them broke that pattern, this repository's own test models included)."""
        x_TD, routed, dispatch, _ = self.route(x, token_ids)
        y_TD = self.experts(x_TD, dispatch)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        stats = routing_stats(routed.plan, dispatch, x_TD.shape[0], routed.z_loss,
                              routed.aux_loss)
        return MoEOutput(y_TD.view(x.shape), routed.aux_loss, stats)

    def infer(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """The layer's output alone, for generation: the routing decision without its
        losses, and no routing statistics. Same output as ``forward`` in eval mode, but
        for a token-choice router with a capacity factor, which runs dropless here: a
        capacity is shared by every row of a call, so a sequence's tokens were dropped or
        kept by what else was in the batch (another request's, in ``moekit serve``), and
        a prompt's prefill dropped what decoding it token by token kept. (Expert choice
        routes over each call's rows by definition: see the README.) Threads may call it
        (and ``forward`` without autograd) on one layer at once: no state is kept between
        calls but in a generation's KV cache (README, "Threads")."""
        x_TD, ids_T = self._checked(x, token_ids)
        dispatch, _ = self._infer_dispatch(x_TD, ids_T)
        y_TD = self.experts(x_TD, dispatch)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(x.shape)

    def _infer_dispatch(self, x_TD: Tensor, ids_T: Tensor | None
                        ) -> tuple[Dispatch, int | None]:
        """``infer``'s routing: dropless for token choice, the capacity for expert choice
        alone. Returns (the Dispatch, the capacity or None)."""
        cfg = self.config
        dispatch = self._route_kernel(x_TD)
        if dispatch is not None:
            return dispatch, None
        plan = self.router.select(x_TD, ids_T)
        capacity = (cfg.capacity(x_TD.shape[0]) if cfg.router == "expert_choice"
                    and cfg.capacity_factor is not None else None)
        return sort_by_expert(plan, cfg.num_experts, capacity, cfg.drop_policy), capacity

    def _route_kernel(self, x_TD: Tensor) -> Dispatch | None:
        """Routing and the sort by expert in one C++ call (``decode.route_sort``), for up
        to ``decode.ROUTE_KERNEL_MAX_TOKENS`` tokens (a decode step, a prefill) on the CPU
        with no gradient wanted through x or the router (a frozen layer with grad mode on
        too: it routes as no_grad does), dropless (as ``infer`` routes token choice); None
        where it does not apply."""
        # fp64 input routes in fp64 (router_dtype), which the fp32 kernel does not
        if (x_TD.shape[0] > decode.ROUTE_KERNEL_MAX_TOKENS or x_TD.device.type != "cpu"
                or x_TD.dtype == torch.float64
                or decode.grad_wanted(x_TD, modules=(self.router,))):
            return None
        spec = self.router.kernel_spec()
        if spec is None or not decode.available():
            return None
        mode, renormalize, bias_E = spec
        token_S, weight_S, counts_E, offsets_E = decode.route_sort(
            self._router_logits(x_TD), self.config.top_k, mode, renormalize,
            self.config.routed_scaling_factor, bias_E)
        return Dispatch(token_S=token_S, weight_S=weight_S, counts_E=counts_E,
                        offsets_E=offsets_E, assigned_E=counts_E)

    def _router_logits(self, x_TD: Tensor) -> Tensor:
        """``Router._logits``, with its [D -> E] fp32 projection on the decode kernel
        for a decode step's rows (software prefetch: a cold 1024 x 64 router took 24 us
        through aten's GEMV, ~10 here; the engine's DecodePlan makes the same call)."""
        w_ED = self.router.weight
        if self.router.training or w_ED is None:  # jitter: the router's own path
            return self.router._logits(x_TD)
        x32 = x_TD if x_TD.dtype == torch.float32 else x_TD.float()
        w32 = w_ED if w_ED.dtype == torch.float32 else w_ED.float()
        if decode.dense_kernel_ok(x32, w32, x32.shape[0]):
            return decode.dense_rows(x32, w32[None].transpose(1, 2))
        return self.router._logits(x_TD)

    @torch.no_grad()
    def update_bias(self, rate: float | None = None, group=None) -> None:
        """Aux-loss-free balancing step from the loads accumulated since the last call."""
        self.router.update_bias(rate, group)


def update_all_biases(model: nn.Module, group=None) -> None:
    """Call ``update_bias`` on every MoE layer in ``model`` that has a selection bias
    (``MoE``, its expert-parallel subclass and ``MultiGateMoE``)."""
    _check_module("model", model)
    for m in model.modules():
        # by its MoEConfig, not isinstance(m, MoE): MultiGateMoE (which imports this
        # module) was skipped, so its gates' loads grew and their biases never moved
        cfg = getattr(m, "config", None)
        if (isinstance(cfg, MoEConfig) and cfg.bias_update_rate > 0
                and callable(getattr(m, "update_bias", None))):
            m.update_bias(group=group)


def attach_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module, group=None):
    """Run the aux-loss-free bias update after every ``optimizer.step()``.

    Returns the hook handle (``handle.remove()`` detaches it). The arguments are checked
    here, not at the first ``step()``: a wrong model would fail after the weights moved.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        reject("optimizer", type(optimizer).__name__, "it must be a torch.optim.Optimizer")
    _check_module("model", model)
    return optimizer.register_step_post_hook(
        lambda *_: update_all_biases(model, group))


def _check_module(name: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        reject(name, type(model).__name__, "it must be a torch.nn.Module (the model whose "
               "MoE layers update their selection bias)")
