"""The generation engine: prompts of different lengths in one batch, a static KV cache,
per-sequence stopping, greedy or seeded sampling.

    engine = Engine(model)
    gens, stats = engine.generate([[100, 101, 102, 32], [99, 108]],
                                  GenerationConfig(max_new_tokens=64, stop_ids=(10,)))

How a batch runs: the prompts are left-padded to the longest and prefilled in
one pass (the fused training path, no autograd state); each decode step feeds
one token per unfinished sequence (``DecodePlan``: the step's kernel calls prepared
once per generation, where the model allows). A sequence that stops leaves the batch: its
cache row is dropped (``StaticKVCache.keep_rows``, a copy once per finished
sequence), so the remaining steps do not compute it. Everything runs under
``torch.inference_mode()``, where the expert layer picks its decode path for
few rows.

Shape letters: B sequences, R rows still generating, L longest prompt, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.config import (
    MAX_SEED,
    FrozenConfig,
    MoEConfig,
    check_bool,
    check_int_range,
    check_positive_int,
    reject,
)
from moekit.inference.concurrency import ConcurrentUseError, OneCall  # noqa: F401 (re-exported)
from moekit.inference.decode_plan import DecodePlan
from moekit.models.generate import check_sampling, sample_next
from moekit.models.transformer import MoETransformer, StaticKVCache
from moekit.models.transformer import kv_cache_dtype as kv_dtype_of

Prompt = Sequence[int] | Tensor
OnToken = Callable[[int, int], None]  # (sequence index, token id), as each token is chosen
# (sequence index, its generated tokens so far) -> stop it now (e.g. its text holds a stop
# string: TokenizerText.stop_when)
StopWhen = Callable[[int, list[int]], bool]
MAX_LOGPROBS = 20  # most likely tokens recorded per step (OpenAI's limit)


class ContextLengthError(ValueError):
    """A prompt plus the tokens to generate would run past the model's context.

    ``prompt``: the index of that prompt in the call's prompts (None where no one prompt
    is named); the message then starts "prompts[i]: " and ``detail`` is the rest, so a
    caller can name the prompt its own way (the CLI: a --prompts-file line)."""

    def __init__(self, detail: str, prompt: int | None = None) -> None:
        super().__init__(detail if prompt is None else f"prompts[{prompt}]: {detail}")
        self.detail, self.prompt = detail, prompt

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return type(self), (self.detail, self.prompt)  # args alone would lose ``prompt``


class EmptyPromptError(ValueError):
    """A prompt holds no token: there is nothing to condition the first token on."""


def _check_ids(name: str, ids: tuple, allow_empty: bool = True) -> None:
    if not isinstance(ids, tuple) or (not ids and not allow_empty) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        reject(name, ids, "it must be a tuple of token ids (ints >= 0)"
               + ("" if allow_empty else ", not empty"))


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationConfig(FrozenConfig):
    """What to generate for every prompt of a batch.

    A sequence stops after ``max_new_tokens``, or as soon as it produces a token
    of ``stop_ids`` or its generated tokens end with one of ``stop_sequences``
    (for the byte-level LM, the UTF-8 bytes of a stop string); the stop tokens
    are kept in the output. ``temperature=0`` is greedy; sampling draws from
    one generator seeded with ``seed``, so the same prompts and seed give the
    same text.
    """

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_sampling(self.temperature, self.top_k, self.top_p)
        _check_ids("stop_ids", self.stop_ids)
        if not isinstance(self.stop_sequences, tuple):
            reject("stop_sequences", self.stop_sequences, "it must be a tuple of tuples of ids")
        for seq in self.stop_sequences:
            _check_ids("stop_sequences", seq, allow_empty=False)
        check_int_range("seed", self.seed, 0, MAX_SEED)  # as training's seed


@dataclass
class Generation:
    """One sequence's result: its prompt, the new tokens, and why it ended; with
    ``generate(logprobs=N)``, each new token's log-probability under the model (its
    log-softmax, before temperature, top-k or top-p) and the N most likely tokens there
    with theirs."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "length" (max_new_tokens), "stop" or "cancelled" (Batcher)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class GenerationStats:
    sequences: int
    prompt_tokens: int  # real prompt tokens, padding not counted
    new_tokens: int
    decode_steps: int  # forward passes after the prefill
    prefill_s: float
    decode_s: float
    reused_tokens: int = 0  # prompt tokens whose keys and values the cache already held

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of prefill + decode."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-12)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)


def routes_across_rows(model: nn.Module) -> bool:
    """Whether a MoE layer of ``model`` routes by expert choice: its experts pick tokens
    among every row of a call, so the sequences of one batch decide each other's experts
    (token choice routes each row alone; a capacity factor is not applied in generation,
    ``MoE.infer``)."""
    return any(isinstance(getattr(m, "config", None), MoEConfig)
               and m.config.router == "expert_choice" for m in model.modules())


class Engine:
    """Generates from a ``MoETransformer``; keeps its KV cache between calls.

    The cache is allocated for the first batch and reused while later batches
    fit in it (rows and positions); it is reallocated only when one does not.
    ``reuse_prefix=True`` (a conversation, one sequence at a time): a prompt that starts
    with the ids the cache holds from the last single-sequence call (its prompt and the
    tokens fed back) prefills only the rest; the model must not change between calls.
    The cache then grows by doubling, up to ``max_cache_len`` positions (default the
    model's max_seq_len; ``moekit serve`` passes its ``--context``).
    ``kv_cache_dtype``: the cache's keys and values (``moekit.models.kv_cache.
    kv_cache_dtype``: default the activations'; under fp32 activations "bfloat16" halves
    the cache, "int8" quarters it plus a float scale per slot and head; under bf16
    activations "int8" halves it, plus the scales).

    Threads: one ``generate`` at a time per Engine (another raises ``ConcurrentUseError``);
    Engines of one model may generate on several threads at once, each its own bits, with
    the model in eval mode (``generate`` puts a model in training mode in eval mode for
    the call and back after it, which another thread's call would see mid-generation).
    """

    def __init__(self, model: MoETransformer, reuse_prefix: bool = False,
                 max_cache_len: int | None = None,
                 kv_cache_dtype: torch.dtype | str | None = None) -> None:
        if not isinstance(model, MoETransformer):
            reject("model", type(model).__name__, "it must be a moekit MoETransformer "
                   "(a transformers model runs its own generate())")
        check_bool("reuse_prefix", reuse_prefix)
        kv_dtype_of(model, kv_cache_dtype)  # checked now; resolved per call (the model's dtype)
        self.kv_cache_dtype = kv_cache_dtype
        limit = model.config.max_seq_len
        if max_cache_len is not None:
            check_int_range("max_cache_len", max_cache_len, 1, limit)
        self.max_cache_len = limit if max_cache_len is None else max_cache_len
        self.model = model
        self.cache: StaticKVCache | None = None
        self.reuse_prefix = reuse_prefix
        self._held: list[int] = []  # the ids whose keys and values fill row 0's slots
        self._one_call = OneCall("Engine.generate is already running (on another thread, or "
                                 "this call comes from its callback): an Engine keeps one KV "
                                 "cache and runs one generation at a time; give each thread "
                                 "its own Engine (they may share the model)")

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig | None = None,
                 on_token: OnToken | None = None, generator: torch.Generator | None = None,
                 stop_when: StopWhen | None = None, logprobs: int | None = None
                 ) -> tuple[list[Generation], GenerationStats]:
        """Generate for every prompt at once; ``generator`` overrides ``config.seed``;
        ``stop_when(i, tokens)`` stops sequence i after its latest token where it returns
        True (besides the config's stop ids and sequences). ``logprobs=N`` (0 <= N <=
        MAX_LOGPROBS) records each token's log-probability and the N most likely tokens'
        (``Generation.logprobs`` / ``top_logprobs``; the plan's steps then return their
        logits and the tokens are picked from them as ``model.infer``'s would be)."""
        with self._one_call:
            return self._generate(prompts, config, on_token, generator, stop_when, logprobs)

    def _generate(self, prompts: Sequence[Prompt], config: GenerationConfig | None,
                  on_token: OnToken | None, generator: torch.Generator | None,
                  stop_when: StopWhen | None, logprobs: int | None
                  ) -> tuple[list[Generation], GenerationStats]:
        cfg = checked_options(config, generator, stop_when, logprobs)
        ids = checked_prompts(self.model, prompts, cfg)
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if len(ids) > 1 and routes_across_rows(self.model):
                    return self._one_at_a_time(ids, cfg, on_token, generator, stop_when,
                                               logprobs)
                return self._run(ids, cfg, on_token, generator, stop_when, logprobs)
        finally:
            self.model.train(was_training)

    def _one_at_a_time(self, ids: list[list[int]], cfg: GenerationConfig,
                       on_token: OnToken | None, generator: torch.Generator,
                       stop_when: StopWhen | None, logprobs: int | None
                       ) -> tuple[list[Generation], GenerationStats]:
        """Each prompt in a batch of its own (an expert-choice model: batched, its experts
        picked among every sequence's tokens, so each sequence's tokens depended on the
        others'); the stats summed."""
        gens, parts = [], []
        for i, prompt in enumerate(ids):
            g, st = self._run(
                [prompt], cfg,
                None if on_token is None else (lambda _, tok, i=i: on_token(i, tok)),
                generator,
                None if stop_when is None else (lambda _, toks, i=i: stop_when(i, toks)),
                logprobs)
            gens += g
            parts.append(st)
        return gens, GenerationStats(
            sequences=len(ids), prompt_tokens=sum(p.prompt_tokens for p in parts),
            new_tokens=sum(p.new_tokens for p in parts),
            decode_steps=sum(p.decode_steps for p in parts),
            prefill_s=sum(p.prefill_s for p in parts), decode_s=sum(p.decode_s for p in parts),
            reused_tokens=sum(p.reused_tokens for p in parts))

    # -- checks ----------------------------------------------------------------------

    def check(self, prompts: Sequence[Prompt], config: GenerationConfig) -> None:
        """The errors ``generate`` would raise for these prompts and config, before
        anything runs (a caller that writes the prompts first checks them here)."""
        checked_prompts(self.model, prompts, config)

    # -- the loop ----------------------------------------------------------------------

    def _prepare(self, ids: list[list[int]], max_new_tokens: int
                 ) -> tuple[Tensor, StaticKVCache, int]:
        """Left-padded prompts [B, L] and a cache reset for them; with ``reuse_prefix``
        and one prompt, only its ids past those the cache holds (and how many it held)."""
        B, L = len(ids), max(len(p) for p in ids)
        need = L + max_new_tokens
        w = self.model.norm.weight  # the activations' device
        kv = kv_dtype_of(self.model, self.kv_cache_dtype)
        c = self.cache
        held, self._held = self._held, []
        reuse = self.reuse_prefix and B == 1
        if c is None or c.batch < B or c.max_len < need or c.k[0].dtype != kv \
                or c.k[0].device != w.device:
            old = c
            grow = need if old is None or not reuse else \
                max(need, min(2 * old.max_len, self.max_cache_len))
            c = self.cache = StaticKVCache.for_model(self.model, B, grow, kv)
            if reuse and old is not None and old.k[0].dtype == kv \
                    and old.k[0].device == w.device:  # a longer conversation: keep what it held
                n = min(len(held), old.max_len)
                for new_t, old_t in zip(c.k + c.v, old.k + old.v, strict=True):
                    new_t[0, :, :n] = old_t[0, :, :n]
                held = held[:n]
            else:
                held = []
        if reuse:
            n = 0  # the common prefix, leaving at least one id to prefill (its logits)
            while n < min(len(held), L - 1) and held[n] == ids[0][n]:
                n += 1
            if n:
                c.reset(torch.zeros(1, dtype=torch.long, device=w.device))  # one row
                c.length = n
                return torch.tensor([ids[0][n:]], device=w.device), c, n
        return left_padded(ids, c), c, 0

    def _run(self, ids: list[list[int]], cfg: GenerationConfig, on_token: OnToken | None,
             generator: torch.Generator, stop_when: StopWhen | None = None,
             logprobs: int | None = None) -> tuple[list[Generation], GenerationStats]:
        t0 = time.perf_counter()
        ids_BL, cache, reused = self._prepare(ids, cfg.max_new_tokens)
        logits_RV = self.model.infer(ids_BL, cache)
        plan = DecodePlan.build(self.model)  # the decode steps' kernel calls, or None
        t1 = time.perf_counter()
        gens = [Generation(prompt=p) for p in ids]
        if logprobs is not None:
            for g in gens:
                g.logprobs, g.top_logprobs = [], []
        active = list(range(len(ids)))  # row r of the cache generates sequence active[r]
        steps = 0
        stops = Stops(cfg)
        # the plan's step picks the next tokens inside its one call: the argmax, or drawn
        # as sample_next draws them (the same generator)
        greedy = cfg.temperature == 0
        sample = None if greedy else (cfg.temperature, cfg.top_k or 0,
                                      1.0 if cfg.top_p is None else cfg.top_p, generator)
        next_R = sample_next(logits_RV, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        for step in range(cfg.max_new_tokens):
            finished = []
            if logprobs is not None:
                record_logprobs([gens[a] for a in active], logits_RV, next_R, logprobs)
            for r, tok in enumerate(next_R.tolist()):
                g = gens[active[r]]
                g.tokens.append(tok)
                if on_token is not None:
                    on_token(active[r], tok)
                if stops.hit(g.tokens) or (stop_when is not None
                                           and stop_when(active[r], g.tokens)):
                    g.finish_reason = "stop"
                    finished.append(r)
            if step == cfg.max_new_tokens - 1 or len(finished) == len(active):
                break
            if finished:
                gone = set(finished)
                keep = [r for r in range(len(active)) if r not in gone]
                active = [active[r] for r in keep]
                keep_R = torch.tensor(keep, device=next_R.device)
                cache.keep_rows(keep_R)
                next_R = next_R.index_select(0, keep_R)
            picks = logprobs is None  # else the step's logits are kept
            out = None if plan is None else plan.step(
                next_R[:, None], cache, greedy and picks, sample if picks else None)
            if out is not None and picks:
                next_R = out
            else:
                logits_RV = self.model.infer(next_R[:, None], cache) if out is None else out
                next_R = sample_next(logits_RV, cfg.temperature, cfg.top_k, cfg.top_p,
                                     generator)
            steps += 1
        t2 = time.perf_counter()
        if self.reuse_prefix and len(ids) == 1:  # every token but the last was fed back
            self._held = ids[0] + gens[0].tokens[:-1]
        stats = GenerationStats(sequences=len(ids), prompt_tokens=sum(len(p) for p in ids),
                                new_tokens=sum(len(g.tokens) for g in gens),
                                decode_steps=steps, prefill_s=t1 - t0, decode_s=t2 - t1,
                                reused_tokens=reused)
        return gens, stats


def left_padded(prompts: Sequence[Sequence[int]], cache: StaticKVCache) -> Tensor:
    """The prompts left-padded to the longest, [B, L], with ``cache`` reset for them."""
    dev = cache.slots_M.device
    L = max(len(p) for p in prompts)
    ids_BL = torch.zeros(len(prompts), L, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        ids_BL[b, L - len(p):] = torch.tensor(p)
    cache.reset(torch.tensor([L - len(p) for p in prompts], device=dev))
    return ids_BL


def checked_options(config: GenerationConfig | None, generator: torch.Generator | None,
                    stop_when: StopWhen | None, logprobs: int | None) -> GenerationConfig:
    """``generate``'s options checked; the config (default ``GenerationConfig()``)."""
    cfg = GenerationConfig() if config is None else config
    if not isinstance(cfg, GenerationConfig):
        reject("config", cfg, "it must be None or a GenerationConfig")
    if generator is not None and not isinstance(generator, torch.Generator):
        reject("generator", generator, "it must be None or a torch.Generator")
    if stop_when is not None and not callable(stop_when):
        reject("stop_when", stop_when, "it must be None or a callable (i, tokens) -> bool")
    if logprobs is not None:
        check_int_range("logprobs", logprobs, 0, MAX_LOGPROBS)
    return cfg


def checked_prompts(model: MoETransformer, prompts: Sequence[Prompt],
                    config: GenerationConfig) -> list[list[int]]:
    """The prompts as lists of ids, after the checks a generation makes before anything
    runs: each prompt's ids, the context, the config's stop ids against the vocabulary."""
    V, limit = model.config.vocab_size, model.config.max_seq_len
    ids = []
    for i, prompt in enumerate(prompts):
        values = prompt.reshape(-1).tolist() if isinstance(prompt, Tensor) else list(prompt)
        if not values:
            raise EmptyPromptError(f"prompts[{i}] is empty, which is not allowed: a prompt "
                                   "must hold at least one token")
        if not all(isinstance(v, int) and 0 <= v < V for v in values):
            reject(f"prompts[{i}]", values[:8], f"its tokens must be ints in [0, {V})")
        ids.append(values)
    if not ids:
        reject("prompts", prompts, "it must hold at least one prompt")
    new = config.max_new_tokens
    # which prompt: in a file of a thousand, "prompt of 300 tokens" did not say
    at = max(range(len(ids)), key=lambda i: len(ids[i]))
    longest = len(ids[at])
    if longest >= limit:  # no new token fits: "use at most 0 new tokens" named a bad value
        raise ContextLengthError(
            f"prompt of {longest} tokens is too long: the model's context is "
            f"max_seq_len={limit} tokens, so a prompt may hold at most {limit - 1} (room "
            "for one new token); shorten the prompt", at)
    if longest + new > limit:
        raise ContextLengthError(
            f"prompt of {longest} tokens + max_new_tokens={new} is not "
            f"allowed: generating past the model's context, max_seq_len={limit} "
            f"(use at most {max(limit - longest, 0)} new tokens, or a shorter prompt)", at)
    # stop ids past the vocabulary would never be produced: an error, not a silent no-op
    for name, stop in (("stop_ids", config.stop_ids), *(
            (f"stop_sequences[{i}]", seq) for i, seq in enumerate(config.stop_sequences))):
        if any(i >= V for i in stop):
            reject(name, stop, f"its ids must be < vocab_size={V}: the model never "
                   "produces the others")
    return ids


def token_logprobs(logits_RV: Tensor, tokens_R: Tensor, top: int
                   ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Row r's log-probability of ``tokens_R[r]`` under ``logits_RV[r]`` (log-softmax in
    fp32) and its ``top`` most likely (token, log-probability) pairs, most likely first."""
    logp_RV = logits_RV.float().log_softmax(-1)
    chosen = logp_RV.gather(1, tokens_R[:, None].to(logp_RV.device))[:, 0].tolist()
    if not top:
        return chosen, [[] for _ in chosen]
    values, indices = logp_RV.topk(top, -1)
    return chosen, [list(zip(i, v, strict=True))
                    for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def record_logprobs(gens: list[Generation], logits_RV: Tensor, next_R: Tensor,
                     top: int) -> None:
    """Each row's chosen token's log-probability and its ``top`` most likely tokens'."""
    chosen, tops = token_logprobs(logits_RV, next_R, top)
    for g, lp, best in zip(gens, chosen, tops, strict=True):
        g.logprobs.append(lp)
        g.top_logprobs.append(best)


class Stops:
    """Does a sequence's generated tail end with a stop id or a stop sequence?"""

    def __init__(self, cfg: GenerationConfig) -> None:
        self.ids = frozenset(cfg.stop_ids)
        self.seqs = [list(s) for s in cfg.stop_sequences]

    def hit(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.ids:
            return True
        return any(len(tokens) >= len(s) and tokens[-len(s):] == s for s in self.seqs)


def stop_sequences_from_text(texts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Stop strings as byte sequences, for the byte-level language model."""
    out = tuple(tuple(t.encode("utf-8")) for t in texts)
    if any(not s for s in out):
        reject("stop", "", "a stop string must hold at least one character")
    return out
