"""bn_lstm's ablation options: ``statistics`` ("per_step", Cooijmans et al. sec. 3-4, or "shared": one set of statistics
over time) and ``recurrent_bn`` (False: only the input term is normalized).

For every combination the fused path equals the step-by-step engine; the shared mode and the input-only mode are checked
against loops written out here from the equations, and the shared mode passes gradcheck.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import zoo.nn
from zoo.models.base import build_rnn

IN, H, B, T = 3, 4, 5, 6
LENGTHS = torch.tensor([6, 2, 5, 1, 4])  # unsorted; a single valid row at the last step
MOMENTUM, EPS = 0.3, 1e-3
COMBOS = list(itertools.product(["per_step", "shared"], [True, False]))
COMBO_IDS = [f"{s}-{'rbn' if r else 'input_only'}" for s, r in COMBOS]
combos = pytest.mark.parametrize(("statistics", "recurrent_bn"), COMBOS, ids=COMBO_IDS)
fused_param = pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])


def make(statistics: str, recurrent_bn: bool, layers: int = 2, bidirectional: bool = True, **kw) -> zoo.nn.RNN:
    return zoo.nn.RNN(
        "bn_lstm",
        IN,
        H,
        num_layers=layers,
        bidirectional=bidirectional,
        statistics=statistics,
        recurrent_bn=recurrent_bn,
        momentum=MOMENTUM,
        eps=EPS,
        **kw,
    )


def randomize(rnn: torch.nn.Module) -> None:
    """Every parameter away from its initial value (γ = 0.1, β = 0, ...), so that each one matters."""
    with torch.no_grad():
        for p in rnn.parameters():
            p.uniform_(-1.0, 1.0)


def running(rnn: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in rnn.state_dict().items() if "running" in k}


# ----------------------------------------------------------------------------------------- the hand-written equations


def batch_stats(a: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, int]:
    """Biased mean and variance over the rows ``valid`` of ``a`` (rows x features), and their number."""
    v = a[valid]
    mean = v.mean(0)
    return mean, ((v - mean) ** 2).mean(0), v.shape[0]


def ema(mean: Tensor, var: Tensor, batch_mean: Tensor, batch_var: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """One momentum update towards the batch mean and the *unbiased* batch variance (none with fewer than 2 rows)."""
    if n < 2:
        return mean, var
    return (1 - MOMENTUM) * mean + MOMENTUM * batch_mean, (1 - MOMENTUM) * var + MOMENTUM * batch_var * n / (n - 1)


def normalize(a: Tensor, mean: Tensor, var: Tensor, gain: Tensor, shift: Tensor | None = None) -> Tensor:
    y = (a - mean) / torch.sqrt(var + EPS) * gain
    return y if shift is None else y + shift


def reference(
    cell: zoo.nn.BNLSTMCell, x: Tensor, lengths: Tensor, training: bool, s0: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """One direction of ``bn_lstm`` from the equations, with either ``statistics`` and ``recurrent_bn``.

    Returns the output (time-major), the final (h, c) of every sequence and the running statistics after the pass.
    Only parameter values and the starting running statistics are read from ``cell``, before anything runs.
    """
    shared = cell.statistics == "shared"
    names = ("bn_ih", "bn_hh", "bn_c") if cell.recurrent_bn else ("bn_ih",)
    gains = {n: getattr(cell, n).weight.detach().clone() for n in names}
    beta_c = cell.bn_c.bias.detach().clone() if cell.recurrent_bn else None
    stats = {n: [getattr(cell, n).running_mean.clone(), getattr(cell, n).running_var.clone()] for n in names}
    wx, wh, b = cell.weight_ih.detach(), cell.weight_hh.detach(), cell.bias.detach()
    steps, batch = x.shape[:2]
    valid = torch.arange(steps)[:, None] < lengths[None]  # (T, B)

    def bn(name: str, a: Tensor, ok: Tensor, t: int, shift: Tensor | None = None) -> Tensor:
        """BN of one step's rows ``a`` (the valid ones are ``ok``): shared statistics use row 0 at every step."""
        mean, var = stats[name]
        row = 0 if shared else min(t, mean.shape[0] - 1)
        if not training:
            return normalize(a, mean[row], var[row], gains[name], shift)
        m, v, n = batch_stats(a, ok)
        if shared or t < mean.shape[0]:
            mean[row], var[row] = ema(mean[row], var[row], m, v, n)
        return normalize(a, m, v, gains[name], shift)

    ax = x @ wx.T
    if shared:  # BN(W_x x) over all valid batch x time positions at once
        flat = ax.reshape(steps * batch, -1)
        mean, var = stats["bn_ih"]
        if training:
            m, v, n = batch_stats(flat, valid.reshape(-1))
            mean[0], var[0] = ema(mean[0], var[0], m, v, n)
        else:
            m, v = mean[0], var[0]
        u = normalize(ax, m, v, gains["bn_ih"])
    else:
        u = torch.stack([bn("bn_ih", ax[t], valid[t], t) for t in range(steps)])
    h, c = s0 if s0 is not None else (x.new_zeros(batch, H), x.new_zeros(batch, H))
    outs = []
    for t in range(steps):
        z = h @ wh.T
        if cell.recurrent_bn:
            z = bn("bn_hh", z, valid[t], t)
        i, f, g, o = (u[t] + z + b).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        cn = bn("bn_c", c_new, valid[t], t, beta_c) if cell.recurrent_bn else c_new
        h_new = torch.sigmoid(o) * torch.tanh(cn)
        keep = valid[t, :, None]
        h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
        outs.append(h_new * keep)
    return torch.stack(outs), (h, c), {n: tuple(s) for n, s in stats.items()}


def check_against_reference(fused: bool, statistics: str, recurrent_bn: bool, training: bool, steps: int) -> None:
    """A one-layer, one-direction float64 RNN against `reference` on a padded batch of ``steps`` steps."""
    rnn = make(statistics, recurrent_bn, layers=1, bidirectional=False, fused=fused, max_steps=T).double()
    randomize(rnn)
    rnn.train()(torch.randn(T, B, IN, dtype=torch.float64), lengths=LENGTHS)  # running statistics away from (0, 1)
    rnn.train(training)
    cell = rnn.cells[0]
    x = torch.randn(steps, B, IN, dtype=torch.float64)
    lengths = LENGTHS.clamp(max=steps)
    lengths[0] = steps
    s0 = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    ref_out, (ref_h, ref_c), ref_stats = reference(cell, x, lengths, training, s0)
    out, (h, c) = rnn(x, (s0[0][None], s0[1][None]), lengths=lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h[0], ref_h, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(c[0], ref_c, rtol=1e-9, atol=1e-10)
    for name, (mean, var) in ref_stats.items():
        bn = getattr(cell, name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-9, atol=1e-12, msg=f"{name} running mean")
        torch.testing.assert_close(bn.running_var, var, rtol=1e-9, atol=1e-12, msg=f"{name} running var")


# ----------------------------------------------------------------------------------------------------- construction


@combos
def test_options_build_the_batch_norms(statistics: str, recurrent_bn: bool) -> None:
    rnn = make(statistics, recurrent_bn, max_steps=7)
    rows = 7 if statistics == "per_step" else 1
    for cell in rnn.cells:
        assert cell.statistics == statistics and cell.recurrent_bn is recurrent_bn
        assert cell.bn_ih.running_mean.shape == (rows, 4 * H)
        assert cell.bn_ih.max_steps == (7 if statistics == "per_step" else None)
        if recurrent_bn:
            assert cell.bn_hh.running_mean.shape == (rows, 4 * H)
            assert cell.bn_c.running_var.shape == (rows, H)
            assert cell.bn_hh.max_steps == cell.bn_c.max_steps == cell.bn_ih.max_steps
            assert (cell.norm_at(0), cell.norm_at(1), cell.norm_at(2)) == (cell.bn_ih, cell.bn_hh, cell.bn_c)
    names = [n for n, _ in rnn.named_parameters()] + list(rnn.state_dict())
    assert any(".bn_hh." in n for n in names) is recurrent_bn
    assert any(".bn_c." in n for n in names) is recurrent_bn


def test_input_only_has_no_recurrent_batch_norms() -> None:
    rnn = zoo.nn.RNN("bn_lstm", 4, 8, statistics="shared", recurrent_bn=False)  # the call of the brief
    cell = rnn.cells[0]
    assert cell.bn_hh is None and cell.bn_c is None
    assert (cell.norm_at(1), cell.norm_at(2)) == (None, None)
    c = torch.randn(2, 8)
    assert cell.cell_norm(c, 0, None) is c
    assert sorted(n for n, _ in cell.named_parameters()) == ["bias", "bn_ih.weight", "weight_hh", "weight_ih"]
    assert sorted(k for k in cell.state_dict() if "running" in k) == ["bn_ih.running_mean", "bn_ih.running_var"]


@pytest.mark.parametrize("value", ["global", "per-step", "", None])
def test_bad_statistics_value(value) -> None:
    with pytest.raises(ValueError, match="per_step.*shared"):
        zoo.nn.RNN("bn_lstm", IN, H, statistics=value)
    with pytest.raises(ValueError, match=repr(value)):
        zoo.nn.BNLSTMCell(IN, H, statistics=value)


def test_per_step_statistics_need_max_steps() -> None:
    with pytest.raises(ValueError, match="needs max_steps"):
        zoo.nn.BNLSTMCell(IN, H, max_steps=None)
    assert zoo.nn.BNLSTMCell(IN, H, max_steps=None, statistics="shared").bn_hh.max_steps is None


def test_options_through_the_registry_and_the_model_config() -> None:
    options = zoo.nn.get_variant("bn_lstm").options
    assert options["statistics"] == "per_step" and options["recurrent_bn"] is True
    default = zoo.nn.RNN("bn_lstm", IN, H, max_steps=9).cells[0]
    assert default.statistics == "per_step" and default.recurrent_bn and default.bn_hh.max_steps == 9
    # what the CLI builds from ``model.rnn_options: {statistics: shared}`` (max_steps still comes from dims, ignored)
    rnn = build_rnn("bn_lstm", IN, H, rnn_options={"statistics": "shared"}, dims={"max_steps": 9})
    cell = rnn.cells[0]
    assert cell.statistics == "shared" and cell.recurrent_bn
    assert all(getattr(cell, n).max_steps is None for n in ("bn_ih", "bn_hh", "bn_c"))
    rnn = build_rnn("bn_lstm", IN, H, rnn_options={"recurrent_bn": False}, dims={"max_steps": 9})
    assert rnn.cells[0].bn_hh is None and rnn.cells[0].bn_ih.max_steps == 9


def test_shared_recurrent_batch_norm_runs_as_many_steps_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synchronized statistics inside the recurrence (shared or per step) all-reduce at every step, so every rank must
    run the longest rank's steps; a shared synchronized BN of the input term alone all-reduces once and needs not."""
    calls = []

    def all_reduce(t: Tensor, op=None) -> None:
        calls.append(int(t))
        t.fill_(11)  # another rank has 11 steps

    monkeypatch.setattr(zoo.nn.MaskedBatchNorm, "synchronized", property(lambda self: True))
    monkeypatch.setattr(zoo.nn.rnn.dist, "all_reduce", all_reduce)
    for statistics, recurrent_bn, expected in [("shared", True, 11), ("per_step", False, 11), ("shared", False, 4)]:
        calls.clear()
        rnn = make(statistics, recurrent_bn).train()
        assert rnn.sync_steps(4, torch.device("cpu")) == expected, (statistics, recurrent_bn)
        assert calls == ([4] if expected == 11 else [])
        assert rnn.eval().sync_steps(4, torch.device("cpu")) == 4


# ------------------------------------------------------------------------------------------- fused equals step by step


@pytest.mark.parametrize("packed", [False, True], ids=["lengths", "packed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@combos
def test_fused_equals_step_by_step(statistics: str, recurrent_bn: bool, training: bool, packed: bool) -> None:
    """float32, 2 layers, bidirectional, a padded batch: outputs, final states, the gradient of every parameter, of the
    input and of the initial state, and the running statistics after the forward."""
    fused = make(statistics, recurrent_bn, fused=True, max_steps=T)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fused.train()(torch.randn(T, B, IN), lengths=LENGTHS)  # running statistics away from (0, 1)
    steps = copy.deepcopy(fused)
    steps.fused = False
    assert fused.fused and not steps.fused
    before = running(fused)
    x = torch.randn(T, B, IN)
    state = [torch.randn(4, B, H) for _ in range(2)]
    proj = torch.randn(T, B, 2 * H)
    results = []
    for rnn in (fused, steps):
        rnn.train(training)
        xr = x.clone().requires_grad_()
        sr = [s.clone().requires_grad_() for s in state]
        if packed:
            out, final = rnn(pack_padded_sequence(xr, LENGTHS, enforce_sorted=False), tuple(sr))
            out, _ = pad_packed_sequence(out, total_length=T)
        else:
            out, final = rnn(xr, tuple(sr), lengths=LENGTHS)
        loss = (out * proj).sum() + sum((f * (k + 1)).sum() for k, f in enumerate(final))
        grads = torch.autograd.grad(loss, [xr, *sr, *rnn.parameters()])
        results.append((out, final, grads, running(rnn)))
    (out, final, grads, stats), (ref_out, ref_final, ref_grads, ref_stats) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=1e-4, atol=1e-5)
    names = ["input", "h0", "c0"] + [n for n, _ in fused.named_parameters()]
    assert any("bn_hh" in n for n in names) is recurrent_bn
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert g is not None and torch.isfinite(g).all(), name
        assert (g - rg).norm() <= 1e-4 * rg.norm() + 1e-6, f"gradient of {name}: {(g - rg).norm()} vs {rg.norm()}"
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
    for key in stats:  # training moved every running statistic, evaluation none
        assert torch.equal(stats[key], before[key]) is not training, key


# ------------------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("recurrent_bn", [True, False], ids=["rbn", "input_only"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@fused_param
def test_gradcheck_shared(fused: bool, training: bool, recurrent_bn: bool) -> None:
    """float64 gradcheck of the shared mode with respect to the input, the initial state and every parameter."""
    b, t, h = 3, 4, 2
    lengths = torch.tensor([4, 1, 3])
    rnn = zoo.nn.RNN(
        "bn_lstm", 2, h, num_layers=2, bidirectional=True, fused=fused, statistics="shared", recurrent_bn=recurrent_bn
    ).double()
    randomize(rnn)
    if not training:  # evaluation with running statistics other than (0, 1)
        rnn.train()(torch.randn(t, b, 2, dtype=torch.float64), lengths=lengths)
    rnn.train(training)
    names = [n for n, _ in rnn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
    x = torch.randn(t, b, 2, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(4, b, h, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def f(x: Tensor, h0: Tensor, c0: Tensor, *ps: Tensor) -> tuple[Tensor, ...]:
        out, (hn, cn) = torch.func.functional_call(rnn, dict(zip(names, ps, strict=True)), (x, (h0, c0), lengths))
        return out, hn, cn

    assert torch.autograd.gradcheck(f, (x, *state, *params))


# ---------------------------------------------------------------------------------------- against the hand-written loop


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@combos
@fused_param
def test_equals_the_equations(fused: bool, statistics: str, recurrent_bn: bool, training: bool) -> None:
    """Every combination against `reference`: outputs, final states and running statistics (float64, padded)."""
    check_against_reference(fused, statistics, recurrent_bn, training, T)


@fused_param
def test_shared_training_uses_the_step_batch_statistics(fused: bool) -> None:
    """In training, BN(W_h h_{t-1}) and BN(c_t) of the shared mode use step t's batch statistics (over its valid rows),
    and the one running mean / variance of each is the momentum average over the steps with >= 2 valid rows."""
    rnn = make("shared", True, layers=1, bidirectional=False, fused=fused).double().train()
    randomize(rnn)
    cell = rnn.cells[0]
    wx, wh, b = (p.detach().clone() for p in (cell.weight_ih, cell.weight_hh, cell.bias))
    g_x, g_h, g_c = (cell.bn_ih.weight.detach().clone(), cell.bn_hh.weight.detach().clone(), cell.bn_c.weight.detach())
    beta_c = cell.bn_c.bias.detach().clone()
    g_c = g_c.clone()
    x = torch.randn(T, B, IN, dtype=torch.float64) * 2 + 1
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    out, (hn, cn) = rnn(x, (h0[None], c0[None]), lengths=LENGTHS)

    valid = torch.arange(T)[:, None] < LENGTHS[None]
    ax = x @ wx.T
    v = ax[valid]  # every valid batch x time position
    u = (ax - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + EPS) * g_x + b
    h, c = h0, c0
    mean_hh, var_hh = torch.zeros(4 * H, dtype=torch.float64), torch.ones(4 * H, dtype=torch.float64)
    mean_c, var_c = torch.zeros(H, dtype=torch.float64), torch.ones(H, dtype=torch.float64)
    updates = 0
    for t in range(T):
        ok = valid[t]
        n = int(ok.sum())
        z = h @ wh.T
        mz, vz = z[ok].mean(0), z[ok].var(0, unbiased=False)  # this step's batch statistics, valid rows only
        i, f, g, o = (u[t] + (z - mz) / torch.sqrt(vz + EPS) * g_h).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        mc, vc = c_new[ok].mean(0), c_new[ok].var(0, unbiased=False)
        h_new = torch.sigmoid(o) * torch.tanh((c_new - mc) / torch.sqrt(vc + EPS) * g_c + beta_c)
        torch.testing.assert_close(out[t][ok], h_new[ok], rtol=1e-9, atol=1e-10)
        if n >= 2:  # the one running set moves at every step (with the unbiased variance)
            mean_hh = (1 - MOMENTUM) * mean_hh + MOMENTUM * mz
            var_hh = (1 - MOMENTUM) * var_hh + MOMENTUM * vz * n / (n - 1)
            mean_c = (1 - MOMENTUM) * mean_c + MOMENTUM * mc
            var_c = (1 - MOMENTUM) * var_c + MOMENTUM * vc * n / (n - 1)
            updates += 1
        h, c = torch.where(ok[:, None], h_new, h), torch.where(ok[:, None], c_new, c)
    assert updates == T - 1  # LENGTHS leave one valid row at the last step: no update there
    torch.testing.assert_close(hn[0], h, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cn[0], c, rtol=1e-9, atol=1e-10)
    assert cell.bn_hh.running_mean.shape == (1, 4 * H) and cell.bn_c.running_mean.shape == (1, H)
    torch.testing.assert_close(cell.bn_hh.running_mean[0], mean_hh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cell.bn_hh.running_var[0], var_hh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cell.bn_c.running_mean[0], mean_c, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cell.bn_c.running_var[0], var_c, rtol=1e-9, atol=1e-12)
    n = v.shape[0]  # the input term: a single update over batch x time
    torch.testing.assert_close(cell.bn_ih.running_mean[0], MOMENTUM * v.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        cell.bn_ih.running_var[0], 1 - MOMENTUM + MOMENTUM * v.var(0, unbiased=True), rtol=1e-9, atol=1e-12
    )


@fused_param
def test_shared_eval_longer_than_training(fused: bool) -> None:
    """Evaluation of the shared mode uses the one running set at every step, however long the sequence: trained on
    sequences of at most T steps, it runs 3 T steps and equals the equations with those statistics."""
    for recurrent_bn in (True, False):
        check_against_reference(fused, "shared", recurrent_bn, training=False, steps=3 * T)
    rnn = make("shared", True, fused=fused, max_steps=2, past_max_steps="error").eval()
    out, _ = rnn(torch.randn(3 * T, B, IN))  # max_steps and past_max_steps are ignored
    assert out.shape == (3 * T, B, 2 * H) and torch.isfinite(out).all()


@fused_param
def test_input_only_equals_a_plain_lstm_on_the_normalized_input(fused: bool) -> None:
    """recurrent_bn=False: i, f, g, o = BN(W_x x) + W_h h + b, h = σ(o) tanh(c), through `torch.nn.LSTMCell`."""
    for statistics in ("per_step", "shared"):
        rnn = make(statistics, False, layers=1, bidirectional=False, fused=fused, max_steps=T).double().train()
        randomize(rnn)
        cell = rnn.cells[0]
        x = torch.randn(T, B, IN, dtype=torch.float64)
        valid = torch.arange(T)[:, None] < LENGTHS[None]
        ax = x @ cell.weight_ih.detach().T
        if statistics == "shared":
            mean, var = ax[valid].mean(0), ax[valid].var(0, unbiased=False)
        else:
            mean = torch.stack([ax[t][valid[t]].mean(0) for t in range(T)])[:, None]
            var = torch.stack([ax[t][valid[t]].var(0, unbiased=False) for t in range(T)])[:, None]
        u = (ax - mean) / torch.sqrt(var + EPS) * cell.bn_ih.weight.detach()
        lstm = torch.nn.LSTMCell(4 * H, H).double()  # u enters through an identity W_ih
        with torch.no_grad():
            lstm.weight_ih.copy_(torch.eye(4 * H))
            lstm.weight_hh.copy_(cell.weight_hh)
            lstm.bias_ih.copy_(cell.bias)
            lstm.bias_hh.zero_()
        out, (hn, cn) = rnn(x, lengths=LENGTHS)
        h = c = torch.zeros(B, H, dtype=torch.float64)
        for t in range(T):
            h_new, c_new = lstm(u[t], (h, c))
            ok = valid[t][:, None]
            torch.testing.assert_close(out[t], h_new * ok, rtol=1e-9, atol=1e-10)
            h, c = torch.where(ok, h_new, h), torch.where(ok, c_new, c)
        torch.testing.assert_close(hn[0], h, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cn[0], c, rtol=1e-9, atol=1e-10)
