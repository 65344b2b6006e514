"""`torch.autograd.gradcheck` in float64 of every variant on each of its backends (`zoo.nn.backends`).

A function of the input and of the initial state, on a padded batch with lengths, 2 layers, bidirectional. Batch-norm
variants in training mode are deterministic given the batch (their running statistics move, but training does not
read them), so finite differences apply there too.
"""

from __future__ import annotations

import pytest
import torch

import zoo.nn

B, T, IN, H = 3, 4, 3, 2
LENGTHS = torch.tensor([4, 1, 3])  # a sequence of one step; one valid sample at the last step

VARIANTS = [v.name for v in zoo.nn.list_variants()]
CASES = [
    (v, o, backend)
    for v, o in [(v, {}) for v in VARIANTS] + [("bn_indrnn", {"bn_placement": "output"})]
    for backend in zoo.nn.get_variant(v).cell.backends
    if backend != "triton"  # (under Triton's interpreter gradcheck's hundreds of calls take minutes: test_nn_triton.py)
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("variant", "options", "backend"), CASES, ids=["-".join([v, *o.values(), b]) for v, o, b in CASES]
)
def test_gradcheck(variant: str, options: dict, backend: str, training: bool) -> None:
    if reason := zoo.nn.backends.unusable(backend, torch.device("cpu")):
        pytest.skip(reason)
    rnn = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, backend=backend, **options).double()
    rnn.train(training)
    if not training:  # evaluation with running statistics other than (0, 1)
        rnn.train()(torch.randn(T, B, IN, dtype=torch.float64), lengths=LENGTHS)
        rnn.eval()
    x = torch.randn(T, B, IN, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(4, B, H, dtype=torch.float64, requires_grad=True) for _ in range(rnn.state_size)]

    def f(x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, final = rnn(x, state[0] if len(state) == 1 else state, lengths=LENGTHS)
        return (out, *(final if isinstance(final, tuple) else (final,)))

    assert torch.autograd.gradcheck(f, (x, *state))
