"""The trainer's step, schedule and validation loss against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.models import LMConfig, MoETransformer
from moekit.train import CheckpointError, TrainConfig, Trainer, encode
from moekit.train.checkpoint_state import _check_load
from moekit.train.data import Corpus
from tests.reference import ref_val_loss

# aux_loss_coef=0: the load-balancing loss is a product of two batch means (expert
# shares times mean router probabilities), so a batch of 8 and the mean of two batches
# of 4 are different losses; the z-loss is a mean over tokens, which accumulation keeps
MODEL = LMConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=32, ffn_dim=16,
                 num_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=1e-3)
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


def make_corpus() -> Corpus:
    data = encode(TEXT * 40).to(torch.uint8)
    return Corpus(data[:2000], data[2000:], "inline", 1, 1)


def trainer(tmp_path, name: str, **kw) -> Trainer:
    cfg = TrainConfig(**{"steps": 4, "seq_len": 16, "lr": 1e-3, "warmup_steps": 0,
                         "seed": 5, **kw})
    return Trainer(MODEL, cfg, make_corpus(), tmp_path / name, progress=False)


def test_grad_accum_draws_the_windows_of_one_large_batch(tmp_path):
    whole = trainer(tmp_path, "a", batch_size=8).batches(3)
    parts = trainer(tmp_path, "b", batch_size=4, grad_accum=2).batches(3)
    assert len(whole) == 1 and len(parts) == 2
    for k in (0, 1):
        assert torch.equal(whole[0][k], torch.cat([p[k] for p in parts]))


def hand_step(ids_BL, tgt_BL, lr: float) -> dict[str, torch.Tensor]:
    """One AdamW step written out: seed, model, full-batch loss, clip at 1, decay on
    matrices only (the trainer's documented recipe)."""
    torch.manual_seed(5)
    model = MoETransformer(MODEL)
    out = model(ids_BL, tgt_BL)
    (out.loss + out.aux_loss).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    scale = min(1.0, 1.0 / (float(norm) + 1e-6))
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad * scale
            wd = 0.1 if p.dim() >= 2 else 0.0
            p.mul_(1 - lr * wd)
            m, v = 0.1 * g, 0.05 * g * g  # beta1 0.9, beta2 0.95, bias-corrected below
            p.sub_(lr * (m / 0.1) / ((v / 0.05).sqrt() + 1e-8))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accum_step_equals_a_hand_written_full_batch_step(tmp_path):
    t = trainer(tmp_path, "acc", batch_size=4, grad_accum=2)
    ids = torch.cat([b[0] for b in t.batches(0)])
    tgt = torch.cat([b[1] for b in t.batches(0)])
    t.step_once()
    want = hand_step(ids, tgt, lr=1e-3)
    # Adam's first step moves each weight by about lr * sign(grad); the gradients of
    # two half-batch means and one full mean differ by fp32 rounding (~1e-7 relative),
    # which moves an update by far less than 1e-3 of lr unless |grad| is near eps
    for name, got in t.model.state_dict().items():
        torch.testing.assert_close(got, want[name], atol=1e-6, rtol=0, msg=name)


def test_validation_loss_is_the_mean_cross_entropy_of_its_batches(tmp_path):
    t = trainer(tmp_path, "val", batch_size=3, eval_batches=2)
    t.step_once()  # weights away from the initialisation
    want = ref_val_loss(t.model, t.corpus.val, windows=3, seq_len=16, batches=2)
    assert math.isclose(t.validate(_NoLog()), want, rel_tol=1e-6)


def test_validation_under_grad_accum_sees_the_windows_of_the_whole_step(tmp_path):
    """--batch-size 4 --grad-accum 2 validates on the 8 windows --batch-size 8 does (it
    had validated on 4: batches of --batch-size windows), run 4 at a time."""
    t = trainer(tmp_path, "acc", batch_size=4, grad_accum=2, eval_batches=2)
    t.step_once()
    want = ref_val_loss(t.model, t.corpus.val, windows=8, seq_len=16, batches=2)
    assert math.isclose(t.validate(_NoLog()), want, rel_tol=1e-6)
    forwards = []
    hook = t.model.register_forward_pre_hook(lambda _, args: forwards.append(args[0].shape))
    t.validate(_NoLog())
    hook.remove()
    assert forwards == [(4, 16)] * 4  # micro-batches of --batch-size: its memory, not 2x


def test_accumulated_and_whole_batch_runs_report_the_same_validation_losses(tmp_path):
    """The runs train alike (aux_loss_coef=0, dropless), so every validation agrees to
    fp32 rounding (1e-7 relative here); before, step 0, the same model, already differed
    by 8e-4 (4 windows against 8)."""
    def vals(name: str, **kw) -> list[tuple[int, float]]:
        t = trainer(tmp_path, name, steps=4, eval_every=2, eval_batches=2, **kw)
        t.fit()
        return [(r["step"], r["val_loss"]) for r in t.history if r["kind"] == "val"]
    whole, parts = vals("whole", batch_size=8), vals("parts", batch_size=4, grad_accum=2)
    assert [s for s, _ in parts] == [s for s, _ in whole] == [0, 2, 4]
    for (step, got), (_, want) in zip(parts, whole, strict=True):
        assert math.isclose(got, want, rel_tol=1e-5), (step, got, want)


class _NoLog:
    def write(self, record) -> None:
        pass


def cosine_lr(i: int, steps: int, warmup: int, lr: float, end: float) -> float:
    """Written out from the README and lr_at's docstring: linear warm-up to lr over
    `warmup` steps (step i trains at lr * (i + 1) / warmup), then half a cosine from lr
    down to `end`, reached at step `steps` (one past the last trained index)."""
    if i < warmup:
        return lr * (i + 1) / warmup
    t = (i - warmup) / max(steps - warmup, 1)
    return end + (lr - end) * (1 + math.cos(math.pi * t)) / 2


def logged_lrs(tmp_path, name: str, **kw) -> list[float]:
    t = trainer(tmp_path, name, batch_size=2, log_every=1, eval_batches=1, **kw)
    t.fit()
    return [r["lr"] for r in t.history if r["kind"] == "train"]


def test_logged_lr_follows_the_documented_schedule(tmp_path):
    got = logged_lrs(tmp_path, "s", steps=7, warmup_steps=3, lr=2e-3)
    want = [cosine_lr(i, 7, 3, 2e-3, 2e-4) for i in range(7)]
    assert got == pytest.approx(want, rel=1e-12)
    assert len(got) == 7 and max(got) == 2e-3 and got[-1] > 2e-4


def test_logged_lr_short_runs(tmp_path):
    with pytest.warns(UserWarning, match="warmup_steps=5 is longer than steps=3"):
        got = logged_lrs(tmp_path, "w", steps=3, warmup_steps=5, lr=1e-3)
    assert got == pytest.approx([2e-4, 4e-4, 6e-4], rel=1e-12)  # never reaches lr
    assert logged_lrs(tmp_path, "one", steps=1, warmup_steps=0, lr=1e-3) == [1e-3]


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    def losses(name: str, seed: int) -> list[float]:
        t = trainer(tmp_path, name, batch_size=2, log_every=1, eval_batches=1, seed=seed,
                    steps=3)
        t.fit()
        return [r.get("loss", r.get("val_loss")) for r in t.history]
    first = losses("a", 5)
    assert losses("b", 5) == first
    assert losses("c", 6) != first


def test_resume_between_validations_reports_the_whole_span_of_expert_load(tmp_path):
    def val_at_6(t: Trainer) -> dict:
        return next(r for r in t.history if r["kind"] == "val" and r["step"] == 6)
    whole = trainer(tmp_path, "u", batch_size=2, steps=6, eval_every=6, save_every=3,
                    eval_batches=1)
    whole.fit()
    trainer(tmp_path, "r", batch_size=2, steps=6, eval_every=6, save_every=3,
            eval_batches=1).fit()
    again = Trainer.resume(tmp_path / "r" / "step_00000003", make_corpus(), progress=False)
    again.fit()
    assert val_at_6(again) == val_at_6(whole)  # expert_load over steps 1-6, not 4-6
    assert again.model.state_dict().keys() == whole.model.state_dict().keys()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name


def test_a_malformed_saved_expert_load_is_refused(tmp_path):
    _check_load(None, tmp_path)
    _check_load([[1, 2], [0, 3]], tmp_path)
    for bad in ([[1, 2], [3]], [[1, -2]], [[1.5]], [], "x"):
        with pytest.raises(CheckpointError, match="load_since_eval"):
            _check_load(bad, tmp_path)


def test_a_resumed_expert_load_adds_to_a_load_on_another_device(tmp_path):
    """restore_progress makes a CPU tensor; a step's load lives on the training device
    ('meta' stands in for CUDA here: CPU + meta fails alike, 'not on the expected device')."""
    t = trainer(tmp_path, "d", batch_size=2)
    t.restore_progress({"step": 3, "counters": {}, "load_since_eval": [[1, 2], [3, 4]]})
    t.add_load(torch.ones(2, 2, dtype=torch.long, device="meta"))
    assert t.load_since_eval.device.type == "meta" and t.load_since_eval.shape == (2, 2)
    t.restore_progress({"step": 3, "counters": {}, "load_since_eval": [[1, 2], [3, 4]]})
    t.add_load(torch.tensor([[1, 0], [0, 1]]))
    assert t.load_since_eval.tolist() == [[2, 2], [3, 5]]
