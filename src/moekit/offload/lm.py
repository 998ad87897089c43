"""moekit checkpoints with experts on demand: ``load_offloaded(run_dir, expert_memory="512MiB")``.

The model is built on the meta device, every MoE layer's ``Experts`` is swapped
for ``OffloadedExperts`` (no parameters), and everything else is read from the
checkpoint. Experts stay in ``model.safetensors`` until a step routes to them.
A quantized checkpoint (a directory written by ``moekit quantize``) works the
same way: its int8 / int4 bytes are what is read and cached. Its scales and zero
points must be finite (``NonFiniteScalesError``): the resident tensors' are checked at
load, each expert's as the store first reads it (at load, that would read every expert).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moekit.dispatch.plan import Dispatch
from moekit.experts.activations import activate
from moekit.experts.experts import resolve_backend
from moekit.functions.moe_experts import stack_experts
from moekit.layer import MoE
from moekit.meta import meta_device, to_empty
from moekit.models.config import LMConfig
from moekit.models.transformer import MoETransformer, rotary_table
from moekit.offload.codecs import Quantized
from moekit.offload.runtime import ExpertOffload, ExpertsCall, ExpertWeights, check_options
from moekit.offload.safetensors_io import ShardError, TensorLoc, read_header, read_into_module
from moekit.offload.store import Codec, ExpertMemoryError, ExpertStore, Part, parse_bytes
from moekit.quant import io as qio
from moekit.quant.model import auto_layout, quantize_like
from moekit.train import rundir
from moekit.train.checkpoint import MODEL_FILE, STATE_FILE, CheckpointError, read_state, resolve


class OffloadedExperts(nn.Module):
    """Stands in for ``Experts``: same call, weights from the expert cache."""

    def __init__(self, cfg, backend: str, layer: int, dtype: torch.dtype,
                 quant: tuple[int, int | None, str] | None, layout: str = "nk") -> None:
        super().__init__()
        self.cfg, self.backend, self.layer = cfg, backend, layer
        self.offload: ExpertOffload | None = None  # set once the cache exists
        fmt = None if quant is None else (quant[0], quant[1], cfg.dim, cfg.ffn_dim,
                                          cfg.expert_bias, quant[2])
        self.call = ExpertsCall(self._act, backend, dtype, quant is not None, cfg.num_experts,
                                self._unpack, self._stacked, fmt, layout)

    def _act(self, h: Tensor) -> Tensor:  # a bound method with .cfg, as Experts has
        return activate(h, self.cfg)

    def forward(self, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
        assert self.offload is not None
        return self.offload.run(self.layer, x_TD, dispatch, self.call, self.cfg.dim)

    @staticmethod
    def _unpack(parts: list[dict]) -> ExpertWeights:
        b_in, b_out = ((torch.stack([p[n] for p in parts]) if n in parts[0] else None)
                       for n in ("b_in", "b_out"))
        return ExpertWeights([p["w_in"] for p in parts], [p["w_out"] for p in parts],
                             b_in, b_out)

    def _stacked(self, x_TD: Tensor, d: Dispatch, parts: list[dict[str, Tensor]]) -> Tensor:
        """A backend other than auto / decode: one call on stacked copies."""
        w = self._unpack(parts)
        w_in, w_out = stack_experts(w.w_in), stack_experts(w.w_out)
        fn = resolve_backend(self.backend, x_TD, w_in, w_out, d.num_rows)
        return fn(x_TD, d, w_in, w_out, w.b_in_EG, w.b_out_ED, self._act)


def _part_names(cfg, bits: int | None) -> list[str]:
    """The stored tensors of one expert: w_in, w_out (quantized: their data, scales and,
    for int4, zeros), then the biases."""
    biases = ["b_in", "b_out"] if cfg.expert_bias else []
    if bits is None:
        return ["w_in", "w_out", *biases]
    buffers = ("data", "scales", "zeros") if bits == 4 else ("data", "scales")
    return [f"{w}.{b}" for w in ("w_in", "w_out") for b in buffers] + biases


def _expert_parts(header: dict[str, TensorLoc], prefix: str, cfg, path: Path,
                  bits: int | None, want: dict[str, Tensor]) -> dict[int, dict[str, Part]]:
    """Where each expert's tensors lie, each stored tensor checked against ``want`` (the
    meta ``Experts``' state dict): its shape, and when quantized its dtype, as
    ``load_quantized`` checks them, before anything is read."""
    names = _part_names(cfg, bits)
    out: dict[int, dict[str, Part]] = {e: {} for e in range(cfg.num_experts)}
    for n in names:
        loc = header.get(f"{prefix}.{n}")
        if loc is None:
            raise ShardError(f"tensor {prefix}.{n} is missing from {path}")
        shape, dtype = tuple(want[n].shape), want[n].dtype
        if loc.shape != shape or (bits is not None and loc.dtype != dtype):
            raise ShardError(f"{prefix}.{n} in {path} is {loc.dtype} of shape {loc.shape}: "
                             f"the model needs {'' if bits is None else f'{dtype} of '}"
                             f"shape {shape}")
        for e in range(cfg.num_experts):
            row = loc.row(e)
            out[e][n] = Part(row.shape, row.dtype, (row,))
    return out


def _check_resident(model: nn.Module, header: dict[str, TensorLoc], tied: dict[str, str],
                    path: Path) -> dict[str, TensorLoc]:
    """The non-expert tensors to read, checked against the model before any is read."""
    want = model.state_dict()
    locs = {}
    for name, t in want.items():
        loc = header.get(tied.get(name, name))
        if loc is None:
            raise ShardError(f"tensor {name} is missing from {path}")
        if loc.shape != tuple(t.shape):
            raise ShardError(f"{name} in {path} has shape {loc.shape}, the model's is "
                             f"{tuple(t.shape)}")
        locs[name] = loc
    return locs


def load_offloaded(path: str | Path, expert_memory: int | str, policy: str = "lru",
                   prefetch: bool = True, backend: str = "auto", threaded: bool = True
                   ) -> MoETransformer:
    """A MoETransformer from a moekit checkpoint whose experts are read on demand.

    ``expert_memory`` is the expert cache's byte budget (int or "512MiB"); the
    model's other weights are resident on top of it. ``model.expert_offload``
    holds the cache and its statistics (``.stats.summary()``); call its
    ``close()`` to stop the prefetch thread. ``threaded=False`` prefetches on the
    calling thread (same hits, no overlap).
    """
    budget = parse_bytes(expert_memory)
    check_options(policy, prefetch, backend, threaded)  # before anything is read
    file, state, quant = _source(path)
    header = read_header(file)
    cfg = LMConfig.from_dict(state["model_config"])
    if cfg.dense:  # _attach had failed with "max() arg is an empty sequence"
        raise ExpertMemoryError(
            f"expert_memory={expert_memory!r} is not allowed for {path}: its model is dense "
            "(dense=True), with no experts to keep on disk; load it without expert_memory")
    with meta_device():
        model = MoETransformer(cfg)
        if quant is not None:  # the experts' stored layout; scope "all": attention and head
            quantize_like(model, quant.bits, quant.group, state["scope"], quant.activations,
                          state["embeddings"])
    store_parts, layer, layouts = {}, 0, {}
    for b, block in enumerate(model.blocks):
        if isinstance(block.ffn, MoE):
            moe = block.ffn
            parts = _expert_parts(header, f"blocks.{b}.ffn.experts", moe.config, file,
                                  quant.bits if quant else None, moe.experts.state_dict())
            store_parts.update({(layer, e): p for e, p in parts.items()})
            dtype = torch.float32 if quant else parts[0]["w_in"].dtype
            fmt = None if quant is None else (quant.bits, quant.group, quant.activations)
            # the order the resident model takes (assemble's set_expert_layout), N = rows
            layouts = {} if quant is None else {
                r: auto_layout(quant.bits, quant.activations, parts[0][f"{r}.data"].shape[0])
                for r in ("w_in", "w_out")}
            moe.experts = OffloadedExperts(moe.config, backend, layer, dtype, fmt,
                                           layouts.get("w_in", "nk"))
            layer += 1
    resident = _check_resident(model, header, state["tied"], file)
    codec = Codec() if quant is None else Quantized(("w_in", "w_out"), *quant, layouts)
    store = ExpertStore(store_parts, codec)
    try:
        to_empty(model, "cpu")
        _load_resident(model, resident, store._fds)
        if quant is not None:  # the resident ones now (read anyway), each expert's on its read
            qio.check_finite_scales(model, model.state_dict(), file)
        offload = _attach(model, store, budget, policy, prefetch, threaded, layer,
                          expert_memory)
    except BaseException:
        store.close()
        raise
    model.expert_offload = offload
    return model.eval()


class _Quant(NamedTuple):
    """A moekit quantized directory's format (quantized.json)."""

    bits: int
    group: int | None
    activations: str


def _source(path: str | Path) -> tuple[Path, dict, _Quant | None]:
    """(model file, state with model_config and tied, the format when quantized), every
    file verified against its recorded SHA-256 before anything is read."""
    if qio.is_quantized_checkpoint(path):
        path = qio.located(path)
        meta = qio.read_meta(path)
        file = _model_file(path / qio.MODEL_FILE)
        if rundir.sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file} is corrupt or truncated: its SHA-256 does not "
                                  f"match the one recorded in {qio.META_FILE}")
        return file, meta, _Quant(meta["bits"], meta["group_size"], meta["activations"])
    ckpt = resolve(path)
    file = _model_file(ckpt / MODEL_FILE)
    # the manifest's SHA-256 of every file, state.json included, before anything is read
    rundir.verify_manifest(ckpt, required=(MODEL_FILE, STATE_FILE),
                           read=(MODEL_FILE, STATE_FILE))  # not the optimizer's
    return file, read_state(ckpt), None


def _model_file(file: Path) -> Path:
    if not file.exists():
        raise ShardError(f"shard {file} is missing (tensor: every model tensor)")
    return file


def _load_resident(model: MoETransformer, locs: dict[str, TensorLoc], fds) -> None:
    cfg = model.config
    read_into_module(model, locs, fds)
    if cfg.tie_embeddings:  # to_empty gives each module its own tensor
        model.head.weight = model.embed.weight
    cos, sin = rotary_table(cfg.max_seq_len, cfg.head_size, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin


def _predictor(moe: MoE):
    if moe.config.router == "hash":  # needs token ids, which the experts never see
        return None

    def predict(x_TD: Tensor) -> Tensor:
        return moe.router(x_TD).plan.expert_S

    return predict


def _attach(model: MoETransformer, store: ExpertStore, budget: int, policy: str,
            prefetch: bool, threaded: bool, num_layers: int, given: int | str
            ) -> ExpertOffload:
    """The cache and the offload runtime on ``model``'s MoE layers; ``given``: the budget
    as the caller wrote it, for the error when it is too small."""
    moes = model.moe_layers()
    offload = ExpertOffload.within(store, budget, given, [m.config.top_k for m in moes],
                                   [_predictor(m) for m in moes[1:]], policy, prefetch,
                                   threaded, num_layers)
    for m in moes:
        m.experts.offload = offload
    return offload
