"""`zoo.nn.backends`: every variant runs identically on each backend that accepts it (float64, 2 layers, both
directions, a padded batch with NaN and inf in its padding, training and evaluation), the automatic choice, and the
errors and messages of the choice."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import zoo.nn
from zoo.nn import _ext, backends, gpu
from zoo.nn import fused as fused_module

B, T, IN, H = 4, 5, 3, 4
LENGTHS = torch.tensor([5, 2, 1, 4])
CASES = [(v.name, {}) for v in zoo.nn.list_variants()] + [
    ("bn_lstm", {"statistics": "shared"}),
    ("bn_indrnn", {"bn_placement": "output"}),
]
IDS = ["-".join([v, *map(str, o.values())]) for v, o in CASES]


def _run(rnn: zoo.nn.RNN, x: torch.Tensor, proj: torch.Tensor) -> list:
    """Outputs, final state, the input's and every parameter's gradient, and the buffers after one call."""
    x = x.clone().requires_grad_()
    out, final = rnn(x, lengths=LENGTHS)
    (out * proj).sum().backward()
    finals = list(final) if isinstance(final, tuple) else [final]
    return [out, *finals, x.grad, *(p.grad for p in rnn.parameters()), *rnn.buffers()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_every_backend_equals_the_reference(variant: str, options: dict, training: bool) -> None:
    reference = zoo.nn.RNN(
        variant, IN, H, num_layers=2, bidirectional=True, batch_first=True, backend="reference", **options
    ).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reference.train()(torch.randn(B, T, IN, dtype=torch.float64), lengths=LENGTHS)  # running statistics moved
    reference.train(training)
    valid = torch.arange(T)[None, :] < LENGTHS[:, None]
    x = torch.randn(B, T, IN, dtype=torch.float64)
    x[~valid] = (
        torch.tensor([float("nan"), float("inf")], dtype=torch.float64)
        .repeat(IN * 16)[:IN]
        .expand(int((~valid).sum()), IN)
    )
    proj = torch.randn(B, T, 2 * H, dtype=torch.float64)
    expected = _run(copy.deepcopy(reference), x, proj)
    ran = []
    for backend in type(reference.cells[0]).backends[:-1]:
        if backends.unusable(backend, x.device):
            continue
        rnn = copy.deepcopy(reference)
        rnn.backend = backend
        assert rnn.backend == backend
        got = _run(rnn, x, proj)
        assert len(got) == len(expected)
        for i, (a, e) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(a, e, msg=lambda m, i=i, b=backend: f"{b}, tensor {i}: {m}")
        ran.append(backend)
    assert ran, "no backend besides the reference ran"


def test_auto_takes_the_fastest_backend_the_variant_has_here() -> None:
    compiled = backends.unusable("compiled", torch.device("cpu")) is None
    for v in zoo.nn.list_variants():
        rnn = zoo.nn.RNN(v.name, IN, H)
        here = [b for b in v.cell.backends if b != "triton" and (compiled or b != "compiled")]  # (triton: CUDA)
        assert rnn.backend == here[0], v.name
        assert f"backend={rnn.backend!r}" in repr(rnn)
    assert zoo.nn.RNN("lstm", IN, H).backend == "native"
    assert zoo.nn.RNN("ln_lstm", IN, H, fused=False).backend == "reference"  # the alias
    rnn = zoo.nn.RNN("ln_lstm", IN, H, backend="python")
    assert rnn.fused and rnn.backend == "python"
    rnn.fused = False
    assert rnn.backend == "reference"
    rnn.backend = "auto"
    assert rnn.backend == ("compiled" if compiled else "python")


def test_a_backend_that_cannot_run_the_variant_is_an_error_at_construction(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"backend 'native' cannot run variant 'bn_lstm'; its backends: compiled"):
        zoo.nn.RNN("bn_lstm", IN, H, backend="native")
    with pytest.raises(ValueError, match=r"backend 'compiled' cannot run variant 'gru'; its backends: native"):
        zoo.nn.RNN("gru", IN, H, backend="compiled")
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; the backends are auto, native, compiled"):
        zoo.nn.RNN("gru", IN, H, backend="cudnn")
    monkeypatch.setenv("ZOO_NO_EXT", "1")
    with pytest.raises(ValueError, match="backend 'compiled' cannot run variant 'ln_gru' here: ZOO_NO_EXT is set"):
        zoo.nn.RNN("ln_gru", IN, H, backend="compiled")
    assert zoo.nn.RNN("ln_gru", IN, H).backend == "python"  # auto: the user switched the extension off, said nothing


def test_on_another_device_auto_chooses_again_and_says_so_once(monkeypatch, caplog) -> None:
    """A GPU cannot run the compiled loops: without Triton, auto takes the Python loop there and logs it once; asking
    for them is an error. (`choose` only reads the device's type, so no GPU is needed here.)"""
    monkeypatch.setattr(_ext, "_said", set())
    monkeypatch.setattr(gpu, "installed", lambda: False)
    cuda = torch.device("cuda")
    cell = zoo.nn.get_variant("rms_gru").cell
    with caplog.at_level(logging.WARNING, logger="zoo.nn"):
        assert backends.choose("auto", "rms_gru", cell.backends, cuda) == "python"
        assert backends.choose("auto", "rms_gru", cell.backends, cuda) == "python"
    assert [r.message for r in caplog.records] == [
        "rms_gru on cuda: the compiled loops run on the CPU only, not on cuda; a slower backend runs",
        "rms_gru on cuda: Triton is not installed (`pip install 'zoo[triton]'`); a slower backend runs",
    ]
    with pytest.raises(ValueError, match="here: the compiled loops run on the CPU only, not on cuda"):
        backends.choose("compiled", "rms_gru", cell.backends, cuda)
    assert backends.choose("auto", "lstm", zoo.nn.get_variant("lstm").cell.backends, cuda) == "native"


def test_the_python_backend_never_runs_the_compiled_loops(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a compiled loop ran")

    for cls in (fused_module.FusedLSTM, fused_module.FusedGRU):
        monkeypatch.setattr(cls, "_forward_ext", staticmethod(refuse))
        monkeypatch.setattr(cls, "_backward_ext", staticmethod(refuse))
    monkeypatch.setattr(fused_module.input_term._InputNorm, "apply", refuse)
    for variant in ("bn_lstm", "ln_lstm", "rms_gru", "bn_indrnn"):
        rnn = zoo.nn.RNN(variant, IN, H, backend="python")
        rnn(torch.randn(T, B, IN))[0].sum().backward()


def test_a_fused_backend_that_must_step_says_so_once(monkeypatch, caplog) -> None:
    """Where a cell's fused recurrence cannot run (a synchronized batch norm in training has no all-reduce in it),
    the reference engine runs, with the same result, and the log says so once."""
    monkeypatch.setattr(_ext, "_said", set())
    rnn = zoo.nn.RNN("bn_lstm", IN, H, max_steps=T).double()
    reference = copy.deepcopy(rnn)
    reference.backend = "reference"
    for cell in rnn.cells:
        monkeypatch.setattr(cell, "fuse_blocker", lambda: "it needs an all-reduce")
    x = torch.randn(T, B, IN, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="zoo.nn"):
        out = [rnn(x)[0] for _ in range(2)]
    expected = [reference(x)[0] for _ in range(2)]  # (the second call normalizes after moving the statistics)
    torch.testing.assert_close(out, expected)
    assert [r.message for r in caplog.records] == [
        f"BNLSTMCell: it needs an all-reduce: the reference engine runs instead of {rnn.backend!r}"
    ]
