"""The zoo's LightningModules against references computed by hand: the classifier's readout of padded and
bidirectional sequences, the language model's loss, carried state, metrics, checkpoint hooks and sampling."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from zoo.models import LanguageModel, SequenceClassifier, rnn_kwargs

CLS_DIMS = {"input_size": 3, "num_classes": 4, "max_steps": 9}
LM_DIMS = {"vocab_size": 6, "max_steps": 4}


def test_rnn_kwargs_fill_max_steps_from_dims_only_where_the_variant_has_it() -> None:
    assert rnn_kwargs("bn_lstm", None, {"max_steps": 7}) == {"max_steps": 7}
    assert rnn_kwargs("bn_lstm", {"max_steps": 3, "gamma": 0.5}, {"max_steps": 7}) == {"max_steps": 3, "gamma": 0.5}
    assert rnn_kwargs("ln_lstm", None, {"max_steps": 7}) == {}
    assert SequenceClassifier("bn_lstm", 5, dims=CLS_DIMS).rnn.cells[0].bn_hh.max_steps == 9


def test_models_need_their_dims() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier("lstm", 5, dims={"input_size": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        LanguageModel("lstm", 5)


@pytest.mark.parametrize("variant", ["lstm", "ln_gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_reads_each_sequence_up_to_its_last_valid_step(variant: str, bidirectional: bool) -> None:
    model = SequenceClassifier(variant, 5, num_layers=2, bidirectional=bidirectional, dims=CLS_DIMS).eval()
    lengths = torch.tensor([9, 4, 1])
    x = torch.randn(3, 9, 3)
    x[torch.arange(9) >= lengths.unsqueeze(1)] = 0.0
    got = model.features(x, lengths)
    for b, n in enumerate(lengths.tolist()):  # each sequence alone, unpadded
        out, _ = model.rnn(x[b : b + 1, :n])
        want = out[0, -1, :5] if not bidirectional else torch.cat([out[0, -1, :5], out[0, 0, 5:]])
        torch.testing.assert_close(got[b], want)
    state = SequenceClassifier(variant, 5, num_layers=2, bidirectional=bidirectional, readout="state", dims=CLS_DIMS)
    state.load_state_dict(model.state_dict())
    torch.testing.assert_close(state.eval().features(x, lengths), got)  # h_n of both directions: the same summary
    assert model(x, lengths).shape == (3, 4)


def test_classifier_logs_loss_and_accuracy_like_the_references(tmp_path) -> None:
    x, lengths, y = torch.randn(10, 9, 3), torch.randint(1, 10, (10,)), torch.randint(4, (10,))
    model = SequenceClassifier("lstm", 5, dims=CLS_DIMS)
    loader = DataLoader(list(zip(x, lengths, y, strict=True)), batch_size=4)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    (result,) = trainer.test(model, loader, verbose=False)
    with torch.no_grad():
        logits = model(x, lengths)
    assert result["test/acc"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert result["test/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def _streams(batch: int = 3, steps: int = 13, vocab: int = 6) -> torch.Tensor:
    return torch.randint(vocab, (batch, steps), generator=torch.Generator().manual_seed(1))


def _windows(data: torch.Tensor, bptt: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(data[:, i : i + bptt], data[:, i + 1 : i + 1 + bptt]) for i in range(0, data.shape[1] - 1, bptt)]


def test_language_model_carries_its_state_across_windows_and_resets_it_each_pass(tmp_path) -> None:
    """val/bpc over windows with the carried state equals the bits per token of the whole streams read at once."""
    data = _streams()
    model = LanguageModel("ln_lstm", 7, embedding_dim=5, dims=LM_DIMS)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    loader = DataLoader(_windows(data, 4), batch_size=None)
    (first,) = trainer.validate(model, loader, verbose=False)
    (again,) = trainer.validate(model, loader, verbose=False)  # the state is reset: the same numbers again
    with torch.no_grad():
        logits, _ = model.eval()(data[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, 6), data[:, 1:].reshape(-1)).item()
    assert first["val/loss"] == pytest.approx(nll, rel=1e-5)
    assert first["val/bpc"] == pytest.approx(nll / math.log(2), rel=1e-5)
    assert first["val/ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert again == first


def test_language_model_training_step_loss_and_state(tmp_path) -> None:
    data = _streams()
    model = LanguageModel("lstm", 7, dims=LM_DIMS)  # one-hot input
    assert model.embedding is None and model.rnn.input_size == 6
    (x1, y1), (x2, y2) = _windows(data, 4)[:2]
    model.on_train_epoch_start()
    loss1 = model.training_step((x1, y1), 0)
    state = model._states["train"]
    assert all(not s.requires_grad for s in state)
    loss2 = model.training_step((x2, y2), 1)
    with torch.no_grad():
        logits, _ = model(data[:, :8])
    want = F.cross_entropy(logits[:, 4:].reshape(-1, 6), data[:, 5:9].reshape(-1))
    torch.testing.assert_close(loss2.detach(), want)  # the second window continued from the first's state
    torch.testing.assert_close(loss1.detach(), F.cross_entropy(logits[:, :4].reshape(-1, 6), y1.reshape(-1)))
    model.on_train_epoch_start()
    assert model._states["train"] is None


def test_language_model_checkpoint_hooks_keep_state_and_vocab_as_plain_data() -> None:
    model = LanguageModel("lstm", 7, dims=LM_DIMS)
    model.vocab = list("abcdef")
    model.training_step(_windows(_streams(), 4)[0], 0)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert isinstance(checkpoint["carried_state"], list) and checkpoint["vocab"] == list("abcdef")
    other = LanguageModel("lstm", 7, dims=LM_DIMS)
    other.on_load_checkpoint(checkpoint)
    assert other.vocab == list("abcdef")
    for a, b in zip(other._states["train"], model._states["train"], strict=True):
        assert torch.equal(a, b)


def test_sample_greedy_matches_reading_the_whole_text_at_once() -> None:
    """For a variant without per-step statistics, the windowed sampler equals greedy decoding of the full text."""
    model = LanguageModel("lstm", 7, dims=LM_DIMS).eval()
    prompt = [1, 2, 3, 4, 5, 0]
    got = model.sample(9, prompt=prompt, temperature=0)
    text = list(prompt)
    with torch.no_grad():
        for _ in range(9):
            logits, _ = model(torch.tensor([text]))
            text.append(int(logits[0, -1].argmax()))
    assert got == text[len(prompt) :]
    vocab = list("abcdef")
    assert model.sample(9, prompt="bcdefa", temperature=0, vocab=vocab) == "".join(vocab[i] for i in got)
    words = ["the", "cat", "sat", "on", "a", "<eos>"]
    assert model.sample(9, prompt="cat sat on a <eos> the", temperature=0, vocab=words).split() == [
        words[i] for i in model.sample(9, prompt=[1, 2, 3, 4, 5, 0], temperature=0)
    ]
    assert model.sample(5, seed=3, vocab=vocab) == model.sample(5, seed=3, vocab=vocab)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        model.sample(3, prompt="xyz", vocab=vocab)
