"""`zoo.hub`: export a real (tiny) training run, load it back with the same outputs, refuse broken or tampered files,
push and pull through a local directory, a local HTTP server and a prepared Hugging Face cache, and start `train.py`
from a published model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from localserver import serve
from needs_data import DATA, needs_data, require_data
from safetensors.torch import load_file

import zoo.hub as hub
from zoo.cli import main
from zoo.data import sha256sum
from zoo.hub.publish import _training_description, convergence
from zoo.models import LanguageModel, SequenceClassifier

ROOT = Path(__file__).resolve().parents[1]

QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
]


def _cli(*args: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's
        mp.setenv("WANDB_MODE", "disabled")
        return main(list(args))


def _fit(root: Path, *args: str) -> Path:
    """A tiny real training run with a CSV logger (so that version_0/config.yaml is written); its last checkpoint."""
    _cli("fit", *args, f"--trainer.default_root_dir={root}", "--name=run", *QUIET[:3], "--test_after_fit=false")
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, exported directory) of a 2-layer ln_lstm (hidden 8) trained for 4 steps on sequential digits."""
    require_data("digits")
    root = tmp_path_factory.mktemp("digits")
    ckpt = _fit(
        root,
        "--config",
        str(ROOT / "configs/pretrained/digits/ln_lstm.yaml"),
        f"--data.data_dir={DATA / 'digits'}",
        "--model.hidden_size=8",
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=2",
    )
    out = root / "published"
    hub.export(ckpt, out, name="tiny-digits", command="python train.py fit ...")
    return ckpt, out


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, exported directory) of a bn_lstm language model (hidden 16) trained 3 steps on tiny-shakespeare."""
    require_data("tinyshakespeare")
    root = tmp_path_factory.mktemp("shakespeare")
    ckpt = _fit(
        root,
        "--model=zoo.models.LanguageModel",
        "--model.variant=bn_lstm",
        "--model.hidden_size=16",
        "--data=zoo.data.TinyShakespeare",
        f"--data.data_dir={DATA / 'tinyshakespeare'}",
        "--data.batch_size=8",
        "--data.bptt=20",
        "--data.eval_batch_size=128",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=2",
    )
    out = root / "published"
    hub.export(ckpt, out, name="tiny-shakespeare")
    return ckpt, out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------------- export and load


def test_export_then_load_gives_the_checkpoints_outputs_and_its_card(digits: tuple[Path, Path]) -> None:
    ckpt, out = digits
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.FILES)
    model = hub.load_pretrained(out)
    reference = SequenceClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert isinstance(model, SequenceClassifier) and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    x, lengths = torch.randn(5, 64, 1), torch.tensor([64, 50, 33, 10, 1])
    assert torch.equal(model(x, lengths), reference(x, lengths))
    # the weights are the checkpoint's, stored as safetensors (no pickle)
    weights = load_file(out / "model.safetensors")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], state[k]) for k in state)
    config = json.loads((out / "config.json").read_text())
    assert config["zoo_version"] == __import__("zoo").__version__ and config["variant"] == "ln_lstm"
    assert config["model"]["class_path"] == "zoo.models.SequenceClassifier"
    assert config["model"]["init_args"]["dims"] == {"input_size": 1, "num_classes": 10, "max_steps": 64}
    assert config["model"]["init_args"]["hidden_size"] == 8
    run_config = yaml.safe_load((ckpt.parents[1] / "version_0" / "config.yaml").read_text())
    assert model.config == config["training_config"] == run_config
    # the card's metrics are the published model's on the full test split (359 of the 1797 digits)
    card = model.card
    assert card.name == "tiny-digits" and card.metric == "test/acc" and "359 test sequences" in card.measured
    assert card.metrics == hub.evaluate(model, data_dir=str(DATA / "digits"))
    assert card.parameters == sum(p.numel() for p in reference.parameters())
    assert card.training_time_s is not None and 0 < card.training_time_s < 60  # from the Timer in the config
    assert card.to_markdown() == (out / "README.md").read_text()


def test_language_model_round_trip_keeps_the_vocabulary_and_bn_statistics(shakespeare: tuple[Path, Path]) -> None:
    ckpt, out = shakespeare
    model = hub.load_pretrained(out)
    reference = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = torch.randint(0, 65, (3, 20))
    assert torch.equal(model(x)[0], reference(x)[0])
    assert model.vocab == reference.vocab and len(model.vocab) == 65
    text = model.sample(30, prompt="ROMEO:", temperature=0.5, seed=0)
    assert isinstance(text, str) and len(text) == 30
    assert model.card.metric == "test/bpc" and model.card.task == "language modelling"
    assert "128 contiguous streams in windows of 20" in model.card.measured
    assert model.card.metrics == hub.evaluate(model, data_dir=str(DATA / "tinyshakespeare"))


def test_export_finds_the_run_config_or_asks_for_it(digits: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = digits
    assert hub.publish.find_run_config(ckpt) == ckpt.parents[1] / "version_0" / "config.yaml"
    lonely = tmp_path / "x" / "checkpoints" / "last.ckpt"
    lonely.parent.mkdir(parents=True)
    shutil.copyfile(ckpt, lonely)
    with pytest.raises(hub.HubError, match="pass the config"):
        hub.export(lonely, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------------ safety


def test_a_file_whose_sha256_does_not_match_is_refused(digits: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = digits
    good = {f: sha256sum(out / f) for f in hub.FILES}
    assert hub.load_pretrained(out, sha256=good).card.name == "tiny-digits"
    tampered = _copy(out, tmp_path / "m")
    _edit_config(tampered, lambda c: c["model"]["init_args"].update(dropout=0.5))  # a valid config, other bytes
    with pytest.raises(hub.HubError, match="config.json: sha256 .* does not match"):
        hub.load_pretrained(tampered, sha256=good)
    hub.load_pretrained(tampered)  # the same files load when no digest is claimed for them


def test_a_truncated_file_is_refused(digits: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = digits
    for file, cut, message in [
        ("model.safetensors", -100, "truncated or corrupt"),
        ("model.safetensors", 20, "truncated or corrupt"),
        ("config.json", 300, "truncated config"),
        ("README.md", 200, "not a zoo model card"),
    ]:
        broken = _copy(out, tmp_path / f"{file}{cut}")
        data = (broken / file).read_bytes()
        (broken / file).write_bytes(data[:cut])
        with pytest.raises(hub.HubError, match=message):
            hub.load_pretrained(broken)
        with pytest.raises(hub.HubError, match="sha256"):
            hub.load_pretrained(broken, sha256={file: sha256sum(out / file)})


def test_an_unknown_variant_or_model_class_is_refused_before_anything_is_built(
    digits: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = digits
    bad = _copy(out, tmp_path / "variant")
    _edit_config(bad, lambda c: c["model"]["init_args"].update(variant="xl_lstm"))
    with pytest.raises(hub.HubError, match=r"unknown variant 'xl_lstm' \(known: lstm, .*bn_lstm"):
        hub.load_pretrained(bad)
    bad = _copy(out, tmp_path / "class")
    _edit_config(bad, lambda c: c["model"].update(class_path="os.system"))
    with pytest.raises(hub.HubError, match="unknown model class 'os.system'"):
        hub.load_pretrained(bad)
    bad = _copy(out, tmp_path / "format")
    _edit_config(bad, lambda c: c.update(format="other/2"))
    with pytest.raises(hub.HubError, match="not a zoo model config"):
        hub.load_pretrained(bad)


def test_weights_that_do_not_fit_the_config_are_refused_and_nothing_is_loaded(
    digits: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = digits
    bad = _copy(out, tmp_path / "shape")
    _edit_config(bad, lambda c: c["model"]["init_args"].update(hidden_size=9))
    with pytest.raises(hub.HubError, match=r"cells.0.weight_hh: file has F32 \[32, 8\], the model F32 \[36, 9\]"):
        hub.load_pretrained(bad)
    bad = _copy(out, tmp_path / "variant")
    _edit_config(bad, lambda c: [c.update(variant="lstm"), c["model"]["init_args"].update(variant="lstm")])
    with pytest.raises(hub.HubError, match="missing rnn.cells.0.bias_ih; .*unexpected rnn.cells.0.ln_c.bias"):
        hub.load_pretrained(bad)
    # loading into a model of other shapes leaves it untouched
    other = SequenceClassifier("ln_lstm", hidden_size=8, num_layers=2, dims={"input_size": 2, "num_classes": 10})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(hub.HubError, match=r"weight_ih: file has F32 \[32, 1\], the model F32 \[32, 2\]"):
        hub.load_into(other, hub.read_published(out))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_unknown_names_and_urls_without_digests_are_refused(digits: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(hub.HubError, match="neither a published model"):
        hub.load_pretrained("no-such-model", manifest=tmp_path / "manifest.json")
    with pytest.raises(hub.HubError, match="no sha256 for model.safetensors, config.json, README.md"):
        hub.load_pretrained("http://127.0.0.1:9/x", cache_dir=tmp_path)
    assert not (tmp_path / "url").exists()


# ------------------------------------------------------------------------------------------------- push and pull


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a fresh folder: (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    with serve(folder) as (url, _):
        yield url, folder


def test_push_to_a_served_directory_then_pull_by_url_once(
    digits: tuple[Path, Path], http_server: tuple[str, Path], tmp_path: Path
) -> None:
    _, out = digits
    url, www = http_server
    manifest = tmp_path / "manifest.json"
    entry = hub.push(out, str(www / "tiny"), source=f"{url}/tiny", manifest=manifest)
    assert entry.files == {f: sha256sum(out / f) for f in hub.FILES} and entry.source == f"{url}/tiny"
    assert entry.size == sum((out / f).stat().st_size for f in hub.FILES) and entry.metrics == {
        k: round(v, 6) for k, v in hub.read_published(out).card.metrics.items()
    }
    assert hub.list_pretrained(manifest) == [entry]
    table = hub.markdown_table(manifest)
    assert table.splitlines()[2].startswith("| `tiny-digits` | sequence classification | `ln_lstm` | UCI optdigits")
    assert f"| test/acc {entry.value:.4f} | {entry.parameters:,} |" in table

    cache = tmp_path / "cache"
    model = hub.load_pretrained("tiny-digits", cache_dir=cache, manifest=manifest)
    x = torch.randn(2, 64, 1)
    assert torch.equal(model(x), hub.load_pretrained(out)(x))
    cached = sorted(p.name for p in (cache / "url").glob("*/*"))
    assert cached == sorted(hub.FILES)  # no .part left
    shutil.rmtree(www)  # the server has nothing now: the cache serves
    assert torch.equal(hub.load_pretrained("tiny-digits", cache_dir=cache, manifest=manifest)(x), model(x))
    # the same URL with a digest it does not have: the download is refused and nothing is kept
    wrong = {**entry.files, "model.safetensors": "0" * 64}
    (www / "tiny").mkdir(parents=True)
    for f in hub.FILES:
        shutil.copyfile(out / f, www / "tiny" / f)
    fresh = tmp_path / "fresh"
    with pytest.raises(hub.HubError, match="does not match the expected 0000"):
        hub.load_pretrained(f"{url}/tiny", sha256=wrong, cache_dir=fresh)
    assert not any(p.name.startswith("model.safetensors") for p in fresh.rglob("*"))


def test_push_refuses_a_broken_model(digits: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = digits
    bad = _copy(out, tmp_path / "bad")
    _edit_config(bad, lambda c: c["model"]["init_args"].update(hidden_size=9))
    with pytest.raises(hub.HubError, match="do not fit"):
        hub.push(bad, str(tmp_path / "target"))
    assert not (tmp_path / "target").exists()


def _hf_cache(cache: Path, repo: str, files: Path) -> None:
    """The layout huggingface_hub's cache has after downloading ``repo`` at one commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(files, folder / "snapshots" / commit)


def test_hugging_face_pull_reads_the_offline_cache_and_push_uploads_the_three_files(
    digits: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not covered: the real upload/download over the network (HfApi's calls are replaced; the pull runs the real
    hf_hub_download against a prepared cache with HF_HUB_OFFLINE)."""
    import huggingface_hub
    from huggingface_hub import constants

    _, out = digits
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when huggingface_hub loads
    uploads: list[dict] = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: uploads.append({"repo": repo}))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    manifest = tmp_path / "manifest.json"
    entry = hub.push(out, "hf://zoo-test/tiny-digits", manifest=manifest)
    assert entry.source == "hf://zoo-test/tiny-digits" and uploads[0] == {"repo": "zoo-test/tiny-digits"}
    assert uploads[1]["folder_path"] == str(out) and sorted(uploads[1]["allow_patterns"]) == sorted(hub.FILES)

    with pytest.raises(hub.HubError, match=r"cannot get model.safetensors .*\(HF_HUB_OFFLINE=True\)"):
        hub.load_pretrained("tiny-digits", cache_dir=tmp_path / "empty", manifest=manifest)
    _hf_cache(tmp_path / "c" / "hf", "zoo-test/tiny-digits", out)
    model = hub.load_pretrained("tiny-digits", cache_dir=tmp_path / "c", manifest=manifest)
    x = torch.randn(2, 64, 1)
    assert torch.equal(model(x), hub.load_pretrained(out)(x))
    # a cached file that differs from the manifest's digest is refused
    snapshot = next((tmp_path / "c" / "hf").glob("models--*/snapshots/*"))
    (snapshot / "README.md").write_text((out / "README.md").read_text() + "\nedited\n")
    with pytest.raises(hub.HubError, match="README.md: sha256"):
        hub.load_pretrained("tiny-digits", cache_dir=tmp_path / "c", manifest=manifest)


# ------------------------------------------------------------------------------------------------------- train.py


def test_train_py_tests_a_published_model_and_fine_tunes_from_one(digits: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = digits
    card = hub.read_published(out).card
    common = [f"--data.data_dir={DATA / 'digits'}", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    cli = _cli("test", "--pretrained", str(out), *common)
    assert float(cli.trainer.callback_metrics["test/acc"]) == card.metrics["test/acc"]
    # --ckpt_path pretrained:<model> with another config: the model comes from the published config
    quickstart = ["--config", str(ROOT / "configs/quickstart.yaml")]
    cli = _cli("validate", *quickstart, f"--ckpt_path=pretrained:{out}", *common)
    assert cli.model.hparams.hidden_size == 8 and "val/acc" in cli.trainer.callback_metrics
    # fit starts from the published weights
    published = load_file(out / "model.safetensors")
    no_training = ["--trainer.max_steps=0", "--test_after_fit=false"]
    cli = _cli("fit", *quickstart, "--init_from", str(out), "--model.hidden_size=8", *common, *no_training)
    assert all(torch.equal(v, published[k]) for k, v in cli.model.state_dict().items())
    with pytest.raises(hub.HubError, match="do not fit"):
        _cli("fit", *quickstart, "--init_from", str(out), *common, *no_training)  # hidden 128
    with pytest.raises(ValueError, match="fit uses --init_from"):
        _cli("fit", "--pretrained", str(out), *common)


# ---------------------------------------------------------------------------------------------- the bundled models


def test_the_manifest_matches_the_bundled_files_and_their_cards() -> None:
    entries = hub.list_pretrained()
    assert entries, "zoo/hub/manifest.json lists no model"
    for entry in entries:
        published = hub.read_published(entry.name)  # every file checked against the manifest's sha256
        assert published.directory.is_relative_to(Path(hub.__file__).parent / "models")
        card = published.card
        assert (entry.task, entry.variant, entry.metric, entry.licence) == (
            card.task,
            card.variant,
            card.metric,
            card.licence,
        )
        assert entry.metrics == {k: round(v, 6) for k, v in card.metrics.items()}
        assert entry.value == round(card.value, 6)
        assert entry.size == sum((published.directory / f).stat().st_size for f in hub.FILES) < 5e6
        assert card.training_time_s is not None and "CPU cores" in card.hardware
        words = card.command.split()
        assert words[:4] == ["python", "train.py", "fit", "--config"], card.command
        assert words[4].startswith(("configs/pretrained/", "configs/zoo/")) and (ROOT / words[4]).is_file()


def test_published_training_configs_name_their_data_relative_to_the_data_root() -> None:
    """The bundled models were published with ``../shared/data/<sub-path>``; they read ``<sub-path>`` under the root."""
    for entry in hub.list_pretrained():
        init_args = hub.read_published(entry.name).training_config["data"]["init_args"]
        data = init_args.get("data_dir") or init_args["path"]
        assert data in ("digits", "tinyshakespeare", "ptb", "ucr_uea", "ett/ETTh1.csv"), init_args


@pytest.mark.parametrize(
    ("name", "data"),
    [("digits-lstm", "digits"), ("italypower-gru", "ucr_uea/ItalyPowerDemand"), ("etth1-bn_lstm", "ett/ETTh1.csv")],
)
def test_a_published_model_reproduces_its_card_with_train_py_test(name: str, data: str, tmp_path: Path) -> None:
    """A sample of the bundled models, one per task kind: ``train.py test --pretrained <name>`` prints the card's
    headline metric again, from the published weights and training config."""
    require_data(data)
    if name not in {e.name for e in hub.list_pretrained()}:
        pytest.fail(f"{name} is not in the manifest")
    card = hub.read_published(name).card
    assert card.evaluate == f"python train.py test --pretrained {name}"
    done = subprocess.run(
        [sys.executable, "train.py", "test", "--pretrained", name, f"--trainer.default_root_dir={tmp_path}", *QUIET],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line.split() for line in done.stdout.splitlines() if line.split()[:1] == [card.metric])
    assert float(row[1]) == pytest.approx(card.value, rel=1e-5)


@needs_data("tinyshakespeare")
def test_a_published_language_model_reproduces_its_card_and_writes_text() -> None:
    model = hub.load_pretrained("shakespeare-lstm")
    assert model.card.metric == "test/bpc" and model.vocab is not None and len(model.vocab) == 65
    metrics = hub.evaluate(model, data_dir=str(DATA / "tinyshakespeare"))
    assert metrics["test/bpc"] == pytest.approx(model.card.metrics["test/bpc"], rel=1e-5)
    text = model.sample(100, prompt="ROMEO:\n", temperature=0.8, seed=0)
    assert isinstance(text, str) and len(text) == 100 and set(text) <= set(model.vocab)


@pytest.mark.parametrize("last_first", [True, False])
def test_training_description_reads_the_monitoring_checkpoint_callback(last_first: bool) -> None:
    """The best score comes from the ModelCheckpoint that monitors the metric, whatever the callbacks' order."""
    best = {"monitor": "val/bpc", "best_model_score": torch.tensor(1.2345)}
    last = {"monitor": None, "best_model_score": None}
    states = [("ModelCheckpoint{'monitor': None}", last), ("ModelCheckpoint{'monitor': 'val/bpc'}", best)]
    ckpt = {"callbacks": dict(states if last_first else states[::-1]), "epoch": 2, "global_step": 30}
    text = _training_description({"trainer": {"max_steps": 30}}, ckpt, "val/bpc")
    assert text.endswith("the checkpoint of epoch 3, step 30, the best on val/bpc (1.2345)")


def test_convergence_states_the_best_the_validations_after_it_and_the_final_slope() -> None:
    points = [{"step": 100 * k, "val/bpc": v} for k, v in enumerate([2.0, 1.6, 1.5, 1.52, 1.51, 1.53], start=1)]
    points.insert(2, {"step": 250, "train_s": 9.0})  # a point without the metric is skipped
    text = convergence(points, "val/bpc", "min", last=3)
    # best 1.5 at step 300, the 3rd of 6; the last 3 (1.52, 1.51, 1.53) lie at most 0.03 / 1.5 = 2% from it; their
    # least-squares slope over steps 400, 500, 600 is (1.53 - 1.52) / 200 per step = +0.05 per 1000 steps
    assert text == (
        "best val/bpc 1.5000 at step 300 (validation 3 of 6; 3 after it without improvement); the last 3 "
        "validations within 2.00% of the best, slope +0.0500 per 1000 steps"
    )
    assert convergence(points, "val/acc", "max") == ""
    accuracy = [{"step": 1, "val/acc": 0.5}, {"step": 2, "val/acc": 0.8}, {"step": 3, "val/acc": 0.8}]
    assert "best val/acc 0.8000 at step 2 (validation 2 of 3; 1 after" in convergence(accuracy, "val/acc", "max")


def test_training_description_names_early_stopping_and_the_time_cap() -> None:
    trainer = {
        "max_epochs": 50,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                "init_args": {"monitor": "val/bpc", "patience": 3},
            },
            {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"duration": "00:00:45:00"}},
        ],
    }
    config = {"trainer": trainer, "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.002}}}
    text = _training_description(config, {"epoch": 9, "global_step": 100}, "val/bpc")
    assert text.startswith(
        "at most 50 epochs, early stopping on val/bpc (patience 3), at most 00:00:45:00 (d:h:m:s, Timer), Adam lr 0.002"
    )
