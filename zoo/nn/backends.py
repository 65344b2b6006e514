"""The backends that run a variant's recurrence, and the choice among them.

- ``native``: the vendor kernel (oneDNN on CPU, cuDNN on GPU) through the call `torch.nn.LSTM` and `torch.nn.GRU` make;
  for the variants that are a plain LSTM or GRU (``lstm``, ``gru``, ``wn_lstm``).
- ``compiled``: the fused recurrence (`zoo.nn.fused`: a hand-written backward through time) with its loop over steps
  in the C++ extension (`zoo.nn._ext`, built by ``python -m zoo.nn.build``); CPU, float32 and float64.
- ``python``: the same fused recurrence with its loop over steps in Python, one vendor kernel per norm and step; any
  device.
- ``triton``: the same fused recurrence with each step's work after the recurrent GEMM in one Triton kernel
  (`zoo.nn.gpu`), for CUDA; on CPU tensors it runs under Triton's interpreter when ``TRITON_INTERPRET=1`` is set and the
  backend is named (``auto`` never takes it on a CPU). Needs the ``triton`` extra.
- ``reference``: the step-by-step engine (`RecurrentCell.forward`'s loop, autograd through every step): the readable
  definition of every variant, which the tests hold every other backend equal to.

A layer's ``backend="auto"`` takes the first of its cell's backends (`RecurrentCell.backends`, fastest first) that can
run on the layer's device; it is chosen when the layer is built and again when it first runs on another device, and
a fallback to a slower backend is logged once. A backend named explicitly that cannot run the variant, or cannot run
here, is an error at construction (or at the first call on a new device).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _ext, gpu

BACKENDS = ("native", "compiled", "triton", "python", "reference")
FUSED = ("compiled", "triton", "python")  # the backends that run a cell's `fused_recurrence`
DISABLED = "ZOO_NO_EXT is set"
_compiled = contextvars.ContextVar("zoo_nn_compiled", default=True)


def unusable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None if it can."""
    if backend == "triton":
        return gpu.unusable(device)
    if backend != "compiled":
        return None
    if device.type != "cpu":
        return f"the compiled loops run on the CPU only, not on {device.type}"
    if _ext.disabled():
        return DISABLED
    if _ext.load() is None:
        return f"the compiled loops are not built (`{_ext.BUILD_COMMAND}` builds them)"
    return None


def choose(requested: str, variant: str, backends: tuple[str, ...], device: torch.device) -> str:
    """The backend that runs ``variant`` (whose cell runs ``backends``, fastest first) on ``device``."""
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; the backends are auto, {', '.join(BACKENDS)}")
    if requested != "auto":
        if requested not in backends:
            raise ValueError(
                f"backend {requested!r} cannot run variant {variant!r}; its backends: {', '.join(backends)}"
            )
        reason = unusable(requested, device)
        if reason:
            raise ValueError(f"backend {requested!r} cannot run variant {variant!r} here: {reason}")
        return requested
    notes = []
    for backend in backends:
        if backend == "triton" and device.type == "cpu":
            continue  # (its interpreter on a CPU: only when named)
        reason = unusable(backend, device)
        if reason is None:
            if backend != "triton":  # (triton is the fastest on a GPU: nothing slower runs)
                for note in notes:
                    _ext.say_once(note)
            return backend
        if reason != DISABLED:  # (a user who set ZOO_NO_EXT knows)
            notes.append(f"{variant} on {device.type}: {reason}; a slower backend runs")
    raise AssertionError(f"no backend of {backends} runs")  # (reference always does)


@contextmanager
def compiled(allowed: bool) -> Iterator[None]:
    """Within it, the fused recurrences use the compiled extension only if ``allowed`` (the ``python`` backend: not)."""
    token = _compiled.set(allowed)
    try:
        yield
    finally:
        _compiled.reset(token)


def compiled_allowed() -> bool:
    """Whether the fused recurrence running now may use the compiled extension."""
    return _compiled.get()
