"""`moekit bench`: run benchmarks/bench_cpu.py (or, with ``--decode``,
benchmarks/bench_decode.py) from the source checkout.

Benchmarks live outside the package (DESIGN.md), so this command needs the
repository: with an editable install (``pip install -e .``) it finds
``benchmarks/`` next to ``src/``; from a wheel it says where it looked.

Every flag is checked (``check_args``) before anything is built, timed or written: a
bad one is one line on stderr naming it, its value and what is allowed, exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from moekit.config import flag_message, reject

# the flags `moekit bench --decode` passes on to bench_decode.py; any other is refused
DECODE_FLAGS = ("quick", "threads")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu.py"
DECODE_SCRIPT = SCRIPT.with_name("bench_decode.py")


def _load(script: Path = SCRIPT) -> ModuleType | None:
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"moekit_{script.stem}", script)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# cli.py: -h comes from add_arguments (``Help``), so that it can follow --decode
OWN_HELP = True


class Help(argparse.Action):
    """-h/--help: bench_cpu's flags, or after --decode the decode benchmark's (the only
    ones that apply then); ``moekit bench --decode --help`` had printed bench_cpu's."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0,
                         help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        (decode_parser(parser.prog) if getattr(namespace, "decode", False)
         else parser).print_help()
        parser.exit()


def decode_parser(prog: str) -> argparse.ArgumentParser:
    """The help of ``moekit bench --decode``: bench_decode's description and its flags
    that apply (``DECODE_FLAGS``), with its own help texts."""
    module = _load(DECODE_SCRIPT)
    doc = (module.__doc__ or "") if module is not None else ""
    p = argparse.ArgumentParser(
        prog=f"{prog} --decode", add_help=False,
        description=doc.split("\n\n")[0].replace("\n", " ") if doc else
        f"the decode benchmark: {DECODE_SCRIPT} is not found (it ships with the source "
        "repository, not the package)",
        epilog="Only these flags apply with --decode; `python benchmarks/bench_decode.py "
        "--help` lists the benchmark's own.")
    p.add_argument("-h", "--help", action=Help, help="show this help message and exit")
    if module is not None:
        flags = argparse.ArgumentParser(add_help=False)
        module.add_arguments(flags)
        for action in flags._actions:  # argparse has no public way to copy an action
            if action.dest in DECODE_FLAGS:
                action = copy.copy(action)
                action.help = _passed_on(action.help)
                p._add_action(action)
    return p


def _passed_on(help: str | None) -> str | None:
    """bench_decode's help text of a flag, less a parenthesis naming flags that `moekit
    bench --decode` does not take: --quick's "(--models, --batches, ... given as well
    win)" had offered six flags the command refuses."""
    def keep(m: re.Match) -> str:
        named = re.findall(r"--([a-z][a-z0-9-]*)", m.group(0))
        return m.group(0) if all(n.replace("-", "_") in DECODE_FLAGS for n in named) else ""
    return None if help is None else re.sub(r"\s*\([^()]*\)", keep, help)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action=Help, help="show this help message and exit "
                   "(with --decode: the decode benchmark's)")
    module = _load()
    if module is not None:
        module.add_arguments(p)
    p.add_argument("--decode", action="store_true",
                   help="run the decode benchmark (benchmarks/bench_decode.py) instead; "
                   "only --quick (its quick mode) and --threads apply (`moekit bench "
                   "--decode --help` describes them)")
    # -h acts where argparse meets it: `--help --decode` printed bench_cpu's help, as
    # --decode was not parsed yet. --decode is a switch, so its place changes nothing
    # else: it is read first.
    parse = p.parse_known_args
    p.parse_known_args = lambda args=None, namespace=None: parse(
        _decode_first(sys.argv[1:] if args is None else list(args)), namespace)


def _decode_first(args: list[str]) -> list[str]:
    """``args`` with --decode (or an abbreviation argparse takes, --de) moved first;
    nothing after a "--" moves."""
    end = args.index("--") if "--" in args else len(args)
    decode = [a for a in args[:end] if len(a) >= 4 and "--decode".startswith(a)]
    return decode + [a for a in args[:end] if a not in decode] + args[end:]


def refuse_repeats(flag: str, value: object, entries: list) -> None:
    """ValueError naming ``flag``, its ``value`` and the first of its ``entries`` (parsed,
    so that ``8,4,2,8`` and `` 8,4,2,8`` are the same) given twice: a repeated entry
    would time the same measurement again, most likely a typo."""
    seen = set()
    for entry in entries:
        if entry in seen:
            shown = ",".join(map(str, entry)) if isinstance(entry, tuple) else str(entry)
            reject(flag, value, f"{shown!r} is given twice; each entry must appear once "
                   "(a repeat would time the same measurement again)")
        seen.add(entry)


def check_args(args: argparse.Namespace, module: ModuleType) -> argparse.Namespace:
    """The flags ``module.run`` gets (bench_cpu's, or with --decode bench_decode's), checked
    by the benchmark's own ``check_args``: ValueError naming the first bad flag, its value
    and what is allowed, before anything is built, timed or written. A list flag with an
    entry given twice is refused (by the benchmarks' own checks, also when run directly)."""
    if not args.decode:
        return module.check_args(args)
    cpu = _load()
    if cpu is not None:  # a CPU-benchmark flag would be ignored: refuse it
        parser = argparse.ArgumentParser(add_help=False)
        cpu.add_arguments(parser)
        for action in parser._actions:
            value = getattr(args, action.dest, None)
            if action.dest in DECODE_FLAGS or value == action.default:
                continue
            allowed = (f"with --decode only --{' and --'.join(DECODE_FLAGS)} apply; run "
                       "`python benchmarks/bench_decode.py --help` for its own flags")
            if action.nargs == 0:  # a switch such as --no-memory: no value to show
                raise ValueError(f"{action.option_strings[-1]} is not allowed: {allowed}")
            reject(action.option_strings[-1], value, allowed)
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    decode_args = parser.parse_args([])
    for dest in DECODE_FLAGS:
        setattr(decode_args, dest, getattr(args, dest))
    return module.check_args(decode_args)


def run(args: argparse.Namespace) -> int:
    module = _load(DECODE_SCRIPT if args.decode else SCRIPT)
    if module is None:
        print(f"moekit bench: {DECODE_SCRIPT if args.decode else SCRIPT} not found. The "
              "benchmarks ship with the source repository, not the package: clone it and "
              "`pip install -e .`, then run `moekit bench` (or `python "
              "benchmarks/bench_cpu.py`).", file=sys.stderr)
        return 1  # a missing file, as exit_code has it: not a usage error
    try:
        checked = check_args(args, module)
    except ValueError as e:
        print(f"moekit bench: error: {flag_message(e, {})}", file=sys.stderr)
        return 2
    return int(module.run(checked))
