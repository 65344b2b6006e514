"""`zoo.nn.MaskedBatchNorm` against `torch.nn.BatchNorm1d` on the valid positions only (one per step if per-step)."""

from __future__ import annotations

import pytest
import torch

import zoo.nn

T, B, F = 4, 5, 3
LENGTHS = torch.tensor([4, 2, 3, 1, 4])
MASK = torch.arange(T)[:, None] < LENGTHS[None]  # (T, B)


def twin(momentum: float = 0.1, eps: float = 1e-5) -> torch.nn.BatchNorm1d:
    bn = torch.nn.BatchNorm1d(F, momentum=momentum, eps=eps)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(F))
        bn.bias.copy_(torch.randn(F))
    return bn


def masked(max_steps: int | None, bn: torch.nn.BatchNorm1d) -> zoo.nn.MaskedBatchNorm:
    m = zoo.nn.MaskedBatchNorm(F, max_steps, momentum=bn.momentum, eps=bn.eps)
    with torch.no_grad():
        m.weight.copy_(bn.weight)
        m.bias.copy_(bn.bias)
    return m


@pytest.mark.parametrize("with_mask", [False, True], ids=["all", "masked"])
def test_shared_statistics_equal_batchnorm1d_on_valid_positions(with_mask: bool) -> None:
    ref = twin(momentum=0.3, eps=1e-3)
    bn = masked(None, ref)
    mask = MASK if with_mask else torch.ones(T, B, dtype=torch.bool)
    for _ in range(2):  # two updates of the running statistics
        x = torch.randn(T, B, F) * 3 + 1
        if with_mask:  # padding enters nothing, NaN and inf included
            x[~MASK] = (
                torch.tensor([float("nan"), float("inf")])
                .repeat(int((~MASK).sum()) * F)[: int((~MASK).sum()) * F]
                .view(-1, F)
            )
        y = bn(x, MASK if with_mask else None)
        torch.testing.assert_close(y[mask], ref(x[mask]))
        assert torch.isfinite(y).all()
    assert bn.running_mean.shape == (1, F)
    torch.testing.assert_close(bn.running_mean[0], ref.running_mean)
    torch.testing.assert_close(bn.running_var[0], ref.running_var)
    bn.eval()
    ref.eval()
    x = torch.randn(T, B, F)
    x[~MASK] = float("nan")
    y = bn(x, MASK)
    torch.testing.assert_close(y[MASK], ref(x[MASK]))
    assert torch.isfinite(y).all()


def test_per_step_statistics_equal_one_batchnorm1d_per_step() -> None:
    refs = [twin() for _ in range(T)]
    for r in refs[1:]:
        r.load_state_dict(refs[0].state_dict())
    bn = masked(T, refs[0])
    for _ in range(2):
        x = torch.randn(T, B, F) * torch.arange(1.0, T + 1).view(T, 1, 1)
        y = bn(x, MASK)
        for t, ref in enumerate(refs):
            rows = MASK[t]
            if rows.sum() >= 2:  # BatchNorm1d cannot train on one sample; the masked norm leaves that step alone
                torch.testing.assert_close(y[t, rows], ref(x[t, rows]))
    for t, ref in enumerate(refs):
        if MASK[t].sum() >= 2:
            torch.testing.assert_close(bn.running_mean[t], ref.running_mean)
            torch.testing.assert_close(bn.running_var[t], ref.running_var)
        else:
            assert torch.equal(bn.running_mean[t], torch.zeros(F)) and torch.equal(bn.running_var[t], torch.ones(F))
    bn.eval()
    for r in refs:
        r.eval()
    x = torch.randn(T + 2, B, F)  # past max_steps evaluation reuses the last step's statistics
    y = bn(x)
    for t in range(T + 2):
        torch.testing.assert_close(y[t], refs[min(t, T - 1)](x[t]))


def test_start_offsets_the_step() -> None:
    """A chunk that starts at step ``start`` uses (and in training updates) rows start, start + 1, ..."""
    bn = zoo.nn.MaskedBatchNorm(F, max_steps=6)
    bn(torch.randn(2, B, F) + 5.0, start=3)
    assert torch.equal(bn.running_mean[:3], torch.zeros(3, F)) and torch.equal(bn.running_mean[5:], torch.zeros(1, F))
    assert (bn.running_mean[3:5] > 0.2).all()
