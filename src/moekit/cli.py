"""The `moekit` command. Each subcommand lives beside the code it drives and
exposes ``add_arguments(parser)`` and ``run(args) -> int`` (and ``OWN_HELP = True``
where its ``add_arguments`` adds -h/--help itself)."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings
from pathlib import Path

# name -> (module, one-line help). Add a line here to add a subcommand.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moekit.demo", "build an MoE layer, run forward+backward, print routing stats"),
    "train": ("moekit.train.cli", "train the MoE language model (default: on the Python stdlib)"),
    "generate": ("moekit.train.generate_cli", "sample text from a trained checkpoint"),
    "compare": ("moekit.train.compare", "MoE vs dense of equal active FLOPs: table and plots"),
    "scaling": ("moekit.train.scaling",
                "loss vs number of experts at equal active FLOPs (Switch scaling): table, plots"),
    "plan": ("moekit.plan.cli", "parameters, FLOPs, memory, communication, time and energy"),
    "analyze": ("moekit.analysis.cli", "routing analysis of a trained LM checkpoint"),
    "convert": ("moekit.integrations.hf.convert",
                "transformers MoE checkpoint (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) <-> moekit "
                "language model, lossless"),
    "bench": ("moekit.bench", "CPU benchmark: moekit vs dense FFN, transformers, reference"),
    "quantize": ("moekit.quant.cli", "int8 / int4 weights of a checkpoint (safetensors)"),
    "serve": ("moekit.inference.server", "an OpenAI-compatible HTTP API for a checkpoint"),
    "perplexity": ("moekit.inference.perplexity",
                   "how well a checkpoint predicts a text: perplexity, bits per byte"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        # a command whose help depends on its other flags (bench --decode) adds its own -h
        p = sub.add_parser(name, help=help_text, description=help_text,
                           add_help=not getattr(mod, "OWN_HELP", False))
        p.set_defaults(_module=module)
        mod.add_arguments(p)
    return parser


PACKAGE_DIR = Path(__file__).resolve().parent


def warning_format(command: str):
    """``warnings.formatwarning`` for a command: moekit's own warnings as one line in the
    house style (``moekit train: warning: ...``, like its errors) instead of Python's
    file:line report; warnings from other packages unchanged."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            return f"moekit {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)
    return format_warning


def interrupted(command: str | None, e: KeyboardInterrupt) -> int:
    """One line, not a traceback, for a Ctrl-C no command handled itself (a corpus or a
    checkpoint being read, torch being imported); 128 + the signal, as a shell reports
    it: 130 for Ctrl-C (``moekit.train.interrupt.Interrupted`` carries another)."""
    print(f"moekit{' ' + command if command else ''}: interrupted", file=sys.stderr)
    return 128 + int(getattr(e, "signum", signal.SIGINT))


def os_failed(command: str, e: OSError) -> int:
    """One line, not a traceback, for a file error no command handled itself (a results
    file that could not be written: a full disk, a read-only folder); exit status 1 like
    every runtime failure (2 is for usage errors, as argparse gives them)."""
    where = f"{e.filename}: " if e.filename else ""
    print(f"moekit {command}: error: {where}{e.strerror or str(e) or type(e).__name__}",
          file=sys.stderr)
    return 1


def pipe_closed() -> int:
    """Quiet, for a reader of stdout that went away (``moekit generate ... | head``), as
    a pipeline expects: 128 + SIGPIPE, as a shell reports a process SIGPIPE ended. stdout
    then points at /dev/null, so the interpreter's last flush raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture)
        pass
    return 128 + int(signal.SIGPIPE)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports every command, torch with them: seconds
        args = parser.parse_args(argv)
    except KeyboardInterrupt as e:
        return interrupted(None, e)
    if args.command is None:
        parser.print_help()
        return 0
    saved = warnings.formatwarning
    warnings.formatwarning = warning_format(args.command)
    try:
        code = int(importlib.import_module(args._module).run(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except KeyboardInterrupt as e:
        return interrupted(args.command, e)
    except BrokenPipeError:
        return pipe_closed()
    except OSError as e:
        return os_failed(args.command, e)
    finally:
        warnings.formatwarning = saved


if __name__ == "__main__":
    sys.exit(main())
