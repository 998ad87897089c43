"""moekit.huge_pages: tensors moved into transparent huge pages in place.

What the kernel did is read back from /proc/self/smaps (its AnonHugePages line for the
mapping); where the kernel cannot collapse, the report must say so and count nothing.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import re
import sys

import pytest
import torch

from moekit import huge_pages
from moekit import hugepages as hp

MiB = 1 << 20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's madvise")


def _mapped(nbytes: int):
    """An fp32 tensor on an anonymous mapping of its own (so smaps' line is its own)."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(m, dtype=torch.float32)
    t.copy_(torch.randn(t.numel(), generator=torch.Generator().manual_seed(0)))
    return t, m


def _anon_huge(address: int) -> int:
    """AnonHugePages (bytes) of the mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m[1], 16) <= address < int(m[2], 16)
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@linux
def test_collapses_in_place_and_smaps_agrees():
    t, m = _mapped(9 * MiB)  # the mapping is page-aligned, not 2 MiB-aligned
    before = t.clone()
    ptr = t.data_ptr()
    start = -(-ptr // (2 * MiB)) * (2 * MiB)
    span = (ptr + 9 * MiB) // (2 * MiB) * (2 * MiB) - start  # 8 MiB, or 6 off alignment
    r = huge_pages(t)
    assert (r.tensors, r.asked) == (1, span)
    assert t.data_ptr() == ptr and torch.equal(t, before)
    if r.reason is not None:  # the kernel refused: nothing counted that smaps lacks
        assert r.collapsed < r.asked
        pytest.skip(f"the kernel did not collapse here: {r.reason}")
    assert r.collapsed == span
    assert _anon_huge(ptr) >= span  # the kernel's own count for this mapping
    again = huge_pages(t)  # already huge: the same report, nothing changed
    assert (again.asked, again.collapsed, again.reason) == (span, span, None)
    assert torch.equal(t, before)
    del t
    m.close()


def test_a_module_counts_each_storage_once_and_skips_small_ones():
    lin = torch.nn.Linear(1024, 1536, bias=True)  # 6 MiB weight, 6 KiB bias
    tied = torch.nn.Module()
    tied.a, tied.b = lin, torch.nn.Linear(1024, 1536)
    tied.b.weight = lin.weight  # tied: one storage
    tied.register_buffer("view", lin.weight.detach()[:10])  # a view of it
    tied.register_buffer("small", torch.zeros(1000))
    r = huge_pages(tied)
    ptr, n = lin.weight.data_ptr(), lin.weight.nbytes
    lo, hi = -(-ptr // (2 * MiB)) * (2 * MiB), (ptr + n) // (2 * MiB) * (2 * MiB)
    assert r.tensors == 1 and r.asked == hi - lo
    assert huge_pages(torch.zeros(100)).tensors == 0
    assert huge_pages([]).asked == 0


class _FakeMadvise:
    """madvise that fails with the given errno for the spans listed by index."""

    def __init__(self, fail: dict[int, int]) -> None:
        self.fail, self.calls = fail, []

    def __call__(self, address, length, advice):
        self.calls.append((address, length, advice))
        err = self.fail.get(len(self.calls) - 1)
        if err is None:
            return 0
        ctypes.set_errno(err)
        return -1


def _three_tensors():
    return [torch.empty(3 * MiB) for _ in range(3)]  # 12 MiB each: 10-12 MiB spans


def test_a_kernel_without_collapse_is_reported_and_stops(monkeypatch):
    fake = _FakeMadvise({0: errno.EINVAL})
    monkeypatch.setattr(hp, "_madvise", lambda: fake)
    r = huge_pages(_three_tensors())
    assert r.tensors == 3 and r.collapsed == 0 and len(fake.calls) == 1
    assert fake.calls[0][2] == 25  # MADV_COLLAPSE
    assert "does not collapse" in r.reason
    monkeypatch.setattr(hp, "_madvise", lambda: _FakeMadvise({0: errno.EINVAL}))
    with pytest.raises(OSError, match="does not collapse"):
        huge_pages(_three_tensors(), strict=True)


def test_spans_the_kernel_could_not_fill_are_left_out(monkeypatch):
    fake = _FakeMadvise({1: errno.EAGAIN})
    monkeypatch.setattr(hp, "_madvise", lambda: fake)
    ts = _three_tensors()
    r = huge_pages(ts)
    spans = hp._spans(ts)
    assert len(fake.calls) == 3 and [(a, n) for a, n, _ in fake.calls] == [
        (lo, hi - lo) for lo, hi in spans]
    assert r.collapsed == r.asked - (spans[1][1] - spans[1][0])
    assert "no free 2 MiB blocks" in r.reason


def test_no_madvise_is_reported(monkeypatch):
    monkeypatch.setattr(hp, "_madvise", lambda: None)
    r = huge_pages(torch.nn.Linear(2048, 2048))
    assert r.collapsed == 0 and "madvise is not available" in r.reason
    with pytest.raises(OSError, match="madvise is not available"):
        huge_pages(torch.nn.Linear(2048, 2048), strict=True)


@pytest.mark.parametrize("target", [5, "weights", [torch.zeros(2), 3]])
def test_bad_target_is_named(target):
    with pytest.raises(TypeError, match=r"target=\w+ is not allowed"):
        huge_pages(target)


def test_bad_strict_is_named():
    with pytest.raises(ValueError, match="strict"):
        huge_pages(torch.zeros(2), strict=1)


@linux
def test_generation_is_unchanged():
    from moekit.inference.engine import Engine, GenerationConfig
    from moekit.models import LMConfig, MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(LMConfig(vocab_size=256, dim=256, num_layers=2, num_heads=4,
                                    ffn_dim=256, num_experts=16, top_k=2,
                                    max_seq_len=64)).eval()
    cfg = GenerationConfig(max_new_tokens=12)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    want = [g.tokens for g in Engine(model).generate(prompts, cfg)[0]]
    r = huge_pages(model)
    assert r.tensors >= 4  # the experts' stacks (4 MiB each) and more
    assert [g.tokens for g in Engine(model).generate(prompts, cfg)[0]] == want


def test_generate_and_serve_flags(tmp_path, capsys, monkeypatch):
    """`moekit generate --huge-pages` moves the loaded model's weights (the report on
    stderr, the same text); off by default there, on by default for `moekit serve`."""
    import argparse

    from moekit.cli import main as cli_main
    from moekit.inference import server
    from moekit.models import MoETransformer, preset
    from moekit.train import generate_cli
    from moekit.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MoETransformer(preset("tiny")).eval()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    seen = []
    real = generate_cli.huge_pages
    monkeypatch.setattr(generate_cli, "huge_pages", lambda m: seen.append(m) or real(m))
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "8",
            "--temperature", "0", "--prompt", "ab"]
    outs = []
    for extra in ([], ["--huge-pages"]):
        assert cli_main(argv + extra) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out and outs[0].out.startswith("ab")
    assert "huge pages" not in outs[0].err and "moekit: huge pages: " in outs[1].err
    assert len(seen) == 1 and isinstance(seen[0], MoETransformer)
    for cmd, flags, want in ((generate_cli.add_arguments, [], False),
                             (server.add_arguments, [], True),
                             (server.add_arguments, ["--no-huge-pages"], False)):
        p = argparse.ArgumentParser()
        cmd(p)
        assert p.parse_args(["--checkpoint", "x", *flags]).huge_pages is want


@linux
def test_a_files_mapping_is_copied_out_first(tmp_path):
    """A checkpoint loaded without a copy maps its file: the kernel collapses anonymous
    memory only, so the tensors on it move to a copy (same Parameters, ties, views)."""
    n = 5 * MiB // 4  # two 5 MiB halves of one mapped file
    want = torch.randn(2 * n, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "weights.bin"
    path.write_bytes(want.numpy().tobytes())
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    flat = torch.frombuffer(m, dtype=torch.float32)
    mod = torch.nn.Module()
    mod.a = torch.nn.Parameter(flat[:n].view(1024, -1))
    mod.b = torch.nn.Parameter(flat[n:].view(1024, -1))
    mod.register_buffer("a_view", mod.a.detach()[:4])
    a, ptr = mod.a, flat.data_ptr()
    assert hp._file_backed(ptr)
    r = huge_pages(mod)
    assert r.copied == 2 * n * 4 and r.tensors == 1
    assert mod.a is a and mod.a.requires_grad  # the same Parameter object
    assert mod.a.untyped_storage().data_ptr() != ptr and not hp._file_backed(mod.a.data_ptr())
    # the three tensors still share one storage, at their offsets
    assert mod.b.data_ptr() == mod.a.data_ptr() + n * 4 == mod.a_view.data_ptr() + n * 4
    assert torch.equal(torch.cat([mod.a.detach().flatten(), mod.b.detach().flatten()]), want)
    if r.reason is None:
        assert r.collapsed == r.asked > 0
    del flat
    m.close()


@linux
def test_a_checkpoint_generates_the_same_after_huge_pages(tmp_path):
    """load_model maps the checkpoint's file: huge_pages copies it out, same tokens."""
    from moekit.inference.engine import Engine, GenerationConfig
    from moekit.models import LMConfig, MoETransformer
    from moekit.train.checkpoint import save_checkpoint
    from moekit.train.generate_cli import load_model

    torch.manual_seed(0)
    model = MoETransformer(LMConfig(vocab_size=256, dim=256, num_layers=2, num_heads=4,
                                    ffn_dim=256, num_experts=16, top_k=2,
                                    max_seq_len=64)).eval()
    save_checkpoint(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.0),
                    {"step": 0, "model_config": model.config.to_dict()})
    cfg = GenerationConfig(max_new_tokens=10)
    want = [g.tokens for g in Engine(model).generate([[1, 2, 3]], cfg)[0]]
    loaded = load_model(str(tmp_path / "run"), torch.float32)
    r = huge_pages(loaded)
    assert r.tensors >= 4 and r.copied > 0  # safetensors mapped the file
    assert [g.tokens for g in Engine(loaded).generate([[1, 2, 3]], cfg)[0]] == want
    for (name, p), q in zip(loaded.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
