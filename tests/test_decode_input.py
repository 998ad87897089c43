"""Bad input to moekit.inference.decode_experts / sorted_rows and the bias-update
helpers: a ValueError naming the argument, its value and what is allowed, before any
work. Before these checks a routing table one row
short left the last token's output at 0, combine weights of another shape were paired
with the wrong experts, integer activations came back truncated, and the rest were
RuntimeErrors from the C++ kernels or torch."""

from __future__ import annotations

import re

import pytest
import torch

import moekit
from moekit.inference import decode_experts, sorted_rows
from moekit.quant.tensor import quantize_tensor

T, D, E, F = 3, 64, 4, 32


def args(**change):
    torch.manual_seed(0)
    a = dict(x_TD=torch.randn(T, D), experts_TK=torch.tensor([[0, 1], [1, 2], [3, 0]]),
             weights_TK=torch.rand(T, 2), w_in=torch.randn(E, D, 2 * F),
             w_out=torch.randn(E, F, D), b_in=None, b_out=None)
    a.update(change)
    return a


@pytest.mark.parametrize(("change", "words"), [
    (dict(x_TD=torch.randn(1, T, D)), "x_TD='(1, 3, 64) torch.float32' is not allowed: it must "
                                      "be a floating-point [T, D] tensor"),
    (dict(x_TD=torch.ones(T, D, dtype=torch.long)), "x_TD='(3, 64) torch.int64' is not allowed"),
    (dict(x_TD=torch.randn(T, D + 16)), "w_in.shape=(4, 64, 64) is not allowed: it must be "
                                        "[E, D, G] with D = x_TD.shape[1] = 80"),
    (dict(experts_TK=torch.tensor([[0, 1], [1, 2]]), weights_TK=torch.rand(2, 2)),
     "experts_TK.shape=(2, 2) is not allowed: it must be [T, K] with T = x_TD.shape[0] = 3"),
    (dict(experts_TK=torch.tensor([0, 1, 2])), "experts_TK.shape=(3,) is not allowed"),
    (dict(experts_TK=torch.tensor([[0, 1], [1, 2], [3, 0]]).float()),
     "experts_TK.dtype=torch.float32 is not allowed: it must be an integer dtype"),
    (dict(experts_TK=torch.tensor([[0, 9], [1, 2], [3, 0]])),
     "experts_TK has values in [0, 9], which is not allowed: they must lie in "
     "[0, num_experts (w_in.shape[0])=4)"),
    (dict(experts_TK=torch.tensor([[0, -1], [1, 2], [3, 0]])), "experts_TK has values in [-1, 3]"),
    (dict(weights_TK=torch.rand(T, 3)), "weights_TK='(3, 3) torch.float32' is not allowed: it "
                                        "must be a floating-point tensor of experts_TK's shape"),
    (dict(weights_TK=torch.ones(T, 2, dtype=torch.long)), "weights_TK='(3, 2) torch.int64'"),
    (dict(w_in=[1, 2]), "w_in='list' is not allowed: it must be a 3-D tensor or QuantizedTensor"),
    (dict(w_out=torch.randn(E + 1, F, D)), "w_out.shape=(5, 32, 64) is not allowed: it must be "
                                           "[E, F, D] = [4, 32, 64]"),
    (dict(w_out=torch.randn(E, F + 1, D)), "w_out.shape=(4, 33, 64) is not allowed"),
    (dict(w_out=torch.randn(E, F, D + 1)), "w_out.shape=(4, 32, 65) is not allowed"),
    (dict(b_in=torch.randn(E, F)), "b_in.shape=(4, 32) is not allowed: it must be None or "
                                   "[4, 64]"),
    (dict(b_out=torch.randn(E, D + 1)), "b_out.shape=(4, 65) is not allowed"),
])
def test_bad_input_is_named(change, words):
    with torch.inference_mode(), pytest.raises(ValueError, match=re.escape(words)):
        decode_experts(**args(**change))


def test_quantized_weights_are_checked_too():
    q_out = quantize_tensor(torch.randn(E, F, D + 64), 8, None)
    with torch.inference_mode(), pytest.raises(ValueError, match=re.escape(
            "w_out.shape=(4, 32, 128) is not allowed")):
        decode_experts(**args(w_out=q_out))


def test_callable_activation_takes_any_hidden_width():
    """A callable maps the [S, G] gate+up output to [S, F] itself: F is w_out's."""
    a = args(w_in=torch.randn(E, D, 3 * F))
    with torch.inference_mode():
        y = decode_experts(**a, activation=lambda h: h[:, :F] * h[:, F:2 * F] + h[:, 2 * F:])
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(2):
            e = int(a["experts_TK"][t, k])
            h = a["x_TD"][t] @ a["w_in"][e]
            ref[t] += a["weights_TK"][t, k] * ((h[:F] * h[F:2 * F] + h[2 * F:]) @ a["w_out"][e])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_float64_activations_come_back_in_float64():
    """Computed in fp32 (the kernels' type), returned in x's dtype, as documented."""
    a = args()
    with torch.inference_mode():
        y64 = decode_experts(**args(x_TD=a["x_TD"].double()))
        y32 = decode_experts(**a)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=0, atol=0)


@pytest.mark.parametrize(("call", "words"), [
    (lambda: sorted_rows(torch.tensor([[0.0, 1.0]]), torch.rand(1, 2), 4),
     "experts_TK.dtype=torch.float32 is not allowed"),  # was NotImplementedError (bincount)
    (lambda: sorted_rows(torch.tensor([[0, 5]]), torch.rand(1, 2), 4),
     "experts_TK has values in [0, 5], which is not allowed: they must lie in "
     "[0, num_experts=4)"),  # was a Dispatch whose offsets miss expert 5's row
    (lambda: sorted_rows(torch.tensor([[0, 1]]), torch.rand(1, 3), 4),
     "weights_TK='(1, 3) torch.float32' is not allowed"),  # was paired silently
    (lambda: sorted_rows(torch.tensor([[0, 1]]), torch.rand(1, 2), 0),
     "num_experts=0 is not allowed: it must be a positive int"),
])
def test_sorted_rows_checks(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def test_sorted_rows_plan():
    """Against a hand-built plan: rows grouped by expert, token order within one."""
    d = sorted_rows(torch.tensor([[2, 1], [1, 0]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]]), 4)
    assert d.token_S.tolist() == [1, 0, 1, 0]  # e0: t1; e1: t0, t1; e2: t0
    assert d.weight_S.tolist() == pytest.approx([0.3, 0.4, 0.7, 0.6])
    assert d.offsets_E.tolist() == [1, 3, 4, 4]


@pytest.mark.parametrize(("call", "words"), [
    (lambda: moekit.update_all_biases("model"),
     "model='str' is not allowed: it must be a torch.nn.Module"),  # was AttributeError
    (lambda: moekit.attach_bias_update(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)),
     "optimizer='Linear' is not allowed: it must be a torch.optim.Optimizer"),
])
def test_bias_update_helpers_check_arguments(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def test_attach_bias_update_checks_the_model_before_any_step():
    """A wrong model failed inside the first optimizer.step(), after the weights moved."""
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape("model='dict' is not allowed")):
        moekit.attach_bias_update(opt, {})
    assert not opt._optimizer_step_post_hooks  # nothing attached
