"""Temporary names that say which process writes them; removing those of dead writers.

Every output a user keeps is written to a temporary beside it and renamed into place when
whole (``rundir.write_files``, ``rundir.temp_dir``). A writer killed mid-write (kill -9,
the OOM killer, a power loss) leaves its temporary. In a run directory ``clean_run_dir``
removes those, but beside an output elsewhere (``analyze --out``, benchmark results,
``quantize --out``) nothing did, and each write picks a new random name, so they piled up
(a whole quantized model each).

So a temporary's name carries its writer, ``<host>-<pid>-`` after ``.tmp``: <host> is 8
hex characters of the SHA-256 of the host name, this boot's ``boot_id`` and the PID
namespace. Before a write, a temporary of the same target is removed only where its
<host> is this process's and no process has its pid (``os.kill(pid, 0)``: ESRCH). That
never removes a live writer's:

- a live writer on this host, in this PID namespace: its pid answers, kept;
- a writer on another host (a shared file system), in another container's PID namespace
  or from before a reboot: another <host>, kept, whatever its pid means here;
- a dead writer whose pid a new process took: the pid answers, kept (left, not removed);
- a pid this process may not signal (another user's): EPERM, taken as alive, kept.

What stays for good outside run directories: temporaries of other hosts, of another
boot, and the unmarked names moekit wrote before (``.<name>.tmp`` + 8 characters), whose
writer nothing tells. No rule removes them without risking a live writer's: a boot id
other than this one's may be a live writer of another kernel writing into this folder (an
NFS / SMB / virtiofs export of a local disk, a gVisor or Kata container), on a host of the
same name (the initial PID namespace has the same inode, 0xEFFFFFFC, on every Linux host);
and an old mtime proves no death (a stopped or blocked writer, a file written inside a
temporary directory leaves the directory's mtime, clocks differ across a network mount).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

# ".tmp", then the writer, then mkstemp's / mkdtemp's 8 random characters
MARK = r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-"
RANDOM = r"[a-z0-9_]{8}"


@functools.cache
def host_tag() -> str:
    """8 hex characters that differ between hosts, boots and PID namespaces (a pid means a
    process only within one of them)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: str(os.stat("/proc/self/ns/pid").st_ino)):
        try:
            parts.append(read())
        except OSError:  # no /proc (not Linux): the host name alone
            parts.append("")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def writer_mark() -> str:
    """What a temporary's name holds after ``.tmp``: this host's tag and this pid (read
    at each call: a forked child writes under its own)."""
    return f"{host_tag()}-{os.getpid()}-"


def writer_gone(name: str) -> bool:
    """Whether ``name`` is a marked temporary whose writer is surely dead: written on this
    host, boot and PID namespace, by a pid no process holds now."""
    m = re.search(r"\.tmp" + MARK, name)
    if m is None or m["host"] != host_tag() or os.name != "posix":
        return False
    pid = int(m["pid"])
    if pid <= 0:  # 0 and -1 name process groups to os.kill
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: alive, another user's; too large: unknown
        return False
    return False


def writer_alive(name: str) -> bool:
    """Whether ``name`` is a marked temporary of a writer that may still be writing it:
    one on this host whose pid answers (``clean_run_dir`` leaves those)."""
    m = re.search(r"\.tmp" + MARK, name)
    return m is not None and m["host"] == host_tag() and not writer_gone(name)


def remove_dead_temps(folder: Path, targets: Iterable[str], dirs: bool = False) -> list[str]:
    """Remove from ``folder`` the marked temporaries of ``targets`` (names in ``folder``)
    whose writers are gone (``writer_gone``): files as ``temp_file`` names them, or with
    ``dirs`` directories as ``temp_dir`` does. Returns the names removed. Never fails:
    what cannot be listed or removed stays for a later write."""
    patterns = [re.compile(re.escape(f".{t}.tmp") + MARK + RANDOM
                           + ("" if dirs else re.escape(Path(t).suffix))) for t in targets]
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not any(p.fullmatch(name) for p in patterns) or not writer_gone(name):
            continue
        p = folder / name
        if _remove(p, dirs):
            removed.append(name)
    return removed


def _remove(p: Path, is_dir: bool) -> bool:
    try:
        if p.is_symlink() or p.is_dir() != is_dir:
            return False  # not what a writer of ours made: leave it
        if is_dir:
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError:
        return False
    return True
