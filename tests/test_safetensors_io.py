"""moekit.offload.safetensors_io, the pread reader under the offloaded experts: what it
reads equals what safetensors wrote, and a malformed shard raises ShardError (a
CheckpointError: one line from `moekit generate`) naming the file and, where there is
one, the tensor. Most of these branches had no test (77% line coverage); a header that
was JSON but not the format's raised AttributeError / KeyError / TypeError, and a
negative begin offset was accepted and read header bytes as the tensor's.

Oracles: the tensors handed to safetensors.torch.save_file; for drop_page_cache, the
kernel's own residency count (mincore).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file

from moekit.errors import CheckpointError
from moekit.offload import ShardError, drop_page_cache, read_header
from moekit.offload.safetensors_io import read_into_module, read_tensor

TENSORS = {
    "w": torch.arange(24, dtype=torch.float32).view(4, 2, 3) / 7,  # a stack of 4 rows
    "b": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
    "i": torch.tensor([[7, -1], [0, 2**40]], dtype=torch.int64),
}


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    return path


def _raw(path, header, data: bytes = b"\0" * 64) -> None:
    """A file in the safetensors layout with ``header`` (JSON value or raw bytes)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_read_header_and_read_tensor_give_what_safetensors_wrote(shard):
    locs = read_header(shard)
    assert set(locs) == set(TENSORS)  # __metadata__ is not a tensor
    fds: dict = {}
    try:
        for name, want in TENSORS.items():
            assert locs[name].shape == tuple(want.shape)
            assert locs[name].dtype == want.dtype
            assert torch.equal(read_tensor(locs[name], fds), want)
        for e in range(4):  # one expert of a stacked [E, ...] tensor
            assert torch.equal(read_tensor(locs["w"].row(e), fds), TENSORS["w"][e])
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.parametrize("index", [-1, 4])
def test_a_row_out_of_range_is_named(shard, index):
    with pytest.raises(ShardError, match=rf"w\[{index}\] is out of range: w in .*"
                                         r"model.safetensors has 4 rows"):
        read_header(shard)["w"].row(index)


def test_read_into_module_converts_dtype_and_fills_a_non_contiguous_parameter(shard):
    """A parameter of another dtype (bf16 model, fp32 file) or layout gets a copy; one of
    the file's dtype is read in place."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(4, 3, 2).transpose(1, 2))  # non-contiguous
    module.b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float32))  # file: bf16
    module.register_buffer("i", torch.zeros(2, 2, dtype=torch.int64))
    fds: dict = {}
    try:
        read_into_module(module, read_header(shard), fds)
    finally:
        for fd in fds.values():
            os.close(fd)
    assert torch.equal(module.w, TENSORS["w"]) and not module.w.is_contiguous()
    assert module.b.dtype == torch.float32 and torch.equal(module.b, TENSORS["b"].float())
    assert torch.equal(module.i, TENSORS["i"])


def test_read_into_module_refuses_a_quantized_tensor_in_the_16_output_order(shard):
    """Its state_dict entries are NK copies of buffers held in another order: filling
    them in place would leave the tensor as it was, with no error."""
    from moekit.quant import quantize_tensor

    qt = quantize_tensor(torch.randn(2, 64, 32), 4, 32, "int8")
    qt.layout = "o16"  # as set_layout leaves it (the check needs no permuted bytes)
    module = torch.nn.Module()
    module.experts = torch.nn.Module()
    module.experts.w_in = qt
    before = qt.data.clone()
    with pytest.raises(ValueError, match=r"experts.w_in holds layout 'o16', which "
                                         r"read_into_module cannot fill.*set_layout\('nk'\)"):
        read_into_module(module, read_header(shard), {})
    assert torch.equal(qt.data, before)


def test_a_file_truncated_after_its_header_was_read_is_named_on_the_read(shard):
    locs = read_header(shard)
    loc = locs["w"]
    with open(shard, "r+b") as f:
        f.truncate(loc.offset + 10)  # 10 of the tensor's 96 bytes left
    fds: dict = {}
    try:
        with pytest.raises(ShardError, match=r"w in .*model.safetensors is truncated: "
                                             r"read 10 of 96 bytes"):
            read_tensor(loc, fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_missing_shard(tmp_path):
    with pytest.raises(ShardError, match=r"shard .*absent.safetensors is missing"):
        read_header(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("content,match", [
    (b"", r"is truncated: 0 bytes, no safetensors header"),
    (b"\x05\0\0", r"is truncated: 3 bytes, no safetensors header"),
    (struct.pack("<Q", 100) + b"{}", r"is truncated: its header says 100 bytes, the file "
                                     r"has 2 after the length"),
])
def test_a_truncated_header(tmp_path, content, match):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(ShardError, match=match):
        read_header(path)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,match", [
    (b"\xff\xfe{", r"x.safetensors has a corrupt safetensors header"),  # not UTF-8
    (b"{'a': 1}", r"x.safetensors has a corrupt safetensors header"),  # not JSON
    pytest.param(b"[" * 100_000 + b"]" * 100_000,
                 r"corrupt safetensors header: maximum recursion", id="deep-json"),
    ([F32_2], r"corrupt safetensors header: a JSON list, where it must be an object"),
    ("a", r"corrupt safetensors header: a JSON str, where it must be an object"),
    ({"a": [1]}, r"a in .*x.safetensors has a corrupt header entry: a JSON list"),
    ({"a": {**F32_2, "dtype": "F8"}}, r"a in .* has dtype 'F8', which is not allowed: it "
                                      r"must be one of F64, F32, F16, BF16"),
    ({"a": {**F32_2, "dtype": ["F32"]}}, r"a in .* has dtype \['F32'\], which is not"),
    ({"a": {"dtype": "F32", "shape": [2]}}, r"a in .* has data_offsets=None, which is not "
                                            r"allowed: it must be \[begin, end\]"),
    ({"a": {**F32_2, "data_offsets": [-8, 0]}}, r"data_offsets=\[-8, 0\], which is not"),
    ({"a": {**F32_2, "data_offsets": [8, 0]}}, r"data_offsets=\[8, 0\], which is not"),
    ({"a": {**F32_2, "data_offsets": [0.0, 8.0]}}, r"data_offsets=\[0.0, 8.0\], which"),
    ({"a": {**F32_2, "data_offsets": [0, 8, 9]}}, r"data_offsets=\[0, 8, 9\], which"),
    ({"a": {**F32_2, "data_offsets": list(range(40))}}, r"data_offsets=\[0, 1, 2, .*\.\.\.,"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, r"a in .* has shape=None, which is "
                                                      r"not allowed: it must be a list"),
    ({"a": {**F32_2, "shape": "2"}}, r"a in .* has shape='2', which is not allowed"),
    ({"a": {**F32_2, "shape": [-2]}}, r"a in .* has shape=\[-2\], which is not allowed"),
    ({"a": {**F32_2, "shape": [True]}}, r"shape=\[True\], which"),  # JSON true
    ({"a": {**F32_2, "shape": [3]}}, r"a in .*: 8 bytes for shape \(3,\) F32 \(needs 12\)"),
    ({"a": {**F32_2, "shape": [20], "data_offsets": [0, 80]}},
     r"a in .* is truncated: it ends at byte \d+, the file has \d+ bytes"),
])
def test_a_malformed_header_names_the_file_and_tensor(tmp_path, header, match):
    path = tmp_path / "x.safetensors"
    _raw(path, header)
    with pytest.raises(ShardError, match=match) as e:
        read_header(path)
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ValueError)
    assert len(str(e.value)) < 300  # one line, whatever the file holds


def test_a_well_formed_raw_header_is_read(tmp_path):
    """The checks refuse nothing the format allows: an empty tensor, a scalar, no
    __metadata__."""
    path = tmp_path / "x.safetensors"
    data = struct.pack("<f", 2.5) + struct.pack("<2f", 1.0, -1.0)
    _raw(path, {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
                "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data)
    locs = read_header(path)
    fds: dict = {}
    try:
        assert torch.equal(read_tensor(locs["s"], fds), torch.tensor(2.5))
        assert read_tensor(locs["e"], fds).shape == (0, 3)
        assert torch.equal(read_tensor(locs["v"], fds), torch.tensor([1.0, -1.0]))
    finally:
        for fd in fds.values():
            os.close(fd)


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache, as the kernel counts them (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mm:
        buf = (ctypes.c_char * size).from_buffer(mm)
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
        del buf
        assert rc == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec)


def _on_tmpfs(path) -> bool:
    best = ("", "")
    with open("/proc/mounts") as f:
        for line in f:
            _, point, fs = line.split()[:3]
            if str(path).startswith(point) and len(point) > len(best[0]):
                best = (point, fs)
    return best[1] == "tmpfs"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore, /proc/mounts")
def test_drop_page_cache_empties_the_files_pages_and_keeps_their_bytes(tmp_path):
    if _on_tmpfs(tmp_path):
        pytest.skip("tmpfs pages are the files themselves: DONTNEED keeps them")
    paths = [tmp_path / f"{i}.bin" for i in range(2)]
    blobs = [os.urandom(1 << 18) for _ in paths]
    for p, b in zip(paths, blobs, strict=True):
        p.write_bytes(b)  # dirty pages: drop_page_cache syncs them first
        p.read_bytes()
    assert all(_resident_pages(p) > 0 for p in paths)
    fds_before = len(os.listdir("/proc/self/fd"))
    drop_page_cache(paths)
    assert [_resident_pages(p) for p in paths] == [0, 0]
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every fd closed
    assert [p.read_bytes() for p in paths] == blobs
