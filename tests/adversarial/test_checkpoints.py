"""Hostile checkpoints: a pickle that runs code, by local path and by URL, through every entry point that reads a
checkpoint (``fit``/``validate``/``test``/``predict --ckpt_path``, resuming with ``--ckpt_path last``,
``load_from_checkpoint``, ``zoo.hub export``, a published directory); truncated, corrupt, empty and misplaced files.
Each must be refused with an error naming the file, before any work starts, and nothing in it may run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from localserver import serve
from needs_data import DATA, require_data

import zoo.hub as hub
from zoo.checkpoints import CheckpointError, load_checkpoint
from zoo.cli import main
from zoo.data import sha256sum
from zoo.models import SequenceClassifier

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "--config",
    str(ROOT / "configs/quickstart.yaml"),
    f"--data.data_dir={DATA / 'digits'}",
    "--model.hidden_size=8",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--test_after_fit=false",
]


class Payload:
    """Unpickling this writes the file ``marker``: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _cli(root: Path, *args: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train.py"])
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("TORCH_HOME", str(root / "torch"))  # a URL's download cache
        main([*args, f"--trainer.default_root_dir={root / 'runs'}"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint: a hidden-8 ln_lstm on the digits after 2 steps."""
    require_data("digits")
    root = tmp_path_factory.mktemp("real")
    _cli(root, "fit", *QUICK, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--name=real")
    return root / "runs" / "real" / "checkpoints" / "last.ckpt"


@pytest.fixture
def evil(tmp_path: Path, checkpoint: Path) -> tuple[Path, Path]:
    """(a real checkpoint with a code-running object added, the file that object would write)."""
    marker = tmp_path / "PWNED"
    state = torch.load(checkpoint, weights_only=True)
    state["payload"] = Payload(marker)
    served = tmp_path / "served"
    served.mkdir()
    torch.save(state, served / "evil.ckpt")
    return served / "evil.ckpt", marker


@pytest.mark.parametrize("remote", [False, True], ids=["path", "url"])
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_code_running_checkpoint_is_refused_by_every_command(
    tmp_path: Path, evil: tuple[Path, Path], subcommand: str, remote: bool
) -> None:
    path, marker = evil
    with serve(path.parent) as (url, requests):
        source = f"{url}/evil.ckpt" if remote else str(path)
        with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused: not a weights-only checkpoint .*names exec"):
            _cli(tmp_path, subcommand, *QUICK, f"--ckpt_path={source}")
    assert not marker.exists()
    assert requests == (["/evil.ckpt"] if remote else [])
    assert not (tmp_path / "runs").exists()  # refused before the Trainer made a run directory


def test_resuming_from_a_tampered_last_checkpoint_is_refused(tmp_path: Path, evil: tuple[Path, Path]) -> None:
    path, marker = evil
    last = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(path, last)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: refused"):
        _cli(tmp_path, "fit", *QUICK, "--ckpt_path=last")
    assert not marker.exists()


def test_full_pickle_loading_cannot_be_switched_back_on(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="--weights_only false is refused"):
        _cli(tmp_path, "test", *QUICK, f"--ckpt_path={checkpoint}", "--weights_only=false")
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        SequenceClassifier.load_from_checkpoint(checkpoint, weights_only=False)


@pytest.mark.parametrize("remote", [False, True], ids=["path", "url"])
def test_load_from_checkpoint_and_export_refuse_it(tmp_path: Path, evil: tuple[Path, Path], remote: bool) -> None:
    path, marker = evil
    with pytest.MonkeyPatch.context() as mp, serve(path.parent) as (url, _):
        mp.setenv("TORCH_HOME", str(tmp_path / "torch"))
        source = f"{url}/evil.ckpt" if remote else str(path)
        with pytest.raises(CheckpointError, match="refused"):
            SequenceClassifier.load_from_checkpoint(source)
        if not remote:
            with pytest.raises(CheckpointError, match="refused"):
                hub.export(path, tmp_path / "out", config=ROOT / "configs/quickstart.yaml")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_real_checkpoint_still_loads_from_a_url(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.MonkeyPatch.context() as mp, serve(checkpoint.parent) as (url, requests):
        mp.setenv("TORCH_HOME", str(tmp_path / "torch"))
        model = SequenceClassifier.load_from_checkpoint(f"{url}/last.ckpt")
        _cli(tmp_path, "test", *QUICK, f"--ckpt_path={url}/last.ckpt", "--trainer.limit_test_batches=1")
    local = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert local.keys() == model.state_dict().keys()
    assert all(torch.equal(local[k], v) for k, v in model.state_dict().items())
    assert requests and set(requests) == {"/last.ckpt"}
    assert any((tmp_path / "runs" / "quickstart").glob("version_*/metrics.csv"))


def _truncated(real: Path, where: Path) -> Path:
    where.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    return where


def _garbage(real: Path, where: Path) -> Path:
    data = bytearray(real.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(range(256)) * 16  # overwrite part of a tensor and the index
    data[-200:] = b"\xff" * 200
    where.write_bytes(bytes(data))
    return where


@pytest.mark.parametrize(
    "make, message",
    [
        (_truncated, "not a complete checkpoint"),
        (_garbage, "not a complete checkpoint"),
        (lambda real, where: where.write_bytes(b"") * 0 or where, "empty file"),
        (lambda real, where: where.mkdir() or where, "is a directory"),
        (lambda real, where: where, "no such checkpoint file"),
        (lambda real, where: torch.save({"epoch": 3}, where) or where, "not a Lightning checkpoint"),
    ],
    ids=["truncated", "garbage", "empty", "directory", "missing", "no-state-dict"],
)
def test_broken_checkpoints_name_the_file_and_the_problem(tmp_path: Path, checkpoint: Path, make, message) -> None:
    path = make(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=rf"broken\.ckpt: {message}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        _cli(tmp_path, "test", *QUICK, f"--ckpt_path={path}")
    assert not (tmp_path / "runs").exists()


def test_a_truncated_checkpoint_by_url_and_a_missing_url(tmp_path: Path, checkpoint: Path) -> None:
    _truncated(checkpoint, tmp_path / "cut.ckpt")
    with pytest.MonkeyPatch.context() as mp, serve(tmp_path) as (url, _):
        mp.setenv("TORCH_HOME", str(tmp_path / "torch"))
        with pytest.raises(CheckpointError, match=r"cut\.ckpt: not a complete checkpoint"):
            load_checkpoint(f"{url}/cut.ckpt")
        with pytest.raises(CheckpointError, match=r"absent\.ckpt: could not download .*404"):
            load_checkpoint(f"{url}/absent.ckpt")


@pytest.mark.parametrize("remote", [False, True], ids=["directory", "url"])
def test_a_pickle_posing_as_published_weights_is_refused(tmp_path: Path, evil: tuple[Path, Path], remote: bool) -> None:
    """A published model's weights are safetensors, never unpickled: a pickle in their place is refused unread."""
    path, marker = evil
    published = tmp_path / "published"
    shutil.copytree(ROOT / "zoo/hub/models/digits-ln_lstm", published)
    shutil.copy(path, published / "model.safetensors")
    with pytest.MonkeyPatch.context() as mp, serve(published) as (url, _):
        mp.setenv("ZOO_HUB_CACHE", str(tmp_path / "cache"))
        files = {f: sha256sum(published / f) for f in hub.FILES} if remote else None
        with pytest.raises(hub.HubError, match="not a complete safetensors file"):
            hub.load_pretrained(url if remote else published, sha256=files)
    assert not marker.exists()
