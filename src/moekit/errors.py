"""Errors shared by layers that do not import each other (train and distributed; quant
and offload)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, unsafe or does not fit the model."""


class NonFiniteScalesError(CheckpointError):
    """A quantized checkpoint whose scales or zero points hold NaN or inf: the model loads,
    then its logits are NaN. Resident tensors are checked at load, offloaded experts as
    the expert store first reads each one."""


def exit_code(e: BaseException) -> int:
    """The ``moekit`` exit status for an error a command reports in one line: 1 for a
    failure of what it read or wrote (a missing, corrupt or unfit checkpoint, a file that
    could not be read, a full disk: ``CheckpointError``, ``OSError``, ``KeyError`` of a
    tensor a file lacks), 2 for a bad argument (any other ``ValueError``, an input file a
    flag names that does not exist among them: the code argparse gives its own usage
    errors). Ctrl-C is 130, SIGTERM 143 (``moekit.cli.interrupted``)."""
    return 1 if isinstance(e, CheckpointError | OSError | KeyError) else 2
