"""Every script in benchmarks/ imports and answers --help, and every flag that README.md
and docs/*.md give a ``benchmarks/<script>.py`` command exists in that script's parser.

Refactors move names between modules and most benchmarks have no other test: a script
that no longer imports, or a documented flag that was renamed, fails here first. Nothing
is built or timed: each script runs only as far as its argument parser (``--help`` exits
inside ``parse_args``; for the documented flags ``parse_args`` is replaced by one that
hands back the finished parser).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# harness.py is the benchmarks' shared library (its own __main__ is an internal helper)
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "harness.py")
pytestmark = pytest.mark.skipif(not SCRIPTS, reason="benchmarks/ is not in this checkout")


class _ParserReadyError(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


@pytest.fixture
def as_script(monkeypatch):
    """Run a benchmark as ``python benchmarks/<name> ARGS`` would, in this process."""
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_TOP_PAD_"):  # so that harness.use_malloc("default") is a no-op
        monkeypatch.delenv(name, raising=False)

    def no_exec(*args, **kwargs):
        raise AssertionError("a benchmark re-executed the process before parsing its flags")

    monkeypatch.setattr(os, "execve", no_exec)

    def run(name: str, *args: str) -> int:
        monkeypatch.setattr(sys, "argv", [str(BENCH / name), *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(BENCH / name), run_name="__main__")
        return exit_.value.code

    return run


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, as_script, capsys):
    assert as_script(name, "--help") in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}"), out[:300]


def parser_of(name: str, as_script, monkeypatch) -> argparse.ArgumentParser:
    def grab(self, args=None, namespace=None):
        raise _ParserReadyError(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(sys, "argv", [str(BENCH / name)])
    with pytest.raises(_ParserReadyError) as got:
        runpy.run_path(str(BENCH / name), run_name="__main__")
    return got.value.parser


def documented_commands() -> list[tuple[str, str, str]]:
    """(where, script, flags) for each `...benchmarks/<script>.py ...` in backticks."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if not doc.exists():
            continue
        text = doc.read_text()
        for m in re.finditer(r"`([^`]*?benchmarks/([a-z_0-9]+\.py)([^`]*))`", text):
            where = f"{doc.name}:{text.count(chr(10), 0, m.start()) + 1}"
            found.append((where, m.group(2), m.group(3).replace("\\\n", " ")))
    return found


COMMANDS = documented_commands()


@pytest.mark.parametrize("script", sorted({s for _, s, _ in COMMANDS} - {"harness.py"}))
def test_documented_flags_exist(script, as_script, monkeypatch):
    assert (BENCH / script).exists(), f"docs cite benchmarks/{script}, which is not there"
    known = set(parser_of(script, as_script, monkeypatch)._option_string_actions)
    missing = []
    for where, name, tail in COMMANDS:
        if name != script:
            continue
        # flags only: values may be placeholders (<run>, N) in the prose
        for flag in re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", tail):
            if flag not in known:  # exact: an abbreviation breaks when a flag is added
                missing.append(f"{where}: {flag}")
    assert not missing, f"flags the docs give benchmarks/{script} that it lacks: {missing}"
