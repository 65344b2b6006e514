"""The ``triton`` backend (`zoo.nn.gpu`): on CPU tensors its kernels run under Triton's interpreter (conftest sets
``TRITON_INTERPRET=1`` where Triton is installed and there is no CUDA device; ``pytest --device cuda`` runs them
compiled on a GPU). Every variant it runs equals the reference engine (outputs, final states, running statistics,
every gradient; float64 and float32, 2 layers, both directions, NaN and inf in the padding, training and evaluation,
with and without gradients), its tiles may split a step's rows or units over many programs, each time step launches
the recurrent GEMM and one kernel each way and nothing else, and the automatic choice takes it on CUDA only."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zoo.nn
from zoo.nn import _ext, backends, gpu

if gpu.unusable(torch.device("cpu")) is not None and not torch.cuda.is_available():
    pytest.skip(f"the triton backend cannot run here: {gpu.unusable(torch.device('cpu'))}", allow_module_level=True)

from zoo.nn.gpu import kernels, recurrence  # noqa: E402  (after TRITON_INTERPRET is known to be set)

B, T, IN, H = 4, 5, 3, 4
LENGTHS = torch.tensor([3, 5, 1, 4])
CASES = [
    ("ln_lstm", {}),
    ("rms_lstm", {}),
    ("bn_lstm", {}),
    ("bn_lstm", {"statistics": "shared"}),
    ("bn_lstm", {"recurrent_bn": False}),
    ("seqbn_lstm", {}),
    ("ln_gru", {}),
    ("rms_gru", {}),
    ("bn_indrnn", {}),
    ("bn_indrnn", {"bn_placement": "output"}),
]
IDS = ["-".join([v, *map(str, o.values())]) for v, o in CASES]
PADDING = torch.tensor([float("nan"), float("inf"), -float("inf")])


@pytest.fixture(autouse=True)
def _triton_runs_on(device: torch.device) -> None:
    """Skip where the backend cannot run on the tests' device (a CPU without the interpreter)."""
    reason = gpu.unusable(device)
    if reason is not None:
        pytest.skip(f"the triton backend cannot run on {device}: {reason}")


def _models(variant: str, options: dict, device: torch.device, dtype: torch.dtype, **sizes) -> tuple:
    """A reference model (parameters moved off their initial values, running statistics moved) and its copy on the
    triton backend."""
    batch = sizes.pop("batch", B)
    size = {"input_size": IN, "hidden_size": H, **sizes}
    ref = zoo.nn.RNN(variant, **size, num_layers=2, bidirectional=True, backend="reference", **options)
    ref = ref.to(device, dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=dtype).to(device))
    ref.train()(torch.randn(T, batch, size["input_size"], dtype=dtype).to(device))
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    assert tri.backend == "triton"
    return ref, tri


def _inputs(batch: int, lengths: torch.Tensor | None, dtype: torch.dtype, device: torch.device, state_size: int):
    x = torch.randn(T, batch, IN, dtype=dtype)
    if lengths is not None:
        pad = torch.arange(T)[:, None] >= lengths[None, :]
        x[pad] = PADDING.to(dtype).repeat(IN * x.numel())[: int(pad.sum()) * IN].view(-1, IN)
    state = [torch.randn(4, batch, H, dtype=dtype).to(device) for _ in range(state_size)]
    proj = torch.randn(T, batch, 2 * H, dtype=dtype).to(device)
    return x.to(device), state, proj


def _run(rnn: zoo.nn.RNN, x, state, proj, lengths, dtype=None) -> list[torch.Tensor]:
    """Outputs, final states, the gradients of the input, initial state and every parameter, and the buffers."""
    dtype = dtype or x.dtype
    xr = x.to(dtype).requires_grad_()
    sr = [s.to(dtype).requires_grad_() for s in state]
    out, final = rnn(xr, sr[0] if len(sr) == 1 else tuple(sr), lengths=lengths)
    final = list(final) if isinstance(final, tuple) else [final]
    loss = (out * proj.to(dtype)).sum() + sum((f * (k + 1)).sum() for k, f in enumerate(final))
    grads = torch.autograd.grad(loss, [xr, *sr, *rnn.parameters()])
    if lengths is not None:
        out = out.masked_fill((torch.arange(T, device=out.device)[:, None] >= lengths.to(out.device))[..., None], 0)
    return [out, *final, *grads, *(b.clone() for b in rnn.buffers())]


@pytest.mark.parametrize(
    ("training", "lengths"), [(True, True), (True, False), (False, True)], ids=["train-lengths", "train-full", "eval"]
)
@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_triton_equals_the_reference_in_float64(
    variant: str, options: dict, training: bool, lengths: bool, device: torch.device
) -> None:
    ref, tri = _models(variant, options, device, torch.float64)
    lens = LENGTHS if lengths else None
    x, state, proj = _inputs(B, lens, torch.float64, device, ref.state_size)
    before = gpu.LAUNCHES["kernel"]
    results = []
    for rnn in (tri, ref):
        rnn.train(training)
        results.append(_run(rnn, x, state, proj, lens))
    assert gpu.LAUNCHES["kernel"] > before or (variant == "seqbn_lstm" and not training)  # (eval: the vendor LSTM)
    for i, (got, expected) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES[::2] + CASES[1::2][:2], ids=IDS[::2] + IDS[1::2][:2])
def test_triton_in_float32_stays_at_float32_precision(
    variant: str, options: dict, training: bool, device: torch.device
) -> None:
    """The yardstick is the float64 reference: outputs within 1e-5, every gradient within 5e-4 of its norm."""
    ref, _ = _models(variant, options, device, torch.float64)
    tri = copy.deepcopy(ref).float()
    tri.backend = "triton"
    x, state, proj = _inputs(B, LENGTHS, torch.float64, device, ref.state_size)
    results = []
    for rnn in (tri, ref):
        rnn.train(training)
        dtype = rnn.cells[0].weight_ih.dtype
        results.append([r.double() for r in _run(rnn, x, state, proj, LENGTHS, dtype)])
    n_out = 1 + ref.state_size
    got, expected = results
    torch.testing.assert_close(got[:n_out], expected[:n_out], rtol=0, atol=1e-5)
    for i, (g, e) in enumerate(zip(got[n_out:], expected[n_out:], strict=True)):
        assert (g - e).norm() <= 5e-4 * e.norm() + 1e-6, i


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("variant", "options"), [CASES[i] for i in (0, 2, 5, 7, 8)], ids=[IDS[i] for i in (0, 2, 5, 7, 8)]
)
def test_triton_without_gradients_equals_the_reference(
    variant: str, options: dict, training: bool, device: torch.device
) -> None:
    """Under `torch.no_grad`, and with frozen parameters, the kernels keep no saved rows: the same results."""
    ref, tri = _models(variant, options, device, torch.float64)
    frozen = copy.deepcopy(tri).requires_grad_(False)
    x, state, _ = _inputs(B, LENGTHS, torch.float64, device, ref.state_size)
    state = tuple(state) if len(state) == 2 else state[0]
    results = []
    for rnn in (tri, frozen, ref):
        rnn.train(training)
        with torch.no_grad() if rnn is not frozen else contextlib.nullcontext():
            out, final = rnn(x, state, lengths=LENGTHS)
        out = out.masked_fill((torch.arange(T, device=out.device)[:, None] >= LENGTHS.to(out.device))[..., None], 0)
        results.append((out, final, [b.clone() for b in rnn.buffers()]))
    for result in results[:2]:
        torch.testing.assert_close(result, results[2], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("variant", "options"), [CASES[i] for i in (0, 2, 5, 7, 8)], ids=[IDS[i] for i in (0, 2, 5, 7, 8)]
)
def test_triton_in_small_tiles(variant: str, options: dict, monkeypatch: pytest.MonkeyPatch, device) -> None:
    """Tiles of about 16 elements split every step's rows (layer and RMS norms) or units (batch norms, none) over
    several programs, with partial tiles at the edges (7 sequences, 5 units): the same results."""
    monkeypatch.setattr(recurrence, "TILE", 16)
    hidden, batch = 5, 7
    lengths = torch.tensor([3, 5, 1, 4, 5, 2, 2])
    ref, tri = _models(variant, options, device, torch.float64, hidden_size=hidden, batch=batch)
    x = torch.randn(T, batch, IN, dtype=torch.float64)
    x[torch.arange(T)[:, None] >= lengths[None, :]] = float("nan")
    x = x.to(device)
    proj = torch.randn(T, batch, 2 * hidden, dtype=torch.float64).to(device)
    results = []
    for rnn in (tri, ref):
        rnn.train()
        xr = x.clone().requires_grad_()
        out, _ = rnn(xr, lengths=lengths)
        grads = torch.autograd.grad((out * proj).sum(), [xr, *rnn.parameters()])
        results.append([out, *grads, *(b.clone() for b in rnn.buffers())])
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)
    assert recurrence.tile((kernels.LN,), batch, hidden, 4)[0] < batch  # (the rows were split)
    assert recurrence.tile((kernels.BN,), batch, hidden, 4)[1] < hidden  # (the units were split)


def test_gradcheck_of_bn_lstm(device: torch.device) -> None:
    """`torch.autograd.gradcheck` in float64 of the intricate case, batch norms in the recurrence with statistics over
    3, 2 and 1 valid rows, both directions (the others' gradients equal the reference's above; test_nn_gradcheck.py
    leaves this backend out: its hundreds of calls take minutes under the interpreter)."""
    rnn = zoo.nn.RNN("bn_lstm", 2, 2, bidirectional=True, backend="triton", max_steps=3).to(device, torch.float64)
    x = torch.randn(3, 3, 2, dtype=torch.float64).to(device).requires_grad_()
    lengths = torch.tensor([3, 1, 2])

    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, (h, c) = rnn(x, lengths=lengths)
        return out, h, c

    assert torch.autograd.gradcheck(f, (x,))


class _Ops(TorchDispatchMode):
    """Logs every ATen call outside the counted launches, and the launches themselves as markers."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list = []
        self.quiet = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.quiet:
            self.log.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("variant", "options"), [CASES[i] for i in (0, 2, 4, 6, 8)], ids=[IDS[i] for i in (0, 2, 4, 6, 8)]
)
def test_each_step_launches_the_gemm_and_one_kernel_each_way(variant: str, options: dict, monkeypatch, device):
    """Counted (`zoo.nn.gpu.LAUNCHES`) and checked: between the first and the last launch of a recurrence's loop no
    other ATen operation runs but views. Forward: a GEMM and one kernel per step (2 launches, the issue's bound 2);
    backward: one kernel and one GEMM per step (2, bound 3); bn_indrnn: one kernel for all steps each way."""
    ops = _Ops()
    marks = {"launch": "LAUNCH", "gemm": "GEMM"}
    for name, mark in marks.items():
        original = getattr(recurrence, name)

        def counted(*args, original=original, mark=mark, **kwargs):
            ops.log.append(mark)
            ops.quiet += 1
            try:
                return original(*args, **kwargs)
            finally:
                ops.quiet -= 1

        monkeypatch.setattr(recurrence, name, counted)
    for fn in (recurrence.TritonLSTM, recurrence.TritonGRU, recurrence.TritonIndRNN):
        for phase in ("forward", "backward"):
            original = getattr(fn, phase)

            def delimited(*args, original=original, phase=phase):
                ops.log.append(("begin", phase))
                try:
                    return original(*args)
                finally:
                    ops.log.append(("end", phase))

            monkeypatch.setattr(fn, phase, staticmethod(delimited))
    _, tri = _models(variant, options, device, torch.float64)
    x = torch.randn(T, B, IN, dtype=torch.float64).to(device)
    before = dict(gpu.LAUNCHES)
    with ops:
        out, _ = tri(x, lengths=LENGTHS)
        out.sum().backward()
    calls = {"forward": [], "backward": []}
    for item in ops.log:
        if isinstance(item, tuple):
            if item[0] == "begin":
                current: list = []
            else:
                calls[item[1]].append(current)
        elif "current" in locals():
            current.append(item)
    indrnn = variant == "bn_indrnn"
    per_loop = {"LAUNCH": 1, "GEMM": 0} if indrnn else {"LAUNCH": T, "GEMM": T}
    for phase in ("forward", "backward"):
        assert len(calls[phase]) == 4, phase  # 2 layers x 2 directions
        for log in calls[phase]:
            assert {m: log.count(m) for m in per_loop} == per_loop, phase
            idx = [i for i, item in enumerate(log) if item in marks.values()]
            between = [f for f in log[idx[0] : idx[-1]] if f not in marks.values()]
            assert all(f.is_view for f in between), (phase, [f for f in between if not f.is_view])
    total = 4 * 2 * (per_loop["LAUNCH"] + per_loop["GEMM"])
    launched = sum(gpu.LAUNCHES[k] - before.get(k, 0) for k in ("kernel", "gemm"))
    assert launched == total


def test_auto_takes_triton_on_cuda_only(monkeypatch, caplog) -> None:
    """`choose` reads the device's type only: on cuda auto takes triton for every variant the backend runs, and says
    nothing (no slower backend runs); on a CPU never, even with the compiled loops off; named, it runs."""
    monkeypatch.setattr(_ext, "_said", set())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    triton_variants = [v for v in zoo.nn.list_variants() if "triton" in v.cell.backends]
    assert {v.name for v in triton_variants} == {
        "bn_lstm", "seqbn_lstm", "ln_lstm", "rms_lstm", "ln_gru", "rms_gru", "bn_indrnn"
    }  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="zoo.nn"):
        for v in triton_variants:
            assert backends.choose("auto", v.name, v.cell.backends, cuda) == "triton"
            assert backends.choose("auto", v.name, v.cell.backends, cpu) != "triton"
        monkeypatch.setenv("ZOO_NO_EXT", "1")
        assert zoo.nn.RNN("ln_lstm", IN, H).backend == "python"
    assert caplog.records == []
    assert zoo.nn.RNN("ln_lstm", IN, H, backend="triton").backend == "triton"
    assert kernels.INTERPRETED == gpu.interpret_requested()


def test_on_a_cpu_triton_needs_the_interpreter(monkeypatch) -> None:
    """Named on a CPU without ``TRITON_INTERPRET=1``, or without Triton, the backend is an error that says why."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' cannot run variant 'ln_gru' here: on the CPU the Triton"):
        zoo.nn.RNN("ln_gru", IN, H, backend="triton")
    monkeypatch.setattr(gpu, "installed", lambda: False)
    with pytest.raises(ValueError, match=r"here: Triton is not installed \(`pip install 'zoo\[triton\]'`\)"):
        zoo.nn.RNN("ln_gru", IN, H, backend="triton")
    assert gpu.unusable(torch.device("mps")) is not None


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 3e-2), (torch.bfloat16, 0.25)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant", ["ln_lstm", "bn_lstm", "rms_gru", "bn_indrnn"])
def test_under_autocast_the_gemms_run_in_half_precision_the_rest_in_float32(
    variant: str, dtype: torch.dtype, bound: float, monkeypatch, device: torch.device
) -> None:
    """Mixed precision: the recurrent GEMMs take and give autocast's dtype, the outputs and final states are float32,
    and every result is within ``bound`` of the float32 reference relative to its norm (the half-precision rounding
    of W_h, h and the input term: about 8x smaller in float16 than in bfloat16, as their mantissas are; the bound in
    bfloat16 is loose, up to 15% seen in a layer norm's gain gradient). 16 sequences: the batch statistics of a few
    rows amplify any rounding (two rows: the batch norm's gradient is all cancellation)."""
    seen = []
    original = recurrence.gemm

    def gemm(a, b, out, add=False):
        seen.append({a.dtype, b.dtype, out.dtype})
        return original(a, b, out, add)

    monkeypatch.setattr(recurrence, "gemm", gemm)
    hidden, batch, lengths = 8, 16, torch.tensor([5, 4, 3, 5] * 4)
    ref = zoo.nn.RNN(variant, IN, hidden, num_layers=2, bidirectional=True, backend="reference").to(device)
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    x = torch.randn(T, batch, IN).to(device)
    proj = torch.randn(T, batch, 2 * hidden).to(device)
    results = []
    for rnn, amp in ((ref, False), (tri, True)):
        xr = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            out, final = rnn(xr, lengths=lengths)
            final = list(final) if isinstance(final, tuple) else [final]
            loss = (out.float() * proj).sum() + sum(f.float().sum() for f in final)
        assert out.dtype == torch.float32 and all(f.dtype == torch.float32 for f in final)
        grads = torch.autograd.grad(loss, [xr, *rnn.parameters()])
        results.append([out, *final, *grads])
    assert all(s == {dtype} for s in seen) and (len(seen) > 0) == (variant != "bn_indrnn")
    for i, (got, expected) in enumerate(zip(*results, strict=True)):
        assert got.dtype == expected.dtype
        assert (got - expected).norm() <= bound * expected.norm() + 1e-6, i


@pytest.mark.parametrize("variant", ["ln_lstm", "bn_lstm", "rms_gru", "bn_indrnn"])
def test_a_float16_model_keeps_its_dtype(variant: str, device: torch.device) -> None:
    """A model in float16 (no autocast): outputs, states and gradients in float16, the kernels computing in float32.
    Against the float32 reference its largest relative error (over outputs, states, gradients) is at most twice the
    reference engine's own in float16 (both a few percent at these sizes)."""
    ref = zoo.nn.RNN(variant, IN, 8, num_layers=2, bidirectional=True, backend="reference").to(device)
    half = copy.deepcopy(ref).half()
    half_ref = copy.deepcopy(half)
    half.backend = "triton"
    lengths = torch.tensor([5, 4, 3, 5] * 4)
    x = torch.randn(T, 16, IN).to(device)
    results = []
    for rnn in (half, half_ref, ref):
        xr = x.to(rnn.cells[0].weight_ih.dtype).requires_grad_()
        out, final = rnn(xr, lengths=lengths)
        final = list(final) if isinstance(final, tuple) else [final]
        grads = torch.autograd.grad(out.float().sum() + sum(f.float().sum() for f in final), [xr, *rnn.parameters()])
        results.append([t.detach() for t in (out, *final, *grads)])
    assert all(r.dtype == torch.float16 for r in results[0])

    def error(got: list[torch.Tensor]) -> float:
        pairs = zip(got, results[2], strict=True)
        return max(float((g.float() - e).norm() / e.norm().clamp(min=1e-6)) for g, e in pairs)

    assert error(results[0]) <= 2 * error(results[1]) + 1e-3


def test_the_kernels_compile_for_an_h100_without_spilling() -> None:
    """What the interpreter cannot check: Triton's compiler builds every kernel for sm_90 at the tiles the host picks
    (`zoo.nn.gpu.compile --quick`, in a process without ``TRITON_INTERPRET``), with no registers spilled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "zoo.nn.gpu.compile", "--quick"], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 19 and all(" REG:" in line for line in lines), run.stdout
    assert all(line.endswith("STACK:0") for line in lines), run.stdout
