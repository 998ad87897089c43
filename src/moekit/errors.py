"""Errors shared by layers that do not import each other (train and distributed)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, unsafe or does not fit the model."""
