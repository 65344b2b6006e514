"""A few Lightning training steps of a normalized RNN on synthetic data, for `scripts/gpu_check.sh`.

    python scripts/gpu_smoke.py --precision bf16-mixed                      # one GPU, mixed precision
    python scripts/gpu_smoke.py --devices 2 --variant bn_lstm --sync-bn     # two GPUs, DDP, synchronized batch norm

Prints one line per rank: the variant, the backend that ran (the reference engine where the fused recurrence cannot:
a synchronized batch norm in training), the precision, the first and last training losses (each
finite, or the script fails) and the milliseconds per step after the first.
"""

from __future__ import annotations

import argparse
import math
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import zoo.nn


class Smoke(L.LightningModule):
    """A classifier over the last output of a ``zoo.nn.RNN``."""

    def __init__(self, variant: str, hidden: int, steps: int, sync_bn: bool) -> None:
        super().__init__()
        options = {"max_steps": steps} if "max_steps" in zoo.nn.get_variant(variant).options else {}
        if sync_bn:
            options["sync_bn"] = True
        self.rnn = zoo.nn.RNN(variant, 32, hidden, num_layers=2, **options)
        self.head = torch.nn.Linear(hidden, 10)
        self.losses: list[float] = []
        self.times: list[float] = []

    def training_step(self, batch, index):
        x, y = batch
        out, _ = self.rnn(x.transpose(0, 1))
        loss = torch.nn.functional.cross_entropy(self.head(out[-1]), y)
        self.losses.append(float(loss))
        self.times.append(time.perf_counter())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="ln_lstm")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accelerator", default="gpu", help="(cpu: to try the script without a GPU)")
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--shape", default="64,100,256", help="batch,length,hidden")
    args = p.parse_args()
    batch, length, hidden = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    n = batch * args.steps * args.devices
    data = TensorDataset(torch.randn(n, length, 32), torch.randint(0, 10, (n,)))
    model = Smoke(args.variant, hidden, length, args.sync_bn)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        precision=args.precision, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=batch))
    losses = model.losses
    assert losses and all(math.isfinite(v) for v in losses), losses
    ms = 1e3 * (model.times[-1] - model.times[0]) / max(1, len(model.times) - 1)
    blocker = model.rnn.cells[0].fuse_blocker()  # (then the reference engine ran instead of the backend)
    ran = model.rnn.backend if blocker is None else f"reference ({blocker})"
    print(
        f"rank {trainer.global_rank}: {args.variant} backend={ran} precision={args.precision} "
        f"devices={args.devices} sync_bn={args.sync_bn} loss {losses[0]:.4f} -> {losses[-1]:.4f} {ms:.1f} ms/step"
    )


if __name__ == "__main__":
    main()
