"""`moekit generate`: sample text from a trained checkpoint with the generation engine
(static KV cache, stop strings, streaming; many prompts batched continuously).
Text is UTF-8 bytes for moekit's own models, a converted checkpoint's tokenizer where it
has one (``moekit.inference.text``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from moekit.config import check_positive_int, flag_message
from moekit.errors import exit_code
from moekit.hugepages import huge_pages
from moekit.inference.batcher import Batcher, sequence_seed
from moekit.inference.engine import (
    ContextLengthError,
    Engine,
    GenerationConfig,
    GenerationStats,
    StopWhen,
)
from moekit.inference.text import (
    ByteText,
    StopText,
    TokenizerText,
    cut_stream,
    cut_text,
    finish_reason,
    text_for,
)
from moekit.malloc import tune_malloc
from moekit.models.generate import generate
from moekit.models.transformer import MoETransformer
from moekit.offload import ExpertMemoryError, load_offloaded, parse_bytes
from moekit.train.checkpoint import CheckpointError
from moekit.train.generate_io import check_jsonl, read_prompts, report, write_jsonl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# GenerationConfig's fields and the flags that set them: its errors lead with the flag
# ("max_new_tokens=0 is not allowed" had not said --max-new-tokens)
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed"}


def add_model_arguments(p: argparse.ArgumentParser, huge_pages: bool = False) -> None:
    """The flags that say which model to load and how (``load_for_generation`` reads
    them): generate's, and serve's and perplexity's (``huge_pages``: --huge-pages's
    default)."""
    p.add_argument("--checkpoint", required=True,
                   help="run directory (uses its LATEST), a step_* directory or a "
                   "`moekit quantize` output")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a directory holding tokenizer.json (default: the checkpoint's own, "
                   "which `moekit convert` copies; else UTF-8 bytes)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights' dtype")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--expert-memory", default=None, metavar="BYTES",
                   help="keep experts on disk, cache at most BYTES of them (e.g. 512MiB)")
    p.add_argument("--expert-policy", choices=("lru", "lfu"), default=None,
                   help="with --expert-memory: which expert the cache evicts (default lru)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="with --expert-memory: do not read the next layer's experts ahead")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=huge_pages,
                   help="move the loaded weights into transparent huge pages "
                   "(moekit.huge_pages: ~2.7 s per GiB once, then decode steps ~4%% "
                   "faster, 0-11%%, on the Intel VM; default "
                   f"{'on' if huge_pages else 'off'})")


def add_kv_cache_argument(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--kv-cache-dtype: generate's and serve's (and, with its own ``help``, perplexity's)."""
    from moekit.plan.decode import KV_CACHE_DTYPES

    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   default="auto",
                   help=help or "the KV cache's keys and values (default auto: the "
                   "activations' dtype); under fp32 or quantized weights bfloat16 halves the "
                   "cache's memory and the bytes a decode step reads from it (keys and "
                   "values rounded once as they are stored), int8 quarters them (plus a "
                   "float scale per slot and head); under bf16 weights int8 halves them")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_kv_cache_argument(p)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--prompts-file", default=None,
                   help="a text file with one prompt per line (replaces --prompt)")
    p.add_argument("--batch", type=int, default=8,
                   help="sequences (prompts x samples) decoded together; one that stops "
                   "makes room for the next at once")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=[],
                   help="stop a sequence when its new text ends with this string (with a "
                   "tokenizer: at the token whose text completes it, the text cut "
                   "after the string); repeatable; "
                   "backslash escapes such as \\n are understood")
    p.add_argument("--samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help="write each sequence as a JSON line to FILE (index, prompt, text, "
                   "finish_reason, token counts; in order; written whole at the end) "
                   "instead of printing it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the prefix every token (slow reference; no batching)")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message in the tokenizer's chat template "
                   "(an instruct model's format); needs a tokenizer")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system message before each prompt")
    p.add_argument("--interactive", action="store_true",
                   help="with --chat: a conversation: each line read from stdin is the "
                   "user's next message, answered with the whole conversation so far as "
                   "context (oldest turns dropped where it outgrows the model's context); "
                   "ends at end of input")


def load_model(path: str, dtype: torch.dtype = torch.float32) -> MoETransformer:
    """A model built from the checkpoint's own config, weights verified and loaded in
    ``dtype`` (a directory written by `moekit quantize` loads its quantized model)."""
    from moekit.quant.io import load_model as load_any

    return load_any(path, dtype)


def _unescape_stop(text: str) -> str:
    """``--stop``'s backslash escapes (\\n, \\t, \\u00e9, ...) decoded; other text kept as is."""
    if "\\" not in text:
        return text
    try:  # non-Latin-1 text as \u escapes first: unicode_escape reads bytes as Latin-1
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        raise ValueError(f"--stop={text!r} is not allowed: its backslash escapes must be "
                         "Python's (\\n, \\t, \\\\, \\xhh, \\uhhhh)") from None


@dataclasses.dataclass(frozen=True)
class _Stops:
    """The stop strings: those matched in the text (a tokenizer's; bytes match as id
    sequences, but a string with U+FFFD), and the strings the written text is cut after."""

    in_text: StopText | None
    strings: tuple[str, ...]

    def after(self, prompt: Sequence[int]) -> StopWhen | None:
        """The engine's stop_when for the sequences of ``prompt``."""
        in_text = self.in_text
        return None if in_text is None else (lambda _, tokens: in_text(prompt, tokens))


def _config(args: argparse.Namespace, text: ByteText | TokenizerText
            ) -> tuple[GenerationConfig, _Stops]:
    """The generation config and its stop strings."""
    stops = tuple(_unescape_stop(s) for s in args.stop)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           stop_ids=text.stop_ids, stop_sequences=text.stop_sequences(stops))
    return cfg, _Stops(text.stop_in_text(stops), stops)


def run(args: argparse.Namespace) -> int:
    tune_malloc()  # a prefill's expert layers free and re-allocate the same buffers
    try:
        _check_flags(args)
        prompts = read_prompts(args)
        text = _text(args)
        cfg, stops = _config(args, text)
        _check_modes(args)
        ids = [text.encode_chat(p, args.system) if args.chat else text.encode(p)
               for p in prompts]
        model = _load(args)
        engine = Engine(model, kv_cache_dtype=args.kv_cache_dtype)
        _check_context(engine, ids, cfg, args)  # every error before the first token
    except (ValueError, CheckpointError) as e:
        print(f"moekit generate: error: {flag_message(e, FLAGS)}", file=sys.stderr)
        return exit_code(e)  # the checkpoint: 1; a flag's value: 2
    try:
        return _generate(args, engine, prompts, ids, text, cfg, stops)
    except CheckpointError as e:  # found as it is read: an offloaded expert's NaN scales
        sys.stdout.flush()  # (on a terminal: below the text streamed so far, not after it)
        print(("\n" if sys.stdout.isatty() else "") + f"moekit generate: error: {e}",
              file=sys.stderr)
        return exit_code(e)
    finally:
        close_offload(model)


def _check_flags(args: argparse.Namespace) -> None:
    """The flags refused before anything is read: --threads, and the --no-cache run's."""
    if args.threads is not None:
        check_positive_int("--threads", args.threads)
    if args.no_cache and args.kv_cache_dtype != "auto":  # no cache to type
        raise ValueError(f"--kv-cache-dtype={args.kv_cache_dtype} is not allowed with "
                         "--no-cache: the slow reference keeps no KV cache")
    if args.no_cache and args.stop:  # was silently ignored
        raise ValueError(f"--stop={args.stop[0]!r} is not allowed with --no-cache: the "
                         "slow reference does not stop early")


def _text(args: argparse.Namespace) -> ByteText | TokenizerText:
    """The checkpoint's text (its tokenizer, else UTF-8 bytes); --chat needs a tokenizer."""
    if not Path(args.checkpoint).exists():  # --chat had blamed a missing tokenizer
        # a missing checkpoint: 1, as analyze / quantize / serve / perplexity exit
        raise CheckpointError(f"--checkpoint={args.checkpoint!r} is not allowed: no "
                              "such directory (a run, a step_* directory or a `moekit "
                              "quantize` output)")
    text = text_for(args.checkpoint, args.tokenizer)
    if args.chat and not isinstance(text, TokenizerText):
        raise ValueError("--chat is not allowed here: the checkpoint has no tokenizer "
                         "(moekit's byte-level models have no chat template); give "
                         "--tokenizer DIR")
    return text


def _check_modes(args: argparse.Namespace) -> None:
    """--system, --jsonl and --interactive refused where they do not fit the run."""
    if args.system is not None and not args.chat:  # would be silently ignored
        raise ValueError(f"--system={args.system!r} is not allowed without --chat")
    if args.jsonl is not None:
        check_jsonl(args)
    if args.interactive and (not args.chat or args.prompts_file or args.no_cache
                             or args.samples != 1):
        raise ValueError("--interactive is not allowed here: it needs --chat, reads "
                         "its messages from stdin (no --prompts-file), one reply each "
                         "(no --samples) with the cache (no --no-cache)")


def _load(args: argparse.Namespace) -> MoETransformer:
    """The model on --threads threads, its C++ kernels built or loaded."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_for_generation(args)
    load_kernels(model)
    return model


def _generate(args: argparse.Namespace, engine: Engine, prompts: list[str],
              ids: list[list[int]], text: ByteText | TokenizerText, cfg: GenerationConfig,
              stops: _Stops) -> int:
    """The sequences, by the path the flags choose: a conversation, the slow reference,
    the --jsonl records, one prompt streamed, or many batched."""
    model, kv = engine.model, args.kv_cache_dtype
    typed = list(prompts)
    if args.chat:  # the user's message, then the reply on its own line
        prompts = [f"{p}\n" for p in prompts]
    if args.interactive:  # each turn prefills only what the cache does not hold
        return _converse(Engine(model, reuse_prefix=True, kv_cache_dtype=kv), text, cfg,
                         args.system, stops)
    if args.no_cache:
        return _run_no_cache(model, prompts, ids, text, cfg)
    if args.jsonl is not None:
        records: list[dict] = []
        stats = _run_many(model, typed, ids, text, cfg, args.batch, stops, records, kv)
        write_jsonl(Path(args.jsonl), records)
        report([stats], args.batch)
    elif len(prompts) == 1:
        report([_run_one(engine, prompts[0], ids[0], text, cfg, stops)], 1)
    else:
        report([_run_many(model, prompts, ids, text, cfg, args.batch, stops, kv=kv)],
               args.batch)
    return 0


def _check_context(engine: Engine, ids: list[list[int]], cfg: GenerationConfig,
                   args: argparse.Namespace) -> None:
    """``engine.check``; a prompt past the context named as --prompt or by its
    --prompts-file line (``prompts[i]`` counts the --samples repeats)."""
    try:
        engine.check(ids, cfg)
    except ContextLengthError as e:
        if e.prompt is None:
            raise
        line = e.prompt // args.samples + 1
        where = "--prompt: " if args.prompts_file is None else \
            f"line {line} of --prompts-file: "
        raise ContextLengthError(where + e.detail) from None


def load_kernels(model: MoETransformer) -> None:
    """Build or load the C++ kernels the model's forwards will call, now: the first use
    builds them (1-2 minutes on a 2-core machine), which would otherwise be timed as the
    first prefill."""
    from moekit.functions import cpu_ext

    cpu_ext.get()
    cpu_ext.get_decode()
    if model.norm.weight.dtype == torch.bfloat16:
        cpu_ext.bf16()


def close_offload(model: MoETransformer | None) -> None:
    """Where ``model``'s experts are offloaded: what its expert cache did (when a step
    used it), on stderr, and its prefetch thread stopped."""
    offload = getattr(model, "expert_offload", None)
    if offload is not None:
        # not where no step asked for an expert (a refused input): four lines of zeros had
        # followed its one-line error
        if offload.stats.total("requests"):
            print(offload.stats.summary(), file=sys.stderr)
        offload.close()


def load_for_generation(args: argparse.Namespace) -> MoETransformer:
    """The checkpoint's model: resident, quantized, or with its experts read on demand;
    with --huge-pages its weights moved into huge pages (what was done to stderr)."""
    if args.expert_memory is None:
        # they were ignored: a run meant to be offloaded loaded every expert resident
        for flag, given in (("--expert-policy", args.expert_policy),
                            ("--no-prefetch", args.no_prefetch or None)):
            if given is not None:
                raise ValueError(f"{flag}{'' if given is True else '=' + given} is not "
                                 "allowed without --expert-memory: it sets how offloaded "
                                 "experts are cached; add --expert-memory BYTES")
        model = load_model(args.checkpoint, DTYPES[args.dtype])
    elif args.dtype != "fp32":
        raise ValueError(f"--dtype={args.dtype} is not allowed with --expert-memory: "
                         "offloaded experts run in the checkpoint's own dtype (fp32)")
    else:
        # checked here so that a bad value is named as the flag the user typed; passed as
        # typed, so that a budget too small for the model is told as "1KiB", not 1024
        parse_bytes(args.expert_memory, "--expert-memory")
        try:
            model = load_offloaded(args.checkpoint, args.expert_memory,
                                   args.expert_policy or "lru", prefetch=not args.no_prefetch)
        except ExpertMemoryError as e:
            raise ExpertMemoryError(flag_message(e, {"expert_memory": "--expert-memory"})
                                    ) from None
    if args.huge_pages:
        print(f"moekit: {huge_pages(model)}", file=sys.stderr)
    return model


def _run_one(engine: Engine, prompt: str, ids: list[int], text: ByteText | TokenizerText,
             cfg: GenerationConfig, stops: _Stops = _Stops(None, ())) -> GenerationStats:
    """One sequence, its text streamed as it is produced (after the prompt as typed; a
    tokenizer's special tokens are not written; the text ends with the stop string that
    stopped it)."""
    sys.stdout.write(prompt)
    emit = cut_stream(text.stream(ids), stops.strings)
    _, stats = engine.generate([ids], cfg, on_token=lambda _, tok: _write(emit(tok)),
                               stop_when=stops.after(ids))
    _write(emit(None) + "\n")
    return stats


def _run_many(model: MoETransformer, prompts: list[str], ids: list[list[int]],
              text: ByteText | TokenizerText, cfg: GenerationConfig, batch: int,
              stops: _Stops = _Stops(None, ()), records: list[dict] | None = None,
              kv: str = "auto") -> GenerationStats:
    """Every sequence through one ``Batcher`` of ``batch`` rows: a sequence that stops
    makes room for the next prompt at once (no batch waits for its longest sequence).
    Each is printed, in order, once it and those before it are done, headed by its index
    counted from 0 (with ``records``: appended there as a dict instead, under "index": a
    script reading either output sees one number per sequence, and the 0-based one of
    OpenAI's ``index``, serve's choices and ``sequence_seed``). Sequence i samples from a
    generator of its own (``sequence_seed``), so its text does not depend on ``--batch``.
    ``kv``: the KV cache's dtype (``--kv-cache-dtype``)."""
    batcher = Batcher(model, rows=min(batch, len(ids)),
                      context=max(map(len, ids)) + cfg.max_new_tokens, kv_cache_dtype=kv)
    groups = [batcher.submit([p], cfg, torch.Generator().manual_seed(sequence_seed(cfg.seed, i)),
                             stop_when=stops.after(p)) for i, p in enumerate(ids)]
    t0 = time.perf_counter()
    printed = 0
    more = True
    while more:
        more = batcher.step()
        while printed < len(groups) and groups[printed].done:
            g = groups[printed]
            if g.error is not None:
                raise g.error
            (gen,) = g.gens
            whole = text.decode_after(ids[printed], gen.tokens)
            new = cut_text(whole, stops.strings)
            reason = finish_reason(gen.finish_reason, whole, stops.strings)
            if records is not None:
                records.append({"index": printed, "prompt": prompts[printed], "text": new,
                                "finish_reason": reason,
                                "prompt_tokens": len(ids[printed]),
                                "completion_tokens": len(gen.tokens)})
            else:
                n = len(gen.tokens)
                print(f"--- {printed} ({reason}, {n} token{'' if n == 1 else 's'})")
                print(prompts[printed] + new, flush=True)
            printed += 1
    # the batcher's totals: a cohort's prefill once, however many groups shared it; the
    # steps that carried a prefill chunk are prefill time, not decode steps
    prefill = batcher.prefill_s
    return GenerationStats(sequences=len(groups), prompt_tokens=sum(map(len, ids)),
                           new_tokens=sum(len(g.gens[0].tokens) for g in groups),
                           decode_steps=batcher.decode_steps - batcher.prefill_steps,
                           prefill_s=prefill, decode_s=time.perf_counter() - t0 - prefill)


def _converse(engine: Engine, text: TokenizerText, cfg: GenerationConfig,
              system: str | None, stops: _Stops = _Stops(None, ())) -> int:
    """--interactive: each stdin line a user message, each reply streamed on its own line
    after it, the conversation so far its context (the oldest exchanges dropped, with a
    note on stderr, where the prompt and the reply would not fit the model's context)."""
    context = engine.model.config.max_seq_len
    head = [] if system is None else [{"role": "system", "content": system}]
    turns: list[dict] = []
    stats = []
    tty = sys.stdin.isatty()
    while True:
        if tty:  # a prompt for the person typing (stdout stays the conversation's text)
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        message = line.rstrip("\n")
        if not message:
            continue
        turns.append({"role": "user", "content": message})
        ids = text.encode_messages([*head, *turns])
        while len(ids) + cfg.max_new_tokens > context and len(turns) > 1:
            del turns[:2]  # the oldest user message and its reply
            print("moekit generate: the conversation outgrew the context "
                  f"({context} tokens): its oldest exchange is dropped", file=sys.stderr)
            ids = text.encode_messages([*head, *turns])
        try:
            engine.check([ids], cfg)
        except ValueError as e:
            print(f"moekit generate: error: {e}", file=sys.stderr)
            return 2
        emit = cut_stream(text.stream(ids), stops.strings)
        gens, s = engine.generate([ids], cfg, on_token=lambda _, tok, emit=emit: _write(emit(tok)),
                                  stop_when=stops.after(ids))
        _write(emit(None) + "\n")
        stats.append(s)
        reply = gens[0].tokens
        if reply and reply[-1] in text.stop_ids:  # the end of the turn, not its content
            reply = reply[:-1]
        turns.append({"role": "assistant",
                      "content": cut_text(text.decode(reply), stops.strings)})
    if stats:
        report(stats, 1)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_no_cache(model: MoETransformer, prompts: list[str], ids: list[list[int]],
                  text: ByteText | TokenizerText, cfg: GenerationConfig) -> int:
    """The slow reference: the whole sequence recomputed per token, one prompt at a time
    (no stopping: --stop is refused with it, end-of-sequence ids are generated past).
    Sequence i draws from its own generator as with the cache (``sequence_seed``): one
    generator for them all had given every sequence after the first another text than
    the cached run's."""
    seconds, new = 0.0, 0
    for i, (prompt, p) in enumerate(zip(prompts, ids, strict=True)):
        gen = torch.Generator().manual_seed(sequence_seed(cfg.seed, i))
        t0 = time.perf_counter()
        out = generate(model, torch.tensor([p]), cfg.max_new_tokens, cfg.temperature,
                       cfg.top_k, cfg.top_p, use_cache=False, generator=gen)
        seconds += time.perf_counter() - t0
        new += out.shape[1] - len(p)
        if len(prompts) > 1:
            print(f"--- {i}")
        print(prompt + text.decode_after(p, out[0, len(p):].tolist()))
    # no prefill: every token is a forward over the whole sequence (its decode step)
    report([GenerationStats(sequences=len(prompts), prompt_tokens=sum(map(len, ids)),
                             new_tokens=new, decode_steps=new, prefill_s=0.0,
                             decode_s=seconds)], 1)
    return 0
