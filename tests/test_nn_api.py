"""`zoo.nn.RNN` as a layer: every variant trains and evaluates, saves and loads, fails early with a clear message."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import zoo.nn

VARIANTS = [v.name for v in zoo.nn.list_variants()]
B, T, IN, H = 4, 7, 8, 16
LENGTHS = torch.tensor([7, 3, 5, 1])


def build(variant: str, fused: bool = True, **kwargs) -> zoo.nn.RNN:
    return zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, batch_first=True, fused=fused, **kwargs)


def as_tuple(state: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def test_the_ten_variants_are_registered() -> None:
    expected = {"lstm", "gru", "bn_lstm", "seqbn_lstm", "ln_lstm", "ln_gru", "rms_lstm", "rms_gru", "wn_lstm"}
    assert expected | {"bn_indrnn"} <= set(VARIANTS)
    for v in zoo.nn.list_variants():
        assert zoo.nn.get_variant(v.name) is v and v.description and v.paper


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_forward_backward_every_parameter_gets_a_gradient(variant: str, fused: bool, training: bool) -> None:
    rnn = build(variant, fused).train(training)
    x = torch.randn(B, T, IN, requires_grad=True)
    out, state = rnn(x, lengths=LENGTHS)
    assert out.shape == (B, T, 2 * H)
    assert len(as_tuple(state)) == rnn.state_size
    assert all(s.shape == (4, B, H) for s in as_tuple(state))
    loss = out.square().sum() + sum(s.square().sum() for s in as_tuple(state))
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for name, p in rnn.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_two_training_forwards_then_one_backward(variant: str, fused: bool) -> None:
    """A layer used twice before one backward (no in-place update of a parameter a graph still holds)."""
    rnn = build(variant, fused).train()
    a, _ = rnn(torch.randn(B, T, IN), lengths=LENGTHS)
    b, _ = rnn(torch.randn(B, T, IN))
    (a.sum() + b.sum()).backward()
    assert all(p.grad is not None for p in rnn.parameters())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_backward_twice_through_a_retained_graph(variant: str, fused: bool) -> None:
    """``retain_graph=True`` then a second backward: the same gradients again (backward keeps what it saved)."""
    rnn = build(variant, fused).train()
    x = torch.randn(B, T, IN, requires_grad=True)
    out, state = rnn(x, lengths=LENGTHS)
    loss = (out * torch.randn_like(out)).sum() + as_tuple(state)[0].sum()
    first = torch.autograd.grad(loss, [x, *rnn.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *rnn.parameters()])
    names = ["input"] + [n for n, _ in rnn.named_parameters()]
    for name, g1, g2 in zip(names, first, second, strict=True):
        torch.testing.assert_close(g2, g1, rtol=0, atol=0, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_state_dict_round_trip(variant: str) -> None:
    """Parameters and buffers (the running statistics) travel through a saved state dict into a fresh module."""
    rnn = build(variant, max_steps=T) if "max_steps" in zoo.nn.get_variant(variant).options else build(variant)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rnn.train()(torch.randn(B, T, IN), lengths=LENGTHS)
    buffer = io.BytesIO()
    torch.save(rnn.state_dict(), buffer)
    buffer.seek(0)
    fresh = zoo.nn.RNN(variant, IN, H, num_layers=2, bidirectional=True, batch_first=True, **rnn.options)
    x = torch.randn(B, T, IN)
    expected, expected_state = rnn.eval()(x, lengths=LENGTHS)
    assert not torch.allclose(fresh.eval()(x, lengths=LENGTHS)[0], expected)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    if variant.startswith(("bn_", "seqbn_")):
        assert any("running_mean" in k for k in fresh.state_dict())
    for (k, a), (k2, b) in zip(fresh.state_dict().items(), rnn.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    out, state = fresh(x, lengths=LENGTHS)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple(state), as_tuple(expected_state), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------- errors


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown variant 'bn_lstmm'") as err:
        zoo.nn.RNN("bn_lstmm", IN, H)
    for name in VARIANTS:
        assert name in str(err.value)
    assert "Did you mean 'bn_lstm'" in str(err.value)


@pytest.mark.parametrize(("variant", "option"), [("lstm", "max_steps"), ("bn_lstm", "gama"), ("ln_gru", "momentum")])
def test_unknown_option_is_a_type_error_naming_it(variant: str, option: str) -> None:
    with pytest.raises(TypeError, match=f"'{option}'"):
        zoo.nn.RNN(variant, IN, H, **{option: 1})


BAD_CALLS = {
    "input features": (lambda x, s: (torch.randn(T, B, IN + 1), s, None), "features, expected input_size=8"),
    "input rank": (lambda x, s: (torch.randn(T, B, 1, IN), s, None), "2-D .* or 3-D"),
    "state batch": (lambda x, s: (x, tuple(t[:, :2] for t in s), None), "state tensors must have shape"),
    "state layers": (lambda x, s: (x, tuple(t[:2] for t in s), None), "state tensors must have shape"),
    "state kind": (lambda x, s: (x, s[0], None), "takes a tuple"),
    "lengths zero": (lambda x, s: (x, s, torch.tensor([T, 0, 2, 1])), "lengths must lie in 1..7"),
    "lengths above T": (lambda x, s: (x, s, torch.tensor([T + 1, 1, 2, 1])), "lengths must lie in 1..7"),
    "lengths shape": (lambda x, s: (x, s, torch.tensor([T, 1, 2])), r"lengths must have shape \(4,\)"),
    "lengths 2-D": (lambda x, s: (x, s, torch.ones(B, 1, dtype=torch.long)), r"lengths must have shape \(4,\)"),
    "lengths float": (lambda x, s: (x, s, torch.tensor([7.0, 1.0, 2.0, 1.0])), "lengths must be integers"),
    "packed and lengths": (
        lambda x, s: (pack_padded_sequence(x, LENGTHS, enforce_sorted=False), s, LENGTHS),
        "lengths or a PackedSequence",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_fail_before_any_work(case: str) -> None:
    """A clear ValueError, raised before a running statistic moves (bn_lstm in training mode)."""
    rnn = zoo.nn.RNN("bn_lstm", IN, H, num_layers=2, bidirectional=True, max_steps=T).train()
    before = copy.deepcopy(rnn.state_dict())
    x, state = torch.randn(T, B, IN), (torch.randn(4, B, H), torch.randn(4, B, H))
    make, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        rnn(*make(x, state))
    for k, v in rnn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gru_state_must_be_a_tensor() -> None:
    rnn = zoo.nn.RNN("gru", IN, H)
    with pytest.raises(ValueError, match="takes a tensor h_0"):
        rnn(torch.randn(T, B, IN), (torch.zeros(1, B, H), torch.zeros(1, B, H)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.5}, "dropout"),
        ({"hidden_size": 0}, "positive"),
        ({"variant": "bn_indrnn", "bn_placement": "after"}, "bn_placement"),
        ({"variant": "bn_lstm", "past_max_steps": "wrap"}, "past_max_steps"),
        ({"variant": "bn_lstm", "max_steps": 0}, "max_steps"),
    ],
)
def test_bad_construction(kwargs: dict, message: str) -> None:
    args = {"variant": "lstm", "input_size": IN, "hidden_size": H} | kwargs
    with pytest.raises(ValueError, match=message):
        zoo.nn.RNN(**args)


# ------------------------------------------------------------------------------------------- dropout, unbatched, packed


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_dropout_between_layers_in_training_only(variant: str, fused: bool) -> None:
    rnn = build(variant, fused, dropout=0.5)
    x = torch.randn(B, T, IN)
    rnn.train()
    train1, train2 = rnn(x, lengths=LENGTHS)[0], rnn(x, lengths=LENGTHS)[0]
    assert not torch.allclose(train1, train2)
    plain = copy.deepcopy(rnn)
    plain.dropout = 0.0
    rnn.eval()
    eval1, eval2 = rnn(x, lengths=LENGTHS)[0], rnn(x, lengths=LENGTHS)[0]
    torch.testing.assert_close(eval1, eval2, rtol=0, atol=0)
    torch.testing.assert_close(eval1, plain.eval()(x, lengths=LENGTHS)[0])
    # one layer: nothing between layers, so nothing is dropped (as in torch.nn.LSTM)
    single = zoo.nn.RNN(variant, IN, H, dropout=0.5, fused=fused).train()
    torch.testing.assert_close(single(x.transpose(0, 1))[0], single(x.transpose(0, 1))[0])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_unbatched_input(variant: str, fused: bool, training: bool) -> None:
    rnn = build(variant, fused).train(training)
    x = torch.randn(T, IN)
    state = tuple(torch.randn(4, H) for _ in range(rnn.state_size))
    out, final = rnn(x, state if len(state) == 2 else state[0])
    assert out.shape == (T, 2 * H)
    state1 = tuple(s.unsqueeze(1) for s in state)
    batched, batched_final = rnn(x.unsqueeze(0), state1 if len(state1) == 2 else state1[0])
    torch.testing.assert_close(out, batched[0])
    for f, bf in zip(as_tuple(final), as_tuple(batched_final), strict=True):
        assert f.shape == (4, H)
        torch.testing.assert_close(f, bf[:, 0])


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "steps"])
def test_packed_sequence_in_packed_sequence_out(variant: str, fused: bool, enforce_sorted: bool) -> None:
    rnn = build(variant, fused).eval()
    rnn.train()(torch.randn(B, T, IN), lengths=LENGTHS)
    lengths = LENGTHS.sort(descending=True).values if enforce_sorted else LENGTHS
    x = torch.randn(B, T, IN)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    for training in (True, False):
        rnn.train(training)
        snapshot = copy.deepcopy(rnn)
        out, final = rnn(packed)
        padded, padded_final = snapshot(x, lengths=lengths)
        assert isinstance(out, PackedSequence)
        if enforce_sorted:
            assert out.sorted_indices is None and out.unsorted_indices is None
        else:
            assert torch.equal(out.sorted_indices, packed.sorted_indices)
            assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        expected = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        torch.testing.assert_close(out.data, expected.data)
        torch.testing.assert_close(as_tuple(final), as_tuple(padded_final))


@pytest.mark.parametrize("variant", ["ln_lstm", "rms_lstm", "ln_gru", "rms_gru"])
def test_layer_norm_of_a_single_input_feature_warns(variant: str) -> None:
    with pytest.warns(UserWarning, match="input_size=1: normalizing W_x x over its features gives sign"):
        zoo.nn.RNN(variant, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.nn.RNN(variant, 2, 4)
        zoo.nn.RNN("bn_lstm", 1, 4)
