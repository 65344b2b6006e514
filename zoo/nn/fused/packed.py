"""Sequences in `PackedSequence` order (sorted by length, time-major) for the fused recurrence: `Layout`, `run_packed`,
and `OuterSum`, the weight gradient summed over steps in chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .gemm import _outer_onednn, outer_add


@dataclass
class Layout:
    """Packed order: ``batch_sizes[t]`` rows run at step t, starting at row ``offsets[t]`` of the packed tensors."""

    batch_sizes: list[int]
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for b in self.batch_sizes[:-1]:
            self.offsets.append(self.offsets[-1] + b)

    @property
    def rows(self) -> int:
        return self.offsets[-1] + self.batch_sizes[-1]

    def at(self, t: int) -> slice:
        return slice(self.offsets[t], self.offsets[t] + self.batch_sizes[t])

    def prev(self, t: int) -> slice:
        """The rows of step t − 1 that are still running at step t."""
        return slice(self.offsets[t - 1], self.offsets[t - 1] + self.batch_sizes[t])

    def last_rows(self, device: torch.device) -> Tensor:
        """For every sequence (in sorted order), the packed row of its last step."""
        if self.batch_sizes[-1] == self.batch_sizes[0]:  # every sequence runs to the last step
            return torch.arange(self.offsets[-1], self.rows, device=device)
        sizes = torch.tensor(self.batch_sizes)
        lengths = (torch.arange(sizes[0]).unsqueeze(0) < sizes.unsqueeze(1)).sum(0)
        return (torch.tensor(self.offsets)[lengths - 1] + torch.arange(sizes[0])).to(device)

    def previous(self, first: Tensor, packed: Tensor, steps: range | None = None) -> Tensor:
        """For the packed rows of ``steps`` (default: all), the row of the step before: ``first`` at t = 0, else the
        packed row of step t − 1. Consecutive steps of equal batch size read one slice of ``packed`` (no copy)."""
        parts: list[Tensor] = []
        lo = hi = -1  # the packed rows [lo, hi) not yet taken
        for t in steps if steps is not None else range(len(self.batch_sizes)):
            if t == 0:
                parts.append(first[: self.batch_sizes[0]])
                continue
            prev = self.prev(t)
            if prev.start != hi:
                if hi > lo:
                    parts.append(packed[lo:hi])
                lo = prev.start
            hi = prev.stop
        if hi > lo:
            parts.append(packed[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class OuterSum:
    """Σ_t dz_t^T h_{t-1} over a backward pass (the gradient of W_h), in chunks of at most ``rows`` packed rows.

    The backward pass walks `chunks` (latest first), writes each step's dz_t into `rows` of the chunk buffer, and
    calls `add` when a chunk is done: one large GEMM per chunk. The memory is one chunk, not a tensor of all steps.
    By default a chunk holds a sixth of all rows, at least 1024: fewer, deeper GEMMs and fewer additions into the
    gradient (docs/speed.md); past 1024 rows the buffer is a sixth of the saved pre-activations.
    """

    def __init__(self, layout: Layout, h0: Tensor, h: Tensor, features: int, rows: int | None = None) -> None:
        self.layout, self.h0, self.h = layout, h0, h
        rows = max(1024, layout.rows // 6) if rows is None else rows
        self.cap = min(max(rows, layout.batch_sizes[0]), layout.rows)
        self.buf = h.new_empty(self.cap, features)
        # (the layout `outer` returns)
        self.grad = h.new_zeros(h.shape[1], features).t() if _outer_onednn(h) else h.new_zeros(features, h.shape[1])

    def chunks(self) -> list[range]:
        """The steps in chunks of at most ``cap`` packed rows, in backward order (the latest chunk first)."""
        sizes, out, hi = self.layout.batch_sizes, [], len(self.layout.batch_sizes)
        while hi > 0:
            lo, rows = hi - 1, sizes[hi - 1]
            while lo > 0 and rows + sizes[lo - 1] <= self.cap:
                lo, rows = lo - 1, rows + sizes[lo - 1]
            out.append(range(lo, hi))
            hi = lo
        return out

    def rows(self, chunk: range, t: int) -> Tensor:
        """Where dz_t goes: step t's rows of the chunk buffer."""
        lo = self.layout.offsets[t] - self.layout.offsets[chunk.start]
        return self.buf[lo : lo + self.layout.batch_sizes[t]]

    def add(self, chunk: range) -> None:
        """Add the finished chunk's Σ dz_t^T h_{t-1}."""
        n = (
            self.layout.offsets[chunk.stop - 1]
            + self.layout.batch_sizes[chunk.stop - 1]
            - self.layout.offsets[chunk.start]
        )
        outer_add(self.grad, self.buf[:n], self.layout.previous(self.h0, self.h, chunk))

    def result(self) -> Tensor:
        return self.grad


def run_packed(recurrence, u, state: tuple[Tensor, ...], mask: Tensor | None):
    """Run ``recurrence(u_packed, state_sorted, layout) -> (out_packed, final_sorted)`` on a padded ``(T, B, G)`` ``u``
    (or a `DeferredInput`, whose input rows are packed instead).

    Returns the padded output ``(T, B, H)`` (zeros at padded positions) and the final state in the batch's own order.
    """
    rows = u if isinstance(u, Tensor) else u.x
    steps, batch = rows.shape[:2]
    if mask is None:
        flat = rows.reshape(steps * batch, -1)
        out, final = recurrence(flat if rows is u else u.with_rows(flat), state, Layout([batch] * steps))
        return out.view(steps, batch, -1), final
    packed = pack_padded_sequence(rows, mask.sum(0).cpu(), enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    layout = Layout(packed.batch_sizes.tolist())
    data = packed.data if rows is u else u.with_rows(packed.data)
    out, final = recurrence(data, tuple(s.index_select(0, order) for s in state), layout)
    out, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes, order, unorder), total_length=steps)
    return out, tuple(f.index_select(0, unorder) for f in final)


def candidate_scale(hidden: int, like: Tensor) -> Tensor:
    """1 on the i, f, o blocks and 2 on the candidate block g (gate order i, f, g, o)."""
    scale = like.new_ones(4 * hidden)
    scale[2 * hidden : 3 * hidden] = 2
    return scale
