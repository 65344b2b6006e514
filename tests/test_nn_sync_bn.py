"""Synchronized batch norm: 2 processes (gloo, CPU) with batch B each compute what 1 process computes with batch 2B.

Every case runs once in a single process on the concatenated batch and once in each of two ranks on its half; the
ranks' outputs, input gradients and running statistics must equal the single process's (rank r's rows of them), and
the sum over ranks of the parameter gradients (what data-parallel training all-reduces) the single process's. The two
halves have different longest lengths, so per-step statistics run with padding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zoo.nn

B, T, IN, H = 3, 6, 4, 5
LENGTHS = torch.tensor([4, 2, 3, 6, 1, 5])  # rank 0's rows are at most 4 steps long, rank 1's 6
RNN_CASES = {
    "bn_lstm": {"max_steps": T},
    "bn_lstm_bidirectional": {"max_steps": T},
    "seqbn_lstm": {},
    "bn_indrnn": {"max_steps": T, "bn_placement": "output"},
}


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(T, 2 * B, H, generator=g, dtype=torch.float64) * 2 + 1,
        "x_rnn": torch.randn(2 * B, T, IN, generator=g, dtype=torch.float64),
        "grad": torch.randn(2 * B, T, 2 * H, generator=g, dtype=torch.float64),
    }


def _run_cases(rows: slice) -> dict[str, torch.Tensor]:
    """Every case on the batch rows ``rows`` (cut to their longest length); the results by name."""
    data, out = _inputs(), {}
    lengths = LENGTHS[rows]
    steps = int(lengths.max())
    mask = torch.arange(T)[:, None] < lengths[None]  # a bare layer needs as many steps on every rank: T, padded
    for max_steps in (None, T):
        torch.manual_seed(0)
        bn = zoo.nn.MaskedBatchNorm(H, max_steps, gamma=0.7).double()
        x = data["x"][:, rows].clone().requires_grad_()
        y = bn(x, mask)
        (y * data["grad"][rows, :, :H].transpose(0, 1)).sum().backward()
        key = f"layer_{max_steps}"
        out |= {f"{key}_y": y.detach(), f"{key}_dx": x.grad, f"{key}_dw": bn.weight.grad, f"{key}_db": bn.bias.grad}
        out |= {f"{key}_mean": bn.running_mean, f"{key}_var": bn.running_var}
    for case, options in RNN_CASES.items():
        torch.manual_seed(0)
        variant = case.removesuffix("_bidirectional")
        bidirectional = case.endswith("_bidirectional")
        rnn = zoo.nn.RNN(variant, IN, H, num_layers=2, batch_first=True, bidirectional=bidirectional, **options)
        rnn.double()
        x = data["x_rnn"][rows, :steps].clone().requires_grad_()
        y, state = rnn(x, lengths=lengths)
        dirs = 2 if bidirectional else 1
        h = state if isinstance(state, torch.Tensor) else state[0]
        ((y * data["grad"][rows, :steps, : dirs * H]).sum() + h.sum()).backward()
        out |= {f"{case}_y": y.detach(), f"{case}_h": h.detach(), f"{case}_dx": x.grad}
        for name, p in rnn.named_parameters():
            out[f"{case}_grad_{name}"] = p.grad
        for name, b in rnn.named_buffers():
            out[f"{case}_buffer_{name}"] = b
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(_run_cases(slice(rank * B, (rank + 1) * B)), Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("sync_bn")
    single = _run_cases(slice(0, 2 * B))
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return single, [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def _rows(value: torch.Tensor, key: str, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of a single-process result: its rows (batch dim 1 time-major, 0 batch-first)."""
    rows = slice(rank * B, (rank + 1) * B)
    steps = int(LENGTHS[rows].max())
    if key.startswith("layer_"):
        return value[:, rows]
    if key.endswith("_h"):
        return value[:, rows]
    return value[rows, :steps]


def test_every_rank_computes_its_rows_of_the_global_batch(results) -> None:
    single, ranks = results
    for key, value in single.items():
        for rank, got in enumerate(ranks):
            if key.endswith(("_y", "_dx", "_h")):
                torch.testing.assert_close(got[key], _rows(value, key, rank), msg=key)
            elif "_buffer_" in key or key.endswith(("_mean", "_var")):
                torch.testing.assert_close(got[key], value, msg=key)  # the same running statistics everywhere
        if key.endswith(("_dw", "_db")) or "_grad_" in key:
            torch.testing.assert_close(ranks[0][key] + ranks[1][key], value, msg=key)


def test_ranks_differ_without_synchronization() -> None:
    """The check above can fail: per-rank statistics (sync=False) are not the global batch's."""
    x = _inputs()["x"][:, :B]
    local = zoo.nn.MaskedBatchNorm(H, None, sync=False).double()(x)
    whole = zoo.nn.MaskedBatchNorm(H, None).double()(_inputs()["x"])[:, :B]
    assert not torch.allclose(local, whole)


def test_sync_true_needs_a_process_group() -> None:
    bn = zoo.nn.MaskedBatchNorm(H, None, sync=True)
    with pytest.raises(RuntimeError, match="process group"):
        bn(torch.randn(T, B, H))
    assert zoo.nn.get_variant("bn_lstm").options["sync_bn"] is None
