"""A slow, per-token MoE written from the papers' definitions: the tests' oracle.

It reads the raw parameters of a ``moekit.MoE`` (or a ``Router`` + ``Experts``)
and recomputes everything one token at a time in fp32 (fp64 for an fp64 layer),
with its own routing, capacity, activation and loss code. Nothing here imports moekit's routing,
dispatch or expert functions, so a shared bug cannot hide.

Shape letters: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor


def wide(t: Tensor) -> Tensor:
    """fp32, or fp64 for an fp64 tensor: the oracle of an fp64 layer is exact to fp64."""
    return t if t.dtype == torch.float64 else t.float()


def f32(module, *names: str) -> SimpleNamespace:
    """The module's tensors cast to fp32 (fp64 ones kept) once: a bf16 parameter used by
    every token then accumulates its gradient in fp32, as one cast, not T bf16 additions."""
    return SimpleNamespace(**{n: None if getattr(module, n) is None
                              else wide(getattr(module, n)) for n in names})


# -- activations, from their definitions -------------------------------------------

def _sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def _gelu(v: Tensor) -> Tensor:
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def ref_activation(h: Tensor, cfg) -> Tensor:
    """h: one row, [G]."""
    if cfg.activation == "relu2":
        return torch.clamp(h, min=0) ** 2
    if cfg.activation == "gelu":
        return _gelu(h)
    half = h.shape[-1] // 2
    gate, up = h[:half], h[half:]
    if cfg.activation == "swiglu":
        return gate * _sigmoid(gate) * up
    if cfg.activation == "geglu":
        return _gelu(gate) * up
    assert cfg.activation == "swiglu_oai"
    gate = torch.clamp(gate, max=cfg.swiglu_limit)
    up = torch.clamp(up, min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
    return gate * _sigmoid(cfg.swiglu_alpha * gate) * (up + 1.0)


def ref_expert(x_D: Tensor, experts: SimpleNamespace, e: int, cfg) -> Tensor:
    h = x_D @ experts.w_in[e]
    if experts.b_in is not None:
        h = h + experts.b_in[e]
    y = ref_activation(h, cfg) @ experts.w_out[e]
    if experts.b_out is not None:
        y = y + experts.b_out[e]
    return y


def ref_shared(x_D: Tensor, shared: SimpleNamespace, cfg) -> Tensor:
    h = x_D @ shared.w_in
    if shared.b_in is not None:
        h = h + shared.b_in
    y = ref_activation(h, cfg) @ shared.w_out
    if shared.b_out is not None:
        y = y + shared.b_out
    if shared.gate is not None:
        y = _sigmoid(x_D @ shared.gate[0]) * y
    return y


# -- routing, one token at a time ---------------------------------------------------

def _softmax(v: Tensor) -> Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def _top(values: list[float], k: int, allowed: list[int]) -> list[int]:
    """Indices of the k largest values among ``allowed`` (ties: lower index first)."""
    return sorted(allowed, key=lambda i: (-values[i], i))[:k]


def _allowed_experts(sel: list[float], cfg, group_score: str) -> list[int]:
    E, G = cfg.num_experts, cfg.num_groups
    if G == 1:
        return list(range(E))
    n = E // G
    scores = []
    for g in range(G):
        members = sorted((sel[i] for i in range(g * n, (g + 1) * n)), reverse=True)
        scores.append(sum(members[:2]) if group_score == "top2_sum" and n >= 2 else members[0])
    kept = _top(scores, cfg.topk_groups, list(range(G)))
    return [i for g in kept for i in range(g * n, (g + 1) * n)]


def ref_route_token(logits_E: Tensor, cfg, bias_E: Tensor | None,
                    noisy_logits_E: Tensor | None = None):
    """One token's (experts, weights, probs) per the router's definition."""
    b = [0.0] * cfg.num_experts if bias_E is None else bias_E.tolist()
    if cfg.router in ("softmax", "switch"):
        p = _softmax(logits_E)
        sel = [v + bb for v, bb in zip(p.tolist(), b, strict=True)]
        chosen = _top(sel, cfg.top_k, _allowed_experts(sel, cfg, "max"))
        w = torch.stack([p[i] for i in chosen])
        if cfg.renormalize and cfg.router == "softmax":
            w = w / w.sum()
        return chosen, w * cfg.routed_scaling_factor, p
    if cfg.router == "sigmoid":
        s = _sigmoid(logits_E)
        sel = [v + bb for v, bb in zip(s.tolist(), b, strict=True)]
        chosen = _top(sel, cfg.top_k, _allowed_experts(sel, cfg, "top2_sum"))
        w = torch.stack([s[i] for i in chosen])
        if cfg.renormalize:
            w = w / w.sum()
        return chosen, w * cfg.routed_scaling_factor, s / s.sum()
    if cfg.router in ("softmax_topk", "noisy_topk"):
        z = logits_E if noisy_logits_E is None else noisy_logits_E
        sel = [v + bb for v, bb in zip(z.tolist(), b, strict=True)]
        chosen = _top(sel, cfg.top_k, list(range(cfg.num_experts)))
        p = _softmax(z)
        w = (_softmax(torch.stack([z[i] for i in chosen])) if cfg.renormalize
             else torch.stack([p[i] for i in chosen]))  # the full softmax's probabilities
        return chosen, w * cfg.routed_scaling_factor, p
    raise AssertionError(cfg.router)


def _or_lowest(v: float) -> float:
    """A score for ranking tokens against each other: NaN below every number."""
    return -math.inf if math.isnan(v) else v


def _apply_capacity(pairs: list[tuple[int, int, Tensor]], cfg, T: int) -> list[bool]:
    """pairs in token-major order: (token, expert, weight). Returns kept flags."""
    if cfg.capacity_factor is None:
        return [True] * len(pairs)
    C = max(1, math.ceil(cfg.capacity_factor * T * cfg.top_k / cfg.num_experts))
    keep = [False] * len(pairs)
    for e in range(cfg.num_experts):
        mine = [i for i, p in enumerate(pairs) if p[1] == e]
        if cfg.drop_policy == "probability":  # a NaN weight ranks last
            mine.sort(key=lambda i: (-_or_lowest(float(pairs[i][2].detach())), i))
        for i in mine[:C]:
            keep[i] = True
    return keep


def _router_input(moe, x_TD: Tensor, jitter_u_TD: Tensor | None) -> Tensor:
    if jitter_u_TD is None:
        return x_TD
    eps = moe.config.jitter_eps
    return x_TD * (1.0 - eps + 2.0 * eps * jitter_u_TD)


def ref_pairs(moe, x_TD: Tensor, token_ids_T: Tensor | None = None,
              jitter_u_TD: Tensor | None = None, noise_TE: Tensor | None = None):
    """All (token, expert, weight) pairs with their kept flags, plus per-token info."""
    cfg, router = moe.config, moe.router
    T = x_TD.shape[0]
    if cfg.router == "expert_choice":
        return _ref_expert_choice(moe, x_TD)
    bias = None if router.expert_bias is None else wide(router.expert_bias)
    xr = _router_input(moe, x_TD, jitter_u_TD)
    gate = f32(router, "weight", "noise_weight")
    pairs, probs, logits, chosen_TK = [], [], [], []
    for t in range(T):
        if cfg.router == "hash":
            chosen = router.hash_table[int(token_ids_T[t])].tolist()
            w = torch.full((cfg.top_k,), cfg.routed_scaling_factor / cfg.top_k,
                           dtype=x_TD.dtype)
            p = torch.zeros(cfg.num_experts, dtype=x_TD.dtype)
            p[chosen] = 1.0 / cfg.top_k
            lg = None
        else:
            lg = gate.weight @ xr[t]
            noisy = None
            if noise_TE is not None:
                nz = gate.noise_weight @ x_TD[t]
                noisy = lg + noise_TE[t] * torch.log1p(torch.exp(nz))
            chosen, w, p = ref_route_token(lg, cfg, bias, noisy)
        for k, e in enumerate(chosen):
            pairs.append((t, e, w[k]))
        probs.append(p)
        logits.append(lg)
        chosen_TK.append(chosen)
    keep = _apply_capacity(pairs, cfg, T)
    return pairs, keep, probs, logits, chosen_TK


def _ref_expert_choice(moe, x_TD: Tensor):
    cfg = moe.config
    T, E = x_TD.shape[0], cfg.num_experts
    factor = cfg.top_k if cfg.capacity_factor is None else cfg.capacity_factor
    C = max(1, min(T, math.ceil(factor * T / E)))
    weight = wide(moe.router.weight)
    logits = [weight @ x_TD[t] for t in range(T)]
    probs = [_softmax(lg) for lg in logits]
    pairs = []
    for e in range(E):
        col = [_or_lowest(float(probs[t][e].detach())) for t in range(T)]  # NaN last
        for t in _top(col, C, list(range(T))):
            pairs.append((t, e, probs[t][e] * cfg.routed_scaling_factor))
    return pairs, [True] * len(pairs), probs, logits, None


# -- the whole layer ----------------------------------------------------------------

def ref_aux_loss(cfg, probs: list[Tensor], logits: list[Tensor | None], chosen_TK,
                 seq_len: int | None) -> Tensor:
    T, E, K = len(probs), cfg.num_experts, cfg.top_k
    total = torch.zeros((), dtype=probs[0].dtype if probs else torch.float32)
    if cfg.router == "hash":  # no learned router: nothing to balance or stabilise
        return total
    if cfg.aux_loss_coef and chosen_TK is not None:
        total = total + cfg.aux_loss_coef * _switch(probs, chosen_TK, E, K)
    elif cfg.aux_loss_coef:  # expert choice: every expert takes exactly C
        total = total + cfg.aux_loss_coef * sum(p for p in torch.stack(probs).mean(0))
    if cfg.seq_aux_loss_coef and chosen_TK is not None:
        L = seq_len or T
        per_seq = [_switch(probs[s:s + L], chosen_TK[s:s + L], E, K) for s in range(0, T, L)]
        total = total + cfg.seq_aux_loss_coef * torch.stack(per_seq).mean()
    if cfg.z_loss_coef and logits[0] is not None:
        z = torch.stack([(lg.max() + torch.log(torch.exp(lg - lg.max()).sum())) ** 2
                         for lg in logits]).mean()
        total = total + cfg.z_loss_coef * z
    return total


def _switch(probs, chosen_TK, E: int, K: int) -> Tensor:
    T = len(probs)
    f = [sum(row.count(e) for row in chosen_TK) / (T * K) for e in range(E)]
    P = [sum(p[e] for p in probs) / T for e in range(E)]
    return E * sum(f[e] * P[e] for e in range(E))


def ref_moe(moe, x: Tensor, token_ids: Tensor | None = None,
            jitter_u_TD: Tensor | None = None, noise_TE: Tensor | None = None):
    """Output (shape of x, fp32; fp64 for fp64 x) and aux loss of ``moe`` on ``x``, token
    by token."""
    cfg = moe.config
    x_TD = wide(x.reshape(-1, cfg.dim))
    ids = None if token_ids is None else token_ids.reshape(-1)
    pairs, keep, probs, logits, chosen_TK = ref_pairs(moe, x_TD, ids, jitter_u_TD, noise_TE)
    experts = f32(moe.experts, "w_in", "w_out", "b_in", "b_out")
    rows = [torch.zeros(cfg.dim) for _ in range(x_TD.shape[0])]
    for (t, e, w), kept in zip(pairs, keep, strict=True):
        if kept:
            rows[t] = rows[t] + w * ref_expert(x_TD[t], experts, e, cfg)
    if moe.shared is not None:
        shared = f32(moe.shared, "w_in", "w_out", "b_in", "b_out", "gate")
        rows = [r + ref_shared(x_TD[t], shared, cfg) for t, r in enumerate(rows)]
    seq_len = x.shape[-2] if x.dim() >= 3 else None
    aux = ref_aux_loss(cfg, probs, logits, chosen_TK, seq_len)
    return torch.stack(rows).view(*x.shape[:-1], cfg.dim), aux, (pairs, keep)


def dense_ffn(x: Tensor, w_in_DG: Tensor, w_out_FD: Tensor, cfg) -> Tensor:
    """A plain FFN, row by row, for the 1-expert invariant."""
    x_TD = wide(x.reshape(-1, x.shape[-1]))
    out = [ref_activation(x_TD[t] @ wide(w_in_DG), cfg) @ wide(w_out_FD)
           for t in range(x_TD.shape[0])]
    return torch.stack(out).view(x.shape)


# -- the selection rule in fp64, tie-robust --------------------------------------------

def ref_selection_key(logits_TE: Tensor, score: str, bias_E: Tensor | None,
                      num_groups: int = 1) -> Tensor:
    """fp64 key whose top-k is the selection rule: the logit without a bias (softmax and
    sigmoid are monotone); score + bias, the score in fp64, with one (or for the
    sigmoid's top-2-sum group score)."""
    lg = logits_TE.double()
    if bias_E is None and (score == "softmax" or num_groups == 1):
        return lg
    s = lg.softmax(-1) if score == "softmax" else torch.sigmoid(lg)
    return s if bias_E is None else s + bias_E.double()


def assert_valid_selection(experts_TK: Tensor, key_TE: Tensor, num_groups: int = 1,
                           topk_groups: int = 1, group_score: str = "max") -> None:
    """experts_TK is a top-K of key_TE (within the best groups) up to ties: compared by
    value, so where the fp64 rule itself ties any of the tied experts is right."""
    T, E = key_TE.shape
    K, n = experts_TK.shape[1], E // num_groups
    allowed_TE = torch.ones(T, E, dtype=torch.bool)
    if num_groups > 1:
        grouped = key_TE.view(T, num_groups, n)
        gs_TG = (grouped.topk(2, -1).values.sum(-1) if group_score == "top2_sum" and n >= 2
                 else grouped.amax(-1))
        t_T1 = gs_TG.topk(topk_groups, -1).values[:, -1:]
        used_TG = torch.zeros(T, num_groups, dtype=torch.bool)
        used_TG.scatter_(1, experts_TK // n, True)
        assert (gs_TG.gather(1, experts_TK // n) >= t_T1).all(), "a chosen group is not a best"
        kept_TG = (gs_TG > t_T1) | (used_TG & (gs_TG == t_T1))
        assert (kept_TG.sum(1) <= topk_groups).all(), "too many groups"
        allowed_TE = kept_TG.repeat_interleave(n, dim=1)
    got = key_TE.gather(1, experts_TK).sort(-1).values
    want = key_TE.masked_fill(~allowed_TE, float("-inf")).topk(K, -1).values.sort(-1).values
    bad = (got != want).any(-1)
    assert not bad.any(), f"{int(bad.sum())} of {T} tokens chose other experts than the rule"
    assert (experts_TK.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice"


def ref_val_loss(model, val_N: Tensor, windows: int, seq_len: int, batches: int,
                 seed0: int = 999_983) -> float:
    """The trainer's validation loss written out: batch i takes ``windows`` windows of
    seq_len + 1 bytes whose starts a generator seeded seed0 + i draws uniformly from
    [0, N - seq_len - 1); all of them go through the model (eval mode) in one forward,
    and the loss is the fp64 cross-entropy of every next byte, averaged over all targets
    of all batches (nats/byte: byte-level tokens)."""
    was_training = model.training
    model.eval()
    nats = []
    with torch.no_grad():
        for i in range(batches):
            gen = torch.Generator().manual_seed(seed0 + i)
            starts = torch.randint(0, val_N.numel() - seq_len - 1, (windows,), generator=gen)
            w = torch.stack([val_N[s:s + seq_len + 1] for s in starts.tolist()]).long()
            logits = model(w[:, :-1]).logits
            nats.append(-torch.log_softmax(logits.double(), -1).gather(-1, w[:, 1:, None]))
    model.train(was_training)
    return float(torch.cat(nats).mean())
