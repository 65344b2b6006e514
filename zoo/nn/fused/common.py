"""What every part of the fused recurrence shares: the block size of cache-sized work, and autograd helpers."""

from __future__ import annotations

import torch
from torch import Tensor

aten = torch.ops.aten

BLOCK = 1 << 19  # elements worked on at a time where a whole tensor would not stay in cache (input term, IndRNN dw)


def recording(ctx, grad: bool) -> bool:
    """Whether a `torch.autograd.Function` call records its backward: ``grad`` is `torch.is_grad_enabled` at the call
    (always off inside ``forward``), and ``ctx.needs_input_grad`` follows the inputs' ``requires_grad`` alone, under
    `torch.no_grad` and `torch.inference_mode` too."""
    return grad and any(ctx.needs_input_grad)


def _grads(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """One gradient per input of the forward: None for those that need none and for the non-tensor inputs."""
    grads = grads + (None,) * (len(ctx.needs_input_grad) - len(grads))
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))
