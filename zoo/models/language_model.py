"""`LanguageModel`: character- or word-level language modelling with stateful truncated backpropagation through time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from .base import RecurrentModule, build_rnn, require_dims

State = Tensor | tuple[Tensor, ...]
SPLITS = ("train", "val", "test")


def _detach(state: State) -> State:
    return state.detach() if isinstance(state, Tensor) else tuple(s.detach() for s in state)


def _batch_of(state: State) -> int:
    return (state if isinstance(state, Tensor) else state[0]).shape[1]


class LanguageModel(RecurrentModule):
    """Embedding (or one-hot) -> recurrent network -> linear decoder, trained with cross-entropy on next tokens.

    Batches are ``(x, y)``, LongTensor (B, T), ``y`` = ``x`` shifted by one; row b of batch i + 1 continues row b of
    batch i. Truncated BPTT as in the papers: the hidden state is carried from one window to the next (detached), and
    reset at the start of every training epoch and of every validation / test pass (each split keeps its own state, so
    a validation in the middle of an epoch does not disturb training). The carried training state is saved in the
    checkpoint, so a run resumed in the middle of an epoch continues exactly.

    Data-parallel (W processes): each rank reads its own block of the rows and carries its own state; the metrics
    are reduced over the ranks (`Perplexity` sums the log-likelihoods and counts), so val/test bpc equal the
    single-process values; the checkpoint holds the carried state of all rows (gathered in rank order), and a run
    resumed on any number of processes takes its own rows from it.

    Logs ``{split}/loss`` (nats per token), ``{split}/bpc`` (bits per token: per character at character level) and
    ``{split}/ppl`` (perplexity, through `torchmetrics.text.Perplexity` for val and test).

    Args:
        variant: a `zoo.nn` variant name.
        hidden_size, num_layers: of the recurrent network.
        dropout: on the embedding, between layers and on the network's output.
        embedding_dim: size of a learnt embedding; None feeds one-hot vectors (as Cooijmans et al. do at character
            level).
        rnn_options: the variant's own options, e.g. ``{"gamma": 0.1}`` for bn_lstm.
        dims: ``{"vocab_size": V, "max_steps": bptt}``, linked from the DataModule by the CLI.
    """

    monitor = "val/bpc"
    monitor_mode = "min"

    def __init__(
        self,
        variant: str = "lstm",
        hidden_size: int = 1000,
        num_layers: int = 1,
        dropout: float = 0.0,
        embedding_dim: int | None = None,
        rnn_options: dict[str, Any] | None = None,
        dims: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        dims = require_dims(dims, "vocab_size", model="LanguageModel")
        vocab_size = dims["vocab_size"]
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        input_size = embedding_dim or vocab_size
        self.rnn = build_rnn(variant, input_size, hidden_size, num_layers, dropout, False, rnn_options, dims)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        self.perplexity = nn.ModuleDict({f"{s}_ppl": Perplexity() for s in ("val", "test")})
        self.vocab: list[str] | None = None
        self._states: dict[str, State | None] = dict.fromkeys(SPLITS)
        self._carried_before: State | None = None

    # ------------------------------------------------------------------------------------------------------ the model

    def embed(self, x: Tensor) -> Tensor:
        """Token ids (B, T) -> network inputs (B, T, I)."""
        if self.embedding is None:
            return F.one_hot(x, self.decoder.out_features).to(self.decoder.weight.dtype)
        return self.drop(self.embedding(x))

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Next-token logits (B, T, V) for ids ``x`` (B, T) from ``state``, and the final state."""
        out, state = self.rnn(self.embed(x), state)
        return self.decoder(self.drop(out)), state

    # ------------------------------------------------------------------------------------------------------ the steps

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        state = self._states[split]
        if state is not None and _batch_of(state) != x.shape[0]:
            state = None  # a different number of streams: nothing to continue
        if state is not None:
            state = state.to(x.device) if isinstance(state, Tensor) else tuple(s.to(x.device) for s in state)
        logits, state = self(x, state)
        self._states[split] = _detach(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if split == "train":
            log = {"on_step": True, "on_epoch": True, "batch_size": y.numel(), "sync_dist": True}
            self.log("train/loss", loss, prog_bar=True, **log)
            self.log("train/bpc", loss / math.log(2), **log)
        else:
            self.perplexity[f"{split}_ppl"].update(logits, y)
        return loss

    def _log_eval(self, split: str) -> None:
        metric = self.perplexity[f"{split}_ppl"]
        if not metric.update_called:
            return
        ppl = metric.compute()  # over all ranks already: the sync_dist mean leaves it as it is
        self.log(f"{split}/ppl", ppl, sync_dist=True)
        self.log(f"{split}/loss", ppl.log(), prog_bar=split == "val", sync_dist=True)
        self.log(f"{split}/bpc", ppl.log2(), prog_bar=True, sync_dist=True)
        metric.reset()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The most likely next token (B, T) at every position of ``batch[0]`` (each batch read from a fresh state)."""
        logits, _ = self(batch[0])
        return logits.argmax(-1)

    def on_train_epoch_start(self) -> None:
        self._states["train"] = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._carried_before = self._states["train"]

    def restore_before_step(self) -> None:
        """The buffers and the carried hidden state, as before the step."""
        super().restore_before_step()
        self._states["train"] = self._carried_before

    def on_validation_epoch_start(self) -> None:
        self._states["val"] = None
        self.perplexity["val_ppl"].reset()

    def on_test_epoch_start(self) -> None:
        self._states["test"] = None
        self.perplexity["test_ppl"].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def setup(self, stage: str) -> None:
        """Take the vocabulary (id -> symbol) from the DataModule, for `sample` and for the checkpoint."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(datamodule, "vocab", None)
        if vocab is not None:
            self.vocab = list(vocab)

    # ------------------------------------------------------------------------------------------------ the checkpoint

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the carried training state of all rows (plain tensors) and the vocabulary (a list of str)."""
        state = self._states["train"]
        if state is not None:
            parts = [state] if isinstance(state, Tensor) else list(state)
            if self._world()[1] > 1:  # every rank saves (Lightning writes rank 0's): gather the rows in rank order
                parts = [torch.cat(list(self.all_gather(p)), dim=1) for p in parts]
            state = [p.cpu() for p in parts]
        checkpoint["carried_state"] = state
        checkpoint["vocab"] = self.vocab

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("carried_state")
        if state is not None:
            rank, world = self._world()
            rows, rest = divmod(state[0].shape[1], world)  # (rest: the rows do not split; nothing to continue)
            state = None if rest else [p[:, rank * rows : (rank + 1) * rows] for p in state]
        if state is not None:
            state = state[0] if len(state) == 1 else tuple(state)
        self._states["train"] = state
        self.vocab = checkpoint.get("vocab") or self.vocab

    # -------------------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(
        self,
        length: int = 200,
        prompt: str | Sequence[int] | None = None,
        temperature: float = 1.0,
        vocab: Sequence[str] | None = None,
        datamodule: Any = None,
        seed: int | None = None,
    ) -> str | list[int]:
        """Generate ``length`` tokens after ``prompt``.

        ``prompt`` is a string (encoded with ``datamodule.encode`` or the vocabulary) or a sequence of ids. The
        vocabulary is ``vocab``, else ``datamodule.vocab``, else the one saved in the checkpoint; with one the result
        is decoded to a string (``datamodule.decode`` if it has one), without one it is a list of ids.
        ``temperature`` 0 picks the most likely token. The text is read in windows of the training length
        (``dims["max_steps"]``) from the state carried between them, as in training, so variants with per-time-step
        statistics (bn_lstm) see each time step with its own statistics.
        """
        vocab = list(vocab) if vocab is not None else getattr(datamodule, "vocab", None) or self.vocab
        ids = self._encode(prompt, vocab, datamodule)
        window_len = int(self.hparams.dims.get("max_steps", 100))
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        was_training = self.training
        self.eval()
        window: list[int] = []
        start: State | None = None

        def push(token: int) -> Tensor:
            nonlocal window, start
            window.append(token)
            logits, end = self(torch.tensor([window], device=self.device), start)
            if len(window) == window_len:
                window, start = [], end
            return logits[0, -1]

        for token in ids[:-1]:
            push(token)
        logits = push(ids[-1])
        out: list[int] = []
        for _ in range(length):
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            out.append(token)
            logits = push(token)
        self.train(was_training)
        if vocab is None:
            return out
        if datamodule is not None and hasattr(datamodule, "decode"):
            return datamodule.decode(out)
        sep = "" if all(len(s) == 1 for s in vocab) else " "
        return sep.join(vocab[i] for i in out)

    def _encode(self, prompt: str | Sequence[int] | None, vocab: list[str] | None, datamodule: Any) -> list[int]:
        if prompt is None or len(prompt) == 0:
            if vocab is None:
                return [0]
            starts = [s for s in ("\n", "<eos>") if s in vocab]
            return [vocab.index(starts[0]) if starts else 0]
        if not isinstance(prompt, str):
            return [int(i) for i in prompt]
        if datamodule is not None and hasattr(datamodule, "encode"):
            return [int(i) for i in datamodule.encode(prompt)]
        if vocab is None:
            raise ValueError("a text prompt needs a vocabulary: pass vocab= or datamodule=, or pass token ids")
        index = {s: i for i, s in enumerate(vocab)}
        symbols = list(prompt) if all(len(s) == 1 for s in vocab) else prompt.split()
        unknown = sorted({s for s in symbols if s not in index})
        if unknown:
            raise ValueError(f"prompt symbols not in the vocabulary: {unknown}")
        return [index[s] for s in symbols]
