"""Weight-only quantized expert stacks: int8 per output channel, int4 per group.

A ``QuantizedTensor`` stands where an expert weight stood. Its logical shape is
the weight's, [E, K, N] (input K, output N: ``w_in`` [E, D, G], ``w_out``
[E, F, D]); it stores each expert's matrix output-major, [E, N, K], so one
output's inputs are contiguous (the decode kernel's dot products read them in
order) and groups run along K.

- int8: symmetric per output channel, ``w = scale * q``, q in -127..127,
  ``scales`` [E, N] fp32. Per channel, not per group: a 1024-wide row costs 4
  bytes of scale, and int8's 255 levels leave little to gain from groups.
- int4: affine per group of g = 32, 64 or 128 inputs, ``w = scale * q + zero``,
  q in 0..15, ``scales`` and ``zeros`` [E, N, K/g] fp32. Affine rather than
  symmetric: a group of 32-128 weights is rarely centred on 0, and min/max
  scaling uses all 16 levels where absmax wastes up to half of them on the
  empty side; the zero point costs the kernel one multiply-add per group
  (``zero * sum(x over the group)``), not one per weight. Packing: within
  each block of 32 inputs, byte j holds input j (low nibble) and j + 16 (high).
  Scales and zeros stay fp32 (25% on top of the int4 bytes at g=64, 12.5% at
  g=128), exact under ``model.to(bfloat16)`` and friends (see ``_apply``).

Layouts. The above is ``layout="nk"``, the form every file and ``state_dict``
holds; int4 weights with int8 activations may live in memory in ``layout="o16"``
instead (``quant/layout.py``). ``set_layout`` converts; ``parts_nk`` gives the NK
parts of either.

Shape letters: E experts, K input width, N output width, g group size.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from moekit.config import check_positive_int
from moekit.quant.layout import RAW_STATE, from_o16, o16_allowed, to_o16

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)


class QuantizationError(ValueError):
    """A quantization request or quantized checkpoint that cannot be honoured."""


def check_bits(bits: int, group_size: int | None) -> int | None:
    """The group size to use (None for int8); a QuantizationError for anything else."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise QuantizationError(f"bits={bits!r} is not allowed: it must be 8 (per output "
                                "channel) or 4 (grouped)")
    if bits == 8:
        if group_size is not None:
            raise QuantizationError(f"group_size={group_size} is not allowed with bits=8: int8 "
                                    "scales are per output channel; leave group_size=None")
        return None
    group_size = 64 if group_size is None else group_size
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
            or group_size not in GROUP_SIZES):  # 64.0 == 64, but not a size to unflatten by
        raise QuantizationError(f"group_size={group_size!r} is not allowed: it must be one of "
                                f"{', '.join(map(str, GROUP_SIZES))}")
    return group_size


ACTIVATIONS = ("float", "int8")


def check_activations(activations: str) -> str:
    """``activations`` if allowed (with either bits); a QuantizationError naming it otherwise."""
    if activations not in ACTIVATIONS:
        raise QuantizationError(f"activations={activations!r} is not allowed: it must be "
                                "'float' (weight-only) or 'int8'")
    return activations


def check_float_dtype(name: str, dtype: object) -> None:
    """A floating torch.dtype (what dequantized weights may be); a QuantizationError naming
    ``name`` otherwise (a string was taken for a device by ``.to``; an integer dtype
    truncated the weights)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise QuantizationError(f"{name}={dtype!r} is not allowed: it must be a floating "
                                "torch.dtype (torch.float32, torch.bfloat16, torch.float16, "
                                "...)")


def check_divides(group_size: int | None, K: int, what: str) -> None:
    if group_size is not None and K % group_size:
        raise QuantizationError(f"group_size={group_size} does not divide {what}={K}: int4 "
                                "groups run along the input dimension and must tile it")


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'}"
    return repr(t)


def _check_format(bits: int, group_size: int | None, activations: str) -> None:
    """bits, group_size (given: no default) and activations of an existing QuantizedTensor."""
    if bits == 4 and group_size is None:  # check_bits' default is for quantize's callers
        raise QuantizationError(f"group_size=None is not allowed with bits=4: it must be one "
                                f"of {', '.join(map(str, GROUP_SIZES))}")
    check_bits(bits, group_size)
    check_activations(activations)


LAYOUTS = ("nk", "o16")


def check_layout(layout: object, bits: int, activations: str, N: int, device: torch.device
                 ) -> str:
    """``layout`` where a QuantizedTensor of this format may take it; a QuantizationError
    naming it otherwise."""
    if layout not in LAYOUTS:
        raise QuantizationError(f"layout={layout!r} is not allowed: it must be one of "
                                f"{', '.join(map(repr, LAYOUTS))}")
    if layout == "o16" and not o16_allowed(bits, activations, N, device):
        raise QuantizationError(f"layout='o16' is not allowed with bits={bits}, activations="
                                f"{activations!r}, N={N} on {device}: it is for int4 weights "
                                "with int8 activations, N a multiple of 16, on the CPU")
    return layout


def check_parts(data: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                group_size: int | None, activations: str) -> None:
    """A QuantizedTensor's parts, consistent with each other and with the format the
    kernels read (checked once, at construction: a hand-made one that passed here and then
    met a kernel's own check failed deep in a forward, or not at all on the torch path)."""
    _check_format(bits, group_size, activations)
    want = torch.int8 if bits == 8 else torch.uint8
    if not (isinstance(data, Tensor) and data.dim() == 3 and data.dtype == want
            and data.is_contiguous()):
        raise QuantizationError(f"data={_describe(data)} is not allowed: with bits={bits} it "
                                f"must be a contiguous {want} tensor [E, N, "
                                f"{'K' if bits == 8 else 'K/2'}]")
    E, N, K = data.shape[0], data.shape[1], data.shape[2] * (2 if bits == 4 else 1)
    check_divides(group_size, K, "K")
    shape = (E, N) if bits == 8 else (E, N, K // group_size)
    dims = "[E, N]" if bits == 8 else f"[E, N, K/{group_size}]"
    for name, t in (("scales", scales), ("zeros", zeros)):
        if name == "zeros" and bits == 8:
            if zeros is not None:
                raise QuantizationError(f"zeros={_describe(zeros)} is not allowed with "
                                        "bits=8: int8 is symmetric; it must be None")
            continue
        if not (isinstance(t, Tensor) and t.dtype == torch.float32 and t.is_contiguous()
                and tuple(t.shape) == shape and t.device == data.device):
            raise QuantizationError(
                f"{name}={_describe(t)} is not allowed: with bits={bits} and data of shape "
                f"{tuple(data.shape)} it must be a contiguous float32 tensor {dims} = "
                f"{list(shape)} on data's device ({data.device})")


class QuantizedTensor(nn.Module):
    """A quantized [E, K, N] weight stack (an nn.Module so its buffers are in state_dict).

    ``data``: int8 [E, N, K] (bits=8) or uint8 [E, N, K/2] (bits=4); ``scales``
    fp32 [E, N] or [E, N, K/g]; ``zeros`` fp32 [E, N, K/g] (bits=4 only); all three in
    ``layout`` order ("nk", or "o16": see the module's docstring).
    """

    def __init__(self, data: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                 group_size: int | None, activations: str = "float",
                 layout: str = "nk") -> None:
        check_parts(data, scales, zeros, bits, group_size, activations)
        check_layout(layout, bits, activations, data.shape[1], data.device)
        super().__init__()
        self.bits, self.group_size = bits, group_size
        # "int8": the decode kernels round the activations to int8 (see
        # moekit.quantize); "float": weight-only
        self.activations = activations
        self.layout = layout
        self.register_buffer("data", data)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def parts_nk(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(data, scales, zeros) in NK order: the buffers themselves, or converted copies of
        an o16 tensor's."""
        if self.layout == "nk":
            return self.data, self.scales, self.zeros
        return from_o16(self.data), from_o16(self.scales), from_o16(self.zeros)

    def set_layout(self, layout: str) -> QuantizedTensor:
        """Hold the buffers in ``layout`` order (new tensors where it changes; one buffer's
        copy at a time). Not while another thread runs a forward on this tensor. For routed
        expert stacks (``quant.model.set_expert_layout``): ``QuantizedLinear``'s prefill
        GEMM and ``QuantizedEmbedding``'s row lookup read NK only."""
        check_layout(layout, self.bits, self.activations, self.data.shape[1], self.device)
        if layout != self.layout:
            convert = to_o16 if layout == "o16" else from_o16
            for name in ("data", "scales", "zeros"):
                setattr(self, name, convert(getattr(self, name)))
            self.layout = layout
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # files and state_dicts hold NK whatever the layout in memory (a copy per buffer
        # of an o16 tensor; not inside raw_state_dicts(): a streamed save converts them)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "nk" and not RAW_STATE.get():
            for name, part in zip(("data", "scales", "zeros"), self.parts_nk(), strict=True):
                destination[prefix + name] = part

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an NK state_dict into o16 buffers: each part of the buffer's shape converted to
        # its dtype as the default's copy_ converts it, then permuted (a part in another
        # dtype, bf16 scales, went in unpermuted); other shapes are left for its own error
        if self.layout != "nk":
            for name in ("data", "scales", "zeros"):
                got, mine = state_dict.get(prefix + name), getattr(self, name)
                if isinstance(got, Tensor) and got.shape == mine.shape:
                    state_dict[prefix + name] = to_o16(got.to(mine.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state):
        state.setdefault("layout", "nk")  # pickled before layouts existed
        super().__setstate__(state)

    @classmethod
    def empty(cls, E: int, K: int, N: int, bits: int, group_size: int | None,
              device: torch.device | str = "cpu", activations: str = "float"
              ) -> QuantizedTensor:
        """Buffers of the right shapes and dtypes, for loading a checkpoint into."""
        # checked before allocating: bits=3 built an int4 tensor, group_size=None failed
        # in K // None, and an odd K was reported as the even K - 1
        _check_format(bits, group_size, activations)
        for name, n in (("E", E), ("K", K), ("N", N)):
            try:
                check_positive_int(name, n)
            except ValueError as e:
                raise QuantizationError(str(e)) from None
        check_divides(group_size, K, "K")
        if bits == 8:
            return cls(torch.zeros(E, N, K, dtype=torch.int8, device=device),
                       torch.ones(E, N, device=device), None, 8, None, activations)
        ng = K // group_size
        return cls(torch.zeros(E, N, K // 2, dtype=torch.uint8, device=device),
                   torch.ones(E, N, ng, device=device), torch.zeros(E, N, ng, device=device),
                   4, group_size, activations)

    @property
    def shape(self) -> torch.Size:
        E, N = self.data.shape[:2]
        K = self.data.shape[2] * (2 if self.bits == 4 else 1)
        return torch.Size((E, K, N))

    @property
    def dtype(self) -> torch.dtype:
        """What it dequantizes to by default."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes_per_expert(self) -> int:
        """Bytes one expert's matrix occupies (data, scales, zeros): what decode reads."""
        bufs = [b for b in (self.data, self.scales, self.zeros) if b is not None]
        return sum(b.numel() * b.element_size() for b in bufs) // self.data.shape[0]

    def extra_repr(self) -> str:
        g = "" if self.group_size is None else f", group_size={self.group_size}"
        a = ", activations=int8" if self.activations == "int8" else ""
        lay = "" if self.layout == "nk" else f", layout={self.layout}"
        return f"shape={tuple(self.shape)}, bits={self.bits}{g}{a}{lay}"

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() must not round the scales (nor touch the integers):
        # only a move to another device applies; o16 is a CPU kernel's order, so a move
        # off the CPU takes NK (the GPU kernels read that)
        if self.layout != "nk" and fn(self.data.new_empty(0)).device.type != "cpu":
            moved = {name: fn(part) for name, part in zip(
                ("data", "scales", "zeros"), self.parts_nk(), strict=True)}
            self.layout = "nk"
        else:
            moved = {name: fn(b) for name, b in self._buffers.items() if b is not None}
        for name, m in moved.items():
            b = self._buffers[name]
            self._buffers[name] = m if m.dtype == b.dtype else b.to(m.device)
        return self

    def select(self, experts: Tensor | list[int]) -> QuantizedTensor:
        """A QuantizedTensor of the given experts only (in that order)."""
        ids = _expert_ids(experts)
        E = self.data.shape[0]
        if ids is None or ids.dim() != 1 or (ids.numel() and not
                                             0 <= int(ids.min()) <= int(ids.max()) < E):
            raise QuantizationError(f"experts={experts!r} is not allowed: it must list expert "
                                    f"ids in [0, {E - 1}]")
        idx = ids.to(self.data.device)
        z = None if self.zeros is None else self.zeros.index_select(0, idx)
        return QuantizedTensor(self.data.index_select(0, idx), self.scales.index_select(0, idx),
                               z, self.bits, self.group_size, self.activations, self.layout)

    def dequantize(self, e0: int = 0, e1: int | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
        """Experts e0..e1-1 as a float [e1 - e0, K, N] tensor (a transposed view of [., N, K])."""
        e1 = self.data.shape[0] if e1 is None else e1
        return dequantize_NK(self, e0, e1, dtype=dtype).transpose(1, 2)


def _expert_ids(experts: object) -> Tensor | None:
    """``experts`` as int64 ids on the CPU; None when they are not integers (as_tensor with
    dtype=long truncated 0.7 to expert 0 and read a bool mask as the ids 1 and 0)."""
    if isinstance(experts, Tensor):
        ids = experts
    else:
        try:
            ids = torch.as_tensor(experts)
        except (TypeError, ValueError, RuntimeError):
            return None
        if ids.numel() == 0:  # [] is float32 to as_tensor: no experts
            return ids.to(torch.long)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        return None
    return ids.to("cpu", torch.long)


def unpack_int4(data: Tensor) -> Tensor:
    """uint8 [..., K/2] -> q in 0..15 as uint8 [..., K] (inverse of ``pack_int4``).

    Checks shape and dtype only (no pass over the values): the torch dequantize path
    calls it on every call."""
    if not (isinstance(data, Tensor) and data.dtype == torch.uint8 and data.dim() >= 1
            and data.shape[-1] % 16 == 0):  # an int8 byte's >> 4 kept its sign
        raise QuantizationError(f"data={_describe(data)} is not allowed: it must be a uint8 "
                                "tensor [..., K/2] of packed int4 values, its last dimension "
                                "a multiple of 16 (32 inputs per 16 bytes)")
    b = data.unflatten(-1, (-1, 16))                    # [..., K/32, 16]
    q = torch.cat([b & 15, b >> 4], dim=-1)              # [..., K/32, 32]
    return q.flatten(-2)


def pack_int4(q: Tensor) -> Tensor:
    """q in 0..15 [..., K] (an integer tensor, K a multiple of 32) -> uint8 [..., K/2].

    Checks the values too (one pass over q; called when quantizing, not per step): 16
    spilled into the neighbouring nibble (input j + 16) and -1 set both."""
    if not (isinstance(q, Tensor) and q.dim() >= 1 and q.shape[-1] % 32 == 0
            and q.dtype != torch.bool and not q.is_floating_point() and not q.is_complex()):
        raise QuantizationError(f"q={_describe(q)} is not allowed: it must be an integer "
                                "tensor [..., K] with values in 0..15, K a multiple of 32 "
                                "(each block of 32 inputs packs into 16 bytes)")
    if q.numel():
        lo, hi = (int(v) for v in torch.aminmax(q))
        if lo < 0 or hi > 15:
            raise QuantizationError(f"q with values in [{lo}, {hi}] is not allowed: int4 "
                                    "values must be in 0..15")
    b = q.to(torch.uint8).unflatten(-1, (-1, 32))
    return (b[..., :16] | (b[..., 16:] << 4)).flatten(-2)


def _dequantize_torch(qt: QuantizedTensor, e0: int, e1: int) -> Tensor:
    if qt.layout == "nk":
        return _dequantize_torch_parts(qt.data, qt.scales, qt.zeros, qt.bits, qt.group_size,
                                       e0, e1)
    e1 = qt.data.shape[0] if e1 is None else e1
    return _dequantize_torch_parts(*_nk_range(qt, e0, e1), qt.bits, qt.group_size, 0, e1 - e0)


def _nk_range(qt: QuantizedTensor, e0: int, e1: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Experts e0..e1-1's parts in NK order (views of an NK tensor's; an o16 tensor's
    experts converted, not the whole stack)."""
    parts = (qt.data[e0:e1], qt.scales[e0:e1], None if qt.zeros is None else qt.zeros[e0:e1])
    if qt.layout == "nk":
        return parts
    return tuple(from_o16(p) for p in parts)


def _dequantize_torch_parts(data: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                            group_size: int | None, e0: int, e1: int) -> Tensor:
    if bits == 8:
        return data[e0:e1].float() * scales[e0:e1, :, None]
    q = unpack_int4(data[e0:e1]).float().unflatten(-1, (-1, group_size))
    w = q * scales[e0:e1, :, :, None] + zeros[e0:e1, :, :, None]
    return w.flatten(-2)


def dequantize_NK(qt: QuantizedTensor, e0: int, e1: int, out: Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """[e1 - e0, N, K] in ``dtype``, or into ``out`` (contiguous float32 or bfloat16 of
    that shape): the C++ kernel where built (CPU), else torch ops (same values). Other
    dtypes are the float32 values rounded as ``.to(dtype)`` rounds them; bfloat16 is
    rounded in the kernel, with no float32 copy written and read again (NaN: a quiet NaN,
    its payload not necessarily torch's)."""
    if qt.layout == "nk":
        return dequantize_parts(qt.data, qt.scales, qt.zeros, qt.bits, qt.group_size, e0, e1,
                                out, dtype)
    e0, e1 = _check_range(e0, e1, qt.data.shape[0])
    return dequantize_parts(*_nk_range(qt, e0, e1), qt.bits, qt.group_size, 0, e1 - e0, out,
                            dtype)


def dequantize_parts(data: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                     group_size: int | None, e0: int, e1: int, out: Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``dequantize_NK`` of a QuantizedTensor's parts, taken as they are (a caller that
    cut them from a checked QuantizedTensor: ``QuantizedEmbedding``'s rows, without
    building a module per lookup)."""
    from moekit.functions import cpu_ext  # a lower layer; imported late to stay cheap

    if not (type(e0) is int and type(e1) is int and 0 <= e0 <= e1 <= data.shape[0]):
        e0, e1 = _check_range(e0, e1, data.shape[0])  # (the check above costs ~0.1 us)
    if out is None and dtype is not torch.float32 and dtype is not torch.bfloat16:
        check_float_dtype("dtype", dtype)  # (decode passes out or float32: no cost there)
    ext = cpu_ext.get_decode() if data.device.type == "cpu" else None
    N, K = data.shape[1], data.shape[2] * (2 if bits == 4 else 1)
    if ext is None:
        if out is not None:  # as the kernel checks it (copy_ would broadcast one expert)
            _check_out(out, (e1 - e0, N, K))
        w = _dequantize_torch_parts(data, scales, zeros, bits, group_size, e0, e1)
        return w.to(dtype) if out is None else out.copy_(w)
    if out is None and dtype not in (torch.float32, torch.bfloat16):
        return ext.dequantize(data, scales, zeros, bits, group_size or 0, e0, e1, None).to(dtype)
    if out is None and dtype == torch.bfloat16:
        out = torch.empty(e1 - e0, N, K, dtype=dtype)
    # the kernel checks a given out: float32 or bfloat16, contiguous, [e1 - e0, N, K]
    return ext.dequantize(data, scales, zeros, bits, group_size or 0, e0, e1, out)


def _check_range(e0: object, e1: object, E: int) -> tuple[int, int]:
    """(e0, e1) as ints when 0 <= e0 <= e1 <= E; a QuantizationError naming them otherwise
    (the kernel's "experts 5..2 out of range" named neither; torch's slicing returned an
    empty or wrong block of experts)."""
    try:
        if isinstance(e0, bool) or isinstance(e1, bool):
            raise TypeError
        i0, i1 = operator.index(e0), operator.index(e1)
    except TypeError:
        i0, i1 = -1, -1
    if not 0 <= i0 <= i1 <= E:
        raise QuantizationError(f"e0={e0!r}, e1={e1!r} is not allowed: the experts e0..e1-1 "
                                f"must be ints with 0 <= e0 <= e1 <= {E} (the tensor's "
                                "experts)")
    return i0, i1


def _check_out(out: Tensor, shape: tuple[int, int, int]) -> None:
    if not (isinstance(out, Tensor) and out.dtype in (torch.float32, torch.bfloat16)
            and out.is_contiguous() and tuple(out.shape) == shape):
        raise QuantizationError(f"out={_describe(out)} is not allowed: it must be a contiguous "
                                f"float32 or bfloat16 tensor of shape {list(shape)} "
                                "([e1 - e0, N, K])")


def quantize_tensor(w_EKN: Tensor, bits: int, group_size: int | None = None,
                    activations: str = "float") -> QuantizedTensor:
    """Quantize a [E, K, N] weight stack (any strides); errors name what is not allowed."""
    group_size = check_bits(bits, group_size)
    check_activations(activations)
    if not (isinstance(w_EKN, Tensor) and w_EKN.dim() == 3 and w_EKN.is_floating_point()
            and w_EKN.shape[1] > 0):  # K = 0: amax's "Expected reduction dim -1" (int8)
        what = (f"weight of shape {tuple(w_EKN.shape)} and dtype {w_EKN.dtype}"
                if isinstance(w_EKN, Tensor) else f"weight={type(w_EKN).__name__}")
        raise QuantizationError(f"{what} is not allowed: it must be a floating [E, K, N] "
                                "tensor stack with K >= 1")
    check_divides(group_size, w_EKN.shape[1], "K")
    E, K, N = w_EKN.shape
    dev = w_EKN.device
    if bits == 8:
        parts = [torch.empty(E, N, K, dtype=torch.int8, device=dev),
                 torch.empty(E, N, device=dev)]
    else:
        parts = [torch.empty(E, N, K // 2, dtype=torch.uint8, device=dev),
                 *(torch.empty(E, N, K // group_size, device=dev) for _ in range(2))]
    # pieces of at most QUANT_PIECE elements (whole experts, or rows of one): the fp32
    # temporaries of a piece, not of the stack (a 128-expert layer of Qwen3-30B-A3B is 1.6
    # GB in fp32, its quantization took ~5 such copies); each value is computed as for the
    # whole stack (per-row, per-group reductions along K)
    experts = max(1, QUANT_PIECE // max(N * K, 1))
    rows = N if experts > 1 else max(1, QUANT_PIECE // K)
    for e0 in range(0, E, experts):
        for n0 in range(0, N, rows):
            e, n = slice(e0, e0 + experts), slice(n0, n0 + rows)
            w_ENK = w_EKN[e, :, n].detach().transpose(1, 2).float()
            for out, value in zip(parts, _quantized_piece(w_ENK, bits, group_size),
                                  strict=True):
                out[e, n] = value
    return QuantizedTensor(*parts, None, 8, None, activations) if bits == 8 else \
        QuantizedTensor(*parts, 4, group_size, activations)


QUANT_PIECE = 1 << 24  # elements quantized at once (64 MiB in fp32)


def _quantized_piece(w_ENK: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, ...]:
    """(data, scales[, zeros]) of an fp32 [E, N, K] piece, as QuantizedTensor holds them."""
    if bits == 8:
        scale_EN = (w_ENK.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w_ENK / scale_EN[..., None]).clamp_(-127, 127).to(torch.int8)
        return q, scale_EN
    g = w_ENK.unflatten(-1, (-1, group_size))                # [E, N, K/g, g]
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0
    q = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, 15).flatten(-2)
    q = q.to(torch.uint8)  # exact: rounded and clamped to 0..15
    return pack_int4(q), scale, lo
