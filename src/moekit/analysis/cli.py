"""`moekit analyze`: what the routers of a trained moekit LM learned.

Per MoE layer: expert load and imbalance, dropped fraction, router entropy,
expert co-activation, and the bytes / byte patterns each expert receives most
relative to their frequency in the text. Writes report.md, routing.json and PNGs;
with --compare, how routing changed against a second checkpoint of the run (compare.json).
Either may be a `moekit quantize` output (analysis/load.py): whether quantization moved
tokens to other experts is one such comparison.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.analysis.analyze import collect_routing, summarise_all, windows
from moekit.analysis.compare import check_comparable, compare, compare_section
from moekit.analysis.load import label, load_lm, tag, weights_line
from moekit.analysis.report import PLOT_HINT, summary_table, write_report
from moekit.analysis.stats import load_summary
from moekit.config import check_out_dir, flag_message, reject
from moekit.errors import exit_code
from moekit.train.rundir import left_by

# argument -> the flag that sets it, so an error names what the user typed
FIELD_FLAGS = {name: "--" + name.replace("_", "-")
               for name in ("data", "split", "tokens", "seq_len", "batch_size", "top",
                            "min_count", "compare")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a moekit LM run directory or one of its step_* dirs, "
                   "or a `moekit quantize` output")
    p.add_argument("--data", default=None, help="text file or directory (default: the "
                   "corpus the checkpoint was trained on, the Python standard library if it "
                   "names none; an error if that corpus is gone, as for train --resume)")
    p.add_argument("--split", default="val", choices=("val", "train"),
                   help="which split of the data to read (default: validation)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens to route")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--top", type=int, default=5, help="items listed per expert")
    p.add_argument("--min-count", type=int, default=5,
                   help="ignore items an expert saw fewer times (their lift is noise)")
    p.add_argument("--compare", default=None, metavar="CHECKPOINT",
                   help="a second checkpoint of the same run (e.g. a later step_*, or a "
                   "`moekit quantize` output of it): route "
                   "the same tokens through both and write compare.json and a report "
                   "section (load share change, imbalance, router entropy, how many tokens "
                   "keep their experts); default --out RUN/analysis/step_A_vs_step_B")
    p.add_argument("--out", default=None, help="output directory (default: "
                   "RUN/analysis/step_NNNNNNNN, beside the checkpoint, not inside it: the "
                   "trainer deletes old checkpoint directories)")


def load_other(path: str):
    """The --compare checkpoint, its errors naming --compare and the value: a missing
    one had read "checkpoint='...': no state.json", as if the first checkpoint were wrong."""
    from moekit.errors import CheckpointError
    try:
        return load_lm(path)
    except CheckpointError as e:
        msg = str(e)
        if msg.startswith("checkpoint="):  # not_a_checkpoint(): "checkpoint='P' is ..."
            raise ValueError("compare=" + msg.removeprefix("checkpoint=")) from e
        raise ValueError(f"compare={path!r} is not a readable checkpoint: {msg}") from e


def default_out(ck) -> Path:
    """RUN/analysis/step_NNNNNNNN: beside the checkpoint, never inside it (the trainer
    deletes a step_* directory, with whatever was written into it, when it prunes old
    checkpoints or re-saves that step: the default CHECKPOINT/analysis was lost so).
    A quantized output Q: Q/../analysis/step_NNNNNNNN_Q."""
    return ck.path.parent / "analysis" / tag(ck)


def check_out_beside(out: Path, *cks) -> None:
    """--out is not a checkpoint directory nor inside one: the report was written among
    the checkpoint's files, where the trainer deletes it with the step_* directory when
    it prunes old checkpoints or re-saves that step."""
    where = out.resolve()
    for ck in cks:
        if where.is_relative_to(ck.path.resolve()):
            reject("--out", str(out), f"it is inside checkpoint {str(ck.path)!r}, which the "
                   "trainer deletes with everything in it when it prunes old checkpoints; "
                   "pick a directory outside it (without --out: under "
                   f"{ck.path.parent / 'analysis'})")


def trained_on(ck) -> str | None:
    """The training corpus a checkpoint names: None for the default one (the stdlib .py
    files, as `moekit train` reads them); a ValueError asking for --data when it does not
    exist here, as `moekit train --resume` gives: the stdlib had been analyzed in its
    place, without a word, under a report that names the checkpoint."""
    from moekit.train.data import recorded_corpus
    if ck.weights is not None and "data" not in ck.state:
        reject("checkpoint", str(ck.path), "it is a `moekit quantize` output that does not "
               "record the float checkpoint it came from (written before moekit recorded "
               "it), so its training corpus is unknown: pass --data with the text to "
               "analyze")
    return recorded_corpus((ck.state.get("data") or {}).get("corpus"),
                           f"checkpoint={str(ck.path)!r}", ", or the text to analyze")


def forward_size(cfg, ck, batch_size: int, seq_len: int, sequences: int) -> dict[str, Any]:
    """The tokens routed together in one forward pass, and the training's: a capacity
    (``capacity_factor``) and expert choice's picks are fractions of the tokens in a pass,
    so the dropped fraction and which tokens an expert takes depend on it (a capped model
    trained at 1,024 tokens a pass dropped 11.8% of pairs analysed at 1,024, 15.8% at 64).
    """
    train = ck.state.get("train_config") or {}
    trained = train.get("batch_size", 0) * train.get("seq_len", 0) or None
    return {"batch_size": batch_size,
            "tokens_per_forward": min(batch_size, sequences) * seq_len,
            # the sequences left for the last pass (the report had claimed every pass
            # routed tokens_per_forward: 64 sequences at --batch-size 24 end on 16)
            "last_forward_tokens": (sequences - (sequences - 1) // batch_size * batch_size)
            * seq_len,
            "train_tokens_per_forward": trained,
            "routing_depends_on_batch": cfg.router == "expert_choice"
            or cfg.capacity_factor is not None}


def batch_note(meta: dict[str, Any]) -> str | None:
    """A line when the routing depends on the tokens in a pass and the analysis routed
    another number than the training did (None otherwise)."""
    trained, here = meta.get("train_tokens_per_forward"), meta.get("tokens_per_forward")
    if not meta.get("routing_depends_on_batch") or trained in (None, here):
        return None
    return (f"this model's routing depends on the tokens in a forward pass (capacity or "
            f"expert choice): analysed {here:,} per pass, trained on {trained:,}; the "
            "dropped fraction and the experts' picks differ (--batch-size x --seq-len "
            "sets it)")


def analyze_checkpoint(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Raises ValueError (CheckpointError is one) on bad input, before writing anything."""
    result, out, _ = analyze_and_compare(args)
    return result, out


def check_other(model, ck, other, ck_b, seq_len: int) -> None:
    """The --compare checkpoint's model, refused in one line unless it has the same MoE
    layers, experts and top-k as ``model`` and takes ``seq_len`` tokens."""
    names = (str(ck.path), str(ck_b.path))
    check_comparable(model, other, *names, (model.config.vocab_size, other.config.vocab_size))
    if seq_len > other.config.max_seq_len:
        raise ValueError(f"checkpoints {names[0]!r} and {names[1]!r} cannot be compared at "
                         f"seq_len={seq_len}: the second's max_seq_len is "
                         f"{other.config.max_seq_len}; pass a --seq-len both take")


def compare_runs(args, rc, layers, ids_BL, other, ck, ck_b) -> dict[str, Any]:
    """compare.json: ``other`` routes the tokens ``rc`` collected (with decisions)."""
    rc_b = collect_routing(other, ids_BL, other.config.vocab_size, args.batch_size, True)
    layers_b = [load_summary(layer) for layer in rc_b.layers]  # what compare reads of it
    return {"meta": {"before": side_meta(ck), "after": side_meta(ck_b),
                     "tokens": ids_BL.numel(), "batch_size": args.batch_size,
                     "note": "expert ids are comparable only between checkpoints of one "
                             "training run"},
            "layers": compare(rc.layers, rc_b.layers, layers, layers_b)}


def side_meta(ck) -> dict[str, Any]:
    """One side of a comparison: its checkpoint, step, label and weights (None: float)."""
    return {"checkpoint": str(ck.path), "step": ck.step, "label": label(ck),
            "weights": ck.weights}


def model_line(cfg) -> str:
    """The report's model line: the routing choices that shape what it shows (a run with
    --shared-experts, --groups or --moe-every had read as a plain top-K model, its
    shared experts' tokens nowhere and its layer count not the MoE layers')."""
    parts = [f"{cfg.num_layers} layers", f"dim {cfg.dim}", f"{cfg.num_experts} experts",
             f"top-{cfg.top_k}", f"{cfg.router} router"]
    if cfg.moe_every > 1:
        parts.append(f"an MoE FFN every {cfg.moe_every} blocks (the dense FFNs between "
                     "are not analysed)")
    if cfg.num_groups > 1:
        parts.append(f"{cfg.num_groups} expert groups, {cfg.topk_groups} per token")
    if cfg.num_shared_experts:
        n = cfg.num_shared_experts
        parts.append(f"{n} shared expert{'s' if n > 1 else ''} every token goes through "
                     "(not routed, not counted in the load)")
    if cfg.capacity_factor is not None:
        parts.append(f"capacity factor {cfg.capacity_factor:g}")
    return ", ".join(parts)


def corpus_ids(corpus, split: str, checkpoint: str
               ) -> tuple[Any, str, Callable[[int], str] | None]:
    """(the ids of ``split``, where they came from, a token's label or None for bytes): a
    checkpoint with a tokenizer (a converted one: RUN/tokenizer) reads the text in its
    tokenizer's ids, labelled by their text (it had been given the text's bytes as ids,
    a space as token 32, whatever the vocabulary)."""
    from moekit.inference.text import TokenizerText, text_for, token_label
    from moekit.safetensors_write import raw_bytes

    data_N = corpus.val if split == "val" else corpus.train
    text = text_for(checkpoint)
    if not isinstance(text, TokenizerText):
        return data_N, f"{corpus.source} ({split} split)", None

    def label(v: int) -> str:
        piece = token_label(text.token_bytes(v))  # "bytes:\\xNN" for part of a character
        return piece if piece.startswith("bytes:") else repr(piece)

    ids = text.encode_tensor(raw_bytes(data_N).decode("utf-8", errors="replace"))
    return ids, f"{corpus.source} ({split} split, in the tokens of {text.directory})", label


def analyze_and_compare(args: argparse.Namespace
                        ) -> tuple[dict[str, Any], Path, dict[str, Any] | None]:
    """analyze_checkpoint, and with ``args.compare`` the comparison (else None)."""
    from moekit.train.data import load_corpus
    model, ck = load_lm(args.checkpoint)
    other = None if getattr(args, "compare", None) is None else load_other(args.compare)
    if other is not None and args.out is None:
        out = default_out(ck).parent / f"{tag(ck)}_vs_{tag(other[1])}"
    else:
        out = default_out(ck) if args.out is None else Path(args.out)
    check_out_dir("--out", out if args.out is None else args.out)  # --out "" is refused
    check_out_beside(out, ck, *([] if other is None else [other[1]]))
    cfg = model.config
    if cfg.dense:  # had read "model has no moekit.MoE layers", naming no checkpoint
        reject("checkpoint", str(ck.path), "it is a dense model (moekit train --dense): "
               "it has no router to analyse; pass an MoE run")
    seq_len = cfg.max_seq_len if args.seq_len is None else args.seq_len  # 0 is an error
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is not allowed: it must be <= the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    for name in ("batch_size", "top", "min_count"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"{name}={v} is not allowed: it must be >= 1")
    corpus = load_corpus(args.data if args.data is not None else trained_on(ck))
    data_N, source, label = corpus_ids(corpus, args.split, args.checkpoint)
    if data_N.numel() < seq_len:  # was "the text has 50 tokens" of a 1,000-byte file
        raise ValueError(f"split={args.split!r} is not allowed: the {args.split} split of "
                         f"{corpus.source} holds {data_N.numel()} tokens, fewer than "
                         f"seq_len={seq_len} (one sequence); try another --split, a shorter "
                         "--seq-len or more text")
    ids_BL = windows(data_N, args.tokens, seq_len)
    if other is not None:
        check_other(model, ck, *other, seq_len)
    rc = collect_routing(model, ids_BL, cfg.vocab_size, args.batch_size, other is not None)
    layers = summarise_all(rc, args.top, args.min_count, label)
    comparison = None
    if other is not None:
        model_b, ck_b = other
        comparison = compare_runs(args, rc, layers, ids_BL, model_b, ck, ck_b)
    meta = {"checkpoint": str(ck.path), "step": ck.step,
            "source": source, "tokens": ids_BL.numel(),
            "sequences": ids_BL.shape[0], "seq_len": seq_len,
            **forward_size(cfg, ck, args.batch_size, seq_len, ids_BL.shape[0]),
            "model": model_line(cfg),
            "weights": ck.weights, "weights_line": weights_line(ck.weights),
            "model_config": cfg.to_dict()}
    return {"meta": meta, "layers": layers}, out, comparison


def run(args: argparse.Namespace) -> int:
    try:
        result, out, comparison = analyze_and_compare(args)
    except ValueError as e:  # CheckpointError too: exit 1
        print(f"moekit analyze: error: {flag_message(e, FIELD_FLAGS)}", file=sys.stderr)
        return exit_code(e)
    note = batch_note(result["meta"])
    if note:
        print(f"moekit analyze: warning: {note}", file=sys.stderr)
    try:
        paths = write_report(result, out, comparison, new_run=True)
    except OSError as e:  # a full disk: was a traceback, after routing.json was cut short
        print(f"moekit analyze: error: could not write out={str(out)!r}: "
              f"{e.strerror or e}; {left_by(e)}", file=sys.stderr)
        return 1
    print("\n".join(summary_table(result["layers"])))
    if comparison is not None:
        section = compare_section(comparison)
        table = next(i for i, line in enumerate(section) if line.startswith("| layer"))
        print("\n" + "\n".join(section[table:]))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    if "load" not in paths:
        print(f"no plots: matplotlib is not installed; {PLOT_HINT}", file=sys.stderr)
    return 0
