"""Training the MoE language model: data, loop, checkpoints, metrics."""

from moekit.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from moekit.train.data import Corpus, decode, encode, load_corpus, sample_windows
from moekit.train.monitor import CollapseMonitor, RouterCollapseWarning, read_metrics
from moekit.train.trainer import (
    NonFiniteError,
    StepResult,
    TrainConfig,
    Trainer,
    evaluate,
    lr_at,
    make_optimizer,
    train_step,
)

__all__ = [
    "Checkpoint", "CheckpointError", "CollapseMonitor", "Corpus", "NonFiniteError",
    "RouterCollapseWarning", "StepResult", "TrainConfig", "Trainer", "decode", "encode",
    "evaluate", "load_checkpoint", "load_corpus", "lr_at", "make_optimizer", "read_metrics",
    "restore", "sample_windows", "save_checkpoint", "train_step",
]
