"""examples/correlation.py: its statistics, and a run on a tiny slice."""

import csv
import itertools
import math

import numpy as np
import pytest
from conftest import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("correlation")


def test_pearson_matches_corrcoef(example):
    rng = np.random.default_rng(0)
    for n in (3, 7, 40):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        assert example.pearson(x, y) == pytest.approx(
            np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert math.isnan(example.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        example.pearson([1.0, 2.0], [1.0, 2.0, 3.0])


def test_average_ranks_and_spearman_with_ties(example):
    # Sorted: 1, 2, 2, 3, 5, 5, 5 -> ranks 1, 2.5, 2.5, 4, 6, 6, 6.
    x = [5, 2, 1, 5, 3, 2, 5]
    np.testing.assert_array_equal(example.average_ranks(x),
                                  [6, 2.5, 1, 6, 4, 2.5, 6])
    # By hand: ranks of y = [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; of x =
    # [1, 2, 3, 4] themselves; both have mean 2.5, so
    # rho = sum(dx dy) / sqrt(sum dx^2 sum dy^2) = 4.5 / sqrt(5 * 4.5).
    assert example.spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(
        4.5 / math.sqrt(5 * 4.5), abs=1e-12)
    rx, ry = [6, 2.5, 1, 6, 4, 2.5, 6], [2, 7, 4.5, 1, 3, 6, 4.5]
    y = [0.1, 0.9, 0.4, -3.0, 0.2, 0.8, 0.4]
    np.testing.assert_array_equal(example.average_ranks(y), ry)
    assert example.spearman(x, y) == pytest.approx(
        np.corrcoef(rx, ry)[0, 1], abs=1e-12)


def test_monotone_nonlinear_data(example):
    x = np.linspace(0.0, 3.0, 12)
    y = np.exp(2 * x)
    assert example.spearman(x, y) == pytest.approx(1.0, abs=1e-12)
    assert example.spearman(x, -y) == pytest.approx(-1.0, abs=1e-12)
    assert example.pearson(x, y) < 0.95


def test_permutation_pvalues(example):
    # Only the identity and the reversal reach |r| = 1: p = 2 / 5!.
    x = np.arange(5.0)
    for method in ("pearson", "spearman"):
        assert example.permutation_pvalue(x, 3 * x + 1, method) == (
            pytest.approx(2 / 120))
    # Random permutations against the exact share, by brute force.
    rng = np.random.default_rng(1)
    x = rng.normal(size=8)
    y = 0.4 * x + rng.normal(size=8)
    observed = abs(np.corrcoef(x, y)[0, 1])
    exact = np.mean([abs(np.corrcoef(x, p)[0, 1]) >= observed - 1e-12
                     for p in itertools.permutations(y)])
    estimate = example.permutation_pvalue(x, y, "pearson", permutations=4000)
    assert abs(estimate - exact) < 4 * math.sqrt(exact * (1 - exact) / 4000)
    assert estimate == example.permutation_pvalue(x, y, "pearson",
                                                  permutations=4000)
    assert math.isnan(example.permutation_pvalue([1, 1, 1], [1, 2, 3]))


def test_example_writes_tables_csvs_and_plot(example, tmp_path, capsys):
    out = tmp_path / "run"
    seeds = 3
    result = example.main(
        ["--seeds", str(seeds), "--epochs", "1", "--train-limit", "300",
         "--measure-examples", "200", "--measure-batch", "100",
         "--directions", "2", "--iterations", "3", "--samples", "2",
         "--permutations", "200", "--out", str(out)]
    )
    assert result == out
    for name in ("results.md", "measures.csv", "correlations.csv",
                 "scatter.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text().split("\n\n")[0]
    assert table in capsys.readouterr().out  # the same table is printed

    with open(out / "measures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == list(range(seeds))
    columns = {c: np.array([float(r[c]) for r in rows])
               for c in rows[0] if c != "seed"}
    assert all(np.isfinite(v).all() for v in columns.values())
    np.testing.assert_allclose(
        columns["gap"], columns["test_loss"] - columns["train_loss"],
        rtol=0, atol=1e-12)
    assert len(set(columns["test_loss"])) == seeds  # the seeds differ

    with open(out / "correlations.csv") as f:
        correlations = list(csv.DictReader(f))
    names = example.MEASURES + (example.REFERENCE,)
    assert [(r["measure"], r["target"]) for r in correlations] == [
        (m, t) for m in names for t in ("test_loss", "gap")]
    for r in correlations:
        x, y = columns[r["measure"]], columns[r["target"]]
        assert int(r["n"]) == seeds
        assert float(r["pearson"]) == pytest.approx(
            np.corrcoef(x, y)[0, 1], abs=1e-9)
        # Distinct values: ranks are the double argsort.
        assert len(set(x)) == len(set(y)) == seeds
        ranks = [np.argsort(np.argsort(v)) for v in (x, y)]
        assert float(r["spearman"]) == pytest.approx(
            np.corrcoef(*ranks)[0, 1], abs=1e-9)
        for p in ("pearson_p", "spearman_p"):
            assert 0 < float(r[p]) <= 1
        assert f"| {r['measure']}" in table


def test_arguments(example):
    args = example.parse_args([])
    assert (args.seeds, args.optimizer, args.out) == (
        8, "sgd", "runs/correlation")
    for bad in (["--seeds", "2"], ["--epochs", "0"],
                ["--train-limit", "100", "--measure-examples", "200"],
                ["--optimizer", "lbfgs"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad)
