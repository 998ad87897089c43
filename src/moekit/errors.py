"""Errors shared by layers that do not import each other (train and distributed; quant
and offload)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, unsafe or does not fit the model."""


class NonFiniteScalesError(CheckpointError):
    """A quantized checkpoint whose scales or zero points hold NaN or inf: the model loads,
    then its logits are NaN. Resident tensors are checked at load, offloaded experts as
    the expert store first reads each one."""
