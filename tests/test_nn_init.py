"""Initial values as the papers (and their official code) set them; see shared/papers.md."""

from __future__ import annotations

import math

import pytest
import torch

import zoo.nn

IN, H = 5, 3


def cell(variant: str, **options) -> torch.nn.Module:
    return zoo.nn.RNN(variant, IN, H, **options).cells[0]


def test_bn_lstm_cooijmans_initialization() -> None:
    """γ = 0.1 for the three BNs, β_c = 0 and no β for the gate BNs, forget bias 1, orthogonal W per gate block."""
    c = cell("bn_lstm")
    for name in ("bn_ih", "bn_hh", "bn_c"):
        assert torch.equal(getattr(c, name).weight, torch.full_like(getattr(c, name).weight, 0.1)), name
    assert c.bn_ih.bias is None and c.bn_hh.bias is None and torch.equal(c.bn_c.bias, torch.zeros(H))
    assert torch.equal(c.bias, torch.tensor([0.0] * H + [1.0] * H + [0.0] * 2 * H))
    for w in (c.weight_ih, c.weight_hh):
        for block in w.detach().chunk(4, dim=0):  # (H, fan_in): orthonormal rows (or columns)
            gram = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
            torch.testing.assert_close(gram, torch.eye(min(block.shape)))
    assert cell("bn_lstm", gamma=0.5, forget_bias=0.0).bn_hh.weight.eq(0.5).all()


@pytest.mark.parametrize("variant", ["ln_lstm", "rms_lstm", "ln_gru", "rms_gru"])
def test_layer_and_rms_norm_gains_one_shifts_zero(variant: str) -> None:
    c = cell(variant)
    norms = [m for m in c.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm)]
    assert len(norms) == (3 if variant.endswith("lstm") else 4)
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and m.eps == 1e-5
        if variant.startswith("rms"):
            assert getattr(m, "bias", None) is None  # RMSNorm: no re-centering
        else:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    if variant.endswith("lstm"):
        assert torch.equal(c.bias[H : 2 * H], torch.ones(H))


@pytest.mark.parametrize("variant", ["lstm", "gru"])
def test_plain_cells_initialise_like_torch(variant: str) -> None:
    c = cell(variant)
    bound = 1 / math.sqrt(H)
    for p in c.parameters():
        assert (p.abs() <= bound).all()
    torch_names = {n.removesuffix("_l0") for n, _ in getattr(torch.nn, variant.upper())(IN, H).named_parameters()}
    assert {n for n, _ in c.named_parameters()} == torch_names


def test_wn_lstm_starts_as_the_lstm_of_v() -> None:
    """g starts at ‖v‖ row by row, so the initial W is v."""
    c = cell("wn_lstm")
    for name in ("weight_ih", "weight_hh"):
        par = getattr(c.parametrizations, name)
        torch.testing.assert_close(par.original0, par.original1.norm(dim=1, keepdim=True))
        torch.testing.assert_close(getattr(c, name), par.original1)


def test_bn_indrnn_u_uniform_in_0_1_and_bounded() -> None:
    c = zoo.nn.RNN("bn_indrnn", IN, 256).cells[0]
    assert (c.weight_hh >= 0).all() and (c.weight_hh <= 1).all() and c.weight_hh.std() > 0.2
    assert c.recurrent_max == pytest.approx(2.0 ** (1 / 1000))
    assert torch.equal(c.bias, torch.zeros(256))
