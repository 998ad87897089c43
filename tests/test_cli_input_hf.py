"""Bad arguments of moekit.integrations.hf: refused with a ValueError naming the argument
and its value before a shard is read, a file opened or a prefetch thread started. Each
test failed before its fix (a thread and open shards left behind, a truthy string taken
as True, an OSError about a hub repo id, an AttributeError)."""

from __future__ import annotations

import os
import threading

import pytest

hf_models = pytest.importorskip("tests.hf_models")

import moekit.integrations.hf.offload as hf_offload  # noqa: E402
from moekit.integrations import hf  # noqa: E402


@pytest.fixture(scope="module")
def olmoe_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmoe")
    hf_models.build("olmoe").save_pretrained(path, max_shard_size="40KB")
    return path


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("kwargs,match", [
    ({"backend": "fast"}, "backend='fast' is not allowed: it must be one of auto"),
    ({"policy": "fifo"}, "policy='fifo' is not allowed: it must be one of lru, lfu"),
    ({"prefetch": "no"}, "prefetch='no' is not allowed: it must be True or False"),
    ({"threaded": "False"}, "threaded='False' is not allowed: it must be True or False"),
])
def test_load_offloaded_checks_before_reading(olmoe_ckpt, kwargs, match, monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("the shards were read before the arguments were checked")
    monkeypatch.setattr(hf_offload, "shard_headers", refuse)
    threads, files = threading.active_count(), _open_files()
    with pytest.raises(ValueError, match=match):
        hf.load_offloaded(olmoe_ckpt, expert_memory="1MiB", **kwargs)
    assert threading.active_count() == threads
    assert _open_files() == files


def test_load_offloaded_bad_backend_leaves_no_thread_or_file(olmoe_ckpt):
    threads, files = threading.active_count(), _open_files()
    with pytest.raises(ValueError, match="backend='fast'"):
        hf.load_offloaded(olmoe_ckpt, expert_memory="1MiB", backend="fast")
    assert threading.active_count() == threads
    assert _open_files() == files


def test_load_offloaded_missing_directory(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"path='{missing}' is not allowed: it must be a "
                       "directory"):
        hf.load_offloaded(missing, expert_memory="1MiB")


def test_load_offloaded_good_flags_still_load(olmoe_ckpt):
    model = hf.load_offloaded(olmoe_ckpt, expert_memory="1MiB", prefetch=False,
                              threaded=False, policy="lfu", backend="loop")
    assert model.expert_offload.close(timeout=5.0)


@pytest.mark.parametrize("model", [None, "model"])
def test_revert_of_a_non_module(model):
    with pytest.raises(ValueError, match=f"model={type(model).__name__} is not allowed"):
        hf.revert(model)
