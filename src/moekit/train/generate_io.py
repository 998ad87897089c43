"""`moekit generate`'s inputs and outputs around the model: the prompts (--prompt or
--prompts-file, each --samples times), the --jsonl file the sequences are written to, and
the stats line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moekit.config import check_writable_folder, reject
from moekit.inference.engine import EmptyPromptError, GenerationStats
from moekit.train.rundir import write_whole


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts, each repeated ``--samples`` times; an empty one is an error."""
    if args.prompts_file is None:
        prompts = [args.prompt]
    else:
        path = Path(args.prompts_file)
        # a named pipe (``<(cmd)``) is a file here: is_file() refused it as "no such file"
        if not path.exists():
            raise ValueError(f"--prompts-file={str(path)!r} is not allowed: no such file")
        if path.is_dir():
            raise ValueError(f"--prompts-file={str(path)!r} is not allowed: it is a "
                             "directory; it must name a UTF-8 text file, one prompt a line")
        try:
            prompts = prompt_lines(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file={str(path)!r} is not allowed: it is not UTF-8 "
                             f"text ({e})") from e
        if not prompts:
            raise EmptyPromptError(f"--prompts-file={str(path)!r} holds no prompt: it must "
                                   "have one prompt per line")
    for i, text in enumerate(prompts):
        if not text:
            where = "--prompt" if args.prompts_file is None else f"line {i + 1} of --prompts-file"
            raise EmptyPromptError(f"{where} is empty, which is not allowed: a prompt must "
                                   "hold at least one byte")
    if args.samples < 1 or args.batch < 1:
        raise ValueError(f"--samples={args.samples} / --batch={args.batch} is not allowed: "
                         "both must be >= 1")
    return [t for t in prompts for _ in range(args.samples)]


def prompt_lines(text: str) -> list[str]:
    """``--prompts-file``'s lines: split at "\n" only, a line's "\r" (CRLF) and the
    empty piece after a final newline dropped. str.splitlines had also split a line at a
    form feed, "\x1c"-"\x1e", "\x85", U+2028 or U+2029 (Python source holds form
    feeds), giving one prompt as two; "utf-8-sig" drops a leading byte-order mark, which
    had been the first prompt's first character."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_jsonl(args: argparse.Namespace) -> None:
    """--jsonl names a file that can be written (its folder exists and is writable), with
    a run that writes sequences (not --interactive or --no-cache)."""
    path = Path(args.jsonl)
    if args.interactive or args.no_cache:
        reject("--jsonl", args.jsonl, "it writes the sequences of a run of prompts: not with "
               "--interactive or --no-cache")
    if not args.jsonl or path.is_dir():
        reject("--jsonl", args.jsonl, "it must name a file, not a directory")
    if not path.parent.is_dir():
        reject("--jsonl", args.jsonl, f"its folder {str(path.parent)!r} does not exist")
    check_writable_folder("--jsonl", path, [path.parent])


def write_jsonl(path: Path, records: list[dict]) -> None:
    """The records as JSON lines in ``path``, whole or not at all (a file there before
    stays as it was if this fails)."""
    write_whole(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def report(stats: list[GenerationStats], batch: int) -> None:
    new = sum(s.new_tokens for s in stats)
    prefill = sum(s.prefill_s for s in stats)
    seconds = prefill + sum(s.decode_s for s in stats)
    step_ms = 1e3 * sum(s.decode_s for s in stats) / max(sum(s.decode_steps for s in stats), 1)
    n = sum(s.sequences for s in stats)
    print(f"moekit generate: {n} sequence{'' if n == 1 else 's'} (batch <= {batch}), "
          f"{new} new tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s; "
          f"prefill {1e3 * prefill:.1f} ms, {step_ms:.2f} ms per decode step"
          + (f"; {reused} prompt tokens held in the cache from earlier turns, not prefilled"
             if (reused := sum(s.reused_tokens for s in stats)) else ""), file=sys.stderr)
