"""Every variant against a step-by-step float64 reference written from its paper's equations.

The references share no code with `zoo.nn`: their own loops over layers, directions, time steps and sequences, their own
reversal of the valid part of a sequence and their own normalization formulas. Only parameter values (and, in eval mode,
running statistics) are copied out of the module under test, always before the module runs. Gate order is
`torch.nn.LSTM`'s (i, f, g, o) and `torch.nn.GRU`'s (r, z, n), as `zoo.nn` documents.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import zoo.nn

DT = torch.float64
IN, H, B, T = 3, 2, 4, 5
LENGTHS = torch.tensor([5, 2, 4, 3])  # unsorted; the longest is T
MOMENTUM, EPS = 0.3, 1e-3  # non-default BN options, so the tests see that the options reach every batch norm

Direction = Callable[[torch.nn.Module, Tensor, Tensor, tuple | None], tuple[Tensor, tuple, dict]]


def close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def copy(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


def randomize(rnn: torch.nn.Module) -> None:
    """Move every parameter away from its initial value (gains 1, shifts 0, ...) so that each one matters."""
    with torch.no_grad():
        for p in rnn.parameters():
            p.uniform_(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ the shared driver


def flip_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first ``lengths[b]`` steps of every column ``b`` of a time-major tensor; padding stays."""
    y = x.clone()
    for b, n in enumerate(lengths.tolist()):
        y[:n, b] = x[:n, b].flip(0)
    return y


def run_stack(
    rnn: zoo.nn.RNN, direction: Direction, x: Tensor, lengths: Tensor, state: tuple | None = None
) -> tuple[Tensor, list[Tensor], list[dict]]:
    """Run ``direction(cell, x, lengths, state) -> (out, final, stats)`` over every layer and direction of ``rnn``.

    ``x`` is time-major. Returns the output (zero at padded positions), the final state tensors stacked in torch's
    ``layer * dirs + d`` order and, per cell, the reference batch norms (holding their updated running statistics).
    """
    dirs = 2 if rnn.bidirectional else 1
    valid = (torch.arange(x.shape[0])[:, None] < lengths[None]).unsqueeze(-1)
    finals, stats = [], []
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            s0 = None if state is None else tuple(s[k] for s in state)
            out, final, st = direction(rnn.cells[k], x if d == 0 else flip_valid(x, lengths), lengths, s0)
            outs.append(out if d == 0 else flip_valid(out, lengths))
            finals.append(final)
            stats.append(st)
        x = torch.cat(outs, dim=-1) * valid
    return x, [torch.stack(f) for f in zip(*finals, strict=True)], stats


def lstm_loop(
    x: Tensor, lengths: Tensor, s0: tuple | None, gates: Callable, c_norm: Callable
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """c_t = σ(f) c_{t-1} + σ(i) tanh(g), h_t = σ(o) tanh(c_norm(c_t)); a sequence's state stops at its last step.

    ``gates(t, x_t, h, valid)`` gives the (i, f, g, o) pre-activations, ``c_norm(t, c, valid)`` the normalized cell.
    """
    h, c = s0 if s0 is not None else (x.new_zeros(x.shape[1], H), x.new_zeros(x.shape[1], H))
    outs = []
    for t in range(x.shape[0]):
        valid = lengths > t
        i, f, g, o = gates(t, x[t], h, valid).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_norm(t, c_new, valid))
        keep = valid[:, None]
        h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
        outs.append(h_new)
    return torch.stack(outs), (h, c)


# --------------------------------------------------------------------------------------------- normalization formulas


def layer_norm(a: Tensor, gain: Tensor, shift: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Ba et al. eq. 4: (a - μ) / sqrt(σ² + ε) ⊙ g + b over the units of each sample."""
    mu = a.mean(-1, keepdim=True)
    var = ((a - mu) ** 2).mean(-1, keepdim=True)
    return (a - mu) / torch.sqrt(var + eps) * gain + shift


def rms_norm(a: Tensor, gain: Tensor, shift: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Zhang & Sennrich eq. 4: a / sqrt(mean(a²) + ε) ⊙ g, no mean subtraction and no shift."""
    assert shift is None
    return a / torch.sqrt((a**2).mean(-1, keepdim=True) + eps) * gain


def affine(norm: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    return copy(norm.weight), copy(getattr(norm, "bias", None))


class BatchNormRef:
    """Batch normalization written out, with the parameters and running statistics of a zoo batch norm copied out.

    Training: biased mean and variance over the valid rows; running statistics of ``row`` (one row per time step, or a
    single row) move by MOMENTUM towards the mean and the *unbiased* variance if at least two rows are valid and the
    row exists. Evaluation: the running statistics of ``row``, or of the last row past the end.
    """

    def __init__(self, bn: torch.nn.Module, training: bool) -> None:
        self.gain, self.shift = affine(bn)
        self.mean, self.var = copy(bn.running_mean), copy(bn.running_var)
        self.training = training

    def __call__(self, a: Tensor, valid: Tensor, row: int) -> Tensor:
        rows = self.mean.shape[0]
        if self.training:
            v = a[valid]
            n = v.shape[0]
            mean = v.mean(0)
            var = ((v - mean) ** 2).mean(0)
            if n >= 2 and row < rows:
                self.mean[row] = (1 - MOMENTUM) * self.mean[row] + MOMENTUM * mean
                self.var[row] = (1 - MOMENTUM) * self.var[row] + MOMENTUM * var * n / (n - 1)
        else:
            mean, var = self.mean[min(row, rows - 1)], self.var[min(row, rows - 1)]
        y = (a - mean) / torch.sqrt(var + EPS) * self.gain
        return y if self.shift is None else y + self.shift


# ------------------------------------------------------------------------------------------------ the variants' cells


def ln_lstm_direction(norm: Callable) -> Direction:
    """Ba et al. eqs. 20-22 (``norm`` = LN) or Zhang & Sennrich (``norm`` = RMSNorm) in the same three positions."""

    def run(cell, x, lengths, s0):
        wx, wh, b = copy(cell.weight_ih), copy(cell.weight_hh), copy(cell.bias)
        n_x, n_h, n_c = affine(cell.ln_ih), affine(cell.ln_hh), affine(cell.ln_c)

        def gates(t, x_t, h, valid):
            return norm(x_t @ wx.T, *n_x) + norm(h @ wh.T, *n_h) + b

        def c_norm(t, c, valid):
            return norm(c, *n_c)

        return (*lstm_loop(x, lengths, s0, gates, c_norm), {})

    return run


def ln_gru_direction(norm: Callable) -> Direction:
    """Ba et al. supplementary, official code: LNs of W_x^{rz} x, W_x^n x, W_h^{rz} h, W_h^n h (before r multiplies)."""

    def run(cell, x, lengths, s0):
        wx, wh, bx, bh = copy(cell.weight_ih), copy(cell.weight_hh), copy(cell.bias_ih), copy(cell.bias_hh)
        nx_rz, nx_n, nh_rz, nh_n = (affine(m) for m in (cell.ln_ih_rz, cell.ln_ih_n, cell.ln_hh_rz, cell.ln_hh_n))
        h = s0[0] if s0 is not None else x.new_zeros(x.shape[1], H)
        outs = []
        for t in range(x.shape[0]):
            ax, ah = x[t] @ wx.T, h @ wh.T
            rz = torch.sigmoid(norm(ax[:, : 2 * H], *nx_rz) + norm(ah[:, : 2 * H], *nh_rz) + bx[: 2 * H] + bh[: 2 * H])
            r, z = rz[:, :H], rz[:, H:]
            n = torch.tanh(norm(ax[:, 2 * H :], *nx_n) + bx[2 * H :] + r * (norm(ah[:, 2 * H :], *nh_n) + bh[2 * H :]))
            h_new = (1 - z) * n + z * h
            h = torch.where((lengths > t)[:, None], h_new, h)
            outs.append(h_new)
        return torch.stack(outs), (h,), {}

    return run


def bn_lstm_direction(training: bool) -> Direction:
    """Cooijmans et al. eqs. 6-8: BN(W_h h; γ_h) + BN(W_x x; γ_x) + b, h = σ(o) tanh(BN(c; γ_c, β_c)), per step."""

    def run(cell, x, lengths, s0):
        wx, wh, b = copy(cell.weight_ih), copy(cell.weight_hh), copy(cell.bias)
        bns = {name: BatchNormRef(getattr(cell, name), training) for name in ("bn_ih", "bn_hh", "bn_c")}

        def gates(t, x_t, h, valid):
            return bns["bn_hh"](h @ wh.T, valid, t) + bns["bn_ih"](x_t @ wx.T, valid, t) + b

        def c_norm(t, c, valid):
            return bns["bn_c"](c, valid, t)

        return (*lstm_loop(x, lengths, s0, gates, c_norm), bns)

    return run


def seqbn_lstm_direction(training: bool) -> Direction:
    """Laurent et al. eq. 10: BN(W_x x; γ) with one set of statistics over the valid batch x time positions."""

    def run(cell, x, lengths, s0):
        wx, wh, b = copy(cell.weight_ih), copy(cell.weight_hh), copy(cell.bias)
        bn = BatchNormRef(cell.bn_ih, training)
        steps, batch = x.shape[:2]
        valid = (torch.arange(steps)[:, None] < lengths[None]).reshape(-1)
        ax = bn((x @ wx.T).reshape(steps * batch, -1), valid, 0).reshape(steps, batch, -1)

        def gates(t, x_t, h, valid):
            return ax[t] + h @ wh.T + b

        def c_norm(t, c, valid):
            return c

        return (*lstm_loop(x, lengths, s0, gates, c_norm), {"bn_ih": bn})

    return run


def bn_indrnn_direction(training: bool, placement: str, u_max: float) -> Direction:
    """Li et al. eq. 2: h_t = ReLU(W x_t + u ⊙ h_{t-1} + b), BN of W x ("input") or of h_t ("output"), |u| ≤ u_max."""

    def run(cell, x, lengths, s0):
        w, u, b = copy(cell.weight_ih), copy(cell.weight_hh), copy(cell.bias)
        if training:  # the projection happens before a training forward
            u = u.clamp(-u_max, u_max)
        bn = BatchNormRef(cell.bn, training)
        steps, batch = x.shape[:2]
        valid = (torch.arange(steps)[:, None] < lengths[None]).reshape(-1)
        a = x @ w.T
        if placement == "input":
            a = bn(a.reshape(steps * batch, H), valid, 0).reshape(steps, batch, H)
        a = a + b
        h = s0[0] if s0 is not None else x.new_zeros(batch, H)
        outs = []
        for t in range(steps):
            h_new = torch.relu(a[t] + u * h)
            h = torch.where((lengths > t)[:, None], h_new, h)
            outs.append(h_new)
        out = torch.stack(outs)
        if placement == "output":
            out = bn(out.reshape(steps * batch, H), valid, 0).reshape(steps, batch, H)
        return out, (h,), {"bn": bn}

    return run


def time_major(x: Tensor) -> Tensor:
    return x.transpose(0, 1)


def make(variant: str, fused: bool, **options) -> zoo.nn.RNN:
    rnn = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, batch_first=True, fused=fused, **options)
    rnn = rnn.to(DT)
    randomize(rnn)
    return rnn


def random_state(n: int) -> tuple[Tensor, ...]:
    return tuple(torch.randn(4, B, H, dtype=DT) for _ in range(n))


def check(rnn: zoo.nn.RNN, direction: Direction, state: tuple | None = None, x: Tensor | None = None) -> list[dict]:
    """Run the reference, then the module, on a padded batch; compare outputs and final states; return the stats."""
    x = torch.randn(B, T, IN, dtype=DT) if x is None else x
    lengths = LENGTHS if x.shape[1] == T else torch.tensor([x.shape[1], 2, x.shape[1] - 1, 3])
    ref_out, ref_final, stats = run_stack(rnn, direction, time_major(x), lengths, state)
    zoo_state = None if state is None else (state[0] if len(state) == 1 else state)
    out, final = rnn(x, zoo_state, lengths=lengths)
    close(time_major(out), ref_out)
    for actual, expected in zip(final if isinstance(final, tuple) else (final,), ref_final, strict=True):
        close(actual, expected)
    return stats


def check_running_stats(rnn: zoo.nn.RNN, stats: list[dict]) -> None:
    """The module's running statistics after a training forward equal the hand-computed momentum updates."""
    for cell, st in zip(rnn.cells, stats, strict=True):
        for name, ref in st.items():
            bn = getattr(cell, name)
            assert not torch.equal(ref.mean, bn.running_mean.new_zeros(bn.running_mean.shape))  # it did move
            close(bn.running_mean, ref.mean)
            close(bn.running_var, ref.var)


# ------------------------------------------------------------------------------------------- lstm / gru vs torch.nn


def torch_twin(rnn: zoo.nn.RNN) -> torch.nn.RNNBase:
    """`torch.nn.LSTM` / `torch.nn.GRU` of the same shape with the zoo module's weights copied in."""
    cls = torch.nn.LSTM if rnn.state_size == 2 else torch.nn.GRU
    twin = cls(IN, H, num_layers=2, bidirectional=True, batch_first=True).to(DT)
    with torch.no_grad():
        for k, cell in enumerate(rnn.cells):
            suffix = f"_l{k // 2}" + ("_reverse" if k % 2 else "")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(twin, name + suffix).copy_(getattr(cell, name))
    return twin


@pytest.mark.parametrize("mode", ["full", "lengths", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
@pytest.mark.parametrize("variant", ["lstm", "gru"])
def test_lstm_gru_equal_torch(variant: str, fused: bool, mode: str) -> None:
    rnn = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, batch_first=True, fused=fused).to(DT)
    twin = torch_twin(rnn)
    x = torch.randn(B, T, IN, dtype=DT, requires_grad=True)
    state = random_state(rnn.state_size)
    state = state if len(state) == 2 else state[0]
    if mode == "full":
        out, final = rnn(x, state)
        ref_out, ref_final = twin(x, state)
    elif mode == "lengths":
        out, final = rnn(x, state, lengths=LENGTHS)
        packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
        ref_packed, ref_final = twin(packed, state)
        ref_out = pad_packed_sequence(ref_packed, batch_first=True, total_length=T)[0]
    else:
        packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
        out, final = rnn(packed, state)
        ref_out, ref_final = twin(packed, state)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.sorted_indices, ref_out.sorted_indices)
        assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
        out, ref_out = out.data, ref_out.data
    close(out, ref_out)
    for a, e in zip(
        final if isinstance(final, tuple) else (final,),
        ref_final if isinstance(ref_final, tuple) else (ref_final,),
        strict=True,
    ):
        close(a, e)
    # the gradients of every weight and of the input agree too
    weights = torch.randn_like(ref_out)
    grad_x, *grads = torch.autograd.grad((out * weights).sum(), [x, *rnn.parameters()], retain_graph=True)
    ref_grad_x, *ref_grads = torch.autograd.grad((ref_out * weights).sum(), [x, *twin.parameters()])
    close(grad_x, ref_grad_x)
    names = [n for _ in range(4) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert [n.split(".")[-1] for n, _ in rnn.named_parameters()] == names  # same order as torch's parameters
    for g, rg in zip(grads, ref_grads, strict=True):
        close(g, rg)


# --------------------------------------------------------------------------------------- per-sample normalized variants


@pytest.mark.parametrize(
    ("variant", "direction"),
    [
        ("ln_lstm", ln_lstm_direction(layer_norm)),
        ("rms_lstm", ln_lstm_direction(rms_norm)),
        ("ln_gru", ln_gru_direction(layer_norm)),
        ("rms_gru", ln_gru_direction(rms_norm)),
    ],
    ids=["ln_lstm", "rms_lstm", "ln_gru", "rms_gru"],
)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_layer_and_rms_norm_variants(variant: str, direction: Direction, with_state: bool, fused: bool) -> None:
    rnn = make(variant, fused)
    state = random_state(rnn.state_size) if with_state else None
    check(rnn.train(), direction, state)
    check(rnn.eval(), direction, state)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_wn_lstm_is_an_lstm_with_normalized_rows(fused: bool) -> None:
    """w = g v / ‖v‖ row by row, then a plain LSTM; the gradients with respect to g and v follow."""
    rnn = make("wn_lstm", fused)
    leaves, weights = {}, {}
    for k, cell in enumerate(rnn.cells):
        suffix = f"_l{k // 2}" + ("_reverse" if k % 2 else "")
        for name in ("weight_ih", "weight_hh"):
            par = getattr(cell.parametrizations, name)
            g, v = copy(par.original0).requires_grad_(), copy(par.original1).requires_grad_()
            assert g.shape == (4 * H, 1)
            leaves[f"{k}.{name}"] = (g, v)
            weights[name + suffix] = g * v / torch.sqrt((v**2).sum(dim=1, keepdim=True))
        for name in ("bias_ih", "bias_hh"):
            weights[name + suffix] = copy(getattr(cell, name))
    twin = torch.nn.LSTM(IN, H, num_layers=2, bidirectional=True, batch_first=True).to(DT)
    x = torch.randn(B, T, IN, dtype=DT)
    state = random_state(2)
    packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
    ref_packed, ref_final = torch.func.functional_call(twin, weights, (packed, state))
    ref_out = pad_packed_sequence(ref_packed, batch_first=True, total_length=T)[0]
    out, final = rnn(x, state, lengths=LENGTHS)
    close(out, ref_out)
    close(final[0], ref_final[0])
    close(final[1], ref_final[1])
    proj = torch.randn_like(out)
    ref_grads = torch.autograd.grad((ref_out * proj).sum(), [t for gv in leaves.values() for t in gv])
    (out * proj).sum().backward()
    zoo_grads = [
        getattr(getattr(cell.parametrizations, name), orig).grad
        for cell in rnn.cells
        for name in ("weight_ih", "weight_hh")
        for orig in ("original0", "original1")
    ]
    for g, rg in zip(zoo_grads, ref_grads, strict=True):
        close(g, rg)


# ---------------------------------------------------------------------------------------------- batch-norm variants


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_bn_lstm_train_uses_per_step_batch_stats_and_updates_running_stats(fused: bool) -> None:
    rnn = make("bn_lstm", fused, max_steps=T, momentum=MOMENTUM, eps=EPS).train()
    stats = check(rnn, bn_lstm_direction(training=True), random_state(2))
    check_running_stats(rnn, stats)
    for cell in rnn.cells:  # one row of statistics per time step
        assert cell.bn_hh.running_mean.shape == (T, 4 * H)
        assert cell.bn_c.running_var.shape == (T, H)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_bn_lstm_eval_uses_running_stats(fused: bool) -> None:
    rnn = make("bn_lstm", fused, max_steps=T, momentum=MOMENTUM, eps=EPS).train()
    rnn(torch.randn(B, T, IN, dtype=DT), lengths=LENGTHS)  # running statistics away from (0, 1)
    check(rnn.eval(), bn_lstm_direction(training=False), random_state(2))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_bn_lstm_past_max_steps(training: bool, fused: bool) -> None:
    """Eval reuses row max_steps - 1 for every later step; training updates no row past max_steps."""
    max_steps = 3
    rnn = make("bn_lstm", fused, max_steps=max_steps, momentum=MOMENTUM, eps=EPS)
    rnn.train()(torch.randn(B, T, IN, dtype=DT), lengths=LENGTHS)
    rnn.train(training)
    stats = check(rnn, bn_lstm_direction(training), x=torch.randn(B, 7, IN, dtype=DT))
    if training:
        check_running_stats(rnn, stats)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_seqbn_lstm(fused: bool) -> None:
    rnn = make("seqbn_lstm", fused, momentum=MOMENTUM, eps=EPS).train()
    assert rnn.cells[0].bn_ih.running_mean.shape == (1, 4 * H)  # one set of statistics over batch x time
    check_running_stats(rnn, check(rnn, seqbn_lstm_direction(training=True), random_state(2)))
    check(rnn.eval(), seqbn_lstm_direction(training=False), random_state(2))


@pytest.mark.parametrize("placement", ["input", "output"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_bn_indrnn(placement: str, fused: bool) -> None:
    rnn = make("bn_indrnn", fused, bn_placement=placement, momentum=MOMENTUM, eps=EPS).train()
    u_max = 2.0 ** (1 / 1000)  # the default magnitude 2 and max_steps 1000: MAG^(1/T)
    check_running_stats(rnn, check(rnn, bn_indrnn_direction(True, placement, u_max), random_state(1)))
    check(rnn.eval(), bn_indrnn_direction(False, placement, u_max), random_state(1))


@pytest.mark.parametrize("options", [{"magnitude": 10.0, "max_steps": 4}, {"recurrent_max": 0.5}])
def test_bn_indrnn_projects_u(options: dict) -> None:
    """A training forward first clips u to [-MAG^(1/T), MAG^(1/T)] (or ±recurrent_max), then runs with it."""
    u_max = options.get("recurrent_max", 10.0 ** (1 / 4))
    rnn = make("bn_indrnn", True, momentum=MOMENTUM, eps=EPS, **options)
    with torch.no_grad():
        for cell in rnn.cells:
            cell.weight_hh.copy_(torch.tensor([2.5, -0.3]))
    before = [copy(cell.weight_hh) for cell in rnn.cells]
    rnn.eval()(torch.randn(B, T, IN, dtype=DT))
    for cell, u in zip(rnn.cells, before, strict=True):  # evaluation leaves u alone
        assert torch.equal(cell.weight_hh, u)
    check(rnn.train(), bn_indrnn_direction(True, "input", u_max))
    for cell, u in zip(rnn.cells, before, strict=True):
        assert torch.equal(cell.weight_hh, u.clamp(-u_max, u_max))
        assert (cell.weight_hh.abs() <= u_max).all() and not torch.equal(cell.weight_hh, u)
