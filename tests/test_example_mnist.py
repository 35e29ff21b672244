"""Runs examples/mnist_teleport.py in-process on a tiny slice of MNIST."""

import csv

import pytest
from conftest import load_example




@pytest.fixture(scope="module")
def example():
    return load_example("mnist_teleport")


def test_example_writes_table_csv_and_plot(example, tmp_path, capsys):
    out = tmp_path / "run"
    result = example.main(
        ["--train-limit", "400", "--epochs", "1", "--optimizers", "sgd,adam",
         "--out", str(out)]
    )
    assert result == out
    for name in ("results.md", "results.csv", "curves.csv", "loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = (out / "results.md").read_text()
    assert "| SGD(1e-2) |" in table and "| Adam(1e-4) |" in table
    printed = capsys.readouterr().out
    assert table.split("\n\n")[0] in printed  # the same table is printed

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["SGD(1e-2)", "Adam(1e-4)"]
    for row in rows:
        assert row["teleports"] == "8"  # 20 steps, teleports at steps 0-7
        for key in ("plain train loss", "teleport train loss"):
            assert 0 < float(row[key]) < 2.4  # finite and below chance level

    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    # 2 optimizers x 2 variants x (initial + 1 epoch).
    assert len(curves) == 8
    starts = {r["train_loss"] for r in curves if r["epoch"] == "0"}
    assert len(starts) == 1  # every run starts from the same weights


def test_example_every_variant_and_bad_args(example, tmp_path):
    out = tmp_path / "every"
    example.main(
        ["--train-limit", "200", "--epochs", "1", "--optimizers", "adagrad",
         "--every", "4", "--out", str(out)]
    )
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert "every4 train loss" in row and "every4 val acc" in row
    with pytest.raises(SystemExit):
        example.parse_args(["--optimizers", "lbfgs"])
