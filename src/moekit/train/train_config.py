"""The training run's configuration: ``TrainConfig`` (a frozen dataclass validated at
construction) and the device checks it and the trainer use (``check_device``,
``devices_here``, ``check_device_available``).

Shape letters: B batch (sequences per micro-batch), L sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.config import (
    MAX_SEED,
    FrozenConfig,
    check_bool,
    check_int_range,
    check_non_negative,
    check_number,
    reject,
)
from moekit.train.checkpoint_state import MAX_STEP

# Upper bounds that only an error reaches (AdamW's lr is ~1e-4..1e-2, weight decay ~0..0.1):
# --lr 1e39 was a RuntimeError traceback from inside AdamW's step (the float32 parameters
# cannot take the update), and weight_decay=1e300 turned the weights into NaN and saved them.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 100.0


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig(FrozenConfig):
    # defaults = `moekit train`: 1500 steps (3.1M tokens) of the "small" preset took
    # 5 min 03 s on the idle 2-core dev box (10.3k tokens/s), leaving room for slower machines
    steps: int = 1500
    batch_size: int = 16  # B, sequences per micro-batch
    seq_len: int = 128  # L
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 150
    eval_batches: int = 8  # each of batch_size * grad_accum windows (evaluate)
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    collapse_fraction: float = 0.9  # one expert above this share of tokens = collapse
    collapse_patience: int = 50  # ... for this many steps in a row
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                     "eval_batches", "save_every", "log_every", "max_bad_steps",
                     "collapse_patience", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                reject(name, v, "it must be a positive int")
        if self.steps > MAX_STEP:  # the save at step 10**8 had raised CheckpointError
            reject("steps", self.steps, f"it must be between 1 and {MAX_STEP:,} (checkpoints "
                   "are named step_NNNNNNNN)")
        if self.grad_accum > 64:
            reject("grad_accum", self.grad_accum, "it must be between 1 and 64")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            reject("warmup_steps", self.warmup_steps, "it must be an int >= 0")
        check_number("lr", self.lr, 0, MAX_LR)
        check_number("weight_decay", self.weight_decay, 0, MAX_WEIGHT_DECAY)
        check_non_negative("grad_clip", self.grad_clip)
        for name in ("min_lr_ratio", "collapse_fraction"):
            check_number(name, getattr(self, name), 0, 1)
        for name in ("beta1", "beta2"):  # AdamW refuses 1.0 (its bias correction divides by 0)
            check_number(name, getattr(self, name), 0, 1, high_open=True)
        check_int_range("seed", self.seed, 0, MAX_SEED)
        for name in ("bf16", "compile"):
            check_bool(name, getattr(self, name))
        check_device("device", self.device)


def check_device(name: str, value: object) -> None:
    """A device torch can parse and allocate on ("cpu", "cuda", "cuda:1", ...), not meta.

    Whether the device exists on this machine is checked when the trainer starts
    (a config saved on a GPU machine must still load on a CPU one).
    """
    try:
        device = torch.device(value) if isinstance(value, str) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type == "meta":
        reject(name, value, "it must be a torch device such as cpu, cuda or cuda:1 "
               "(meta holds no data to train)")



def devices_here() -> list[str]:
    """The device strings naming a device this machine has: cpu (index 0 or none), and
    cuda / mps with each index torch counts. Asks the driver nothing beyond the count."""
    here = ["cpu", "cpu:0"]
    if torch.cuda.is_available():
        here += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        here += ["mps", "mps:0"]
    return here


def check_device_available(device: str, name: str = "device") -> None:
    """Fail before anything is built (or a run directory made) when the device is not on
    this machine, naming the ones that are. torch ignores a CPU index, so ``cpu:3`` had
    trained on the CPU and recorded ``cpu:3`` in the checkpoint; a cuda index past the
    device count failed only once the model was moved."""
    check_device(name, device)
    kind = torch.device(device).type
    if kind in ("cpu", "cuda", "mps"):
        here = devices_here()
        if str(torch.device(device)) not in here:
            reject(name, device, f"no such device on this machine; it must be one of "
                   f"{', '.join(here)}")
        return
    try:  # another backend (xpu, hpu, ...): ask torch for a tensor there
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # CPU-only torch: AssertionError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reject(name, device, f"it is not available on this machine ({reason}); devices "
               f"here: {', '.join(devices_here())}")
