"""One optimizer step and its schedule: the learning rate at a step (``lr_at``, warm-up +
cosine), the AdamW optimizer (``make_optimizer``), gradient accumulation over
micro-batches, the skip of a non-finite step (``finish_step``, ``train_step``) and the
validation loss (``evaluate``).

``train_step`` is a plain function of (model, optimizer, micro-batches, config, lr) so a
distributed wrapper can call it inside its own loop. Shape letters: B batch, L sequence,
E experts, N bytes of a corpus split.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.layer import update_all_biases
from moekit.train.data import sample_windows
from moekit.train.train_config import TrainConfig

VAL_SEED = 999_983  # validation windows are drawn from seeds VAL_SEED + i, fixed per run


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# the start of warn_short_schedule's message, for a filter that silences it (a sweep
# warns once, not once per run)
SHORT_SCHEDULE = r"warmup_steps=\d+ is longer than steps=\d+"


def warn_short_schedule(cfg: TrainConfig) -> None:
    """Warn when the warm-up outlasts the run: the learning rate never reaches cfg.lr.

    A warning, not an error: short runs with the default warm-up (the CI smoke,
    `--steps 20`) are legitimate. Called by the Trainer, not by TrainConfig, which is
    also built for resume, comparisons and tests."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # one line per run, not one per rank
    if cfg.warmup_steps > cfg.steps:
        peak = lr_at(cfg.steps - 1, cfg)  # the warm-up is still rising at the last step
        warnings.warn(
            f"warmup_steps={cfg.warmup_steps} is longer than steps={cfg.steps}: the "
            f"learning rate peaks at {peak:.3g} (lr={cfg.lr:g} x {cfg.steps}/"
            f"{cfg.warmup_steps}) on the last step, never reaching lr, and the cosine decay "
            f"never starts; set warmup_steps (--warmup) <= steps", stacklevel=3)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not norms, not 1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class StepResult(NamedTuple):
    loss: float  # mean LM loss over the micro-batches (nats)
    aux_loss: float
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient: no update was made
    load_LE: Tensor  # noqa: N815 - tokens per expert per MoE layer, summed over micro-batches
    tokens: int


def _reset_router_loads(model: nn.Module) -> None:
    for m in model.modules():
        load = getattr(getattr(m, "router", None), "load", None)
        if isinstance(load, Tensor):
            load.zero_()


def accumulate_gradients(forward: nn.Module, batches: list[tuple[Tensor, Tensor]],
                         cfg: TrainConfig) -> tuple[float, float, list[Tensor], int]:
    """Forward and backward over the micro-batches (gradient accumulation).

    Returns (mean LM loss, mean aux loss, per-micro-batch expert loads [L, E], tokens).
    """
    loss_sum = aux_sum = 0.0
    loads, tokens = [], 0
    for ids_BL, targets_BL in batches:
        with torch.autocast(ids_BL.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = forward(ids_BL, targets_BL)
        ((out.loss + out.aux_loss) / len(batches)).backward()
        loss_sum += float(out.loss.detach())
        aux_sum += float(out.aux_loss.detach())
        if out.stats:
            loads.append(torch.stack([s.tokens_per_expert for s in out.stats]))
        tokens += ids_BL.numel()
    return loss_sum / len(batches), aux_sum / len(batches), loads, tokens


def finish_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: float, aux: float,
                grad_norm: float, load_LE: Tensor, tokens: int) -> StepResult:
    """Step, then the aux-loss-free bias update; or skip it all when anything is not finite."""
    if not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        _reset_router_loads(model)  # the bad batch must not steer the balancing bias
        return StepResult(loss, aux, grad_norm, True, load_LE, tokens)
    optimizer.step()
    update_all_biases(model)
    return StepResult(loss, aux, grad_norm, False, load_LE, tokens)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[tuple[Tensor, Tensor]], cfg: TrainConfig, lr: float,
               forward: nn.Module | None = None) -> StepResult:
    """One optimizer step over ``batches`` (gradient accumulation), skipped when
    the loss or the gradient norm is not finite. ``forward`` may be a compiled
    wrapper of ``model``. The aux-loss-free bias update runs after the step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss, aux, loads, tokens = accumulate_gradients(
        model if forward is None else forward, batches, cfg)
    params = [p for p in model.parameters() if p.grad is not None]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    load_LE = torch.stack(loads).sum(0) if loads else torch.zeros(0, 0, dtype=torch.long)
    return finish_step(model, optimizer, loss, aux, grad_norm, load_LE, tokens)


def validation_micro_batches(data_N: Tensor, cfg: TrainConfig) -> list[tuple[Tensor, Tensor]]:
    """The fixed validation micro-batches, in order (CPU tensors): cfg.eval_batches batches
    of batch_size * grad_accum windows (as many as an optimizer step trains on), each cut
    into micro-batches of batch_size windows."""
    out: list[tuple[Tensor, Tensor]] = []
    for i in range(cfg.eval_batches):
        ids, tgt = sample_windows(data_N, cfg.batch_size * cfg.grad_accum, cfg.seq_len,
                                  VAL_SEED + i)
        out += zip(ids.split(cfg.batch_size), tgt.split(cfg.batch_size), strict=True)
    return out


def micro_batch_loss(model: nn.Module, ids_BL: Tensor, tgt_BL: Tensor, cfg: TrainConfig
                     ) -> float:
    """The mean LM loss over one micro-batch's B * L targets (no grad; the caller sets eval)."""
    with torch.no_grad(), torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16,
                                         enabled=cfg.bf16):
        return float(model(ids_BL.to(cfg.device), tgt_BL.to(cfg.device)).loss)


@torch.no_grad()
def evaluate(model: nn.Module, data_N: Tensor, cfg: TrainConfig) -> float:
    """Mean LM loss over the ``validation_micro_batches``, each run through the model on its
    own so validation holds no more activations than a training micro-batch.

    A batch had been batch_size windows: --grad-accum 2 --batch-size 4 validated on half
    the windows --batch-size 8 does, and the two runs reported different losses for the
    same model. Every micro-batch holds B * L targets, so the mean of their losses is the
    mean over the whole batch."""
    was_training = model.training
    model.eval()
    losses = [micro_batch_loss(model, ids_BL, tgt_BL, cfg)
              for ids_BL, tgt_BL in validation_micro_batches(data_N, cfg)]
    model.train(was_training)
    return sum(losses) / len(losses)
