"""What ``predict`` leaves beside ``predictions.pt``: a forecaster's ``predictions.csv`` (one row per origin, the
forecast beside the actual value; from the end of a new CSV with ``--data.predict_path``), a classifier's class
probabilities, a language model's text samples. Tiny models on synthetic data in tmp_path."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo.cli import main
from zoo.data import CSVForecasting, DataError
from zoo.models import Forecaster, LanguageModel, SequenceClassifier

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def write_csv(path: Path, rows: int, start: int = 0, date: bool = True) -> None:
    """An hourly CSV with ETTh1's columns (sines of different periods), from hour ``start``; without ``date``, no
    date column."""
    lines = [("date," if date else "") + ",".join(COLUMNS)]
    for i in range(start, start + rows):
        values = ",".join(f"{math.sin(2 * math.pi * i / (6 + 3 * k)) * k + 10 * k:.4f}" for k in range(1, 8))
        stamp = f"2021-03-{1 + i // 24:02d} {i % 24:02d}:00:00," if date else ""
        lines.append(stamp + values)
    path.write_text("\n".join(lines) + "\n")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _ett(tmp_path: Path, *extra: str, date: bool = True) -> tuple[Path, Path]:
    """Fit a tiny ETT-config forecaster on a 5-day synthetic CSV (3/1/1 days; 12 rows in, 4 out); (csv, checkpoint)."""
    data = tmp_path / "synthetic.csv"
    write_csv(data, 24 * 5, date=date)
    split = "[3D, 1D, 1D]" if date else "[72, 24, 24]"
    common = [
        "--config", str(ROOT / "configs" / "ett" / "lstm.yaml"),
        "--data.path", str(data), "--data.split", split, "--data.input_len", "12", "--data.horizon", "4",
        *(["--data.date_column", "null"] if not date else []),
        "--trainer.default_root_dir", str(tmp_path / "runs"), *QUIET,
    ]  # fmt: skip
    fit = ["--model.init_args.hidden_size", "8", "--trainer.max_steps", "3", "--test_after_fit", "false"]
    main(["fit", *common, *fit])
    ckpt = tmp_path / "runs" / "csvforecasting_lstm" / "checkpoints" / "last.ckpt"
    main(["predict", *common, "--ckpt_path", str(ckpt), *extra])
    return data, ckpt


def test_forecaster_predict_writes_one_row_per_test_origin_with_the_actual_values(tmp_path: Path) -> None:
    data, _ = _ett(tmp_path)
    run = tmp_path / "runs" / "csvforecasting_lstm"
    rows = read_rows(run / "predictions.csv")
    columns = ["origin_row", "origin_date"] + [c for h in range(1, 5) for c in (f"OT_h{h}", f"OT_h{h}_true")]
    assert list(rows[0]) == columns
    # the test part is rows 96..119 and its windows start input_len=12 rows earlier: origins 95..115
    assert [int(r["origin_row"]) for r in rows] == list(range(95, 116))
    table = read_rows(data)
    for r in rows:
        origin = int(r["origin_row"])
        assert r["origin_date"] == table[origin]["date"]
        for h in range(1, 5):
            assert float(r[f"OT_h{h}_true"]) == pytest.approx(float(table[origin + h]["OT"]), abs=1e-4)
    forecast = torch.load(run / "predictions.pt")  # normalized; the CSV holds the original scale
    dm = CSVForecasting(str(data), split=("3D", "1D", "1D"), input_len=12, horizon=4)
    raw = forecast[:, :, 0] * dm.target_std[0] + dm.target_mean[0]
    assert [float(r["OT_h1"]) for r in rows] == pytest.approx(raw[:, 0].tolist(), rel=1e-4)


def test_forecaster_predict_path_forecasts_from_the_end_of_a_new_csv(tmp_path: Path) -> None:
    new = tmp_path / "new.csv"
    write_csv(new, 30, start=200)
    _ett(tmp_path, "--data.predict_path", str(new), "--name", "new")
    rows = read_rows(tmp_path / "runs" / "new" / "predictions.csv")
    assert len(rows) == 1 and rows[0]["origin_row"] == "29"
    assert rows[0]["origin_date"] == read_rows(new)[-1]["date"]
    assert all(rows[0][f"OT_h{h}_true"] == "" and rows[0][f"OT_h{h}"] for h in range(1, 5))


def test_predict_path_is_checked_for_the_columns_and_the_rows(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    write_csv(data, 24 * 5)
    short, narrow = tmp_path / "short.csv", tmp_path / "narrow.csv"
    write_csv(short, 5)
    narrow.write_text("date,HUFL,OT\n" + "2021-01-01 00:00:00,1,2\n" * 20)
    options = {"split": ("3D", "1D", "1D"), "input_len": 12, "horizon": 4}
    with pytest.raises(DataError, match=r"narrow.csv: no column 'HULL'.*which .*train.csv has"):
        CSVForecasting(str(data), predict_path=str(narrow), **options).predict_origins()
    with pytest.raises(DataError, match=r"short.csv: 5 data row\(s\), a forecast reads the last input_len=12"):
        CSVForecasting(str(data), predict_path=str(short), **options).predict_origins()
    # scaled with the training statistics: the window equals the training file's rows where the files agree
    same = tmp_path / "same.csv"
    write_csv(same, 30, start=20)  # hours 20..49: its last 12 rows are the training file's rows 38..49
    dm = CSVForecasting(str(data), predict_path=str(same), **options)
    assert torch.allclose(dm.predict_origins().x[0], dm.dataset("train")[38][0], atol=1e-5)


def test_forecaster_without_a_date_column_names_the_origin_by_row(tmp_path: Path) -> None:
    _ett(tmp_path, date=False)
    rows = read_rows(tmp_path / "runs" / "csvforecasting_lstm" / "predictions.csv")
    assert list(rows[0])[:3] == ["origin_row", "OT_h1", "OT_h1_true"] and rows[0]["origin_row"] == "95"


def test_classifier_predictions_csv_has_the_class_probabilities(tmp_path: Path) -> None:
    model = SequenceClassifier(hidden_size=4, dims={"input_size": 2, "num_classes": 3, "max_steps": 5})
    x, lengths, y = torch.randn(7, 5, 2), torch.full((7,), 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    outputs = torch.cat(trainer.predict(model, DataLoader(TensorDataset(x, lengths, y), batch_size=3)))
    (path,) = model.write_predictions(outputs, None, tmp_path)
    rows = read_rows(path)
    assert list(rows[0]) == ["index", "p_0", "p_1", "p_2", "predicted", "true"] and len(rows) == 7
    probs = model.eval()(x, lengths).softmax(-1)
    for i, r in enumerate(rows):
        assert [float(r[f"p_{k}"]) for k in range(3)] == pytest.approx(probs[i].tolist(), abs=1e-5)
        assert int(r["predicted"]) == int(outputs[i]) and int(r["true"]) == int(y[i])


def test_language_model_predict_writes_text_samples(tmp_path: Path) -> None:
    model = LanguageModel(hidden_size=8, dims={"vocab_size": 4, "max_steps": 10})
    model.vocab = ["a", "b", "c", "\n"]
    (path,) = model.write_predictions(None, None, tmp_path)
    text = path.read_text()
    assert path.name == "samples.txt" and text.count("# sample ") == 3
    bodies = [part.split("\n", 1)[1] for part in text.split("# sample ")[1:]]
    assert all(len(body.strip("\n")) > 100 and set(body) <= set("abc\n") for body in bodies)


def test_forecaster_csv_columns_for_several_targets_and_a_limited_predict(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    write_csv(data, 24 * 5)
    dm = CSVForecasting(str(data), target=["OT", "HUFL"], split=("3D", "1D", "1D"), input_len=12, horizon=2)
    model = Forecaster(hidden_size=4, dims=dm.dims)
    outputs = torch.zeros(5, 2, 2)  # the first 5 of the 21 origins (as limit_predict_batches leaves them)
    (path,) = model.write_predictions(outputs, dm, tmp_path)
    rows = read_rows(path)
    assert list(rows[0]) == [
        "origin_row", "origin_date",
        "OT_h1", "OT_h1_true", "OT_h2", "OT_h2_true", "HUFL_h1", "HUFL_h1_true", "HUFL_h2", "HUFL_h2_true",
    ]  # fmt: skip
    assert [int(r["origin_row"]) for r in rows] == [95, 96, 97, 98, 99]
    # a zero forecast on the normalized scale is each target's training mean on the original scale
    assert float(rows[0]["HUFL_h2"]) == pytest.approx(float(dm.target_mean[1]), rel=1e-5)
    assert model.write_predictions(outputs, None, tmp_path) == []  # another DataModule: no CSV
