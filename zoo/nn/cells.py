"""The recurrent cells: one direction of one layer of every variant.

A cell states its equations through three hooks and the shared engine (`RecurrentCell.forward`) runs the recurrence:

- ``input_projection(x, mask)``: everything that depends on the input only, for all time steps at once (``(T, B, G)``);
- ``step(u_t, state, t, mask_t)``: one step of the recurrence, returning the output and the new state;
- ``output_transform(out, mask)``: a transform of the whole output sequence (identity unless a variant says otherwise);
- ``deferred_input(x)``, optional: the input term left for the fused recurrence to compute a step at a time (the
  normalized LSTMs in inference), instead of ``input_projection``'s.

Gate order follows `torch.nn.LSTM` (i, f, g, o) and `torch.nn.GRU` (r, z, n) everywhere. ``mask`` is a ``(T, B)`` bool
tensor of valid positions (``None``: all valid); at a padded position the engine keeps the previous state, so the final
state of every sequence is its state after its last valid step, as with a `PackedSequence` in `torch.nn.LSTM`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from . import gpu
from ._ext import say_once
from .backends import FUSED, compiled
from .fused import (
    DeferredInput,
    FusedGRU,
    FusedIndRNN,
    FusedLSTM,
    StepNorm,
    candidate_scale,
    defer_input,
    linear,
    normalize_input,
    run_packed,
)
from .norm import MaskedBatchNorm, RMSNorm
from .registry import variant

State = tuple[Tensor, ...]
BA = "Ba et al. 2016, arXiv:1607.06450"
RMS = "Zhang & Sennrich 2019, arXiv:1910.07467"


class RecurrentCell(nn.Module):
    """Base class: the engine that runs a cell's hooks over a time-major ``(T, B, input_size)`` sequence."""

    state_size = 1  # number of state tensors: 1 (h) or 2 (h, c)
    num_gates = 1  # rows of W_x per hidden unit
    native: str | None = None  # "lstm" / "gru" when `native_weights` can run the vendor kernel
    backends: tuple[str, ...] = ("reference",)  # the `zoo.nn.backends` that run this cell, fastest first
    backend = "reference"  # the one that runs, set by `zoo.nn.RNN`

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"

    def input_projection(self, x: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def step(self, u: Tensor, state: State, t: int, mask: Tensor | None) -> tuple[Tensor, State]:
        raise NotImplementedError

    def output_transform(self, out: Tensor, mask: Tensor | None) -> Tensor:
        return out

    def fuse_blocker(self) -> str | None:
        """Why `fused_recurrence` may not run now (it lacks something the step loop has), or None."""
        return None

    def deferred_input(self, x: Tensor) -> DeferredInput | None:
        """The input term left for `fused_recurrence` to compute a step at a time (in inference), or None: then
        `input_projection` computes it for all steps first."""
        return None

    def init_state(self, batch: int, like: Tensor) -> State:
        """The zero state, ``state_size`` tensors of shape ``(B, H)``."""
        return tuple(like.new_zeros(batch, self.hidden_size) for _ in range(self.state_size))

    def forward(self, x: Tensor, state: State, mask: Tensor | None = None) -> tuple[Tensor, State]:
        """Run the recurrence: ``x`` is ``(T, B, I)``; returns the output ``(T, B, H)`` and the final state."""
        with compiled(self.backend == "compiled"):
            blocker = self.fuse_blocker() if self.backend in FUSED else None
            u = self.deferred_input(x) if self.backend in FUSED and blocker is None else None
            u = self.input_projection(x, mask) if u is None else u
            if self.backend in FUSED:
                if blocker is None:
                    out, state = run_packed(self.fused_recurrence, u, state, mask)
                    return self.output_transform(out, mask), state
                say_once(f"{type(self).__name__}: {blocker}: the reference engine runs instead of {self.backend!r}")
        outputs = []
        for t in range(x.shape[0]):
            m = None if mask is None else mask[t]
            h, new = self.step(u[t], state, t, m)
            if m is not None:
                keep = m.unsqueeze(-1)
                new = tuple(torch.where(keep, n, s) for n, s in zip(new, state, strict=True))
            state = new
            outputs.append(h)
        return self.output_transform(torch.stack(outputs), mask), state


# --------------------------------------------------------------------------------------------------------------- LSTM


class _TorchLayoutCell(RecurrentCell):
    """A cell with `torch.nn.LSTM`'s / `torch.nn.GRU`'s parameters: ``weight_ih`` (G, I), ``weight_hh`` (G, H),
    ``bias_ih``, ``bias_hh`` (G,), G = ``num_gates`` · H, all U(−1/√H, 1/√H), and its input term W_ih x + b_ih."""

    backends = ("native", "reference")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__(input_size, hidden_size)
        g = self.num_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(g)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(g)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters(recurse=False):
            nn.init.uniform_(p, -bound, bound)

    def native_weights(self) -> list[Tensor]:
        """The weights in the vendor kernel's order."""
        ws = [self.weight_ih, self.weight_hh]
        return ws if self.bias_ih is None else [*ws, self.bias_ih, self.bias_hh]

    def input_projection(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return linear(x, self.weight_ih, self.bias_ih)


@variant("lstm", "plain LSTM, equal to torch.nn.LSTM (runs its kernel)", "Hochreiter & Schmidhuber 1997")
class LSTMCell(_TorchLayoutCell):
    """The plain LSTM, exactly as `torch.nn.LSTM` (same parameter names, shapes, initialisation and gate order).

    i, f, g, o = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh;  c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g);  h_t = σ(o) ⊙ tanh(c_t).
    """

    state_size = 2
    num_gates = 4
    native = "lstm"

    def recurrent(self, h: Tensor, t: int, mask: Tensor | None) -> Tensor:
        """The recurrent term of the gates."""
        return F.linear(h, self.weight_hh, self.bias_hh)

    def cell_norm(self, c: Tensor, t: int, mask: Tensor | None) -> Tensor:
        """What goes into the output tanh: c_t itself here; normalized variants override it."""
        return c

    def step(self, u: Tensor, state: State, t: int, mask: Tensor | None) -> tuple[Tensor, State]:
        h, c = state
        i, f, g, o = (u + self.recurrent(h, t, mask)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.cell_norm(c, t, mask))
        return h, (h, c)


@variant("wn_lstm", "weight normalization of the rows of W_x and W_h", "Salimans & Kingma 2016, arXiv:1602.07868")
class WeightNormLSTMCell(LSTMCell):
    """Weight-normalized LSTM (Salimans & Kingma 2016, eq. 2): every row of W_ih and W_hh is w = g · v / ‖v‖.

    The rest is the plain LSTM, so the normalized weights run through the same kernels. `torch.nn.utils.parametrizations
    .weight_norm` holds g (``original0``) and v (``original1``); g starts at ‖v‖, so the initial W equals the LSTM's.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__(input_size, hidden_size, bias)
        weight_norm(self, "weight_ih", dim=0)
        weight_norm(self, "weight_hh", dim=0)

    def reset_parameters(self) -> None:
        if not parametrize.is_parametrized(self):
            super().reset_parameters()
            return
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in ("weight_ih", "weight_hh"):
            v = getattr(self.parametrizations, name).original1
            nn.init.uniform_(v, -bound, bound)
            getattr(self.parametrizations, name).original0.data.copy_(v.norm(dim=1, keepdim=True))
        for b in (self.bias_ih, self.bias_hh):
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor, state: State, mask: Tensor | None = None) -> tuple[Tensor, State]:
        with parametrize.cached():  # compute g · v / ‖v‖ once per sequence, not once per step
            return super().forward(x, state, mask)


class _NormalizedLSTMCell(LSTMCell):
    """An LSTM whose gates are N_x(W_x x_t) + N_h(W_h h_{t-1}) + b and whose output is σ(o) ⊙ tanh(N_c(c_t)).

    A subclass states its normalizations as data: `norms` names the attributes holding N_x, N_h and N_c (None, or an
    attribute set to None: not normalized), modules the engine applies at each step (a `MaskedBatchNorm` with the
    step's mask and time step, any other module to the step's rows). One bias b (the normalizations' own shifts
    aside), the forget-gate part initialised to ``forget_bias``.
    """

    norms: tuple[str | None, str | None, str | None] = (None, None, None)

    native = None
    backends = ("compiled", "triton", "python", "reference")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, forget_bias: float = 1.0) -> None:
        super().__init__(input_size, hidden_size, bias=False)
        self.forget_bias = forget_bias
        self.bias = nn.Parameter(torch.empty(self.num_gates * hidden_size)) if bias else None
        self._reset_bias()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # the weights (called once before the bias exists, from LSTMCell.__init__)
        if getattr(self, "bias", None) is not None:
            self._reset_bias()

    def _reset_bias(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)
            self.bias.data[self.hidden_size : 2 * self.hidden_size] = self.forget_bias

    def input_projection(self, x: Tensor, mask: Tensor | None) -> Tensor:
        norm = self.norm_at(0)
        if self.backend in FUSED and norm is not None:  # N(W_x x) + b in one node, where it applies
            u = normalize_input(norm, x, self.weight_ih, self.bias, mask, keep_projection=True)
            if u is not None:
                return u
        u = linear(x, self.weight_ih)
        if norm is not None:
            u = norm(u, mask) if isinstance(norm, MaskedBatchNorm) else norm(u)
        return u if self.bias is None else u + self.bias

    def deferred_input(self, x: Tensor) -> DeferredInput | None:
        norm = self.norm_at(0)
        return None if self.backend != "compiled" or norm is None else defer_input(norm, x, self.weight_ih, self.bias)

    def norm_at(self, position: int) -> nn.Module | None:
        """The module normalizing position 0 (W_x x), 1 (W_h h) or 2 (c_t): the attribute `norms` names; None if
        the position is not normalized."""
        name = self.norms[position]
        return None if name is None else getattr(self, name)

    def recurrent(self, h: Tensor, t: int, mask: Tensor | None) -> Tensor:
        return _at_step(self.norm_at(1), F.linear(h, self.weight_hh), t, mask)

    def cell_norm(self, c: Tensor, t: int, mask: Tensor | None) -> Tensor:
        return _at_step(self.norm_at(2), c, t, mask)

    def fused_recurrence(self, u: Tensor, state: State, layout) -> tuple[Tensor, State]:
        """The recurrence with a hand-written backward (`zoo.nn.fused.FusedLSTM`), on packed rows."""
        if self.backend == "triton":
            return gpu.lstm_recurrence(self, u, state, layout)
        mh, mc = self.norm_at(1), self.norm_at(2)
        like = u if isinstance(u, Tensor) else u.x  # (a DeferredInput)
        nh = StepNorm(mh, scale=candidate_scale(self.hidden_size, like))
        nc = StepNorm(mc, scale=like.new_full((self.hidden_size,), 2.0))
        grad = torch.is_grad_enabled()
        out, h, c = FusedLSTM.apply(u, *state, self.weight_hh, *nh.params(), *nc.params(), layout, nh, nc, grad)
        return out, (h, c)


def _warn_scalar_input(cell: nn.Module, input_size: int) -> None:
    """Layer/RMS-normalizing W_x x over the features of a 1-feature input keeps only the sign of x."""
    if input_size == 1:
        warnings.warn(
            f"{type(cell).__name__} with input_size=1: normalizing W_x x over its features gives sign(x) times a "
            "constant vector (the magnitude of x is lost, and x = 0 is a zero-variance input whose gradient is "
            "scaled by 1/sqrt(eps)); standardize the input (no exact zeros) or embed it in more features first",
            stacklevel=3,
        )


def _at_step(norm: nn.Module | None, x: Tensor, t: int, mask: Tensor | None) -> Tensor:
    """Apply ``norm`` to one step's rows ``(B, F)`` of time step ``t`` (a time-major batch norm with the step's mask;
    None: x itself)."""
    if norm is None:
        return x
    if isinstance(norm, MaskedBatchNorm):
        return norm(x.unsqueeze(0), None if mask is None else mask.unsqueeze(0), start=t).squeeze(0)
    return norm(x)


BN_STATISTICS = ("per_step", "shared")


@variant(
    "bn_lstm",
    "recurrent batch norm: BN of W_x x, W_h h and c_t, per-time-step statistics (or shared; or input only)",
    "Cooijmans et al. 2016, arXiv:1603.09025",
)
class BNLSTMCell(_NormalizedLSTMCell):
    """Recurrent Batch Normalization (Cooijmans et al. 2016, eqs. 6-8).

    i, f, g, o = BN(W_h h_{t-1}; γ_h, 0) + BN(W_x x_t; γ_x, 0) + b;  c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g);
    h_t = σ(o) ⊙ tanh(BN(c_t; γ_c, β_c)).  The unnormalized c_t is carried. γ, β are shared over time.
    γ starts at ``gamma`` (0.1), β at 0, the forget-gate bias at 1; W_x and W_h are orthogonal per gate block, as in the
    official code. ``init_noise`` > 0 adds Gaussian noise of that std to the initial hidden state in training (the
    paper does so on sequential MNIST, whose first pixels are constant). ``sync_bn``: synchronize the statistics over
    data-parallel processes (`MaskedBatchNorm`'s ``sync``; the step loop runs then, the fused recurrence has no
    all-reduce).

    Two options for ablations:

    - ``statistics``: ``"per_step"`` (the paper, sec. 3-4): every BN keeps separate running statistics for each time
      step t < ``max_steps`` (T_max) and training normalizes step t with that step's batch statistics
      (``past_max_steps``: see `MaskedBatchNorm`). ``"shared"``: every BN keeps one set of statistics for all steps
      (the "single BN" of naive implementations): BN(W_x x) normalizes with the statistics of all valid batch x time
      positions; BN(W_h h_{t-1}) and BN(c_t), which inside the recurrence see only step t, normalize in training with
      the batch statistics of step t's valid rows and update the one running mean and variance at every step;
      evaluation uses the one running set at every step, for any length. ``max_steps`` and ``past_max_steps`` are then
      ignored.
    - ``recurrent_bn``: ``False`` normalizes the input term only, i, f, g, o = BN(W_x x_t; γ_x, 0) + W_h h_{t-1} + b
      and h_t = σ(o) ⊙ tanh(c_t) (no ``bn_hh``, ``bn_c``: they are None).
    """

    norms = ("bn_ih", "bn_hh", "bn_c")

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        max_steps: int = 1000,
        gamma: float = 0.1,
        momentum: float = 0.1,
        eps: float = 1e-5,
        past_max_steps: str = "reuse",
        init_noise: float = 0.0,
        forget_bias: float = 1.0,
        sync_bn: bool | None = None,
        statistics: str = "per_step",
        recurrent_bn: bool = True,
    ) -> None:
        if statistics not in BN_STATISTICS:
            raise ValueError(f"statistics must be one of {BN_STATISTICS}, got {statistics!r}")
        if statistics == "per_step" and max_steps is None:
            raise ValueError('statistics="per_step" needs max_steps (T_max); statistics="shared" has none')
        super().__init__(input_size, hidden_size, bias, forget_bias)
        self.statistics = statistics
        self.recurrent_bn = bool(recurrent_bn)
        g = self.num_gates * hidden_size
        steps = max_steps if statistics == "per_step" else None
        bn = dict(max_steps=steps, gamma=gamma, momentum=momentum, eps=eps, past_max_steps=past_max_steps, sync=sync_bn)
        self.bn_ih = MaskedBatchNorm(g, bias=False, **bn)
        self.bn_hh = MaskedBatchNorm(g, bias=False, **bn) if self.recurrent_bn else None
        self.bn_c = MaskedBatchNorm(hidden_size, bias=True, **bn) if self.recurrent_bn else None
        self.init_noise = init_noise

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, statistics={self.statistics!r}, recurrent_bn={self.recurrent_bn}"

    def reset_parameters(self) -> None:
        for w in (self.weight_ih, self.weight_hh):
            for block in w.data.chunk(self.num_gates, dim=0):
                nn.init.orthogonal_(block)
        if getattr(self, "bias", None) is not None:
            self._reset_bias()

    def fuse_blocker(self) -> str | None:
        # the fused recurrence has no all-reduce; the input term's BN runs outside it, synchronized or not
        if self.training and self.bn_hh is not None and self.bn_hh.synchronized:
            return "a synchronized batch norm (sync_bn) inside the recurrence needs an all-reduce at every step"
        return None

    def forward(self, x: Tensor, state: State, mask: Tensor | None = None) -> tuple[Tensor, State]:
        if self.training and self.init_noise > 0:
            h, c = state
            state = (h + self.init_noise * torch.randn_like(h), c)
        return super().forward(x, state, mask)


@variant(
    "seqbn_lstm",
    "sequence-wise batch norm of the input term only, statistics over batch x time",
    "Laurent et al. 2016, arXiv:1510.01378; Amodei et al. 2016",
)
class SeqBNLSTMCell(_NormalizedLSTMCell):
    """Sequence-wise batch normalization of the input term only (Laurent et al. 2016, eq. 10; Amodei et al. 2016).

    i, f, g, o = BN(W_x x_t; γ, 0) + W_h h_{t-1} + b, with one set of statistics over all valid batch x time positions;
    the recurrent term and c_t are not normalized (Laurent et al. found BN of the hidden-to-hidden path did not help).
    ``sync_bn``: synchronize the statistics over data-parallel processes (`MaskedBatchNorm`'s ``sync``).
    """

    norms = ("bn_ih", None, None)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        gamma: float = 1.0,
        momentum: float = 0.1,
        eps: float = 1e-5,
        forget_bias: float = 1.0,
        sync_bn: bool | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, forget_bias)
        self.bn_ih = MaskedBatchNorm(
            self.num_gates * hidden_size, None, gamma=gamma, bias=False, momentum=momentum, eps=eps, sync=sync_bn
        )

    @property
    def native(self) -> str | None:
        """The vendor kernel's "lstm" in evaluation, where the running statistics make BN(W_x x) affine in x:
        the cell is then exactly an LSTM (`native_weights`). Training normalizes with batch statistics."""
        return None if self.bn_ih.training else "lstm"

    def native_weights(self) -> list[Tensor]:
        """The evaluation-mode cell as a plain LSTM: BN(W_x x) + b = diag(s) W_x x + (β - s μ + b) with
        s = γ / √(σ² + ε) from the running statistics (μ, σ²), folded into W_x and b_ih; b_hh is zero."""
        bn = self.bn_ih
        scale = torch.rsqrt(bn.running_var[0] + bn.eps) * bn.weight
        shift = -bn.running_mean[0] * scale
        for b in (bn.bias, self.bias):
            shift = shift if b is None else shift + b
        return [self.weight_ih * scale.unsqueeze(1), self.weight_hh, shift, torch.zeros_like(shift)]


@variant("ln_lstm", "layer norm of W_x x, W_h h and c_t", BA)
class LNLSTMCell(_NormalizedLSTMCell):
    """Layer-normalized LSTM (Ba et al. 2016, eqs. 20-22).

    i, f, g, o = LN(W_x x_t; α_1, β_1) + LN(W_h h_{t-1}; α_2, β_2) + b, each LN over all 4H gate units jointly;
    c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g);  h_t = σ(o) ⊙ tanh(LN(c_t; α_3, β_3)); the unnormalized c_t is carried.
    Gains start at 1, shifts at 0, ε = 1e-5.
    """

    norms = ("ln_ih", "ln_hh", "ln_c")
    norm_layer = nn.LayerNorm

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5, forget_bias: float = 1.0
    ) -> None:
        super().__init__(input_size, hidden_size, bias, forget_bias)
        _warn_scalar_input(self, input_size)
        g = self.num_gates * hidden_size
        self.ln_ih = self.norm_layer(g, eps=eps)
        self.ln_hh = self.norm_layer(g, eps=eps)
        self.ln_c = self.norm_layer(hidden_size, eps=eps)


@variant("rms_lstm", "RMSNorm in the layer-norm positions of ln_lstm", RMS)
class RMSLSTMCell(LNLSTMCell):
    """RMSNorm LSTM (Zhang & Sennrich 2019, eq. 4) in Ba et al.'s LN positions.

    i, f, g, o = RMS(W_x x_t; g_1) + RMS(W_h h_{t-1}; g_2) + b;  h_t = σ(o) ⊙ tanh(RMS(c_t; g_3)),
    with RMS(a; g) = a / sqrt(mean(a²) + ε) ⊙ g: no mean subtraction, no shift (b is the only bias).
    """

    norm_layer = RMSNorm


# ---------------------------------------------------------------------------------------------------------------- GRU


@variant("gru", "plain GRU, equal to torch.nn.GRU (runs its kernel)", "Cho et al. 2014")
class GRUCell(_TorchLayoutCell):
    """The plain GRU, exactly as `torch.nn.GRU` (same parameter names, shapes, initialisation and gate order).

    r = σ(W_ir x + b_ir + W_hr h + b_hr);  z = σ(W_iz x + b_iz + W_hz h + b_hz);
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn));  h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}.
    """

    num_gates = 3
    native = "gru"

    def recurrent(self, h: Tensor, t: int, mask: Tensor | None) -> Tensor:
        """The recurrent term of (r, z, n), before the reset gate multiplies its n part."""
        return F.linear(h, self.weight_hh, self.bias_hh)

    def step(self, u: Tensor, state: State, t: int, mask: Tensor | None) -> tuple[Tensor, State]:
        (h,) = state
        ur, uz, un = u.chunk(3, dim=-1)
        hr, hz, hn = self.recurrent(h, t, mask).chunk(3, dim=-1)
        r = torch.sigmoid(ur + hr)
        z = torch.sigmoid(uz + hz)
        n = torch.tanh(un + r * hn)
        h = n + z * (h - n)
        return h, (h,)


class _NormalizedGRUCell(GRUCell):
    """A GRU whose gates read normalized terms:

    r, z = σ(N_x^{rz}(W_x^{rz} x_t) + N_h^{rz}(W_h^{rz} h_{t-1}) + b^{rz});
    n = tanh(N_x^n(W_x^n x_t) + b_x^n + r ⊙ (N_h^n(W_h^n h_{t-1}) + b_h^n));  h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}.

    A subclass states its normalizations as data: `norms` names the attributes holding N_x^{rz}, N_x^n, N_h^{rz} and
    N_h^n (None: not normalized), modules the engine applies at each step (a `MaskedBatchNorm` with the step's mask and
    time step, any other module to the step's rows). The biases are `torch.nn.GRU`'s b_ih and b_hh, added after the
    normalizations; the recurrent candidate term is normalized before the reset gate multiplies it.
    """

    norms: tuple[str | None, str | None, str | None, str | None] = (None, None, None, None)

    native = None
    backends = ("compiled", "triton", "python", "reference")

    def norm_at(self, position: int) -> nn.Module | None:
        """The module normalizing position 0 (W_x^{rz} x), 1 (W_x^n x), 2 (W_h^{rz} h) or 3 (W_h^n h): the attribute
        `norms` names; None if the position is not normalized."""
        name = self.norms[position]
        return None if name is None else getattr(self, name)

    def _norm(self, a: Tensor, first: int, b: Tensor | None, t: int | None, mask: Tensor | None) -> Tensor:
        """N^{rz} and N^n (positions ``first`` and ``first + 1``) of the (r, z) and n parts of ``a``, plus ``b``; ``t``:
        the time step of one step's rows, None for the input term of the whole sequence."""
        h2 = 2 * self.hidden_size
        parts = [a[..., :h2], a[..., h2:]]
        for k in (0, 1):
            norm = self.norm_at(first + k)
            if t is not None:
                parts[k] = _at_step(norm, parts[k], t, mask)
            elif norm is not None:
                parts[k] = norm(parts[k], mask) if isinstance(norm, MaskedBatchNorm) else norm(parts[k])
        a = torch.cat(parts, dim=-1)
        return a if b is None else a + b

    def input_projection(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.backend not in FUSED:
            return self._norm(linear(x, self.weight_ih), 0, self.bias_ih, None, mask)
        # The fused recurrence takes b_hh's r, z part in the input term (b_hn stays inside the reset gate).
        h2 = 2 * self.hidden_size
        b = None if self.bias_ih is None else torch.cat([self.bias_ih[:h2] + self.bias_hh[:h2], self.bias_ih[h2:]])
        shifts = (None, None) if b is None else (b[:h2], b[h2:])
        blocks = ((self.norm_at(0), self.weight_ih[:h2], shifts[0]), (self.norm_at(1), self.weight_ih[h2:], shifts[1]))
        parts = [None if norm is None else normalize_input(norm, x, w, shift, mask) for norm, w, shift in blocks]
        if all(p is not None for p in parts):  # each block's W_x x and its norm in one node
            return torch.cat(parts, dim=-1)
        return self._norm(linear(x, self.weight_ih), 0, b, None, mask)

    def recurrent(self, h: Tensor, t: int, mask: Tensor | None) -> Tensor:
        return self._norm(F.linear(h, self.weight_hh), 2, self.bias_hh, t, mask)

    def fused_recurrence(self, u: Tensor, state: State, layout) -> tuple[Tensor, State]:
        """The recurrence with a hand-written backward (`zoo.nn.fused.FusedGRU`), on packed rows."""
        if self.backend == "triton":
            return gpu.gru_recurrence(self, u, state, layout)
        b_hn = None if self.bias_hh is None else self.bias_hh[2 * self.hidden_size :]  # (the r, z part is in u)
        n_rz, n_n = StepNorm(self.norm_at(2)), StepNorm(self.norm_at(3), shift=b_hn)
        grad = torch.is_grad_enabled()
        out, h = FusedGRU.apply(
            u, state[0], self.weight_hh, b_hn, *n_rz.params(), *n_n.params(), layout, n_rz, n_n, grad
        )
        return out, (h,)


@variant("ln_gru", "layer-normalized GRU (four LNs, in the official code's positions)", BA)
class LNGRUCell(_NormalizedGRUCell):
    """Layer-normalized GRU (Ba et al. 2016, supplementary; the LN positions of the official code).

    r, z = σ(LN(W_x^{rz} x_t) + LN(W_h^{rz} h_{t-1}) + b^{rz});
    n = tanh(LN(W_x^n x_t) + b_x^n + r ⊙ (LN(W_h^n h_{t-1}) + b_h^n));  h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}.
    The recurrent candidate term is normalized before the reset gate multiplies it. Gains start at 1, shifts at 0.
    The LNs sit where the official code (ryankiros/layer-norm) puts them; the biases b are `torch.nn.GRU`'s b_ih, b_hh,
    added after the normalization (the official code adds its input biases before it, where the LN shift absorbs them,
    and has no recurrent bias).
    """

    norms = ("ln_ih_rz", "ln_ih_n", "ln_hh_rz", "ln_hh_n")
    norm_layer = nn.LayerNorm

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__(input_size, hidden_size, bias)
        _warn_scalar_input(self, input_size)
        h = hidden_size
        self.ln_ih_rz = self.norm_layer(2 * h, eps=eps)
        self.ln_ih_n = self.norm_layer(h, eps=eps)
        self.ln_hh_rz = self.norm_layer(2 * h, eps=eps)
        self.ln_hh_n = self.norm_layer(h, eps=eps)


@variant("rms_gru", "RMSNorm in the layer-norm positions of ln_gru", RMS)
class RMSGRUCell(LNGRUCell):
    """RMSNorm GRU (Zhang & Sennrich 2019) in the four LN positions of the LN-GRU; gains only, the biases b shift."""

    norm_layer = RMSNorm


# ------------------------------------------------------------------------------------------------------------- IndRNN


@variant(
    "bn_indrnn", "independently recurrent ReLU network with batch norm, |u| bounded", "Li et al. 2018, arXiv:1803.04831"
)
class BNIndRNNCell(RecurrentCell):
    """IndRNN with batch normalization (Li et al. 2018, eq. 2).

    h_t = ReLU(W x_t + u ⊙ h_{t-1} + b), u a vector: every neuron recurs on itself only. ``bn_placement``:
    ``"input"`` normalizes the input term, h_t = ReLU(BN(W x_t) + u ⊙ h_{t-1} + b); ``"output"`` (the paper's stacked
    models) normalizes the layer's output, BN(h_t), while the recurrence carries the unnormalized h_t. Statistics are
    over all valid batch x time positions. |u| is kept within ``recurrent_max`` (default ``magnitude ** (1 /
    max_steps)``, the paper's MAG^(1/T)) by projecting u at the start of every training forward (so after each
    optimizer update, as the paper clips it; the weights saved after the last update may still exceed it until the
    next training forward); u starts U(0, 1).
    ``sync_bn``: synchronize the statistics over data-parallel processes (`MaskedBatchNorm`'s ``sync``).
    """

    backends = ("compiled", "triton", "python", "reference")  # (compiled: the input term's norm)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        bn_placement: str = "input",
        max_steps: int = 1000,
        magnitude: float = 2.0,
        recurrent_max: float | None = None,
        momentum: float = 0.1,
        eps: float = 1e-5,
        sync_bn: bool | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size)
        if bn_placement not in ("input", "output"):
            raise ValueError(f"bn_placement must be 'input' or 'output', got {bn_placement!r}")
        self.bn_placement = bn_placement
        self.recurrent_max = recurrent_max if recurrent_max is not None else magnitude ** (1.0 / max_steps)
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.bn = MaskedBatchNorm(
            hidden_size, None, momentum=momentum, eps=eps, bias=bn_placement == "output", sync=sync_bn
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_ih, a=math.sqrt(5))
        nn.init.uniform_(self.weight_hh, 0.0, 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def input_projection(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.backend in FUSED and self.bn_placement == "input":  # BN(W_x x) + b in one node, where it applies
            u = normalize_input(self.bn, x, self.weight_ih, self.bias, mask)
            if u is not None:
                return u
        u = linear(x, self.weight_ih)
        if self.bn_placement == "input":
            u = self.bn(u, mask)
        return u if self.bias is None else u + self.bias

    def forward(self, x: Tensor, state: State, mask: Tensor | None = None) -> tuple[Tensor, State]:
        if self.training:
            with torch.no_grad():  # write (and bump u's version) only when u is out of range: a graph still
                if (self.weight_hh.abs() > self.recurrent_max).any():  # holding u stays valid otherwise
                    self.weight_hh.clamp_(-self.recurrent_max, self.recurrent_max)
        return super().forward(x, state, mask)

    def step(self, u: Tensor, state: State, t: int, mask: Tensor | None) -> tuple[Tensor, State]:
        h = torch.relu(u + self.weight_hh * state[0])
        return h, (h,)

    def fused_recurrence(self, u: Tensor, state: State, layout) -> tuple[Tensor, State]:
        """The recurrence with a hand-written backward (`zoo.nn.fused.FusedIndRNN`), on packed rows."""
        if self.backend == "triton":
            return gpu.indrnn_recurrence(self, u, state, layout)
        out, h = FusedIndRNN.apply(u, state[0], self.weight_hh, layout)
        return out, (h,)

    def output_transform(self, out: Tensor, mask: Tensor | None) -> Tensor:
        return self.bn(out, mask) if self.bn_placement == "output" else out
