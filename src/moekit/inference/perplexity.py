"""`moekit perplexity`: how well a checkpoint predicts a text, in its own tokens.

    moekit perplexity --checkpoint runs/train-int4 [--text FILE] [--context 512]

The text is cut into chunks of ``--context`` tokens, one forward each (the prefill path:
quantized, bf16 and offloaded models run as they generate); in each chunk the tokens
after the first ``--score-from`` (default: half the chunk) are scored, so every scored
token sees at least that much context (llama.cpp's ``llama-perplexity`` scores chunks
alike; as there, with a tokenizer that begins every text with a BOS token, each chunk's
first token is that BOS). Reported: perplexity exp(mean negative log-likelihood) with its
standard error ("unavailable", null in ``--json``, for a single scored token: one has no
spread), nats per token, bits per byte of the scored text (its tokens' own bytes:
comparable across tokenizers), and tokens per second of the model's forwards. The same text, context
and chunks give comparable numbers for the float, bf16, int8 and int4 forms of one model:
what quantizing costs, in the model's own tokens (``benchmarks/quant_quality.py``
measures moekit's byte-level models on their trainer's validation windows).
``--against BASE`` also runs the base checkpoint (say, the float model a quantized one
came from) on the same chunks and reports the mean KL divergence of this model's
next-token distribution from the base's and how often their top tokens agree (as
llama.cpp's ``--kl-divergence``): differences too small to move the perplexity past its
standard error still show there. ``--kv-cache-dtype bfloat16 | int8`` runs each chunk
through a ``StaticKVCache`` of that dtype, so attention reads the keys and values as that
cache holds them (what decoding with ``--kv-cache-dtype`` reads); with ``--against`` the
same checkpoint, it measures what the cache costs.
"""

from __future__ import annotations

import argparse
import codecs
import errno
import json
import math
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.config import check_positive_int, reject

DEFAULT_CHUNKS = 32  # --chunks not given


@dataclass(frozen=True)
class Perplexity:
    """The scores of one text: sums over every scored token."""

    tokens: int  # scored tokens
    nll: float  # sum of their negative log-likelihoods (nats)
    nll_sq: float  # sum of their squares (for the standard error)
    chunks: int
    context: int
    score_from: int
    seconds: float  # the model's forward passes and their scoring (not a base's)
    scored_bytes: int = 0  # UTF-8 bytes of the scored tokens' text (0: not known)
    # against a base model (None: not run): sums of KL(base || model) per scored token,
    # their squares, and the positions where both models' most likely tokens are equal
    kl: float | None = None
    kl_sq: float | None = None
    top1_same: int | None = None

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def stderr(self) -> float | None:
        """The standard error of the perplexity (of the mean NLL, through exp); None for
        one scored token, whose spread is unknown (it was 0, as if exact)."""
        n, mean = self.tokens, self.nats_per_token
        if n < 2:
            return None
        var = max(self.nll_sq / n - mean * mean, 0.0) * n / (n - 1)
        return self.perplexity * math.sqrt(var / n)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.scored_bytes if self.scored_bytes else None

    @property
    def kl_mean(self) -> float | None:
        return None if self.kl is None else self.kl / self.tokens

    @property
    def kl_stderr(self) -> float | None:
        """The standard error of the mean KL; None where not run or for one token."""
        if self.kl is None or self.tokens < 2:
            return None
        n, mean = self.tokens, self.kl / self.tokens
        return math.sqrt(max(self.kl_sq / n - mean * mean, 0.0) / (n - 1))

    @property
    def top1_agreement(self) -> float | None:
        return None if self.top1_same is None else self.top1_same / self.tokens

    @property
    def tokens_per_s(self) -> float:
        """Tokens through the model (context and scored) per second of its forwards."""
        return self.chunks * self.context / max(self.seconds, 1e-12)

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "stderr": self.stderr,
                "nats_per_token": self.nats_per_token, "bits_per_byte": self.bits_per_byte,
                "tokens_per_s": self.tokens_per_s, "kl_mean": self.kl_mean,
                "kl_stderr": self.kl_stderr, "top1_agreement": self.top1_agreement}


def chunk_ids(ids: list[int] | Tensor, context: int, chunks: int | None = None,
              bos: int | None = None) -> Tensor:
    """[C, context]: the first ``chunks`` (None: all) whole chunks of ``ids`` (a 1-D
    tensor: a view of it in its dtype, ``score`` widens a chunk at a time; a list: int64).
    ``bos``: each chunk's first token becomes it, as llama.cpp's ``llama-perplexity``
    starts each chunk of a tokenizer that begins texts with BOS (a copy, then)."""
    check_positive_int("context", context)
    n = len(ids) // context if chunks is None else min(chunks, len(ids) // context)
    if n < 1:
        reject("text", f"{len(ids)} tokens", f"it must hold at least one chunk of "
               f"context={context} tokens")
    if isinstance(ids, Tensor):
        out = ids[:n * context].view(n, context)
    else:
        out = torch.tensor(ids[:n * context], dtype=torch.long).view(n, context)
    if bos is not None:
        out = out.clone()
        out[:, 0] = bos
    return out


@torch.inference_mode()
def score(model, chunks_CL: Tensor, score_from: int | None = None,
          token_bytes=None, base=None, kv_cache_dtype: torch.dtype | str | None = None
          ) -> Perplexity:
    """The negative log-likelihoods of each chunk's tokens after ``score_from`` (default
    half the chunk; at least 1: the first token has no prediction), one chunk per
    forward. ``token_bytes(id) -> bytes`` (the model's text: ``ByteText.token_bytes``)
    counts the scored bytes, each token's own (a decode of the scored ids would spell a
    character cut at a chunk's edge as U+FFFD, 3 bytes: 172 bytes for 160 byte tokens
    of "héllo wörld, ça va? " at context 16); ``base``
    (a model of the same vocabulary) adds KL(base || model) and top-1 agreement.
    ``kv_cache_dtype`` (not None): each chunk runs through a ``StaticKVCache`` of that
    dtype, its attention over the keys and values as the cache holds them (the base runs
    as it is)."""
    C, L = chunks_CL.shape
    cache = None
    if kv_cache_dtype is not None:
        from moekit.models.transformer import StaticKVCache

        cache = StaticKVCache.for_model(model, 1, L, kv_cache_dtype)

    def forward(ids: Tensor) -> Tensor:
        if cache is None:
            return model(ids).logits
        cache.reset()
        return model(ids, cache=cache).logits

    first = L // 2 if score_from is None else score_from
    if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first < L:
        reject("score_from", first, f"it must be an int in [1, context={L})")
    if base is not None and base.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"base has vocab_size={base.config.vocab_size}, which is not "
                         "allowed: it must share the model's vocabulary, vocab_size="
                         f"{model.config.vocab_size}")
    was_training = model.training
    model.eval()
    nll = nll_sq = 0.0
    kl = kl_sq = 0.0
    same = 0
    scored_bytes = 0
    # first-use kernel builds and set-ups out of the timed loop (tokens/s is the forwards')
    forward(chunks_CL[:1, :2].long())
    if base is not None:
        base(chunks_CL[:1, :2].long())
    seconds = 0.0  # the model's forwards (and their scoring: float() waits for them)
    try:
        for c in range(C):
            start = time.perf_counter()
            ids = chunks_CL[c:c + 1].long()  # (the chunks may be uint8 or int32: chunk_ids)
            logits = forward(ids)[0, first - 1:L - 1].float()  # predicts first..L-1
            target = ids[0, first:]
            token_nll = torch.logsumexp(logits, -1) - logits.gather(1, target[:, None])[:, 0]
            nll += float(token_nll.double().sum())
            nll_sq += float(token_nll.double().square().sum())
            # not the base's forwards: they halved an --against run's tokens/s
            seconds += time.perf_counter() - start
            if base is not None:
                # float64: an int8 model's KL is ~2e-7 nats a token, at float32's rounding
                # of log-probabilities near -5 (a 3% error on the tiny run, 1.94e-4 for
                # 1.998e-4 summed over 512 tokens)
                logp = logits.double().log_softmax(-1)
                base_logp = base(ids).logits[0, first - 1:L - 1].double().log_softmax(-1)
                token_kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
                kl += float(token_kl.sum())
                kl_sq += float(token_kl.square().sum())
                same += int((base_logp.argmax(-1) == logp.argmax(-1)).sum())
            if token_bytes is not None:
                scored_bytes += sum(len(token_bytes(t)) for t in target.tolist())
    finally:
        model.train(was_training)
    return Perplexity(tokens=C * (L - first), nll=nll, nll_sq=nll_sq, chunks=C, context=L,
                      score_from=first, seconds=seconds,
                      scored_bytes=scored_bytes,
                      **({} if base is None else {"kl": kl, "kl_sq": kl_sq, "top1_same": same}))


def _shown_error(error: float | None, spec: str) -> str:
    """A standard error as printed: "unavailable" for one scored token (no spread)."""
    return "unavailable" if error is None else format(error, spec)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.train.generate_cli import add_kv_cache_argument, add_model_arguments

    add_model_arguments(p)
    add_kv_cache_argument(p, help="run each chunk through a KV cache of this dtype, "
                          "attention reading its keys and values as it holds them (what "
                          "`moekit generate --kv-cache-dtype` decodes with; with --against "
                          "the same checkpoint: what the cache costs); default auto: no "
                          "cache, the plain forward")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="the path of a UTF-8 text file to score (a pipe too); only as much "
                   "is read as --chunks takes (default: the validation files of the built-in "
                   "corpus, the Python standard library's source)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per chunk (default: the model's max_seq_len, at most 512)")
    p.add_argument("--score-from", type=int, default=None,
                   help="score each chunk's tokens after this many (default: half the chunk)")
    p.add_argument("--chunks", type=int, default=None,
                   help="chunks to score, from the text's start (default 32; 0: every whole "
                   "chunk)")
    p.add_argument("--against", default=None, metavar="BASE",
                   help="also run this checkpoint (e.g. the float model a quantized one came "
                   "from; loaded in fp32, resident) on the same chunks: KL divergence "
                   "from it and top-token agreement")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _shown(path: str) -> str:
    """``path`` as an error quotes it: a text typed where a path belongs, too long for
    one, is cut (a real path is quoted whole)."""
    return repr(path) if len(path) <= 255 else f"{path[:40]!r}... ({len(path):,} characters)"


def text_file(path: str) -> Path:
    """``--text``'s file, checked before the model loads: a ValueError (exit 2) for a name
    that is no file (missing, a directory, a text typed in its place), an OSError naming
    the flag (exit 1) for one that cannot be read. A pipe is a file here (``<(cmd)``)."""
    if path == "":  # Path("") is the current directory
        raise ValueError("--text='' is not allowed: it must name a UTF-8 text file")
    try:
        mode = Path(path).stat().st_mode
        if stat.S_ISDIR(mode):
            raise ValueError(f"--text={_shown(path)} is not allowed: it is a directory; it "
                             "must name a UTF-8 text file")
        if stat.S_ISREG(mode):  # not a named pipe: an open and close would end its writer
            with open(path, "rb"):
                pass
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # was a raw "File name too long", exit 1
            raise ValueError(f"--text={_shown(path)} is not allowed: no file can have this "
                             "name (too long); --text takes a file's path, not the text "
                             "itself") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ValueError(f"--text={_shown(path)} is not allowed: no such file") from None
        raise OSError(e.errno, f"--text={_shown(path)} could not be read: "
                      f"{e.strerror or e}") from None
    return Path(path)


def read_ids(path: str, encode, tokens: int | None) -> list[int]:
    """The ids of the UTF-8 text in ``path`` (a leading byte-order mark dropped), enough
    for its first ``tokens`` (None: the whole file). Only as much is read as gives them,
    so a file of gigabytes costs what is scored, not its size (it was read, decoded and
    tokenized whole, its ids a Python list: ~8 bytes each). A tokenizer's ids near the
    cut can differ from those of the whole text, so reading doubles until two prefixes
    agree on the first ``tokens`` ids (a byte model's agree at once). ``encode`` may give a
    list or a 1-D tensor (``encode_tensor``: compact, for a whole text's ids)."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text, done, before, block = "", 0, None, -1 if tokens is None else 4 * tokens + 4096
    with open(text_file(path), "rb") as f:
        while True:
            data = f.read(block)
            end = block < 0 or len(data) < block
            if done == 0 and data.startswith(codecs.BOM_UTF8):
                data, done = data[3:], 3
            held = len(utf8.getstate()[0])  # a character's first bytes, from the last block
            try:
                text += utf8.decode(data, final=end)
            except UnicodeDecodeError as e:
                raise ValueError(f"--text={_shown(path)} is not allowed: it is not UTF-8 "
                                 f"text (byte {e.object[e.start]:#04x} at offset "
                                 f"{done - held + e.start:,})") from None
            done += len(data)
            ids = encode(text)
            if end or (before is not None and len(before) > tokens
                       and _same_start(before, ids, tokens)):
                return ids
            before, block = ids, done


def _same_start(a: list[int] | Tensor, b: list[int] | Tensor, n: int) -> bool:
    """Whether the first ``n`` ids of ``a`` and ``b`` (lists or 1-D tensors) are equal."""
    if isinstance(a, Tensor):
        return torch.equal(a[:n], b[:n])
    return a[:n] == b[:n]


def _text_ids(path: str | None, encode, context: int, chunks: int) -> list[int] | Tensor:
    """The ids of ``--text`` (None: the built-in corpus's validation text), enough for
    ``chunks`` chunks of ``context`` (0: all); a text shorter than one chunk is refused
    by the flags' names (it was "text='0 tokens' is not allowed")."""
    if path is None:
        from moekit.safetensors_write import raw_bytes
        from moekit.train.data import load_corpus

        # raw_bytes: .tolist() had made a Python int of each of the corpus's bytes
        ids = encode(raw_bytes(load_corpus().val).decode("utf-8", errors="replace"))
        where = "the built-in corpus's validation text"
    else:
        ids = read_ids(path, encode, chunks * context or None)
        where = f"--text={_shown(path)}"
    if len(ids) < context:
        raise ValueError(f"{where} is not allowed: it holds {len(ids):,} tokens, fewer than "
                         f"one chunk of --context={context}; give a longer text or a "
                         "smaller --context")
    return ids


def _check_vocab(chunks_CL: Tensor, vocab_size: int, tokenizer: str | None) -> None:
    """The text's ids fit the model's embedding (a --tokenizer of another model gave "ids_BL
    has values in [11, 277]" from inside the forward, naming no flag)."""
    top = int(chunks_CL.max())
    if top >= vocab_size:
        where = "the checkpoint's tokenizer" if tokenizer is None else f"--tokenizer={tokenizer!r}"
        raise ValueError(f"{where} is not allowed: it gives ids up to {top}, beyond the "
                         f"model's vocab_size={vocab_size} (it must be the model's own)")


def run(args: argparse.Namespace) -> int:
    from moekit.errors import exit_code
    from moekit.inference.text import text_for
    from moekit.malloc import tune_malloc
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.generate_cli import close_offload, load_for_generation

    tune_malloc()
    model = None
    try:
        for flag in ("threads", "context", "score_from"):
            if getattr(args, flag) is not None:
                check_positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
        if args.context is not None and args.context < 2:  # was an empty range of score_from
            raise ValueError(f"--context={args.context} is not allowed: it must be at least "
                             "2 (a token of context before each scored one)")
        asked = DEFAULT_CHUNKS if args.chunks is None else args.chunks
        if asked < 0:
            raise ValueError(f"--chunks={args.chunks} is not allowed: it must be >= 0 "
                             "(0: every whole chunk)")
        if args.against is not None and not Path(args.against).is_dir():  # was checkpoint=
            raise ValueError(f"--against={args.against!r} is not allowed: it must be a "
                             "checkpoint directory (a run, a step_* directory or a `moekit "
                             "quantize` output)")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        text = text_for(args.checkpoint, args.tokenizer)
        if args.text is not None:
            text_file(args.text)  # a bad path is told before the model loads
        model = load_for_generation(args)
        limit = model.config.max_seq_len
        context = args.context if args.context is not None else min(limit, 512)
        if context > limit:
            raise ValueError(f"--context={context} is not allowed: it must be <= the "
                             f"model's max_seq_len={limit}")
        # a tensor of a small integer type, not a list: --chunks 0 holds the whole text's
        # a tokenizer that starts texts with BOS: every chunk starts with it, not only the
        # first (the others began mid-text, a context a model is not trained on)
        chunks = chunk_ids(_text_ids(args.text, text.encode_tensor, context, asked),
                           context, asked or None, text.bos_id)
        _check_vocab(chunks, model.config.vocab_size, args.tokenizer)
        if args.score_from is not None and args.score_from >= context:
            raise ValueError(f"--score-from={args.score_from} is not allowed: it must be "
                             f"< --context={context}")
        base = None
        if args.against is not None:
            from moekit.quant.io import load_model

            try:
                base = load_model(args.against)
            except ValueError as e:  # a CheckpointError stays one: exit 1, not 2
                kind = CheckpointError if isinstance(e, CheckpointError) else ValueError
                raise kind(f"--against={args.against!r} is not allowed: {e}") from e
            if base.config.vocab_size != model.config.vocab_size:  # was "base has ..."
                raise ValueError(f"--against={args.against!r} is not allowed: its vocab_size="
                                 f"{base.config.vocab_size} is not the model's, "
                                 f"{model.config.vocab_size}; it must share its vocabulary")
            if context > base.config.max_seq_len:  # was "sequence length 128 ..." mid-run
                raise ValueError(f"--context={context} is not allowed: it must be <= the "
                                 f"--against model's max_seq_len={base.config.max_seq_len}")
        kv = None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
        result = score(model, chunks, args.score_from, text.token_bytes, base, kv)
        # was silent; then it told of a --chunks=32 nobody typed (the default)
        if args.chunks is not None and args.chunks > len(chunks):
            print(f"moekit perplexity: --chunks={args.chunks}, but the text holds "
                  f"{len(chunks)} whole chunks of {context} tokens: scoring those "
                  f"{len(chunks)}", file=sys.stderr)
    except (ValueError, CheckpointError) as e:
        print(f"moekit perplexity: error: {e}", file=sys.stderr)
        return exit_code(e)
    finally:
        close_offload(model)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    bpb = result.bits_per_byte
    print(f"perplexity {result.perplexity:.4f} +- {_shown_error(result.stderr, '.4f')} over "
          f"{result.tokens:,} token{'s' * (result.tokens != 1)} ({result.chunks} "
          f"chunk{'s' * (result.chunks != 1)} of {result.context}, scoring the last "
          f"{result.context - result.score_from} of each): {result.nats_per_token:.4f} "
          f"nats/token" + ("" if bpb is None else f", {bpb:.4f} bits/byte")
          + f"; {result.tokens_per_s:.0f} tokens/s")
    if result.kl is not None:
        # significant digits: a bf16 or int8 KV cache's KL, ~2e-8 nats a token, printed
        # as 0.000000 +- 0.000000 (as if the two were the same)
        print(f"against {args.against}: KL divergence {result.kl_mean:.4g} +- "
              f"{_shown_error(result.kl_stderr, '.2g')} nats/token, top token the same at "
              f"{100 * result.top1_agreement:.2f}% of {result.tokens:,} positions")
    return 0
