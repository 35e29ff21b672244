"""Runs examples/mnist_optimizers.py in-process on a tiny slice of MNIST."""

import csv

import keras
import pytest

from conftest import load_example




@pytest.fixture(scope="module")
def example():
    return load_example("mnist_optimizers")


def test_example_writes_plot_table_and_csv(example, tmp_path, capsys):
    out = tmp_path / "run"
    result = example.main(
        ["--train-limit", "600", "--epochs", "1", "--optimizers", "sgd,adam",
         "--variants", "plain,teleport,reset-only", "--out", str(out)]
    )
    assert result == out
    for name in ("loss.png", "results.md", "results.csv", "curves.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = (out / "results.md").read_text().split("\n\n")[0]
    assert table in capsys.readouterr().out  # the same table is printed
    lines = table.splitlines()
    assert len(lines) == 2 + 2 * 3  # header, rule, 2 optimizers x 3 variants
    for label in ("SGD(1e-2)", "Adam(1e-4)"):
        for variant in ("plain", "teleport", "reset-only"):
            assert f"| {label} | {variant} |" in table

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["variant"]) for r in rows] == [
        (o, v) for o in ("SGD(1e-2)", "Adam(1e-4)")
        for v in ("plain", "teleport", "reset-only")
    ]
    for row in rows:
        # Finite, and below the loss of a uniform guess over 10 classes.
        assert 0 < float(row["train loss @1"]) < 2.31
        assert 0 < float(row["val loss"]) < 2.31
        assert 0 <= float(row["val acc"]) <= 1
        if row["variant"] == "plain":
            assert row["teleports (rejected)"] == "—"
            assert float(row["epochs to plain's final loss"]) == 1.0
        else:
            # 30 steps; --epochs 1 moves every schedule to steps 0-7.
            assert row["teleports (rejected)"] == "8 (0)"
            assert float(row["teleport s (timed)"]) > 0

    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 2 * 3 * 2  # runs x (before training + 1 epoch)
    starts = {r["train_loss"] for r in curves if r["epoch"] == "0"}
    assert len(starts) == 1  # every run starts from the same weights
    reset = {r["variant"]: r["train_loss"] for r in curves
             if r["optimizer"] == "sgd" and r["epoch"] == "1"}
    # Plain SGD has no state: resetting it changes nothing.
    assert reset["reset-only"] == reset["plain"]


def test_schedule_and_arguments(example):
    assert example.teleport_epoch("adagrad", 10) == 2
    assert example.teleport_epoch("adagrad", 2) == 0  # run too short
    assert example.teleport_epoch("adam", 10) == 0
    opt = example.make_optimizer("adagrad", "teleport", 2500, 10)
    assert opt.at_steps == tuple(range(5000, 5008))
    assert (opt.group, opt.slots, opt.steps, opt.teleport_lr) == (
        "gl", "reset", 10, 1e-4)
    assert opt.loss_tolerance is None
    control = example.make_optimizer("rmsprop", "reset-only", 2500, 3)
    assert (control.objective, control.slots, control.at_steps) == (
        "none", "reset", tuple(range(8)))
    scaling = example.make_optimizer("momentum", "scaling", 2500, 3)
    assert (scaling.group, scaling.slots, scaling.teleport_lr) == (
        "scaling", "transport", example.SCALING_LR)
    both = example.make_optimizer("adam", "both", 2500, 3)
    inner = both.inner_optimizer
    assert (both.group, both.slots, both.at_steps) == (
        "scaling", "transport", tuple(range(8)))
    assert (inner.group, inner.slots, inner.at_steps) == (
        "gl", "reset", tuple(range(8)))
    assert isinstance(inner.inner_optimizer, keras.optimizers.Adam)
    for variant in example.VARIANTS:  # every pair builds
        for name in example.OPTIMIZERS:
            example.make_optimizer(name, variant, 30, 1)
    args = example.parse_args(["--optimizers", "adam,sgd",
                               "--variants", "teleport,plain"])
    assert args.optimizers == ["sgd", "adam"]
    assert args.variants == ["plain", "teleport"]
    for bad in (["--optimizers", "lbfgs"], ["--variants", "magic"],
                ["--epochs", "0"], ["--train-limit", "100"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad)


def test_time_to_reach(example):
    reach = example.time_to_reach
    assert reach([2.0, 1.0, 0.5], [0.0, 1.0, 3.0], 0.5) == (2.0, 3.0)
    epochs, seconds = reach([2.0, 1.0, 0.25], [0.0, 1.0, 3.0], 0.5)
    assert epochs == pytest.approx(1.5) and seconds == pytest.approx(2.0)
    assert reach([2.0, 1.0], [0.0, 1.0], 0.5) is None


def test_seeds_run_apart_and_merged_equal_one_run(example, tmp_path):
    common = ["--train-limit", "300", "--epochs", "1", "--optimizers", "adam",
              "--variants", "plain,scaling"]
    example.main(common + ["--seeds", "2", "--out", str(tmp_path / "both")])
    example.main(common + ["--out", str(tmp_path / "s0")])
    example.main(common + ["--first-seed", "1", "--out", str(tmp_path / "s1")])
    example.main(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                  "--out", str(tmp_path / "merged")])

    def rows(name, columns):
        with open(tmp_path / name / "results.csv") as f:
            return [{c: r[c] for c in columns} for r in csv.DictReader(f)]

    # Wall-clock columns differ between jobs; everything learned must not.
    columns = ["optimizer", "variant", "train loss @1", "val loss", "val acc",
               "teleports (rejected)"]
    assert rows("merged", columns) == rows("both", columns)

    def curve(name):
        with open(tmp_path / name / "curves.csv") as f:
            return sorted((r["variant"], r["seed"], r["epoch"], r["train_loss"])
                          for r in csv.DictReader(f))

    assert curve("merged") == curve("both")
    assert {seed for _, seed, _, _ in curve("merged")} == {"0", "1"}
