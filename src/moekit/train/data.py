"""Text corpora as byte streams, split by file, sampled as fixed-length windows.

The default corpus is the running interpreter's own standard library source
(``sysconfig.get_paths()["stdlib"]``, ~1800 ``.py`` files, ~30 MB), read at run
time. Shape letters: B batch, L sequence length, N corpus bytes.
"""

from __future__ import annotations

import os
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.config import check_number, check_positive_int, reject
from moekit.safetensors_write import raw_bytes

VOCAB_SIZE = 256  # byte-level: token id = byte value
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})
TEXT_SUFFIXES = frozenset({".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml",
                           ".cfg", ".ini", ".html", ".js", ".css", ".sh", ".yaml", ".yml"})


def encode(text: str) -> Tensor:
    """UTF-8 bytes as int64 token ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: Tensor | list[int]) -> str:
    values = ids.tolist() if isinstance(ids, Tensor) else ids
    return bytes(int(v) for v in values).decode("utf-8", errors="replace")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, suffixes: frozenset[str]) -> list[Path]:
    """Files under ``root`` (sorted, so the split is the same on every machine)."""
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        found += [Path(dirpath, f) for f in filenames if Path(f).suffix in suffixes]
    return sorted(p for p in found if readable_file(p))


def readable_file(path: Path) -> bool:
    """False, with a warning, for a dangling symlink (or anything else not a regular file)."""
    if path.is_file():  # follows symlinks: False when the target is gone
        return True
    warnings.warn(f"data: skipping {str(path)!r}: "
                  f"{'a dangling symlink' if path.is_symlink() else 'not a regular file'}",
                  stacklevel=3)
    return False


# Bytes that text does not hold: control characters other than \t \n \f \r, and
# the bytes of invalid UTF-8. Python source and prose: 0%; random bytes: ~60%; a
# zip or PNG: ~50%. Refusing above 10% leaves room for the odd escape sequence.
MAX_NON_TEXT = 0.10
_TEXT_CONTROLS = torch.tensor([9, 10, 12, 13], dtype=torch.uint8)


def text_sample(data_N: Tensor, chunks: int = 64, chunk: int = 1 << 14) -> Tensor:
    """Up to 64 evenly spaced 16 KiB pieces: checking all 31 MB of the stdlib took 1.6 s,
    as long as reading it; this sample ~0.1 s (load average 4)."""
    if data_N.numel() <= chunks * chunk:
        return data_N
    starts = torch.linspace(0, data_N.numel() - chunk, chunks).long()
    return data_N[(starts[:, None] + torch.arange(chunk)).reshape(-1)]


def non_text_fraction(data_N: Tensor) -> float:
    data_N = text_sample(data_N)
    if data_N.numel() == 0:
        return 0.0
    control = (data_N < 32) & ~torch.isin(data_N, _TEXT_CONTROLS) | (data_N == 127)
    invalid = bytes(raw_bytes(data_N)).decode("utf-8", errors="replace").count("\ufffd")
    return (int(control.sum()) + invalid) / data_N.numel()


def check_text(data_N: Tensor, source: str) -> None:
    frac = non_text_fraction(data_N)
    if frac > MAX_NON_TEXT:
        raise ValueError(f"data={source!r} is not allowed: {frac:.0%} of its bytes are not "
                         f"text (control bytes or invalid UTF-8); it must be text files "
                         f"(at most {MAX_NON_TEXT:.0%} such bytes)")


def is_validation(path: Path, root: Path, val_percent: float) -> bool:
    """A stable hash of the relative path picks the split: no RNG, no ordering."""
    rel = path.name if root.is_file() else path.relative_to(root).as_posix()
    return zlib.crc32(rel.encode()) % 10_000 < val_percent * 100


def read_bytes(paths: list[Path]) -> Tensor:
    """Concatenate files into one preallocated uint8 tensor, each followed by a newline.

    Sizes are known up front, so the corpus is held once (no list of chunks to join).
    The buffer is a bytearray that the tensor shares (``torch.frombuffer``), not
    ``Tensor.numpy()``: the CPU torch wheel does not bring numpy, and moekit's
    main job must run without it.
    """
    sizes = [p.stat().st_size + 1 for p in paths]
    buf = bytearray(sum(sizes))
    view = memoryview(buf)
    pos = 0
    for path, size in zip(paths, sizes, strict=True):
        with open(path, "rb") as f:
            got = f.readinto(view[pos:pos + size - 1])
        view[pos + got] = 10  # b"\n"
        pos += got + 1
    view.release()
    if not buf:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)[:pos]


@dataclass
class Corpus:
    train: Tensor  # uint8 [N_train]
    val: Tensor  # uint8 [N_val]
    source: str
    train_files: int
    val_files: int

    def location(self) -> str:
        """``source`` as a checkpoint records it: absolute where it names a path here, so
        a run resumed (or analyzed) from another working directory reads the same corpus
        (a relative ``--data data`` had resumed on whatever ``data`` the new directory
        held, without a word)."""
        path = Path(self.source)
        if self.source == str(stdlib_dir()) or not path.exists():
            return self.source  # the default corpus is recognised by this exact string
        return os.path.abspath(path)

    def describe(self) -> str:
        return (f"{self.source}: {self.train_files} train files "
                f"({self.train.numel() / 1e6:.1f} MB), {self.val_files} "
                f"validation files ({self.val.numel() / 1e6:.1f} MB)")


def load_corpus(data: str | None = None, val_percent: float = 5.0) -> Corpus:
    """``data`` None -> the Python stdlib ``.py`` files; else a text file or directory."""
    check_number("val_percent", val_percent, 0, 100, low_open=True, high_open=True)
    if data is not None and str(data) == "":
        # Path("") is the current directory: `--data "$UNSET"` trained on whatever was there
        reject("data", data, "it must name a text file or directory (leave it out for the "
               "Python standard library)")
    root = stdlib_dir() if data is None else Path(data)
    if not root.exists():
        raise ValueError(f"data={data!r} is not allowed: no such file or directory")
    files = list_files(root, frozenset({".py"}) if data is None else TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"data={str(root)!r} is not allowed: it holds no text files "
                         f"({', '.join(sorted(TEXT_SUFFIXES))})")
    if len(files) == 1:  # one file: the last val_percent of its bytes validate
        data_N = read_bytes(files)
        check_text(data_N, str(root))
        cut = int(data_N.numel() * (1 - val_percent / 100))
        return Corpus(data_N[:cut], data_N[cut:], str(root), 1, 1)
    val = [p for p in files if is_validation(p, root, val_percent)]
    train = [p for p in files if not is_validation(p, root, val_percent)]
    if not val or not train:  # too few files for the hash to split: fall back to last file
        train, val = files[:-1], files[-1:]
    corpus = Corpus(read_bytes(train), read_bytes(val), str(root), len(train), len(val))
    check_text(corpus.train, str(root))
    check_text(corpus.val, str(root))
    return corpus


def recorded_corpus(source: object, owner: str, also: str = "") -> str | None:
    """The corpus a checkpoint names (its state's ``data.corpus``), for ``load_corpus``:
    None for the default corpus (or none recorded); a ValueError led by ``owner``
    (``resume='RUN'``) asking for --data when that path does not exist here, never a
    silent switch to the default corpus. ``moekit train --resume`` and ``moekit analyze``
    follow this one rule; ``also`` adds what else --data may be."""
    if not isinstance(source, str) or source == str(stdlib_dir()):
        return None  # the default corpus, the stdlib .py files
    if not Path(source).exists():
        raise ValueError(f"{owner} needs --data: its run was trained on {source!r}, which "
                         f"does not exist here; pass --data with that corpus{also}")
    return source


def sample_windows(data_N: Tensor, batch: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``seq_len + 1`` bytes: (inputs, targets), each [B, L].

    The windows depend only on ``seed``, so a run resumed at step s draws the
    same batches as an uninterrupted one (the data position is the step).
    ``data_N`` is 1-D byte token ids: uint8 (a loaded corpus) or an integer dtype
    (``encode``) with values in [0, 256).
    """
    check_data(data_N)
    check_positive_int("batch", batch)
    check_positive_int("seq_len", seq_len)
    if data_N.numel() < seq_len + 2:
        raise ValueError(f"the corpus has {data_N.numel()} bytes, which is not allowed: "
                         f"it needs more than seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    starts_B = torch.randint(0, data_N.numel() - seq_len - 1, (batch,), generator=gen)
    idx_BL = starts_B[:, None] + torch.arange(seq_len + 1)
    window = data_N[idx_BL].long()
    if data_N.dtype != torch.uint8:  # uint8 is in range by construction
        # the drawn window only (B*(L+1) values), never the corpus: a full scan per
        # step would cost as much as reading it
        low, high = (int(v) for v in torch.aminmax(window))
        if low < 0 or high >= VOCAB_SIZE:
            reject("data_N token id", low if low < 0 else high,
                   f"it must be a byte in [0, {VOCAB_SIZE}) (the model's vocabulary)")
    return window[:, :-1], window[:, 1:]


# bool is no token id; float ids were truncated by .long() in silence (0.7 -> 0)
_ID_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def check_data(data_N: object) -> None:
    """A 1-D tensor of byte token ids: type, dtype and shape only (no scan of the values)."""
    if not isinstance(data_N, Tensor):
        reject("data_N", type(data_N).__name__, "it must be a 1-D torch.Tensor of byte "
               "token ids (uint8, or int64 from encode)")
    if data_N.dtype not in _ID_DTYPES:
        reject("data_N.dtype", data_N.dtype, "it must be torch.uint8 or an integer dtype "
               "(int16, int32, int64) holding byte token ids; float ids would be truncated")
    if data_N.dim() != 1:
        reject("data_N.shape", tuple(data_N.shape), "it must be 1-D [N]: one stream of bytes "
               "(flatten it, or concatenate the documents)")


def batch_seed(seed: int, step: int) -> int:
    """A reproducible seed per (run seed, step): every micro-batch of the step is cut from
    the windows it draws. (The factor 64 left room for a seed per micro-batch, as steps
    drew before; kept, so that runs saved before resume on the same data.)"""
    return (seed * 1_000_003 + step) * 64
