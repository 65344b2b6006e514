"""The fast path (``fused=True``: vendor kernels, hand-written backward through time) equals the step-by-step engine.

The step-by-step engine is checked against the papers' equations in test_nn_reference.py and its gradients are
autograd's; here every variant's fused path must give the same outputs, final states, running statistics and the same
gradients with respect to every parameter, the input and the initial state (float64, padded batch, 2 layers,
bidirectional). They run on the CPU, or on the device of ``--device`` (``pytest tests/test_nn_fused.py --device
cuda``: there the fused path is the Python loop over vendor kernels, the compiled loops being CPU-only).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import zoo.nn

B, T, IN, H = 4, 5, 3, 3
LENGTHS = torch.tensor([3, 5, 1, 4])

VARIANTS = [v.name for v in zoo.nn.list_variants()]
CASES = [(v, {}) for v in VARIANTS] + [("bn_indrnn", {"bn_placement": "output"})]


def randn(*shape: int, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normal samples drawn on the CPU (the same numbers whatever the device), then moved to ``device``."""
    return torch.randn(*shape, dtype=dtype).to(device)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=[v + "-" + "-".join(o.values()) for v, o in CASES])
def test_fused_equals_step_by_step(
    variant: str, options: dict, training: bool, lengths: bool, bias: bool, device: torch.device
) -> None:
    check_fused(variant, options, training, lengths, bias, device)


@pytest.mark.parametrize("lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_weight_gradient_in_chunks(
    variant: str, lengths: bool, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """The W_h gradient taken in chunks of a few steps (`OuterSum` with 5 rows; batch sizes 4, 3, 3, 2, 1 when
    padded) equals the step-by-step engine's."""
    monkeypatch.setattr(zoo.nn.fused.OuterSum.__init__, "__defaults__", (5,))
    check_fused(variant, {}, True, lengths, True, device)


@pytest.mark.parametrize(("sizes", "cap"), [([8] * 100, 800), ([8] * 1000, 1333), ([70] * 3 + [10] * 2000, 3368)])
def test_weight_gradient_chunks_default(sizes: list[int], cap: int) -> None:
    """By default a chunk of the W_h gradient holds a sixth of all rows, at least 1024 (or all rows, if fewer); the
    chunks cover every step once, latest first, none over the cap."""
    layout = zoo.nn.fused.Layout(sizes)
    h = torch.zeros(layout.rows, 2)
    outer = zoo.nn.fused.OuterSum(layout, h[: sizes[0]], h, 3)
    assert outer.cap == cap and outer.buf.shape == (cap, 3)
    chunks = outer.chunks()
    assert [t for c in chunks for t in reversed(c)] == list(reversed(range(len(sizes))))
    assert all(sum(sizes[t] for t in c) <= cap for c in chunks)


@pytest.mark.parametrize("lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=[v + "-" + "-".join(o.values()) for v, o in CASES])
def test_fused_in_small_blocks(
    variant: str, options: dict, lengths: bool, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """Work done a block at a time (the input term's projection and norm, IndRNN's dw over a few steps at a time)
    with blocks of 16 elements, so that every pass has several: the same results as the step-by-step engine."""
    monkeypatch.setattr(zoo.nn.fused.common, "BLOCK", 16)
    check_fused(variant, options, True, lengths, True, device)


def check_fused(variant: str, options: dict, training: bool, lengths: bool, bias: bool, device: torch.device) -> None:
    """The fused and step-by-step engines of one model: outputs, final states, every gradient, the buffers."""
    fused = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, bias=bias, fused=True, **options)
    fused = fused.to(device, torch.float64)
    if not bias:  # only the normalizations' own shifts remain
        assert all(".bias" not in n or n.split(".")[-2].startswith(("ln", "bn")) for n, _ in fused.named_parameters())
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.3 * randn(*p.shape, device=device))
    fused.train()(randn(T, B, IN, device=device), lengths=LENGTHS)  # running statistics away from (0, 1)
    steps = copy.deepcopy(fused)
    steps.fused = False
    assert fused.fused and not steps.fused
    x = randn(T, B, IN, device=device)
    state = [randn(4, B, H, device=device) for _ in range(fused.state_size)]
    proj = randn(T, B, 2 * H, device=device)
    results = []
    for rnn in (fused, steps):
        rnn.train(training)
        xr = x.clone().requires_grad_()
        sr = [s.clone().requires_grad_() for s in state]
        out, final = rnn(xr, sr[0] if len(sr) == 1 else tuple(sr), lengths=LENGTHS if lengths else None)
        final = final if isinstance(final, tuple) else (final,)
        loss = (out * proj).sum() + sum((f * (k + 1)).sum() for k, f in enumerate(final))
        grads = torch.autograd.grad(loss, [xr, *sr, *rnn.parameters()])
        results.append((out, final, grads, [b.clone() for b in rnn.buffers()]))
    (out, final, grads, buffers), (ref_out, ref_final, ref_grads, ref_buffers) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-9, atol=1e-10)
    names = ["input"] + [f"state{k}" for k in range(len(state))] + [n for n, _ in fused.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"gradient of {name}: {m}")
    torch.testing.assert_close(buffers, ref_buffers, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_float32_matches_float64(variant: str, training: bool, device: torch.device) -> None:
    """In float32 (oneDNN's prepacked GEMM, tanh through a sigmoid) the fused path stays at float32 precision.

    The yardstick is the float64 step-by-step result; every gradient tensor within 5e-4 of its norm (float32 results of
    either engine are about 1e-7 to 7e-5 off at these sizes).
    """
    fused = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True).to(device)
    fused.train()(randn(T, B, IN, device=device, dtype=torch.float32), lengths=LENGTHS)
    exact = copy.deepcopy(fused).double()
    exact.fused = False
    x = randn(T, B, IN, device=device, dtype=torch.float32)
    proj = randn(T, B, 2 * H, device=device, dtype=torch.float32)
    results = []
    for rnn in (fused, exact):
        rnn.train(training)
        xr = x.to(rnn.cells[0].weight_ih.dtype).requires_grad_()
        out, final = rnn(xr, lengths=LENGTHS)
        final = final if isinstance(final, tuple) else (final,)
        loss = (out * proj.to(out.dtype)).sum() + sum(f.sum() for f in final)
        grads = torch.autograd.grad(loss, [xr, *rnn.parameters()])
        results.append((out.double(), [f.double() for f in final], [g.double() for g in grads]))
    (out, final, grads), (ref_out, ref_final, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-5)
    names = ["input"] + [n for n, _ in fused.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert (g - rg).norm() <= 5e-4 * rg.norm() + 1e-7, name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=[v + "-" + "-".join(o.values()) for v, o in CASES])
def test_fused_without_gradients_equals_step_by_step(
    variant: str, options: dict, training: bool, device: torch.device
) -> None:
    """Under `torch.no_grad` (and with frozen parameters) the fused path's inference mode gives the same results."""
    fused = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, **options).to(device, torch.float64)
    fused.train()(randn(T, B, IN, device=device), lengths=LENGTHS)
    steps = copy.deepcopy(fused)
    steps.fused = False
    frozen = copy.deepcopy(fused).requires_grad_(False)
    x = randn(T, B, IN, device=device)
    state = tuple(randn(4, B, H, device=device) for _ in range(fused.state_size))
    state = state if len(state) == 2 else state[0]
    results = []
    for rnn in (fused, frozen, steps):
        rnn.train(training)
        with torch.no_grad() if rnn is not frozen else contextlib.nullcontext():
            out, final = rnn(x, state, lengths=LENGTHS)
        results.append((out, final, [b.clone() for b in rnn.buffers()]))
    for result in results[:2]:
        torch.testing.assert_close(result, results[2], rtol=1e-9, atol=1e-10)
