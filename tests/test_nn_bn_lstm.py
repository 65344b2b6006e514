"""bn_lstm's per-step running statistics (Cooijmans et al. sec. 3), its policy past T_max, and the initial-state noise.

The values of the statistics are checked against hand-computed updates in test_nn_reference.py; here: which rows exist,
which rows move, and what happens past ``max_steps``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import zoo.nn

IN, H = 3, 4
NORMS = ("bn_ih", "bn_hh", "bn_c")

fused_param = pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])


def bn_lstm(fused: bool, **options) -> zoo.nn.RNN:
    return zoo.nn.RNN("bn_lstm", IN, H, num_layers=2, bidirectional=True, fused=fused, **options)


def snapshot(rnn: zoo.nn.RNN) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in rnn.state_dict().items() if "running" in k}


def test_one_row_of_statistics_per_step() -> None:
    rnn = bn_lstm(True, max_steps=5)
    for cell in rnn.cells:
        for name, features in zip(NORMS, (4 * H, 4 * H, H), strict=True):
            bn = getattr(cell, name)
            assert bn.running_mean.shape == (5, features) and bn.running_var.shape == (5, features)
            assert torch.equal(bn.running_mean, torch.zeros(5, features))
            assert torch.equal(bn.running_var, torch.ones(5, features))


@fused_param
def test_training_moves_only_the_rows_of_the_steps_seen(fused: bool) -> None:
    rnn = bn_lstm(fused, max_steps=5).train()
    before = snapshot(rnn)
    rnn(torch.randn(3, 6, IN), (torch.randn(4, 6, H), torch.randn(4, 6, H)))  # sequences of length 3
    for key, value in snapshot(rnn).items():
        for t in range(3):
            assert not torch.equal(value[t], before[key][t]), f"{key} row {t} did not move"
        assert torch.equal(value[3:], before[key][3:]), f"{key}: rows past the sequence moved"


@fused_param
def test_per_step_rows_follow_per_step_statistics(fused: bool) -> None:
    """Data whose mean and spread change with t leave different statistics in every row (not one shared row)."""
    rnn = zoo.nn.RNN("bn_lstm", IN, H, fused=fused, max_steps=4).train()
    t = torch.arange(4.0).view(4, 1, 1)
    for _ in range(3):
        rnn(2.0 * t + (1.0 + t) * torch.randn(4, 32, IN))
    bn = rnn.cells[0].bn_ih
    for stat in (bn.running_mean, bn.running_var):
        for a in range(4):
            for b in range(a + 1, 4):
                assert (stat[a] - stat[b]).abs().max() > 0.05, f"rows {a} and {b} are alike: {stat}"
    # the spread grows with t, so does every feature's running variance (each row of W_x is non-zero)
    assert (bn.running_var.diff(dim=0) > 0).all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@fused_param
def test_longer_than_max_steps(fused: bool, training: bool) -> None:
    """'reuse' (default) runs any length and never writes a row past max_steps; 'error' refuses before any work."""
    rnn = bn_lstm(fused, max_steps=3).train(training)
    out, _ = rnn(torch.randn(7, 2, IN))
    assert out.shape == (7, 2, 2 * H) and torch.isfinite(out).all()
    assert all(v.shape[0] == 3 for v in snapshot(rnn).values())

    strict = bn_lstm(fused, max_steps=3, past_max_steps="error").train(training)
    strict(torch.randn(3, 2, IN))  # up to max_steps is fine
    before = snapshot(strict)
    with pytest.raises(ValueError, match="max_steps=3"):
        strict(torch.randn(4, 2, IN))
    for key, value in snapshot(strict).items():
        assert torch.equal(value, before[key]), f"{key} moved although the call failed"


@fused_param
def test_steps_with_fewer_than_two_valid_samples_leave_statistics_alone(fused: bool) -> None:
    rnn = bn_lstm(fused, max_steps=4).train()
    before = snapshot(rnn)
    state = (torch.randn(4, 3, H), torch.randn(4, 3, H))  # a zero h_0 would leave W_h h's mean at 0
    out, _ = rnn(torch.randn(4, 3, IN), state, lengths=torch.tensor([4, 1, 1]))  # steps 1..3: one valid sample
    assert torch.isfinite(out).all()
    for key, value in snapshot(rnn).items():
        assert not torch.equal(value[0], before[key][0]), f"{key} row 0 did not move"
        assert torch.equal(value[1:], before[key][1:]), f"{key} moved on a step with one valid sample"
    # a single unbatched sequence: no row moves at all, and the output stays finite
    before = snapshot(rnn)
    out, _ = rnn(torch.randn(4, IN))
    assert torch.isfinite(out).all()
    for key, value in snapshot(rnn).items():
        assert torch.equal(value, before[key]), key


@fused_param
def test_zero_variance_inputs_stay_finite(fused: bool) -> None:
    """Sequential MNIST's first pixels are constant over the batch: no NaN, in outputs or gradients (γ = 0.1)."""
    rnn = bn_lstm(fused, max_steps=6).train()
    x = torch.randn(6, 5, IN)
    x[:3] = 0.0
    out, (h, c) = rnn(x)
    (out.sum() + h.sum() + c.sum()).backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in rnn.parameters())


@fused_param
def test_init_noise_perturbs_training_only(fused: bool) -> None:
    noisy = bn_lstm(fused, max_steps=5, init_noise=0.1)
    clean = bn_lstm(fused, max_steps=5)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(5, 4, IN)
    torch.testing.assert_close(noisy.eval()(x)[0], clean.eval()(x)[0], rtol=0, atol=0)
    clean_out = clean.train()(x)[0]
    noisy_out1 = copy.deepcopy(noisy).train()(x)[0]
    noisy_out2 = noisy.train()(x)[0]
    assert not torch.allclose(noisy_out1, clean_out, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(noisy_out1, noisy_out2, rtol=1e-4, atol=1e-4)  # fresh noise at every call
