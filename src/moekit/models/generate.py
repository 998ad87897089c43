"""Sampling from the language model, with the engine's static KV cache or without a cache.

Shape letters: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.config import check_bool, check_int_range, check_number, reject
from moekit.models.transformer import MoETransformer
from moekit.routing.hashing import check_id_range, check_integer_tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    check_number("temperature", temperature, 0, math.inf)  # 0 = greedy
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is not allowed: it must be None or an int >= 1")
    if top_p is not None:
        check_number("top_p", top_p, 0, 1, low_open=True)


def sample_next(logits_BV: Tensor, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """One token id per row, [B]. temperature 0 is greedy."""
    # scalars only, no host sync (0.4 us a call): temperature=-1 sampled the least
    # likely tokens, top_k=0 / top_p=0 were torch errors
    check_sampling(temperature, top_k, top_p)
    if not isinstance(logits_BV, Tensor) or logits_BV.dim() != 2:
        reject("logits_BV.shape", tuple(logits_BV.shape) if isinstance(logits_BV, Tensor)
               else type(logits_BV).__name__, "it must be a [batch, vocab] tensor")
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1)
    ext = _sampler(logits_BV)
    if ext is not None:  # the same ops in one C++ call (cpu_decode.cpp, sample_rows)
        return ext.sample_rows(logits_BV, temperature, top_k or 0, 1.0 if top_p is None
                               else top_p, generator)
    return sample_torch(logits_BV, temperature, top_k, top_p, generator)


def _sampler(logits_BV: Tensor):
    """The decode extension where it samples these logits (a CPU tensor), else None."""
    if logits_BV.device.type != "cpu":
        return None
    from moekit.functions import cpu_ext  # a lower layer; imported late to stay cheap

    return cpu_ext.get_decode()


def sample_torch(logits_BV: Tensor, temperature: float, top_k: int | None,
                 top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """``sample_next`` (temperature > 0) in torch ops: on other devices, without the
    decode extension, and the reference its C++ sampler is tested against."""
    # in float64 with the row's maximum taken off first: any temperature > 0 (down to
    # 5e-324) gives 0 for the best token and a finite or -inf score for the others,
    # never NaN (fp32 rounded a temperature under ~1e-45 to 0, and logits / 1e-40
    # overflowed to inf); the same distribution as softmax(logits / temperature)
    logits_BV = logits_BV.double()
    max_B1 = logits_BV.amax(-1, keepdim=True)
    if not bool(max_B1.isfinite().all()):  # NaN / inf: no distribution (as sample_rows)
        reject("logits_BV", f"rows with a largest logit of {max_B1[~max_B1.isfinite()][0]}",
               "each row's largest logit must be finite")
    logits_BV = (logits_BV - max_B1) / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        # stable: equal scores in token order (sample_rows' order too)
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True, stable=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MoETransformer, ids_BL: Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``ids_BL``; returns [B, L + new].

    With the cache this runs ``moekit.inference.Engine`` (static KV cache, no
    stopping); without it, the whole sequence is recomputed for every token
    (the slow reference). ``generator=None`` draws from torch's global generator, which
    every thread shares: threads sampling at once should pass one generator each.
    """
    if not isinstance(model, MoETransformer):
        reject("model", type(model).__name__, "it must be a moekit MoETransformer")
    check_int_range("max_new_tokens", max_new_tokens, 0)  # -1 returned the prompt
    check_sampling(temperature, top_k, top_p)
    check_bool("use_cache", use_cache)
    if generator is not None and not isinstance(generator, torch.Generator):
        reject("generator", generator, "it must be None or a torch.Generator")
    _check_prompt(ids_BL, model.config.vocab_size)
    limit = model.config.max_seq_len
    if ids_BL.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {ids_BL.shape[1]} + max_new_tokens={max_new_tokens} "
                         f"is not allowed: the total must be <= max_seq_len={limit}")
    if max_new_tokens < 1:
        return ids_BL.clone()
    generator = torch.default_generator if generator is None else generator
    if use_cache:
        from moekit.inference.engine import Engine, GenerationConfig  # engine imports this file

        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p)
        gens, _ = Engine(model).generate(list(ids_BL), cfg, generator=generator)
        new_BN = torch.tensor([g.tokens for g in gens], dtype=ids_BL.dtype, device=ids_BL.device)
        return torch.cat([ids_BL, new_BN], dim=1)
    was_training = model.training
    model.eval()
    out = ids_BL.long()  # the embedding takes int64 / int32 only
    try:
        for _ in range(max_new_tokens):
            logits = model(out).logits[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)[:, None]
            out = torch.cat([out, nxt], dim=1)
    finally:
        model.train(was_training)
    return out.to(ids_BL.dtype)  # the prompt's dtype, as with the cache


def _check_prompt(ids_BL: Tensor, vocab_size: int) -> None:
    """An integer [B >= 1, L >= 1] tensor of ids in [0, vocab_size) whose dtype holds
    every id the model can produce. Reads the ids once per call (a host sync on CUDA)."""
    check_integer_tensor("ids_BL", ids_BL)  # a bool prompt ran as ids 0 / 1
    if ids_BL.dim() != 2 or ids_BL.shape[0] < 1 or ids_BL.shape[1] < 1:
        raise ValueError(f"ids_BL.shape={tuple(ids_BL.shape)} is not allowed: it must be "
                         "[batch >= 1, length >= 1]")
    if torch.iinfo(ids_BL.dtype).max < vocab_size - 1:  # uint8 with V=512: overflow at the end
        reject("ids_BL.dtype", ids_BL.dtype, f"it cannot hold the ids the model produces "
               f"(up to vocab_size - 1 = {vocab_size - 1}); use int64")
    check_id_range("ids_BL", ids_BL, vocab_size, "vocab_size")
