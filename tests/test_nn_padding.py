"""Padding never matters: not to outputs, final states, running statistics or gradients; each sequence is on its own.

A padded batch (batch first, 2 layers, bidirectional) is run with zeros, Gaussian noise, 1e6, NaN, inf and a mix of
non-finite values in its padded positions; everything that depends on valid positions must be the same, and outputs at
padded positions exactly zero.
"""

from __future__ import annotations

import copy

import pytest
import torch

import zoo.nn

B, T, IN, H = 4, 6, 3, 4
LENGTHS = torch.tensor([6, 3, 1, 4])
VALID = torch.arange(T)[None, :] < LENGTHS[:, None]  # (B, T)

CASES = [(v.name, {}) for v in zoo.nn.list_variants()] + [("bn_indrnn", {"bn_placement": "output"})]
IDS = [v + "-" + "-".join(o.values()) for v, o in CASES]
FILLS = {
    "zeros": lambda shape: torch.zeros(shape),
    "noise": lambda shape: torch.randn(shape),
    "1e6": lambda shape: torch.full(shape, 1e6),
    "nan": lambda shape: torch.full(shape, float("nan")),
    "inf": lambda shape: torch.full(shape, float("inf")),
    "mixed": lambda shape: (
        torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
        .repeat(shape.numel())[: shape.numel()]
        .view(shape)
    ),
}


def build(variant: str, options: dict, fused: bool) -> zoo.nn.RNN:
    rnn = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, batch_first=True, fused=fused, **options)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return rnn


def states(final: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    return final if isinstance(final, tuple) else (final,)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_padding_values_do_not_matter(variant: str, options: dict, fused: bool, training: bool) -> None:
    rnn = build(variant, options, fused)
    rnn.train()(torch.randn(B, T, IN), lengths=LENGTHS)  # running statistics away from (0, 1) for eval
    rnn.train(training)
    x = torch.randn(B, T, IN)
    proj = torch.randn(B, T, 2 * H)
    results = {}
    for name, fill in FILLS.items():
        model = copy.deepcopy(rnn)
        xp = torch.where(VALID.unsqueeze(-1), x, fill(x.shape)).requires_grad_()
        out, final = model(xp, lengths=LENGTHS)
        assert torch.isfinite(out).all()
        assert (out[~VALID] == 0).all(), "outputs at padded positions must be exactly zero"
        (out * proj).sum().backward()
        assert (xp.grad[~VALID] == 0).all(), "padded inputs must get no gradient"
        grads = [p.grad for p in model.parameters()]
        results[name] = (out, states(final), xp.grad, grads, list(model.buffers()))
    ref = results.pop("zeros")
    for name, res in results.items():
        what_list = ["outputs", "final state", "input gradient", "parameter gradients", "buffers"]
        for what, a, e in zip(what_list, res, ref, strict=True):
            torch.testing.assert_close(a, e, msg=lambda m, what=what, name=name: f"{what} with {name} padding: {m}")


PER_SAMPLE = ["lstm", "gru", "ln_lstm", "ln_gru", "rms_lstm", "rms_gru", "wn_lstm"]
BATCH_NORM = [("bn_lstm", {}), ("seqbn_lstm", {}), ("bn_indrnn", {}), ("bn_indrnn", {"bn_placement": "output"})]
ALONE_CASES = [(v, {}, True) for v in PER_SAMPLE] + [(v, o, False) for v, o in BATCH_NORM]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
@pytest.mark.parametrize(
    ("variant", "options", "training"),
    ALONE_CASES,
    ids=[v + "-" + "-".join(o.values()) + ("-train" if t else "-eval") for v, o, t in ALONE_CASES],
)
def test_each_sequence_as_if_alone(variant: str, options: dict, training: bool, fused: bool) -> None:
    """Per-sample variants (and batch-norm variants in eval mode) give a sequence the result it gets on its own."""
    rnn = build(variant, options, fused)
    rnn.train()(torch.randn(B, T, IN), lengths=LENGTHS)
    rnn.train(training)
    x = torch.randn(B, T, IN)
    state = tuple(torch.randn(4, B, H) for _ in range(rnn.state_size))
    out, final = rnn(x, state if len(state) == 2 else state[0], lengths=LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        s = tuple(t[:, b : b + 1] for t in state)
        alone, alone_final = rnn(x[b : b + 1, :n], s if len(s) == 2 else s[0])
        torch.testing.assert_close(out[b, :n], alone[0])
        for f, fa in zip(states(final), states(alone_final), strict=True):
            torch.testing.assert_close(f[:, b], fa[:, 0])


def test_mask_and_reversal_helpers() -> None:
    """`lengths_to_mask` marks t < length; `reverse_padded` reverses each valid prefix and leaves padding in place."""
    lengths = torch.tensor([3, 1, 2])
    mask = zoo.nn.lengths_to_mask(lengths, 4)
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool))
    x = torch.arange(12.0).view(4, 3, 1)  # x[t, b] = 3 t + b
    expected = torch.tensor([[6.0, 1, 5], [3, 4, 2], [0, 7, 8], [9, 10, 11]]).view(4, 3, 1)
    assert torch.equal(zoo.nn.reverse_padded(x, lengths), expected)
    assert torch.equal(zoo.nn.reverse_padded(zoo.nn.reverse_padded(x, lengths), lengths), x)
    assert torch.equal(zoo.nn.reverse_padded(x, None), x.flip(0))
