"""What the expert cache holds per expert, and what the compute gets from it.

- ``Renamed``: the tensors as read, handed over under the compute's names, as
  transposed views where the checkpoint stores [N, K] (transformers' experts).
- ``Quantized``: experts already int8 / int4 in the checkpoint (``moekit quantize``):
  data, scales and zeros read as they are, wrapped as one-expert QuantizedTensors;
  W4A8 ones put in the 16-output order as read where the resident model takes it
  (``layouts``; files hold NK).
- ``Quantize``: float experts quantized as they are read (``quantize=8|4``); only the
  quantized bytes are cached (the float read goes to a per-thread buffer).

Quantizing one expert gives the bytes quantizing the whole stack gives (scales
are per output channel or per group of one expert's inputs), so an offloaded
quantized model computes what ``moekit.quantize`` on the resident model computes.

Shape letters: K input width, N output width of one projection, g group size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.offload.store import Codec, Layout, Part
from moekit.quant.layout import to_o16
from moekit.quant.tensor import QuantizedTensor, check_divides, quantize_tensor


def _wrap(cached: dict[str, Tensor], role: str, bits: int, group: int | None,
          activations: str = "float", layout: str = "nk") -> QuantizedTensor:
    z = cached.get(f"{role}.zeros")
    return QuantizedTensor(cached[f"{role}.data"][None], cached[f"{role}.scales"][None],
                           None if z is None else z[None], bits, group, activations, layout)


class Renamed(Codec):
    """``names``: compute name -> (stored name, transposed?); other tensors pass as they are."""

    def __init__(self, names: dict[str, tuple[str, bool]]) -> None:
        self.names = names

    def wrap(self, cached: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {k: v for k, v in cached.items()
               if k not in {stored for stored, _ in self.names.values()}}
        for name, (stored, transposed) in self.names.items():
            out[name] = cached[stored].t() if transposed else cached[stored]
        return out


class Quantized(Codec):
    """Parts ``<role>.data`` / ``.scales`` / ``.zeros`` per role (``w_in``, ``w_out``)."""

    def __init__(self, roles: tuple[str, ...], bits: int, group: int | None,
                 activations: str = "float", layouts: dict[str, str] | None = None) -> None:
        self.roles, self.bits, self.group = roles, bits, group
        self.activations = activations  # a moekit quantized directory's (quantized.json)
        self.finite = tuple(f"{r}.{p}" for r in roles for p in ("scales", "zeros"))
        # role -> the order the cache holds (the resident model's, set_expert_layout's
        # "auto"): kernels of another order gave an offloaded W4A8 model other logits
        self.layouts = {r: (layouts or {}).get(r, "nk") for r in roles}

    def reads_into_cache(self) -> bool:
        return all(v == "nk" for v in self.layouts.values())

    def encode(self, raw: dict[str, Tensor], out: dict[str, Tensor]) -> None:
        for name, t in raw.items():
            role, _, part = name.partition(".")
            o16 = self.layouts.get(role) == "o16" and part in ("data", "scales", "zeros")
            if o16:  # permuted straight into the slot: no temporary per part
                to_o16(t[None], out=out[name][None])
            else:
                out[name].copy_(t)

    def wrap(self, cached: dict[str, Tensor]) -> dict:
        out = {k: v for k, v in cached.items() if k.split(".")[0] not in self.roles}
        out.update({r: _wrap(cached, r, self.bits, self.group, self.activations,
                             self.layouts[r]) for r in self.roles})
        return out


class Quantize(Codec):
    """``roles``: compute name -> (stored float part, stored as [N, K]?), quantized on read."""

    def __init__(self, roles: dict[str, tuple[str, bool]], bits: int, group: int | None
                 ) -> None:
        self.roles, self.bits, self.group = roles, bits, group

    def layout(self, parts: dict[str, Part]) -> Layout:
        specs = {}
        for role, (stored, nk) in self.roles.items():
            N, K = parts[stored].shape if nk else parts[stored].shape[::-1]
            check_divides(self.group, K, f"the input dimension of {role}")
            if self.bits == 8:
                specs[f"{role}.data"] = ((N, K), torch.int8)
                specs[f"{role}.scales"] = ((N,), torch.float32)
            else:
                specs[f"{role}.data"] = ((N, K // 2), torch.uint8)
                specs[f"{role}.scales"] = ((N, K // self.group), torch.float32)
                specs[f"{role}.zeros"] = ((N, K // self.group), torch.float32)
        return Layout.of(specs)

    def reads_into_cache(self) -> bool:
        return False

    def encode(self, raw: dict[str, Tensor], out: dict[str, Tensor]) -> None:
        for role, (stored, nk) in self.roles.items():
            w_KN = raw[stored].t() if nk else raw[stored]
            q = quantize_tensor(w_KN[None], self.bits, self.group)
            for name in ("data", "scales", "zeros"):
                t = getattr(q, name)
                if t is not None:
                    out[f"{role}.{name}"].copy_(t[0])

    def wrap(self, cached: dict[str, Tensor]) -> dict:
        return {r: _wrap(cached, r, self.bits, self.group) for r in self.roles}
