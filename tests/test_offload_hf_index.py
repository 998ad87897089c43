"""hf.load_offloaded on a transformers checkpoint whose model.safetensors.index.json or
shard files are wrong: a ShardError naming the file, before anything is loaded or a
prefetch thread started. A corrupt index (not JSON, no weight_map, a weight_map of other
types) had raised JSONDecodeError / KeyError / AttributeError / TypeError, and a shard
named "../other/x.safetensors" was read from outside the checkpoint; the branches for a
tensor the index places in the wrong shard and for a directory with no weights had no
test (integrations/hf/offload.py 135 and 141: 0 hits).
"""

from __future__ import annotations

import json
import re
import shutil
import threading

import pytest

from moekit.offload import ShardError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf_models = pytest.importorskip("tests.hf_models")
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "mixtral"
    hf_models.build("mixtral").save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.fixture
def ckpt(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ckpt")


def _edit_index(path, change) -> None:
    index = json.loads((path / INDEX).read_text())
    change(index)
    (path / INDEX).write_text(json.dumps(index))


def _first(index) -> str:
    return sorted(index["weight_map"])[0]


def _move_to_another_shard(index) -> None:
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in sorted(index["weight_map"].items()) if f == files[0])
    index["weight_map"][name] = files[1]


CASES = {  # how the checkpoint is damaged: (change to the index or a function, message)
    "index not JSON": ("{", rf"{INDEX} is unreadable or corrupt: Expecting property name"),
    "index a list": ("[]", rf"{INDEX} is corrupt: it must hold a weight_map of tensor names "
                           r"to shard file names"),
    "no weight_map": (lambda i: i.pop("weight_map"), rf"{INDEX} is corrupt: it must hold a "
                                                     r"weight_map"),
    "weight_map a list": (lambda i: i.update(weight_map=[]), rf"{INDEX} is corrupt"),
    "a shard named by a number": (lambda i: i["weight_map"].update({_first(i): 5}),
                                  rf"{INDEX} is corrupt"),
    "a shard outside the directory": (
        lambda i: i["weight_map"].update({_first(i): "../other/" + i["weight_map"][_first(i)]}),
        r"names the shard '\.\./other/model-0000\d-of-0000\d\.safetensors', which is not "
        r"allowed: a shard must be a file in .*ckpt"),
    "an absolute shard path": (lambda i: i["weight_map"].update({_first(i): "/etc/hostname"}),
                               r"names the shard '/etc/hostname', which is not allowed"),
    "a tensor in the wrong shard": (
        _move_to_another_shard,
        rf"tensor .* is missing from .*model-00002-of-0000\d\.safetensors, where {INDEX} "
        r"says it is"),
}


@pytest.mark.parametrize("what", sorted(CASES))
def test_a_damaged_index_is_named_before_anything_starts(ckpt, what):
    from moekit.integrations import hf

    change, match = CASES[what]
    if isinstance(change, str):
        (ckpt / INDEX).write_text(change)
    else:
        _edit_index(ckpt, change)
    threads = threading.active_count()
    with pytest.raises(ShardError, match=match) as e:
        hf.load_offloaded(ckpt, expert_memory="1MiB")
    assert "\n" not in str(e.value)
    assert threading.active_count() == threads  # no prefetch thread left behind


def test_a_directory_without_weights(ckpt):
    from moekit.integrations import hf

    for f in ckpt.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(ShardError, match=re.escape(f"{ckpt} has neither model.safetensors "
                                                   f"nor {INDEX}")):
        hf.load_offloaded(ckpt, expert_memory="1MiB")
