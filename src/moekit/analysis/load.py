"""The checkpoints `moekit analyze` reads: a training checkpoint (run or step_*
directory) or a `moekit quantize` output, each as a model and a ``Source``.

A quantized model routes as the float one does (its MoE layers, routers and hooks
are the same modules), so the analysis and the comparison read it unchanged; what
differs is said in the report: the weights' bits and group size, and that the routers
stay in floating point (``moekit.quantize`` never quantizes them: their logits pick
the experts), while with scope "all" the attention feeding them is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Source:
    """Where a model came from, as the report names it.

    ``state``: the keys of a training checkpoint's state that analyze reads
    (model_config, train_config, data); a quantized output written before moekit
    recorded its float checkpoint has no "data" (its corpus is unknown).
    ``weights``: None for float weights, else the quantization (``weights_meta``).
    """

    path: Path
    step: int | None
    state: dict[str, Any]
    weights: dict[str, Any] | None = None


def load_lm(path: str) -> tuple[nn.Module, Source]:
    """The model in ``path`` (training checkpoint or quantized output) and its Source."""
    from moekit.quant.io import is_quantized_checkpoint
    if is_quantized_checkpoint(path):
        return load_quantized_lm(path)
    from moekit.models import LMConfig, MoETransformer
    from moekit.train.checkpoint import load_checkpoint, restore
    ck = load_checkpoint(path, optimizer=False)
    model = MoETransformer(LMConfig.from_dict(ck.state["model_config"]))
    restore(ck, model, rng=False)
    return model.eval(), Source(ck.path, ck.step, ck.state)


def load_quantized_lm(path: str) -> tuple[nn.Module, Source]:
    from moekit.quant.io import load_quantized, located, read_meta
    model = load_quantized(path)  # checks the file (SHA-256, names, shapes) first
    where = located(path)
    meta = read_meta(where)
    source = meta.get("source")
    state: dict[str, Any] = {"model_config": meta["model_config"]}
    if isinstance(source, dict):
        state.update(data=source.get("data"), train_config=source.get("train_config"))
    step = source.get("step") if isinstance(source, dict) else None
    return model, Source(where, step, state, weights_meta(model, meta, source))


def weights_meta(model: nn.Module, meta: dict[str, Any], source: Any) -> dict[str, Any]:
    """The quantization the report states: bits, group size (None: one scale per output
    channel), scope, activations, and the routers' dtype read from the model itself."""
    from moekit.layer import MoE
    routers = {str(p.dtype).removeprefix("torch.") for m in model.modules()
               if isinstance(m, MoE) for p in m.router.parameters()}
    return {"bits": meta["bits"], "group_size": meta["group_size"], "scope": meta["scope"],
            "activations": meta["activations"], "embeddings": meta["embeddings"],
            "router_dtypes": sorted(routers),
            "quantized_from": source.get("checkpoint") if isinstance(source, dict) else None}


def tag(src: Source) -> str:
    """A directory name for ``src``: step_NNNNNNNN, and for a quantized one its own name
    after it (two outputs of one step, int8 and int4, compared, got one name)."""
    step = "step_unknown" if src.step is None else f"step_{src.step:08d}"
    return step if src.weights is None else f"{step}_{src.path.name}"


def label(src: Source) -> str:
    """"step 30", or "step 30, int8 weights" / "int4 g32 weights" for a quantized one."""
    step = "step unknown" if src.step is None else f"step {src.step}"
    return step if src.weights is None else f"{step}, {weights_short(src.weights)} weights"


def weights_short(w: dict[str, Any]) -> str:
    return f"int{w['bits']}" + ("" if w["group_size"] is None else f" g{w['group_size']}")


def weights_line(w: dict[str, Any] | None) -> str:
    """The report's weights line."""
    if w is None:
        return "floating point (a training checkpoint)"
    groups = ("one scale per output channel" if w["group_size"] is None
              else f"group size {w['group_size']}")
    scope = ("routed experts and every dense projection (attention, the LM head, any "
             "dense FFN or shared expert" + (", the embedding table)" if w["embeddings"]
                                              else ")")
             if w["scope"] == "all" else "routed experts only")
    act = "; the decode kernels round activations to int8" \
        if w["activations"] == "int8" else ""
    frm = f", quantized from `{w['quantized_from']}`" if w["quantized_from"] else ""
    routers = "/".join(w["router_dtypes"]) or "none"
    inputs = (" quantized attention (and past the first MoE layer, quantized experts)"
              if w["scope"] == "all" else " the quantized experts of the layers before")
    return (f"int{w['bits']} ({groups}), quantized: {scope}{act}{frm}. The routers are "
            f"not quantized: kept in {routers} (moekit.quantize leaves every router in "
            f"floating point), but their input comes through{inputs}, so which experts "
            "a token gets can still change")
