"""The compiled loops (`zoo/nn/csrc/`) equal the Python fused loop and the step-by-step engine.

A session fixture builds the extension once (about a minute the first time; the cache keeps it); the module is skipped
only where no C++ compiler exists or ``ZOO_NO_EXT`` is set. Every LSTM-family normalization (batch norm with per-step
and shared statistics and without the recurrent ones, sequence-wise BN, LayerNorm, RMSNorm) and the LayerNorm and
RMSNorm GRUs, training and evaluation, a padded batch, 2 layers, bidirectional: outputs, final states, every gradient
and the running statistics.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import zoo.nn
from zoo.nn import _ext, cells
from zoo.nn import fused as fused_module

B, T, IN, H = 4, 6, 3, 5
LENGTHS = torch.tensor([4, 6, 1, 3])

CASES = [
    ("bn_lstm", {"max_steps": T}),
    ("bn_lstm", {"statistics": "shared"}),
    ("bn_lstm", {"max_steps": T, "recurrent_bn": False}),
    ("seqbn_lstm", {}),
    ("ln_lstm", {}),
    ("rms_lstm", {}),
    ("ln_gru", {}),
    ("rms_gru", {}),
]
IDS = [v + "".join(f"-{k}={o}" for k, o in opts.items() if k != "max_steps") for v, opts in CASES]


@pytest.fixture(scope="session", autouse=True)
def extension():
    if os.environ.get("ZOO_NO_EXT", "") not in ("", "0"):
        pytest.skip("ZOO_NO_EXT is set: the compiled loops are disabled")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++")):
        pytest.skip("no C++ compiler: the compiled loops cannot be built")
    if not _ext.library().is_file():
        _ext.build(_ext.cpu_level())
    module = _ext.load()
    assert module is not None and fused_module.extension_available()
    assert _ext.loaded_level() == _ext.cpu_level()  # (ZOO_EXT_ISA runs this module on a lower level's build)
    return module


class Spy:
    """Counts the calls of the compiled forward and backward loops (LSTM and GRU), and the forward calls in inference
    mode (the LSTM's ``s``, the GRU's ``a_all`` not kept)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forward = self.backward = self.inference = 0
        for cls, saved in ((fused_module.FusedLSTM, 11), (fused_module.FusedGRU, 10)):
            fwd, bwd = cls._forward_ext, cls._backward_ext

            def forward(*args, fwd=fwd, saved=saved):
                self.forward += 1
                self.inference += args[saved] is None
                return fwd(*args)

            def backward(*args, bwd=bwd):
                self.backward += 1
                return bwd(*args)

            monkeypatch.setattr(cls, "_forward_ext", staticmethod(forward))
            monkeypatch.setattr(cls, "_backward_ext", staticmethod(backward))


def states(variant: str) -> int:
    """The tensors of a variant's recurrent state: (h, c), or h for a GRU."""
    return 1 if variant.endswith("gru") else 2


def run(rnn, x, state, proj, lengths, monkeypatch, ext: bool):
    """Outputs, final states, gradients (input, states, parameters) and buffers after one forward and backward."""
    with monkeypatch.context() as m:
        if not ext:
            m.setenv("ZOO_NO_EXT", "1")
        xr = x.clone().requires_grad_()
        sr = [s.clone().requires_grad_() for s in state]
        out, final = rnn(xr, tuple(sr) if len(sr) > 1 else sr[0], lengths=lengths)
        final = final if isinstance(final, tuple) else (final,)
        loss = (out * proj).sum() + sum((f * (k + 1)).sum() for k, f in enumerate(final))
        grads = torch.autograd.grad(loss, [xr, *sr, *rnn.parameters()])
    return out, final, grads, [b.clone() for b in rnn.buffers()]


def assert_close(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """float64: equal to 1e-9; float32: within 5e-4 of b's norm (as test_nn_fused's float32 check)."""
    if a.dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    else:
        assert (a - b).norm() <= 5e-4 * b.norm() + 1e-6, name


@pytest.mark.parametrize("chunk", [1024, 6], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("lengths", [True, False], ids=["lengths", "full"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_extension_equals_python_and_steps(variant, options, training, lengths, dtype, chunk, monkeypatch) -> None:
    """``chunk``: the W_h gradient's chunk (`OuterSum` rows): 6 rows make several chunks of 1 or 2 steps."""
    torch.manual_seed(0)
    monkeypatch.setattr(fused_module.OuterSum.__init__, "__defaults__", (chunk,))
    base = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, **options).to(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.3 * torch.randn_like(p))
    base.train()(torch.randn(T, B, IN, dtype=dtype), lengths=LENGTHS)  # running statistics away from (0, 1)
    models = [copy.deepcopy(base) for _ in range(3)]  # compiled step, Python fused loop, step-by-step engine
    models[2].fused = False
    x = torch.randn(T, B, IN, dtype=dtype)
    state = [torch.randn(4, B, H, dtype=dtype) for _ in range(states(variant))]
    proj = torch.randn(T, B, 2 * H, dtype=dtype)
    spy = Spy(monkeypatch)
    results = []
    for k, rnn in enumerate(models):
        rnn.train(training)
        results.append(run(rnn, x, state, proj, LENGTHS if lengths else None, monkeypatch, ext=k == 0))
    calls = 0 if models[0].cells[0].native else 4  # 2 layers x 2 directions (seqbn_lstm evaluates on the vendor kernel)
    assert spy.forward == spy.backward == calls
    names = ["output", "h_n", "c_n"][: 1 + len(state)] + ["input", "h0", "c0"][: 1 + len(state)]
    names += [n for n, _ in base.named_parameters()]
    names += [n for n, _ in base.named_buffers()]
    flat = [[*r[0:1], *r[1], *r[2], *r[3]] for r in results]
    for other in flat[1:]:
        for name, a, b in zip(names, flat[0], other, strict=True):
            assert_close(a, b, name)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mkl"])
def test_weight_gradient_products_through_either_library(onednn: bool, monkeypatch) -> None:
    """`outer` and `outer_add` (oneDNN on AVX-512 CPUs other than Intel's, MKL elsewhere) give ``a.T @ b``, and a
    float32 training step's W_h gradient, taken in chunks, equals the step-by-step engine's through either."""
    monkeypatch.setattr(fused_module.gemm, "_onednn_outer_cpu", lambda: onednn)
    torch.manual_seed(0)
    a, b = torch.randn(37, 20), torch.randn(37, 6)
    assert fused_module.gemm._outer_onednn(a) == (onednn and torch.backends.mkldnn.is_available())
    torch.testing.assert_close(fused_module.outer(a, b), a.t() @ b)
    out = fused_module.outer(a, b)
    fused_module.outer_add(out, a[:9], b[:9])
    torch.testing.assert_close(out, a.t() @ b + a[:9].t() @ b[:9])
    monkeypatch.setattr(fused_module.OuterSum.__init__, "__defaults__", (6,))
    for variant in ("ln_lstm", "ln_gru"):
        base = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True)
        steps = copy.deepcopy(base)
        steps.fused = False
        x = torch.randn(T, B, IN)
        state = [torch.randn(4, B, H) for _ in range(states(variant))]
        proj = torch.randn(T, B, 2 * H)
        got = run(base, x, state, proj, LENGTHS, monkeypatch, ext=True)[2]
        want = run(steps, x, state, proj, LENGTHS, monkeypatch, ext=False)[2]
        for name, g, w in zip(["input", "h0", "c0"][: 1 + len(state)] + [n for n, _ in base.named_parameters()],
                              got, want, strict=True):  # fmt: skip
            assert_close(g, w, f"{variant} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_extension_inference_equals_steps(variant, options, training, dtype, monkeypatch) -> None:
    """Under `torch.no_grad` (parameters that require grad) the compiled loops run in inference mode (no saved
    tensors) and give the step-by-step engine's results."""
    torch.manual_seed(0)
    base = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, **options).to(dtype)
    base.train()(torch.randn(T, B, IN, dtype=dtype), lengths=LENGTHS)
    steps = copy.deepcopy(base)
    steps.fused = False
    x = torch.randn(T, B, IN, dtype=dtype)
    state = tuple(torch.randn(4, B, H, dtype=dtype) for _ in range(states(variant)))
    state = state if len(state) > 1 else state[0]
    spy = Spy(monkeypatch)
    results = []
    for rnn in (base, steps):
        rnn.train(training)
        with torch.no_grad():
            out, final = rnn(x, state, lengths=LENGTHS)
        results.append((out, final, [b.clone() for b in rnn.buffers()]))
    calls = 0 if base.cells[0].native else 4
    assert spy.forward == spy.inference == calls and spy.backward == 0
    (out, final, buffers), (rout, rfinal, rbuffers) = results
    final, rfinal = (final, rfinal) if isinstance(final, tuple) else ((final,), (rfinal,))
    for a, b in zip([out, *final, *buffers], [rout, *rfinal, *rbuffers], strict=True):
        assert_close(a, b)


DEFERRED = [
    ("ln_lstm", {}),
    ("rms_lstm", {}),
    ("bn_lstm", {"max_steps": 3}),  # (steps past T_max reuse the last statistics)
    ("bn_lstm", {"statistics": "shared"}),
]


def deferred_runs(rnn, x, state, lengths, monkeypatch) -> tuple[list, list, int]:
    """Inference outputs and final states with the input term deferred to the compiled loop, and without (the input
    term of all steps first), and how many cells deferred it."""
    made = []
    real = cells.defer_input
    monkeypatch.setattr(cells, "defer_input", lambda *a: made.append(real(*a)) or made[-1])
    with torch.no_grad():
        out, (h, c) = rnn(x, state, lengths=lengths)
        monkeypatch.setattr(cells, "defer_input", lambda *a: None)
        rout, (rh, rc) = rnn(x, state, lengths=lengths)
    return [out, h, c], [rout, rh, rc], sum(d is not None for d in made)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("variant", "options"), DEFERRED, ids=[f"{v}-{'-'.join(o)}" for v, o in DEFERRED])
def test_deferred_input_term_equals_the_input_term_first(variant, options, threads, monkeypatch) -> None:
    """In inference (float32) the LSTM loop computes N(W_x x) + b a step at a time (`DeferredInput`), each thread for
    its rows, from several blocks of W_x (160 units: 640 gate features, 10 blocks; 70 input features): outputs and
    final states equal those of the input term computed for all steps first, on a padded batch, 2 layers, both
    directions, for 6 steps (the per-step batch norm: 3 statistics, the last reused)."""
    torch.manual_seed(0)
    rnn = zoo.nn.RNN(variant, 70, 160, num_layers=2, bidirectional=True, **options)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for name, b in rnn.named_buffers():
            if "running" in name:
                b.uniform_(0.5, 1.5) if "var" in name else b.normal_(0, 0.3)
    rnn.eval()
    x = torch.randn(T, B, 70)
    state = tuple(torch.randn(4, B, 160) for _ in range(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want, deferred = deferred_runs(rnn, x, state, LENGTHS, monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert deferred == 4  # 2 layers x 2 directions
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


def test_deferred_input_term_under_a_training_batch_norm_in_the_recurrence(monkeypatch) -> None:
    """A recurrent batch norm left in training mode under `torch.no_grad` (its statistics span each step's rows) runs
    the loop that shares each step among the threads; the deferred input term goes through it too, and the running
    statistics move as without it."""
    torch.manual_seed(0)
    rnn = zoo.nn.RNN("bn_lstm", 70, 160, max_steps=T)
    rnn.eval()
    for cell in rnn.cells:
        cell.bn_hh.train()
        cell.bn_c.train()
    x = torch.randn(T, B, 70)
    state = tuple(torch.randn(1, B, 160) for _ in range(2))
    before = [b.clone() for b in rnn.buffers()]
    got, want, deferred = deferred_runs(rnn, x, state, LENGTHS, monkeypatch)
    assert deferred == 1
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    moved = [b - a for a, b in zip(before, rnn.buffers(), strict=True)]
    assert any(m.abs().max() > 0 for m in moved)  # (both runs moved them: equal outputs need equal statistics)


@pytest.mark.parametrize("variant", ["ln_lstm", "ln_gru"])
def test_a_batch_first_input_takes_the_fused_input_term(variant: str, monkeypatch) -> None:
    """A batch-first input (the layout of the LightningModules) reaches the fused input term (one compiled node) as
    contiguous time-major rows, as a time-major input does, with the same output and gradients."""
    calls = []
    real = fused_module.input_term._InputNorm.apply
    monkeypatch.setattr(fused_module.input_term._InputNorm, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    time_major = zoo.nn.RNN(variant, IN, H)
    batch_first = zoo.nn.RNN(variant, IN, H, batch_first=True)
    batch_first.load_state_dict(time_major.state_dict())
    x = torch.randn(B, T, IN)
    out, _ = batch_first(x)
    fused = len(calls)
    want, _ = time_major(x.transpose(0, 1).contiguous())
    assert fused > 0 and len(calls) == 2 * fused
    torch.testing.assert_close(out.transpose(0, 1), want)
    out.square().sum().backward()
    want.square().sum().backward()
    for p, q in zip(batch_first.parameters(), time_major.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", ["ln_lstm", "rms_lstm", "ln_gru", "rms_gru"])
def test_extension_row_norms_over_wide_rows_equal_steps(variant, dtype, monkeypatch) -> None:
    """Rows wider than the row statistics' partial sums (`lane_sum`: 4 vectors of 16 float32 or 8 float64 lanes),
    with remainders of whole vectors and of single values: 25 units make LSTM gate rows of 100 and GRU rows of 75 and
    25 (float32 100 = 64 + 2·16 + 4, 75 = 64 + 11, 25 = 16 + 9; float64 75 = 2·32 + 8 + 3). Outputs and every
    gradient equal the step-by-step engine's."""
    torch.manual_seed(0)
    hidden = 25
    base = zoo.nn.RNN(variant, IN, hidden).to(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.3 * torch.randn_like(p))
    steps = copy.deepcopy(base)
    steps.fused = False
    x = torch.randn(T, B, IN, dtype=dtype)
    state = [torch.randn(1, B, hidden, dtype=dtype) for _ in range(states(variant))]
    proj = torch.randn(T, B, hidden, dtype=dtype)
    spy = Spy(monkeypatch)
    results = [run(rnn, x, state, proj, LENGTHS, monkeypatch, ext=k == 0) for k, rnn in enumerate((base, steps))]
    assert spy.forward == spy.backward == 1
    flat = [[r[0], *r[1], *r[2]] for r in results]
    for a, b in zip(*flat, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_extension_gradcheck(variant, options, training, monkeypatch) -> None:
    """float64 finite differences through the compiled step (the input and both initial states)."""
    lengths = torch.tensor([3, 1, 2])
    rnn = zoo.nn.RNN(variant, 2, 2, num_layers=2, bidirectional=True, **options).double()
    if not training:
        rnn.train()(torch.randn(3, 3, 2, dtype=torch.float64), lengths=lengths)
    rnn.train(training)
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(states(variant))]
    spy = Spy(monkeypatch)

    def f(x, *state):
        out, final = rnn(x, state if len(state) > 1 else state[0], lengths=lengths)
        return out, *(final if len(state) > 1 else (final,))

    assert torch.autograd.gradcheck(f, (x, *state))
    if rnn.cells[0].native:  # seqbn_lstm in evaluation: the vendor kernel
        assert spy.forward == spy.backward == 0
    else:
        assert spy.forward > 0 and spy.backward > 0


def test_no_ext_env_forces_the_python_loop(monkeypatch) -> None:
    monkeypatch.setenv("ZOO_NO_EXT", "1")
    assert not fused_module.extension_available()
    spy = Spy(monkeypatch)
    rnn = zoo.nn.RNN("ln_lstm", IN, H)
    rnn(torch.randn(T, B, IN))[0].sum().backward()
    assert spy.forward == spy.backward == 0


def test_the_compiled_batch_norm_keeps_the_modules_minimum_of_rows(extension) -> None:
    """A step moves the running statistics only from `zoo.nn.norm.MIN_ROWS` valid rows, in C++ as in Python."""
    assert extension.MIN_ROWS == zoo.nn.norm.MIN_ROWS == 2


def test_load_never_compiles(monkeypatch, tmp_path) -> None:
    """Without a built library in the cache, `load` returns None at once (the layer runs the Python loop)."""
    monkeypatch.setenv("ZOO_EXT_DIR", str(tmp_path))
    assert _ext.load() is None
    assert not any(tmp_path.iterdir())


def test_the_cpu_level_follows_torch_and_zoo_ext_isa_only_lowers_it(monkeypatch) -> None:
    """The level is PyTorch's own dispatch level; ``ZOO_EXT_ISA`` may lower it, not raise it or name an unknown one."""
    monkeypatch.delenv("ZOO_EXT_ISA", raising=False)  # (the suite may run under a forced level)
    known = list(_ext.levels())
    for capability, level in [("AVX512", "avx512"), ("AVX2", "avx2"), ("DEFAULT", "baseline")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert _ext.cpu_level() == (level if level in known else "baseline")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setenv("ZOO_EXT_ISA", known[0])
    if known[0] != "baseline":
        with pytest.raises(ValueError, match="this CPU runs 'baseline' at most"):
            _ext.cpu_level()
    monkeypatch.setenv("ZOO_EXT_ISA", "sse9")
    with pytest.raises(ValueError, match="ZOO_EXT_ISA='sse9'"):
        _ext.cpu_level()


def test_a_missing_build_or_a_lower_one_is_said_once(monkeypatch, tmp_path, caplog) -> None:
    """No build: the Python loop runs and the log says so once, with the command; where the CPU's own level is
    missing and a lower one is built, the lower one runs, said once."""
    known = list(_ext.levels())
    lowest = _ext.library(known[-1])
    if not lowest.is_file():
        _ext.build(known[-1])
    monkeypatch.setenv("ZOO_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(_ext, "_said", set())
    monkeypatch.setattr(_ext, "_loaded", {})
    with caplog.at_level("WARNING", logger="zoo.nn"):
        assert _ext.load() is None and _ext.load() is None
    assert [r.message.count("python -m zoo.nn.build") for r in caplog.records] == [1]
    if _ext.cpu_level() == known[-1]:
        return
    _ext.library(known[-1]).parent.mkdir(parents=True)
    shutil.copy(lowest, _ext.library(known[-1]))
    monkeypatch.setattr(_ext, "_loaded", {})
    caplog.clear()
    with caplog.at_level("WARNING", logger="zoo.nn"):
        assert _ext.load() is not None and _ext.load() is not None and _ext.loaded_level() == known[-1]
    assert len(caplog.records) == 1 and f"their {known[-1]!r} build" in caplog.records[0].message


@pytest.mark.parametrize("level", [lv for lv in _ext.levels() if lv != _ext.cpu_level()])
def test_every_other_built_level_equals_the_python_loop(level: str) -> None:
    """The builds for the lower levels this CPU runs (e.g. avx2 and baseline on an AVX-512 CPU) pass the same checks,
    and their recurrent GEMM (blocks of another width there) equals torch.mm, in a child process that ``ZOO_EXT_ISA``
    points at them (one level's module per process)."""
    known = list(_ext.levels())
    if known.index(level) < known.index(_ext.cpu_level()):
        pytest.skip(f"this CPU cannot run the {level!r} build")
    if not _ext.library(level).is_file():
        _ext.build(level)
    env = {**os.environ, "ZOO_EXT_ISA": level}
    checks = "equals_python_and_steps or recurrent_gemm_equals_mm"
    cmd = [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-k", checks]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* passed", done.stdout), done.stdout[-500:]


def _input_norms() -> list[tuple[str, torch.nn.Module]]:
    bn = zoo.nn.norm.MaskedBatchNorm
    return [
        ("layernorm", torch.nn.LayerNorm(8)),
        ("rmsnorm", zoo.nn.norm.RMSNorm(8)),
        ("bn-per-step", bn(8, max_steps=T, gamma=0.1, bias=False)),
        ("bn-past-max-steps", bn(8, max_steps=T - 2, gamma=0.1, bias=True)),
        ("bn-shared", bn(8, None, bias=False)),
    ]


@pytest.mark.parametrize("index", range(5), ids=[n for n, _ in _input_norms()])
def test_deferred_input_term_materializes_as_the_module_computes_it(index: int) -> None:
    """Where the compiled loop turns out not to run, `DeferredInput.materialize` gives the input term of the packed
    rows as the norm module computes it (a per-step batch norm in evaluation: each row with its step's map)."""
    torch.manual_seed(0)
    name, module = _input_norms()[index]
    module.eval()
    x = torch.randn(T, B, 7)
    proj, shift = torch.randn(8, 7), torch.randn(8)
    with torch.no_grad():
        for name_b, b in module.named_buffers():
            b.uniform_(0.5, 1.5) if "var" in name_b else b.normal_(0, 0.3)
        deferred = fused_module.defer_input(module, x, proj, shift)
        assert deferred is not None, name
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        layout = fused_module.Layout(packed.batch_sizes.tolist())
        got = deferred.with_rows(packed.data).materialize(layout)
        p = x @ proj.t()
        want = (module(p) if not isinstance(module, zoo.nn.norm.MaskedBatchNorm) else module(p, None)) + shift
        want = torch.nn.utils.rnn.pack_padded_sequence(want, LENGTHS, enforce_sorted=False).data
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1 << 19, 16], ids=["one-block", "blocks"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("proj", [None, 1, 3], ids=["projected", "narrow-input", "wide-input"])
@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("index", range(5), ids=[n for n, _ in _input_norms()])
def test_input_norm_kernel_equals_module(index, shift, proj, training, block, monkeypatch) -> None:
    """`normalize_input` (W_x x and its normalization in one node) = the module of the projection plus the shift:
    output, every gradient, running statistics (float64, statistics away from their start). ``proj``: the input
    width of W_x (None: x is the projection already); 1 is narrow enough for the projection to be recomputed in
    backward (8 · 1 <= 8 features), 3 is kept. Evaluation: a batch norm's affine map of its running statistics.
    ``block``: the elements projected and normalized at a time; 16 makes blocks of one step or two rows."""
    monkeypatch.setattr(fused_module.common, "BLOCK", block)
    _, module = _input_norms()[index]
    module = module.double().train()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if hasattr(module, "running_mean"):
        module(torch.randn(T, B, 8, dtype=torch.float64) * 2 + 1)  # running statistics away from (0, 1)
    module.train(training)
    reference = copy.deepcopy(module)
    x = torch.randn(T, B, proj or 8, dtype=torch.float64) * 3 + 0.5
    w = None if proj is None else torch.randn(8, proj, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64) if shift else None
    dy = torch.randn(T, B, 8, dtype=torch.float64)
    results = []
    for m, kernel in ((module, True), (reference, False)):
        xr = x.clone().requires_grad_()
        wr = None if w is None else w.clone().requires_grad_()
        br = None if b is None else b.clone().requires_grad_()
        if kernel:
            y = fused_module.normalize_input(m, xr, wr, br, None)
            assert y is not None
        else:
            y = m(xr if wr is None else xr @ wr.t()) + (0 if br is None else br)
        wrt = [xr, *m.parameters()] + [t for t in (wr, br) if t is not None]
        results.append((y, torch.autograd.grad((y * dy).sum(), wrt), [t.clone() for t in m.buffers()]))
    (y, grads, buffers), (ry, rgrads, rbuffers) = results
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-11)
    for g, rg in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(buffers, rbuffers, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("proj", [1, 3], ids=["narrow-input", "wide-input"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_norm_float32_blocks_of_many_panels(training, proj, threads, monkeypatch) -> None:
    """float32: the projection through brgemm over several panels (200 features: 4 blocks of 64, shared among the
    threads), a block of rows at a time, equals the module of the projection: every panel of every block computed
    (three calls on fresh buffers, so that a panel left unwritten would show)."""
    monkeypatch.setattr(fused_module.common, "BLOCK", 200 * 3)
    torch.manual_seed(0)
    module = torch.nn.LayerNorm(200).train(training)
    x = torch.randn(T, B, proj) * 3 + 0.5
    w, b = torch.randn(200, proj), torch.randn(200)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):  # (fresh buffers each call: garbage left unwritten would show)
            y = fused_module.normalize_input(module, x, w, b, None)
            torch.testing.assert_close(y, module(x @ w.t()) + b, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_input_norm_recomputes_a_narrow_projection() -> None:
    """A narrow input's projection is not saved for backward (the input and the weights are) unless
    ``keep_projection``; a wide one's is."""
    ln = torch.nn.LayerNorm(16)
    for width, keep, kept in ((2, False, None), (2, True, (T * B, 16)), (3, False, (T * B, 16))):
        y = fused_module.normalize_input(
            ln, torch.randn(T, B, width), torch.randn(16, width, requires_grad=True), None, None, keep
        )
        shapes = [None if t is None else tuple(t.shape) for t in y.grad_fn.saved_tensors]
        assert shapes == [(T, B, width), (16, width), kept]


@pytest.mark.parametrize("variant", ["ln_lstm", "rms_lstm", "bn_lstm", "ln_gru"])
def test_lstm_cells_keep_their_input_projection(variant: str) -> None:
    """The LSTM cells hold W_x x for backward even for a narrow input (faster); the GRU recomputes it."""
    options = {"max_steps": T} if "max_steps" in zoo.nn.get_variant(variant).options else {}
    rnn = zoo.nn.RNN(variant, 2, 16, **options)  # 8 · 2 <= the 16 to 64 features of a gate block: narrow
    out, _ = rnn(torch.randn(T, B, 2))
    nodes, seen = [out.grad_fn], []
    while nodes:
        node = nodes.pop()
        if node is not None and node not in seen:
            seen.append(node)
            nodes += [n for n, _ in node.next_functions]
    inputs = [n for n in seen if type(n).__name__ == "_InputNormBackward"]
    assert inputs
    saved = [n.saved_tensors[2] is not None for n in inputs]
    assert saved == [variant.endswith("lstm")] * len(inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("index", range(5), ids=[n for n, _ in _input_norms()])
def test_input_norm_kernel_gradcheck(index: int, training: bool) -> None:
    _, module = _input_norms()[index]
    module = module.double().train()
    if hasattr(module, "running_mean"):
        module(torch.randn(T, 3, 8, dtype=torch.float64) * 2 + 1)
    module.train(training)
    x = torch.randn(T, 3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    weight = next(module.parameters()).detach().clone().requires_grad_()
    norm = fused_module.StepNorm(module)  # the kind, eps and running statistics; the gain is gradcheck's input

    def f(x, b, weight):
        return fused_module.input_term._InputNorm.apply(x, None, weight, b, norm, _ext.load(), False, True)

    assert torch.autograd.gradcheck(f, (x, b, weight))


def test_input_norm_kernel_declines_what_it_lacks() -> None:
    """Padding in training and a past-T_max error go to the module (None); evaluation ignores the padding."""
    bn = zoo.nn.norm.MaskedBatchNorm(8, max_steps=T - 1, past_max_steps="error")
    x = torch.randn(T, B, 8)
    mask = torch.ones(T - 1, B, dtype=torch.bool)
    assert fused_module.normalize_input(bn, x[: T - 1], None, None, mask) is None
    assert fused_module.normalize_input(bn.eval(), x[: T - 1], None, None, mask) is not None
    for training in (True, False):
        assert fused_module.normalize_input(bn.train(training), x, None, None, None) is None
        assert fused_module.normalize_input(bn, x[: T - 1], None, None, None) is not None


@pytest.mark.parametrize(("steps", "batch", "max_steps"), [(64, 64, None), (2, 4096, 2)], ids=["shared", "per-step"])
def test_input_norm_kernel_large_batch_norm(steps: int, batch: int, max_steps: int | None) -> None:
    """Statistics over more than 2^18 elements are summed row-parallel: the same output, gradients and running
    statistics as the module (float64)."""
    features = 80
    assert batch * features * (steps if max_steps is None else 1) > 2**18
    bn = zoo.nn.norm.MaskedBatchNorm(features, max_steps=max_steps, gamma=0.7).double().train()
    reference = copy.deepcopy(bn)
    x = torch.randn(steps, batch, features, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    results = []
    for m, kernel in ((bn, True), (reference, False)):
        xr = x.clone().requires_grad_()
        y = fused_module.normalize_input(m, xr, None, None, None) if kernel else m(xr)
        results.append(
            (y, torch.autograd.grad((y * dy).sum(), [xr, *m.parameters()]), [b.clone() for b in m.buffers()])
        )
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("variant", "options"), CASES, ids=IDS)
def test_extension_is_bitwise_reproducible(variant, options) -> None:
    """The same step gives the same bits whatever the allocator's state (a resumed run must equal an uninterrupted
    one): the compiled loops' scratch buffers are aligned like tensors, so their vector loops split the same way."""
    torch.manual_seed(0)
    rnn = zoo.nn.RNN(variant, IN, 8, num_layers=2, **options)
    x = torch.randn(12, 16, IN)
    grads, keep = [], []
    for k in range(8):
        keep.append(torch.empty(k * 37 + 1))  # moves later allocations by odd numbers of bytes
        rnn.zero_grad()
        out, _ = rnn(x)
        (out**2).sum().backward()
        grads.append([p.grad.clone() for p in rnn.parameters()])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("rows", "depth", "features"),
    [
        (1, 1, 1), (5, 3, 20), (6, 16, 64), (7, 33, 65), (13, 257, 40), (32, 600, 128), (100, 100, 400),
        (64, 1000, 4000), (3, 1025, 64), (9, 2500, 130),
    ],
)  # fmt: skip
def test_recurrent_gemm_equals_mm(extension, threads: int, rows: int, depth: int, features: int) -> None:
    """The recurrent GEMM for float32 (brgemm over blocks of `PANEL_WIDTH` features, the threads sharing the blocks)
    equals torch.mm: full and partial blocks, one block and many, depths over 1024 (taken in chunks), any strides of W
    (contiguous, column-major, rows further apart than their length), packed and multiplied on 1 and 2 threads;
    float64 goes to torch.mm."""
    x = torch.randn(rows, depth)
    w = torch.randn(features, depth)
    reference = (x.double() @ w.double().t()).float()
    layouts = [w, w.t().contiguous().t(), torch.cat([w, torch.randn(features, 5)], 1)[:, :depth]]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed = [extension.pack_panels(v) for v in layouts]
        got = [extension.panels_mm(x, v, p) for v, p in zip(layouts, packed, strict=True)]
    finally:
        torch.set_num_threads(before)
    for p in packed:
        torch.testing.assert_close(p, packed[0], rtol=0, atol=0)
    block = extension.PANEL_WIDTH
    assert packed[0].shape == (depth * ((features + block - 1) // block) * block,)
    for g in got:
        torch.testing.assert_close(g, reference, rtol=1e-5, atol=1e-5 * depth**0.5)
    torch.testing.assert_close(extension.panels_mm(x.double(), w.double(), None), x.double() @ w.double().t())


def _amx(extension) -> None:
    if not extension.brgemm_bf16:
        pytest.skip("this CPU has no bfloat16 matrix unit oneDNN packs for (AMX): the bfloat16 products do not run")


@pytest.mark.parametrize(
    ("rows", "depth", "features"), [(1, 1, 1), (5, 7, 20), (13, 33, 65), (64, 512, 256), (4, 1025, 64), (9, 2501, 70)]
)
def test_bf16_blocks_equal_the_products_of_bf16_rounded_operands(extension, rows, depth, features) -> None:
    """bfloat16 blocks (VNNI, odd depths padded with a zero row; depths over 1024 in even chunks): the product of
    the bfloat16-rounded operands, accumulated in float32, so within float32 rounding of the float64 product of the
    rounded operands."""
    _amx(extension)
    x, w = torch.randn(rows, depth), torch.randn(features, depth)
    reference = x.bfloat16().double() @ w.bfloat16().double().t()
    packed = extension.pack_panels(w, True)
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(extension.panels_mm(x, w, packed).double(), reference, rtol=1e-5, atol=1e-5 * depth)


@pytest.mark.parametrize("variant", ["ln_lstm", "bn_lstm", "rms_gru"])
def test_autocast_bf16_runs_the_recurrent_products_in_bf16(extension, variant, monkeypatch) -> None:
    """Under torch.autocast("cpu", bfloat16) the compiled loops pack W_h (and W_h.T in backward) in bfloat16, outside
    it in float32; the outputs and gradients stay float32 and within bfloat16 rounding of the float32 run."""
    _amx(extension)
    dtypes = []

    class Spy(fused_module.Panels):  # the recurrences' weights (the input term's projection stays float32)
        def __init__(self, ext, weight, bf16=False):
            super().__init__(ext, weight, bf16)
            dtypes.append(self.packed.dtype)

    for module in (fused_module.lstm, fused_module.gru):
        monkeypatch.setattr(module, "Panels", Spy)
    torch.manual_seed(0)
    options = {"max_steps": T} if variant == "bn_lstm" else {}
    rnn = zoo.nn.RNN(variant, IN, 16, num_layers=2, **options)
    x = torch.randn(T, B, IN, requires_grad=True)
    runs = []
    for autocast in (False, True):
        dtypes.clear()
        x.grad = None
        rnn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = rnn(x)
        out.sum().backward()
        assert out.dtype == torch.float32
        assert set(dtypes) == {torch.bfloat16 if autocast else torch.float32}
        assert len(dtypes) == 4  # forward and backward, per layer
        runs.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in rnn.parameters()]))
    (out32, dx32, g32), (out16, dx16, g16) = runs
    torch.testing.assert_close(out16, out32, rtol=0, atol=0.05)
    for a, b in [(dx16, dx32), *zip(g16, g32, strict=True)]:
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_autocast_bf16_without_amx_stays_float32_and_says_so_once(extension, monkeypatch, caplog) -> None:
    """Where oneDNN cannot pack bfloat16 for a matrix unit, autocast leaves the products in float32, logged once."""
    import logging

    monkeypatch.setattr(extension, "brgemm_bf16", False)
    monkeypatch.setattr(_ext, "_said", set())
    rnn = zoo.nn.RNN("ln_lstm", IN, H)
    with caplog.at_level(logging.WARNING, logger="zoo.nn"), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = rnn(torch.ones(T, B, IN))[0]
        rnn(torch.ones(T, B, IN))
    with torch.no_grad():
        torch.testing.assert_close(reference, rnn(torch.ones(T, B, IN))[0])  # float32 products, as without autocast
    assert [r.message for r in caplog.records if "bfloat16" in r.message] == [
        "autocast bfloat16: this CPU has no bfloat16 matrix unit oneDNN packs for (AMX); the recurrent GEMMs of the "
        "compiled loops stay float32"
    ]
