"""moekit.safetensors_write.save_file on bad input: a ValueError naming the problem before
the file is opened, so no unreadable or half-written file is left behind (an existing
file keeps its contents)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from moekit.safetensors_write import save_file

GOOD = {"w": torch.arange(6.0).view(2, 3)}


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(GOOD, path, metadata={"format": "pt"})
    return path


def assert_unchanged(path):
    back = load_file(str(path))
    assert set(back) == {"w"} and torch.equal(back["w"], GOOD["w"])


@pytest.mark.parametrize(("tensors", "metadata", "words"), [
    # were written, and safetensors then refused to read the file
    (GOOD, {"step": 3}, "metadata={'step': 3} is not allowed"),
    (GOOD, {1: "x"}, "metadata={1: 'x'} is not allowed"),
    (GOOD, ["format", "pt"], "metadata=['format', 'pt'] is not allowed"),
    ({"__metadata__": torch.ones(2)}, {"format": "pt"}, "'__metadata__' is not allowed"),
    # was written under the name "1"
    ({1: torch.ones(2)}, None, "tensor name 1 is not allowed"),
    # was NotImplementedError after the header: a truncated file
    ({"a": torch.ones(2), "b": torch.empty(3, device="meta")}, None,
     "tensor 'b' is not allowed: it must be a dense torch.Tensor with data"),
    # was AttributeError: 'list' object has no attribute 'items'
    ([torch.ones(2)], None, "tensors=list is not allowed"),
])
def test_bad_input_is_refused_before_writing(tmp_path, existing, tensors, metadata, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        save_file(tensors, existing, metadata=metadata)
    assert_unchanged(existing)
    fresh = tmp_path / "new.safetensors"
    with pytest.raises(ValueError, match=re.escape(words)):
        save_file(tensors, fresh, metadata=metadata)
    assert not fresh.exists()


def test_good_input_still_round_trips(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    tensors = {"a": base.t(), "b": base[:, 1], "c": base}  # non-contiguous and shared
    save_file(tensors, tmp_path / "t.safetensors", metadata={})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_tensors_are_written_in_pieces(tmp_path, monkeypatch):
    """write_raw copies a tensor out in pieces of WRITE_PIECE bytes: with pieces of 7
    bytes (a piece ends inside elements, and tensors of 0, 1 and many pieces) the file is
    bitwise the one written in one piece, and safetensors reads back the tensors."""
    from moekit import safetensors_write

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(11, generator=g).bfloat16(),
               "c": torch.randint(-128, 127, (3,), dtype=torch.int8, generator=g),
               "empty": torch.zeros(0, 4), "t": torch.randn(4, 6, generator=g).t()}
    safetensors_write.save_file(tensors, str(tmp_path / "whole.safetensors"))
    monkeypatch.setattr(safetensors_write, "WRITE_PIECE", 7)
    safetensors_write.save_file(tensors, str(tmp_path / "pieces.safetensors"))
    assert (tmp_path / "pieces.safetensors").read_bytes() == \
        (tmp_path / "whole.safetensors").read_bytes()
    back = load_file(str(tmp_path / "pieces.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
