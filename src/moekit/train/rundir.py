"""The files of a run directory: LATEST, manifests, atomic swaps, leftovers of crashes.

Shared by single-process checkpoints (``step_NNNNNNNN``) and expert-parallel
DCP checkpoints (``dcp_step_NNNNNNNN``). Nothing here trusts a name read from
disk: LATEST may only name a direct child of the run directory of the checkpoint
form, never a path, and never a symbolic link.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from moekit.errors import CheckpointError
from moekit.train.temps import MARK, RANDOM, remove_dead_temps, writer_alive, writer_mark

LATEST, MANIFEST = "LATEST", "manifest.json"
STEP_DIR = re.compile(r"step_\d{8}")
DCP_DIR = re.compile(r"dcp_step_\d{8}")
ASIDE = ".old"  # a checkpoint being replaced waits under ".<name>.old" until LATEST moves
_LATEST_MAX_BYTES = 4096  # "step_00000100\n" is 14; read no more than this


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory in ``parent`` to write a directory into before it is swapped into
    place (``write_dir``), named ``prefix`` + the writer (``temps.writer_mark``) + 8
    random characters, with the mode ``mkdir`` gives under the current umask:
    ``tempfile.mkdtemp`` makes it 0700, which the swapped-in output kept (other users
    could not read it where a plain ``mkdir`` would have let them)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix + writer_mark()))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def write_files(out: Path, writers: Mapping[str, Callable[[Path], object]]) -> None:
    """The files ``writers`` names in ``out`` (name -> what writes it to a given path),
    each written beside its place under a temporary name, then all renamed into place
    (``replace_durably``: the data synced to disk first, the directory after).

    What is guaranteed: each file is whole, old or new, never cut short. Where a write
    or a data fsync fails or is stopped, nothing is renamed: every file is as it was and
    the temporary files go. Not guaranteed: all of them or none once renaming starts.
    The renames run one after another, so a failure or a stop (Ctrl-C, power loss)
    between two leaves some files new and the rest old; a failed directory fsync after
    the renames raises with every new file in place (on a power loss any rename may
    then be lost). Either raises ``ReplacedError``, which says so (``left_by``).

    Each temporary name is new (``temp_file``: ``.<name>.tmp`` + the writer + 8 random
    characters + the suffix again, which savefig reads the format from): with one fixed
    name per file, two processes writing the same file wrote into the same temporary, and
    one renamed the other's half-written data into place. A killed writer's temporary
    stays until the next write of the same file here, which removes it where its writer
    is surely dead (``temps.remove_dead_temps``; a live writer's is never touched);
    ``clean_run_dir`` removes those of a run directory (``is_killed_write``)."""
    remove_dead_temps(out, writers)
    tmps: dict[str, Path] = {}
    try:
        for name in writers:
            tmps[name] = temp_file(out, name)
        for name, write in writers.items():
            write(tmps[name])
        replace_durably({tmp: out / name for name, tmp in tmps.items()})
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise


def temp_file(out: Path, name: str) -> Path:
    """A new empty file in ``out`` to write ``name`` into before it is renamed into place,
    named ``.<name>.tmp<host>-<pid>-<8 random characters><name's suffix>`` (the writer:
    ``temps.writer_mark``), with the mode ``open`` gives under the umask (``mkstemp``
    makes it 0600, which the rename would keep)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.tmp{writer_mark()}",
                               suffix=Path(name).suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return Path(tmp)


def write_whole(path: Path, text: str | bytes) -> None:
    """``text`` in ``path`` whole or not at all (``write_files``), so a file there before
    stays as it was if this fails, is stopped or the power goes."""
    write_files(path.parent, {path.name: (
        (lambda tmp: tmp.write_bytes(text)) if isinstance(text, bytes)
        else (lambda tmp: tmp.write_text(text, encoding="utf-8")))})


def current_umask() -> int:
    umask = os.umask(0o022)  # read it (no other way to read it portably), then put it back
    os.umask(umask)
    return umask


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """fsync ``path``: a file, or a directory's plain files and then the directory itself
    (a subdirectory, such as a copied tokenizer/, was made durably by its own writer)."""
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.iterdir()):
            if p.is_file() and not p.is_symlink():
                fsync(p)
    fsync(path)


def replace_durably(moves: Mapping[Path, Path]) -> None:
    """Rename each temporary (a file, or a directory of files) onto its place
    (``{tmp: final}``) so that even a power loss leaves the old or the new one whole:
    the rename alone survives ``kill -9`` and a full disk, but the kernel may write the
    rename to disk before the data, leaving ``final`` empty. So: fsync all the data,
    then rename, then fsync each parent directory (the renames themselves). Every
    writer of moekit's outputs goes through here (``write_files``, ``write_latest``,
    ``swap_in``'s checkpoints, the tokenizer copy).

    Every fsync of the data comes before the first rename: a failed one raises with
    every ``final`` as it was. A failure after the first rename (a later rename, a
    directory's fsync) raises ``ReplacedError``, which says which places hold new data.

    Cost: the data's fsync is the disk writing what it must write anyway (checkpoints
    fsynced their files before); the directory fsyncs are small. Roughly (one thread,
    ext4, a shared 2-core machine, so noisy): a ``small``-preset checkpoint save (3.4M
    parameters, ~41 MB with AdamW state) took 0.12-0.19 s before the directory fsyncs
    and 0.13-0.15 s after, over 6 saves each."""
    for tmp in moves:
        sync_tree(tmp)
    done: list[Path] = []
    try:
        for tmp, final in moves.items():
            os.replace(tmp, final)
            done.append(final)
        for parent in dict.fromkeys(final.parent for final in moves.values()):
            fsync(parent)
    except OSError as e:
        if not done:
            raise
        raise ReplacedError(e, renamed_left(done, len(moves))) from e


def renamed_left(done: list[Path], total: int) -> str:
    """What ``replace_durably`` left when it failed after renaming ``done`` of ``total``."""
    if len(done) == total:
        return ("the new files are in place, whole, but the directory's fsync failed: a "
                "power loss before the disk syncs may undo the renames")
    names = ", ".join(p.name for p in done)
    return f"{names} {'is' if len(done) == 1 else 'are'} new (whole), the rest as before"


class ReplacedError(OSError):
    """An OSError raised once some new data was renamed into place, so that "what was
    there before is unchanged" would be untrue; ``left`` says what is on disk (an error
    message's closing clause, ``left_by``). Raised by ``replace_durably`` and
    ``swap_in`` where a rename or the directory's fsync failed after the first rename,
    by ``analysis.report.write_report`` where an earlier run's file could not be
    removed after the new files went in."""

    def __init__(self, cause: OSError, left: str) -> None:
        super().__init__(*cause.args)
        for attr in ("filename", "filename2"):
            if getattr(cause, attr) is not None:
                setattr(self, attr, getattr(cause, attr))
        self.left = left


def left_by(e: OSError) -> str:
    """The closing clause of a failed write's message: what ``e`` left on disk. Only a
    ``ReplacedError`` comes after anything was renamed into place; any other error left
    every output as it was (the writers here rename last)."""
    return e.left if isinstance(e, ReplacedError) else "what was there before is unchanged"


# -- LATEST ----------------------------------------------------------------------


def write_latest(run_dir: Path, name: str) -> None:
    """LATEST names ``name``, written whole (``write_whole``: a new temporary file with
    the mode ``open`` gives under the umask, fsynced, renamed, the directory fsynced; on
    a failure the old LATEST stays and the temporary goes). ``mkstemp``'s 0600 had been
    kept by the rename, so another user who could read the checkpoints could not read
    LATEST (``moekit generate --checkpoint RUN`` failed for them)."""
    write_whole(run_dir / LATEST, name + "\n")


def read_latest(run_dir: Path, pattern: re.Pattern[str] = STEP_DIR) -> str:
    """The checkpoint name in ``run_dir/LATEST``, refused unless it is a plain child name."""
    path = run_dir / LATEST
    try:
        with open(path, "rb") as f:
            raw = f.read(_LATEST_MAX_BYTES + 1)
        name = raw.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from e
    if len(raw) > _LATEST_MAX_BYTES or not pattern.fullmatch(name):
        shown = raw[:_LATEST_MAX_BYTES].decode("ascii", "replace").strip()
        raise CheckpointError(
            f"{path} holds {shown if len(shown) <= 300 else shown[:300] + '...'!r}, "
            f"which is not allowed: it may only name a checkpoint directory directly inside "
            f"{run_dir}, of the form {pattern.pattern.replace(chr(92) + 'd{8}', 'NNNNNNNN')}")
    if (run_dir / name).is_symlink():
        raise CheckpointError(f"{path} names {name!r}, which is a symbolic link: a "
                              "checkpoint must be a real directory inside the run directory")
    return name


# -- manifests: the SHA-256 of every file of a checkpoint ---------------------------


def _canonical(hashes: dict[str, str]) -> bytes:
    return json.dumps({"sha256": hashes}, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(ckpt: Path, files: list[str]) -> None:
    """Hash ``files`` of ``ckpt`` into ``ckpt/manifest.json`` (``write_whole``: fsynced;
    written last)."""
    write_whole(ckpt / MANIFEST, _canonical({f: sha256(ckpt / f) for f in sorted(files)}))


def verify_manifest(ckpt: Path, required: tuple[str, ...] = (),
                    read: tuple[str, ...] | None = None) -> list[str]:
    """Check every file the manifest names (``read``: only those, the rest neither opened
    nor hashed); returns the names it holds.

    The manifest must be byte-for-byte the canonical JSON of what it holds, so
    a flipped byte anywhere in it (or in a file it names) is an error. ``read`` is for
    loads that use part of a checkpoint: a generation load had hashed (read whole) the
    optimizer file, twice the model's size under AdamW, that it then never used.
    """
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is incomplete: it has no {MANIFEST} (written last, "
                              "after every other file; moekit checkpoints saved before "
                              "state.json format_version 2 have none either)")
    raw = path.read_bytes()
    try:
        hashes = json.loads(raw)["sha256"]
        ok = _canonical(hashes) == raw and all(
            isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in hashes.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} is corrupt: it is not the manifest moekit writes")
    for name in required:
        if name not in hashes:
            raise CheckpointError(f"{path} does not cover {name!r}")
    for name, want in hashes.items():
        if read is not None and name not in read:
            continue
        f = ckpt / name
        if Path(name).name != name or f.is_symlink() or not f.is_file():
            raise CheckpointError(f"{ckpt / name} is missing (or not a plain file in {ckpt})")
        if sha256(f) != want:
            raise CheckpointError(f"{f} is corrupt or truncated: its SHA-256 does not match "
                                  f"the one recorded in {MANIFEST}")
    return sorted(hashes)


# -- replacing a checkpoint and cleaning up after crashes ---------------------------


def swap_in(tmp: Path, final: Path) -> Path | None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is first moved aside, not deleted.

    Returns the aside directory (delete it once LATEST no longer needs it). A
    crash between the two renames leaves the old checkpoint whole under
    ``.<name>.old``: readers use it, ``clean_run_dir`` renames it back. As in
    ``replace_durably`` (power loss): ``tmp``'s files and ``tmp`` are fsynced before
    anything is renamed, the parent after. A failed rename of ``tmp`` renames the old
    checkpoint back (so the error leaves ``final`` as it was); a failure after it raises
    ``ReplacedError``.
    """
    aside = final.parent / f".{final.name}{ASIDE}"
    sync_tree(tmp)
    moved = final.exists()
    if moved:
        if aside.exists():  # a leftover from an earlier crash; final is complete
            shutil.rmtree(aside)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError as e:  # the old one back, so that what was there before is unchanged
        if moved:
            try:
                os.rename(aside, final)
            except OSError:
                raise ReplacedError(e, f"{final.name} is missing: the one there before "
                                    f"waits under {aside.name}, which readers use") from e
        raise
    try:
        fsync(final.parent)
    except OSError as e:
        raise ReplacedError(e, renamed_left([final], 1)) from e
    return aside if aside.exists() else None


def write_dir(final: Path, fill: Callable[[Path], object], *, overwrite: bool = True,
              check: Callable[[Path], object] | None = None,
              then: Callable[[], object] | None = None, tmp: Path | None = None) -> Path:
    """The directory ``final``, whole or not at all: ``fill(tmp)`` writes its files into a
    new temporary directory beside it (``temp_dir``; a killed writer's of the same name is
    removed first, ``temps.remove_dead_temps``), which is then swapped in (``swap_in``: a
    directory there before waits aside until the new one is in place). ``then()`` runs
    once it is (a checkpoint's LATEST), and only after it is the replaced one deleted.
    Returns ``final``.

    Refused before anything is written, and again just before the swap (it may have
    changed while ``fill`` ran): whatever ``check(final)`` raises, and with ``overwrite``
    False a ``final`` that exists and is not an empty directory (a ValueError). A
    failure up to the swap leaves ``final`` as it was and removes the temporary; one in
    ``then`` leaves the new directory in place and the old one aside (``.<name>.old``,
    which ``clean_run_dir`` removes). ``tmp``: a directory the caller made and filled in
    part (every rank of a sharded save writes into one agreed name); it is the caller's,
    left where it is if this fails."""
    _refuse(final, overwrite, check)
    made = tmp is None
    if tmp is None:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(final.parent, [final.name], dirs=True)
        tmp = temp_dir(final.parent, f".{final.name}.tmp")
    try:
        fill(tmp)
        _refuse(final, overwrite, check)
        aside = swap_in(tmp, final)  # fsyncs the files, renames, fsyncs final.parent
    except BaseException:
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if then is not None:
        then()
    if aside is not None:  # only now: the new directory is in place (and LATEST moved)
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _refuse(final: Path, overwrite: bool,
            check: Callable[[Path], object] | None) -> None:
    if check is not None:
        check(final)
    if not overwrite and final.exists() and not (final.is_dir() and not any(final.iterdir())):
        raise ValueError(f"final={str(final)!r} is not allowed: it exists and is not an "
                         "empty directory, and overwrite=False keeps it; pick a new or "
                         "empty directory")


def aside_of(ckpt: Path) -> Path:
    return ckpt.parent / f".{ckpt.name}{ASIDE}"


def clean_run_dir(run_dir: Path) -> list[str]:
    """Remove temporary files of killed saves and restore checkpoints moved aside.

    Call once at the start of a run that owns ``run_dir``. A temporary whose writer is
    alive on this host (``temps.writer_alive``: another process saving into it) is left;
    any other is removed, a killed save's, as the run owns the directory. Returns what it
    did, for the log.
    """
    done: list[str] = []
    if not run_dir.is_dir():
        return done
    for p in sorted(run_dir.iterdir()):
        name = p.name
        if writer_alive(name):
            continue
        if name.endswith(ASIDE) and (STEP_DIR.fullmatch(name[1:-len(ASIDE)])
                                     or DCP_DIR.fullmatch(name[1:-len(ASIDE)])):
            target = run_dir / name[1:-len(ASIDE)]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {name} (replaced by {target.name})")
            else:
                os.rename(p, target)
                done.append(f"restored {target.name} from {name}")
        elif re.fullmatch(r"\.(dcp_)?step_\d{8}\.tmp.*|\.LATEST\..+", name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            done.append(f"removed {name}")
        elif is_killed_write(name) and (p.is_symlink() or not p.is_dir()):
            p.unlink(missing_ok=True)
            done.append(f"removed {name}")
    return done


def is_killed_write(name: str) -> bool:
    """Whether ``name`` is a ``write_files`` temporary (``temp_file``): ``.<name>.tmp``,
    the writer (``temps.MARK``; none before it was added), mkstemp's 8 characters, then
    the suffix of ``<name>`` again (a result.json, a plot or a converted
    model.safetensors a killed writer left)."""
    m = re.fullmatch(r"\.(.+)\.tmp(?:" + MARK + ")?" + RANDOM + r"(?P<suffix>(?:\.[^.]*)?)",
                     name)
    return m is not None and m["suffix"] == Path(m[1]).suffix


def check_no_newer_sharded(run_dir: Path, step: int) -> None:
    """Refuse a one-process resume of ``run_dir`` at ``step`` (what LATEST names) where a
    complete ``dcp_step_*`` past it exists.

    Rank 0 of an ``--nproc`` run renames its ``dcp_step_N`` into place before it writes
    the one-process ``step_N`` and moves LATEST; a rank 0 killed (or a disk filled) in
    between left LATEST naming an older step, and a one-process ``--resume RUN`` went
    back to it without a word, then wrote a second, different ``step_N`` beside
    ``dcp_step_N``."""
    complete = [d for d in checkpoint_dirs(run_dir, DCP_DIR) if (d / MANIFEST).is_file()]
    if not complete or int(complete[-1].name.rsplit("_", 1)[1]) <= step:
        return
    raise CheckpointError(
        f"resume={str(run_dir)!r} is not allowed in one process: its newest checkpoint "
        f"{complete[-1].name} (a `moekit train --nproc` checkpoint) is past step {step}, "
        f"which {LATEST} names; continue it with `moekit train --nproc N --resume "
        f"{run_dir}`, or pass the step_{step:08d} directory to --resume to go back to "
        f"step {step}")


def checkpoint_dirs(run_dir: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Real directories directly in ``run_dir`` whose names fit ``pattern``, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
