"""`zoo.nn.RNN`: every variant behind the API of `torch.nn.LSTM`."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .backends import choose
from .cells import RecurrentCell
from .norm import MaskedBatchNorm
from .registry import get_variant

StateArg = Tensor | tuple[Tensor, Tensor] | None


def lengths_to_mask(lengths: Tensor, steps: int) -> Tensor:
    """``(T, B)`` bool mask, True where ``t < lengths[b]``."""
    return torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse the valid part of every sequence of a time-major ``(T, B, ...)`` tensor; padding stays in place."""
    if lengths is None:
        return x.flip(0)
    steps = x.shape[0]
    t = torch.arange(steps, device=x.device).unsqueeze(1)
    idx = torch.where(t < lengths.unsqueeze(0), lengths.unsqueeze(0) - 1 - t, t)
    return x.gather(0, idx.view(steps, -1, *([1] * (x.dim() - 2))).expand_as(x))


class RNN(nn.Module):
    """A multi-layer, optionally bidirectional recurrent network of any registered variant.

    Args:
        variant: a name from `zoo.nn.list_variants()` ("lstm", "bn_lstm", "ln_gru", ...).
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as in `torch.nn.LSTM`.
        backend: what runs the recurrence (`zoo.nn.backends`): ``"auto"`` (the fastest the variant has on the
            layer's device), ``"native"``, ``"compiled"``, ``"python"`` or ``"reference"``. ``rnn.backend`` says
            which runs; assigning it chooses again.
        fused: an alias of ``backend``: True is ``"auto"``, False ``"reference"``.
        **options: the variant's own options (see ``zoo.nn.get_variant(name).options``), e.g. ``max_steps`` for
            ``bn_lstm``.

    Forward: ``(input, state=None, lengths=None) -> (output, state)``. ``input`` is ``(T, B, I)`` (``(B, T, I)`` with
    ``batch_first``), ``(T, I)`` unbatched, or a `PackedSequence`. ``lengths`` (``(B,)``, each in 1..T) marks the valid
    prefix of each padded sequence: padding never enters a statistic, the reverse direction reverses only the valid
    part, outputs at padded positions are zero and the returned state is each sequence's state after its last valid
    step. ``state`` is ``h_0`` or, for LSTM variants, ``(h_0, c_0)``, each ``(num_layers * num_directions, B, H)``.
    """

    def __init__(
        self,
        variant: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        backend: str = "auto",
        fused: bool | None = None,
        **options,
    ) -> None:
        super().__init__()
        spec = get_variant(variant)
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "none"
            raise TypeError(f"variant {variant!r} has no option {', '.join(map(repr, unknown))}; its options: {known}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.variant = variant
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.options = dict(options)
        dirs = 2 if bidirectional else 1
        self.cells = nn.ModuleList(
            spec.cell(input_size if layer == 0 else hidden_size * dirs, hidden_size, bias, **options)
            for layer in range(num_layers)
            for _ in range(dirs)
        )
        self._device_type = ""
        self.backend = backend if fused is None else ("auto" if fused else "reference")

    @property
    def backend(self) -> str:
        """The backend that runs the recurrence (`zoo.nn.backends`); assigning a name or ``"auto"`` chooses again."""
        return self.cells[0].backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.requested_backend = value
        self._choose_backend(next(self.parameters()).device)

    def _choose_backend(self, device: torch.device) -> None:
        chosen = choose(self.requested_backend, self.variant, type(self.cells[0]).backends, device)
        for cell in self.cells:
            cell.backend = chosen
        self._device_type = device.type

    @property
    def fused(self) -> bool:
        """An alias of ``backend``: whether a backend other than ``"reference"`` runs (False sets ``"reference"``,
        True ``"auto"``)."""
        return self.backend != "reference"

    @fused.setter
    def fused(self, value: bool) -> None:
        self.backend = "auto" if value else "reference"

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def state_size(self) -> int:
        """1 for variants whose state is h, 2 for those whose state is (h, c)."""
        return self.cells[0].state_size

    def extra_repr(self) -> str:
        s = f"{self.variant!r}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + f", backend={self.backend!r}"

    def forward(
        self, input: Tensor | PackedSequence, state: StateArg = None, lengths: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, StateArg]:
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None:
            if lengths is not None:
                raise ValueError("pass lengths or a PackedSequence, not both")
            x, lengths = pad_packed_sequence(packed)
            unbatched = False
        else:
            x, unbatched = self._time_major(input)
        steps, batch = x.shape[:2]
        if x.device.type != self._device_type:  # first call on this device
            self._choose_backend(x.device)
        if lengths is not None:
            lengths = self._check_lengths(lengths, steps, batch, x.device)
        states = self._initial_state(state, batch, x, unbatched)
        longest = self.sync_steps(steps, x.device)
        if longest > steps:  # other ranks have longer sequences: pad, the padding masked out
            if lengths is None:
                lengths = torch.full((batch,), steps, dtype=torch.long, device=x.device)
            x = F.pad(x, (0, 0, 0, 0, 0, longest - steps))
        if lengths is not None:  # padding enters nothing, whatever it holds (NaN and inf too: 0 · NaN is NaN)
            x = x.masked_fill(~lengths_to_mask(lengths, x.shape[0]).unsqueeze(-1), 0)

        if self.backend != "reference" and self.cells[0].native is not None:
            out, finals = self._native(x, states, lengths)
        else:
            out, finals = self._layers(x, states, lengths)
        out = out[:steps]

        if packed is not None:
            return self._repack(out, lengths, packed), self._state_out(finals, unbatched)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, self._state_out(finals, unbatched)

    def sync_steps(self, steps: int, device: torch.device) -> int:
        """The number of time steps to run: ``steps``, or the most steps of any rank when the network synchronizes
        batch statistics step by step over processes (per-step statistics, or a batch norm inside the recurrence even
        with shared statistics): every rank must run as many steps, i.e. all-reduces."""
        if not self.training:
            return steps
        recurrent = {
            id(m)
            for cell in self.cells
            if hasattr(cell, "norm_at")
            for m in (cell.norm_at(1), cell.norm_at(2))
            if m is not None
        }
        if not any(
            isinstance(m, MaskedBatchNorm) and (m.per_step or id(m) in recurrent) and m.synchronized
            for m in self.modules()
        ):
            return steps
        longest = torch.tensor([steps], device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        return int(longest)

    # ------------------------------------------------------------------------------------------------ the two engines

    def _layers(self, x: Tensor, states: list[Tensor], lengths: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """Every layer and direction runs its cell (on the reference engine, or the cell's fused recurrence)."""
        mask = None if lengths is None else lengths_to_mask(lengths, x.shape[0])
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                cell: RecurrentCell = self.cells[k]
                inp = x if d == 0 else reverse_padded(x, lengths)
                out, final = cell(inp, tuple(s[k] for s in states), mask)
                outs.append(out if d == 0 else reverse_padded(out, lengths))
                for acc, s in zip(finals, final, strict=True):
                    acc.append(s)
            x = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
            if mask is not None:
                x = x.masked_fill(~mask.unsqueeze(-1), 0)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, [torch.stack(f) for f in finals]

    def _native(self, x: Tensor, states: list[Tensor], lengths: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """The vendor kernel (oneDNN / cuDNN) through the same call `torch.nn.LSTM` and `torch.nn.GRU` make."""
        weights = [w for cell in self.cells for w in cell.native_weights()]
        kernel = _VF.lstm if self.cells[0].native == "lstm" else _VF.gru
        hx = tuple(states) if len(states) == 2 else states[0]
        has_biases = len(weights) == 4 * len(self.cells)  # (a folded normalization brings biases of its own)
        args = (weights, has_biases, self.num_layers, self.dropout, self.training, self.bidirectional)
        if lengths is None:
            out, *finals = kernel(x, hx, *args, False)
            return out, finals
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(h.index_select(1, order) for h in hx) if len(states) == 2 else hx.index_select(1, order)
        out, *finals = kernel(packed.data, packed.batch_sizes, hx, *args)
        out, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes, order, unorder), total_length=x.shape[0])
        return out, [f.index_select(1, unorder) for f in finals]

    # ----------------------------------------------------------------------------------------------- input and state

    def _time_major(self, input: Tensor) -> tuple[Tensor, bool]:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input has {input.shape[-1]} features, expected input_size={self.input_size}")
        if input.dim() == 2:
            return input.unsqueeze(1), True
        return (input.transpose(0, 1) if self.batch_first else input), False

    def _check_lengths(self, lengths: Tensor, steps: int, batch: int, device: torch.device) -> Tensor:
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() != batch:
            raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be integers, got {lengths.dtype}")
        if batch and (lengths.min() < 1 or lengths.max() > steps):
            raise ValueError(f"lengths must lie in 1..{steps} (the sequence length), got {lengths.tolist()}")
        return lengths.to(device=device, dtype=torch.long)

    def _initial_state(self, state: StateArg, batch: int, x: Tensor, unbatched: bool) -> list[Tensor]:
        n = self.num_layers * self.num_directions
        if state is None:
            return [x.new_zeros(n, batch, self.hidden_size) for _ in range(self.state_size)]
        parts = [state] if isinstance(state, Tensor) else list(state)
        if len(parts) != self.state_size:
            want = "a tensor h_0" if self.state_size == 1 else "a tuple (h_0, c_0)"
            raise ValueError(f"variant {self.variant!r} takes {want} as state, got {len(parts)} tensor(s)")
        shape = (n, self.hidden_size) if unbatched else (n, batch, self.hidden_size)
        for p in parts:
            if tuple(p.shape) != shape:
                raise ValueError(f"state tensors must have shape {shape}, got {tuple(p.shape)}")
        return [p.unsqueeze(1) if unbatched else p for p in parts]

    def _state_out(self, finals: list[Tensor], unbatched: bool) -> StateArg:
        if unbatched:
            finals = [f.squeeze(1) for f in finals]
        return finals[0] if self.state_size == 1 else (finals[0], finals[1])

    @staticmethod
    def _repack(out: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
        """Pack ``out`` with the same batch order as the input ``like``."""
        order = like.sorted_indices
        if order is not None:
            out, lengths = out.index_select(1, order), lengths.index_select(0, order)
        data = pack_padded_sequence(out, lengths.cpu(), enforce_sorted=True).data
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
