"""Experts quantized as they are read (``hf.load_offloaded(..., quantize=8|4)``) under
``torch.inference_mode()``, the mode moekit's own generation runs in.

A cache slot's tensor views are made once, by the first thread that reads into the slot,
and reused by every later read. Made on the caller's thread inside inference mode, they
were inference-mode views, and the prefetch thread (never in inference mode: the mode is
per thread) failed writing an expert into them: "PrefetchError: ... Inplace update to
inference tensor outside InferenceMode". Oracle: ``moekit.quantize`` of the resident
patched model (the same bytes, bitwise), and the quantized bytes of the expert itself.
"""

from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_models = pytest.importorskip("tests.hf_models")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    """A tiny random Mixtral whose expert widths int4's groups of 32 tile (F = D = 32)."""
    path = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**{**hf_models.COMMON, "intermediate_size": 32,
                                        "num_local_experts": 8, "num_experts_per_tok": 2})
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _in_thread(fn):
    """fn() on a new thread (outside inference mode, as the prefetch thread runs)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_a_slot_first_read_in_inference_mode_takes_a_read_from_another_thread(
        mixtral_dir, bits, group):
    from moekit.integrations import hf
    from moekit.quant.tensor import quantize_tensor

    model = hf.load_offloaded(mixtral_dir, expert_memory="1MiB", quantize=bits,
                              group_size=group, prefetch=False)
    try:
        cache = model.expert_offload.cache
        store, slot = cache.store, cache.arena.view(0)
        first, second = sorted(store.experts)[:2]
        with torch.inference_mode():
            store.load(first, slot)  # the slot's views made here, in inference mode
        value = _in_thread(lambda: store.load(second, slot))  # was the RuntimeError
        resident = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
        layer, e = second
        experts = resident.model.layers[layer].mlp.experts
        want = quantize_tensor(experts.down_proj[e].t()[None].detach(), bits, group)
        assert torch.equal(value["w_out"].data, want.data)
        assert torch.equal(value["w_out"].scales, want.scales)
    finally:
        model.expert_offload.close()


def test_threaded_prefetch_under_inference_mode_equals_the_resident_model(mixtral_dir):
    """generate() under inference mode with the prefetch thread on, a budget of a third of
    the experts (slots read by both threads): moekit.quantize's resident tokens."""
    from moekit import quantize
    from moekit.integrations import hf

    resident = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
    quantize(hf.apply(resident).eval(), 8)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = resident.generate(ids, max_new_tokens=12, do_sample=False)
    # 3.4 KiB an int8 expert (D = F = 32, and its scales): 7 of the 16 experts
    model = hf.load_offloaded(mixtral_dir, expert_memory="24KiB", quantize=8)
    try:
        for _ in range(3):
            with torch.inference_mode():
                got = model.generate(ids, max_new_tokens=12, do_sample=False)
            assert torch.equal(got, want)
    finally:
        model.expert_offload.close()
