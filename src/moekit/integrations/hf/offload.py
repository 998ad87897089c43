"""transformers MoE checkpoints with experts streamed from their safetensors shards.

>>> from moekit.integrations import hf
>>> model = hf.load_offloaded("path/to/olmoe", expert_memory="2GiB")
>>> model.generate(ids, max_new_tokens=20)            # unchanged transformers API
>>> print(model.expert_offload.stats.summary())
>>> q = hf.load_offloaded("path/to/olmoe", expert_memory="1GiB", quantize=4)  # int4 cached

The experts modules are built on the meta device (their class's ``__init__``
runs under ``torch.device("meta")`` while the model is constructed); every other
weight is read from the shards. Each experts module becomes a moekit-patched
class without parameters whose forward asks the expert cache for the experts
the router picked. Routers are patched by ``hf.apply`` as in a resident model.

Checkpoints store experts per expert (``experts.3.gate_proj.weight``, Mixtral's
``w1``/``w3``/``w2``) or stacked (``experts.gate_up_proj`` [E, 2F, D]; Llama 4's
transposed [E, D, 2F] / [E, F, D]); both are read by byte range, gate and up straight
into one [2F, D] buffer (NemotronH: ``up_proj`` alone, no gate). A ``llama4`` checkpoint
(Llama4ForConditionalGeneration) is loaded as its text model, a Llama4ForCausalLM. With
``quantize=8|4`` each expert is quantized as it is read (``moekit.quantize``'s
int8 / int4 format) and only the quantized bytes are cached.

Shape letters: T tokens, D hidden, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import reject
from moekit.dispatch.plan import Dispatch
from moekit.functions.moe_experts import stack_experts
from moekit.integrations.hf.architectures import OFFLOADABLE
from moekit.integrations.hf.experts import (
    Llama4Experts,
    StackedExperts,
    UngatedExperts,
    dispatch_from_topk,
    run_experts,
)
from moekit.integrations.hf.patch import ARCHITECTURES, patched_class
from moekit.offload.codecs import Quantize, Renamed
from moekit.offload.runtime import ExpertOffload, ExpertsCall, ExpertWeights, check_options
from moekit.offload.safetensors_io import ShardError, TensorLoc, read_header, read_into_module
from moekit.offload.store import Codec, ExpertStore, Part, parse_bytes
from moekit.quant.model import quantize_dense
from moekit.quant.tensor import check_bits
from moekit.routing.token_choice import limit_groups

# llama4 (Llama4ForConditionalGeneration's checkpoint): its text model only, a
# Llama4ForCausalLM built from text_config, reading the keys under this prefix
TEXT_ONLY = {"llama4": "language_model."}
PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\."
                        r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
STACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|up_proj|down_proj)$")
ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down",
        "w2": "down", "gate_up_proj": "gate_up"}


class OffloadedStackedExperts(StackedExperts):
    """Mixin: a transformers experts module whose weights come from the expert cache."""

    _moekit_offloaded = True  # hf.revert refuses: the original class would hold meta weights
    _moekit_layer: int
    _moekit_offload: ExpertOffload
    _moekit_dtype: torch.dtype
    _moekit_quantized: bool
    _moekit_quant_format: tuple[int, int | None, int, int, bool, str] | None  # ExpertsCall's

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                ) -> Tensor:
        dispatch = dispatch_from_topk(top_k_index, top_k_weights, self.num_experts)
        call = ExpertsCall(self._moekit_act(), self._moekit_backend, self._moekit_dtype,
                           self._moekit_quantized, self.num_experts, _unpack,
                           self._moekit_stacked, self._moekit_quant_format)
        y_TD = self._moekit_offload.run(self._moekit_layer, hidden_states, dispatch, call,
                                        hidden_states.shape[-1])
        return y_TD.to(hidden_states.dtype)

    def _moekit_stacked(self, x_TD: Tensor, d: Dispatch, parts: list[dict]) -> Tensor:
        """A backend other than auto / decode: one call on stacked copies, in the
        resident module's layout ([E', D, 2F] / [E', F, D], transposed views or not)."""
        w = _unpack(parts)
        return run_experts(x_TD, d, stack_experts(w.w_in), stack_experts(w.w_out), None, None,
                           self._moekit_act(), self._moekit_backend)


class OffloadedLlama4Experts(OffloadedStackedExperts, Llama4Experts):
    """Llama 4's experts from the cache; the patched block (``blocks.Llama4Block``) hands
    them the routed rows. Stored [D, 2F] / [F, D] per expert (the transposed layout)."""


class OffloadedUngatedExperts(OffloadedStackedExperts, UngatedExperts):
    """NemotronH's experts from the cache: ``up_proj`` [F, D] only, no gate."""


# the resident mixin -> its offloaded form
OFFLOADED: dict[type, type] = {StackedExperts: OffloadedStackedExperts,
                               Llama4Experts: OffloadedLlama4Experts,
                               UngatedExperts: OffloadedUngatedExperts}


def _unpack(parts: list[dict]) -> ExpertWeights:
    return ExpertWeights([p["w_in"] for p in parts], [p["w_out"] for p in parts])


# -- reading the shards -------------------------------------------------------------


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard file map, checked: a corrupt index had raised
    JSONDecodeError, KeyError, AttributeError or TypeError, and a shard named
    "../other/x.safetensors" was read from outside the checkpoint directory."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ShardError(f"{index} is unreadable or corrupt: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ShardError(f"{index} is corrupt: it must hold a weight_map of tensor names to "
                         "shard file names")
    for file in weight_map.values():
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ShardError(f"{index} names the shard {file!r}, which is not allowed: a "
                             f"shard must be a file in {index.parent}")
    return weight_map


def shard_headers(path: Path) -> dict[str, TensorLoc]:
    """Every tensor of the checkpoint in ``path`` (one file or an index + shards)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _weight_map(index)
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        out: dict[str, TensorLoc] = {}
        for file, names in sorted(by_file.items()):
            if not (path / file).exists():
                raise ShardError(f"shard {path / file} is missing (it holds {names[0]} and "
                                 f"{len(names) - 1} more tensors)")
            header = read_header(path / file)
            lost = [n for n in names if n not in header]
            if lost:
                raise ShardError(f"tensor {lost[0]} is missing from {path / file}, where "
                                 f"{index.name} says it is")
            out.update({n: header[n] for n in names})
        return out
    single = path / "model.safetensors"
    if not single.exists():
        raise ShardError(f"{path} has neither model.safetensors nor "
                         "model.safetensors.index.json")
    return read_header(single)


def renamer(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint key -> model key, with transformers' own renamings (not its converters)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
        renamings = [t for t in get_model_conversion_mapping(model)
                     if isinstance(t, WeightRenaming)]
    except ImportError:  # an older transformers renames nothing here
        return lambda key: key
    return lambda key: apply_renamings(key, renamings)


def expert_parts(locs: dict[str, TensorLoc], rename, modules: dict[str, nn.Module]
                 ) -> dict[str, dict[int, dict[str, Part]]]:
    """module name -> expert -> {"gate_up": Part, "down": Part}, checked against the module."""
    found: dict[str, dict[int, dict[str, TensorLoc]]] = {name: {} for name in modules}
    for key, loc in locs.items():
        name = rename(key)
        m = PER_EXPERT.match(name) or STACKED.match(name)
        if m is None or m["prefix"] not in modules:
            continue
        experts = found[m["prefix"]]
        if "e" in m.groupdict():
            experts.setdefault(int(m["e"]), {})[ROLE[m["proj"]]] = loc
        else:
            for e in range(loc.shape[0]):
                experts.setdefault(e, {})[ROLE[m["proj"]]] = loc.row(e)
    return {name: _parts(name, found[name], mod) for name, mod in modules.items()}


def _parts(name: str, experts: dict[int, dict[str, TensorLoc]], module: nn.Module
           ) -> dict[int, dict[str, Part]]:
    w_in = getattr(module, "gate_up_proj", None)
    if w_in is None:  # no gate (NemotronH): up_proj alone is the input projection
        w_in = module.up_proj
    shapes = {"gate_up": tuple(w_in.shape[1:]),
              "down": tuple(module.down_proj.shape[1:])}
    out = {}
    for e in range(module.num_experts):
        have = experts.get(e, {})
        if "gate_up" not in have:
            have = dict(have, gate_up=tuple(have[r] for r in ("gate", "up") if r in have))
        gu = have["gate_up"] if isinstance(have["gate_up"], tuple) else (have["gate_up"],)
        for role, parts in (("gate_up", gu), ("down", (have["down"],) if "down" in have else ())):
            nbytes = sum(p.nbytes for p in parts)
            dtype = parts[0].dtype if parts else module.down_proj.dtype
            need = shapes[role][0] * shapes[role][1] * dtype.itemsize
            if not parts or nbytes != need or any(p.dtype != dtype for p in parts):
                raise ShardError(f"expert {e} of {name}: its {role} tensor is missing or has "
                                 f"the wrong size ({nbytes} bytes, the model needs {need})")
        out[e] = {"gate_up": Part(shapes["gate_up"], dtype, gu),
                  "down": Part(shapes["down"], dtype, (have["down"],))}
    return out


# -- building the model -------------------------------------------------------------


def _experts_class(model_type: str, config) -> tuple[type, type]:
    """The transformers experts class of the causal LM built from ``config``, and the
    moekit mixin ``hf.apply`` gives it (a ``StackedExperts`` or a subclass)."""
    from transformers import AutoModelForCausalLM
    name, mixin = next((n, m) for n, m in ARCHITECTURES[model_type].items()
                       if issubclass(m, StackedExperts))
    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    return getattr(sys.modules[model_cls.__module__], name), mixin


def _under(prefix: str | None, rename: Callable[[str], str]) -> Callable[[str], str]:
    """``rename`` of the keys under ``prefix`` (the prefix dropped); other keys (a vision
    tower's) get a name no model key has."""
    if prefix is None:
        return rename
    return lambda key: rename(key[len(prefix):]) if key.startswith(prefix) else "\0" + key


def _gate(block: nn.Module) -> nn.Module:
    """The router module of an MoE block: ``gate``, or Llama 4's ``router``."""
    gate = getattr(block, "gate", None)
    return gate if isinstance(gate, nn.Module) else block.router


@contextmanager
def _meta_init(cls: type):
    """Construct ``cls`` modules on the meta device while the context is open."""
    had = "__init__" in cls.__dict__
    original = cls.__init__

    def init(self, *args, **kwargs):
        with torch.device("meta"):
            original(self, *args, **kwargs)

    cls.__init__ = init
    try:
        yield
    finally:
        if had:
            cls.__init__ = original
        else:
            del cls.__init__


def _no_init_weights():
    """transformers' own switch that skips weight initialisation: every weight is read
    next, so initialising them is time spent on values thrown away."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def _resident_locs(model: nn.Module, locs: dict[str, TensorLoc], rename, skip: set[str],
                   path: Path) -> dict[str, TensorLoc]:
    """Model key -> location for every non-expert tensor; tied copies may be absent."""
    by_name = {rename(k): loc for k, loc in locs.items()}
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if any(name.startswith(s + ".") for s in skip):
            continue
        names = aliases.get(id(t), [name])
        loc = next((by_name[n] for n in [name, *names] if n in by_name), None)
        if loc is None:
            raise ShardError(f"tensor {name} is missing from the checkpoint in {path}")
        if loc.shape != tuple(t.shape):
            raise ShardError(f"{loc.name} in {loc.file} has shape {loc.shape}, the model's "
                             f"{name} is {tuple(t.shape)}")
        out[name] = loc
    return out


def _next_gate_predictor(gate: nn.Module) -> Callable[[Tensor], Tensor]:
    """Layer l+1's top-k from layer l's expert input, without calling the gate module
    (transformers records router logits with hooks on it), by the gate's own selection
    rule: the correction bias and the group limit of DeepSeek-V3's router and its copies
    (NemotronH) included, so no expert outside a token's groups is fetched. The fp32
    copy of the gate's weight is made once (per change of the weight), not per step."""
    held: dict[str, object] = {}
    groups, topk_groups = getattr(gate, "num_group", 1) or 1, getattr(gate, "topk_group", 1)

    def predict(x_TD: Tensor) -> Tensor:
        w = gate.weight
        if held.get("src") is not w or held.get("version") != w._version:
            held.update(src=w, version=w._version, w32=w.detach().float())
        scores = F.linear(x_TD.float(), held["w32"])
        bias = getattr(gate, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3: sigmoid scores, biased choice
            scores = scores.sigmoid() + bias
        if groups > 1:  # groups scored by their two best (biased) scores, as the gate does
            scores = limit_groups(scores, groups, topk_groups, "top2_sum", ties="topk")
        return scores.topk(gate.top_k, dim=-1).indices
    return predict


def _codec(quantize: int | None, group_size: int | None, stored_nk: bool) -> Codec:
    """The cache's form of an expert: gate_up / down as read (as w_in / w_out views), or
    quantized on read. ``stored_nk``: the checkpoint stores [N, K] (not transposed)."""
    roles = {"w_in": ("gate_up", stored_nk), "w_out": ("down", stored_nk)}
    if quantize is None:
        if group_size is not None:
            raise ValueError(f"group_size={group_size} is not allowed without quantize=4")
        return Renamed(roles)
    if quantize not in (8, 4):
        raise ValueError(f"quantize={quantize!r} is not allowed: it must be None, 8 or 4")
    return Quantize(roles, quantize, check_bits(quantize, group_size))


def _check_arguments(path: Path, policy: str, prefetch: bool, backend: str,
                     threaded: bool) -> None:
    """What is used only once the shards are read (the cache, its thread, hf.apply):
    checked before anything is read, opened or started."""
    if not path.is_dir():
        reject("path", str(path), "it must be a directory holding a transformers checkpoint "
               "(config.json and its safetensors files)")
    check_options(policy, prefetch, backend, threaded)


def load_offloaded(path: str | Path, expert_memory: int | str, quantize: int | None = None,
                   policy: str = "lru", prefetch: bool = True, backend: str = "auto",
                   threaded: bool = True, group_size: int | None = None) -> nn.Module:
    """A transformers causal LM from ``path`` whose experts are read on demand.

    ``expert_memory``: the expert cache's byte budget (int or "2GiB"); the other
    weights are resident on top of it. ``quantize``: 8 or 4 quantizes each expert
    as it is read (``moekit.quantize``'s format; int4 groups of ``group_size``,
    default 64) and caches the quantized bytes; outputs equal those of
    ``moekit.quantize(resident, bits)``. ``policy``: "lru" or "lfu". Everything is
    checked (files, sizes, every tensor's presence and shape) before the first
    tensor is read. ``model.expert_offload`` has the cache, ``.stats`` and ``close()``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.integrations.hf import apply

    budget = parse_bytes(expert_memory)
    _codec(quantize, group_size, True)  # arguments checked before anything is read
    path = Path(path)
    _check_arguments(path, policy, prefetch, backend, threaded)
    config = AutoConfig.from_pretrained(path)
    model_type = config.model_type
    if model_type not in OFFLOADABLE:
        raise ValueError(f"model_type={model_type!r} is not supported for offloading: "
                         f"it must be one of {', '.join(OFFLOADABLE)}")
    if model_type in TEXT_ONLY:
        config = config.get_text_config()
    locs = shard_headers(path)
    dtype = next(loc.dtype for loc in locs.values() if loc.dtype.is_floating_point)
    cls, mixin = _experts_class(model_type, config)
    with _meta_init(cls), _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # transformers ties the embeddings inside init_weights, which _no_init_weights skips:
    # tie_word_embeddings=True left lm_head its own (never read) weight.
    model.tie_weights()
    modules = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
    rename = _under(TEXT_ONLY.get(model_type), renamer(model))
    parts = expert_parts(locs, rename, modules)
    resident = _resident_locs(model, locs, rename, set(modules), path)
    # Llama 4's experts class has no is_transposed: its layout is the mixin's
    first = next(iter(modules.values()))
    stored_nk = not getattr(first, "is_transposed", getattr(mixin, "is_transposed", False))
    store = ExpertStore({(i, e): p for i, name in enumerate(modules)
                         for e, p in parts[name].items()},
                        _codec(quantize, group_size, stored_nk))
    try:
        read_into_module(model, resident, store._fds)
        offload = _attach(model, modules, OFFLOADED[mixin], store, budget, policy, prefetch,
                          threaded, expert_memory)
        if quantize is not None:  # the rest as moekit.quantize's default scope does it
            quantize_dense(model, quantize, group_size)
    except BaseException:
        store.close()
        raise
    apply(model, backend)
    model.expert_offload = offload
    return model.eval()


def _attach(model: nn.Module, modules: dict[str, nn.Module], offloaded: type,
            store: ExpertStore, budget: int, policy: str, prefetch: bool, threaded: bool,
            given: int | str) -> ExpertOffload:
    """``given``: the budget as the caller wrote it, for the error when it is too small."""
    gates = [_gate(model.get_submodule(name.rsplit(".", 1)[0])) for name in modules]
    offload = ExpertOffload.within(store, budget, given, [g.top_k for g in gates],
                                   [_next_gate_predictor(g) for g in gates[1:]], policy,
                                   prefetch, threaded, len(modules))
    for i, m in enumerate(modules.values()):
        for name in list(m._parameters):  # meta placeholders: the cache holds the weights
            del m._parameters[name]
        m.__class__ = patched_class(type(m), offloaded)
        m._moekit_layer, m._moekit_offload = i, offload
        m._moekit_dtype = store.experts[(i, 0)]["down"].dtype
        m._moekit_quantized = isinstance(store.codec, Quantize)
        m._moekit_quant_format = None
        if m._moekit_quantized:  # (bits, group, D, F, no biases, activations); down: [D, F] (nk)
            stored, nk = store.codec.roles["w_out"]
            down = store.experts[(i, 0)][stored].shape
            D, F = down if nk else down[::-1]
            m._moekit_quant_format = (store.codec.bits, store.codec.group, D, F, False,
                                      "float")  # Quantize: weight-only
    return offload
