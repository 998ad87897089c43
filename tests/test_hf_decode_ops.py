"""``benchmarks/bench_decode.py --ops`` counts the aten ops of a decode step of the
transformers models patched by moekit (``hfpatch-*``) too, by call site: moekit's lines
where one is on the stack, transformers' elsewhere. On a tiny shape, the counts name
the patched router and the experts' one prepared C++ call, and nothing from the experts'
general path (experts.py: the two weight transposes per call it made before the plan)."""

from __future__ import annotations

import re

import pytest

from moekit import bench
from moekit.functions import decode

DECODE = bench._load(bench.DECODE_SCRIPT)
pytestmark = [pytest.mark.skipif(DECODE is None, reason="benchmarks/ is not in this checkout"),
              pytest.mark.skipif(not decode.available(), reason="no decode kernels")]
pytest.importorskip("transformers")
TINY = dict(dim=64, num_layers=2, num_heads=4, ffn_dim=32, num_experts=8, top_k=2)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_ops_count_a_patched_transformers_step_by_site(family, monkeypatch, capsys):
    monkeypatch.setitem(DECODE.SHAPES, "tiny", TINY)
    DECODE.count_ops("tiny", 1, f"hfpatch-{family}")
    head, *lines = capsys.readouterr().out.strip().splitlines()
    total = re.fullmatch(rf"ops: tiny hfpatch-{family} batch 1: (\d+) aten ops per decode step",
                         head)
    assert total is not None, head
    rows = [line.split() for line in lines]
    assert sum(int(n) for n, _, _ in rows) == int(total.group(1))
    sites = {site.rsplit(":", 1)[0] for _, _, site in rows}
    assert {"integrations/hf/routers.py", "integrations/hf/experts_plan.py",
            f"transformers/models/{family}/modeling_{family}.py"} <= sites
    assert "integrations/hf/experts.py" not in sites
    # the one C++ call per layer: its output and scratch tensors, nothing converted
    plan = [(n, op) for n, op, site in rows if site.startswith("integrations/hf/experts_plan")]
    assert {op for _, op in plan} <= {"aten.empty.memory_format", "aten.zeros.default",
                                      "aten.empty_like.default"}, plan
