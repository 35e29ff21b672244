"""examples/teleport_generalization.py: a run on a tiny slice, checked against
the CSVs it writes and against uninterrupted `model.fit` runs."""

import csv
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import load_example

import keras_teleport
from keras_teleport.datasets import load_mnist

SEEDS, EPOCHS, TELEPORT_EPOCH, LIMIT, TELEPORT_BATCH = 2, 2, 1, 2000, 500
VARIANTS = ["plain", "min_sharpness"]


@pytest.fixture(scope="module")
def example():
    return load_example("teleport_generalization")


@pytest.fixture(scope="module")
def run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("generalization")
    result = example.main(
        ["--seeds", str(SEEDS), "--epochs", str(EPOCHS), "--teleport-epoch",
         str(TELEPORT_EPOCH), "--train-limit", str(LIMIT), "--variants",
         ",".join(VARIANTS), "--teleport-batch", str(TELEPORT_BATCH),
         "--measure-examples", "500", "--directions", "2", "--out",
         str(out)])
    assert result == out
    with open(out / "results.csv") as f:
        results = list(csv.DictReader(f))
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    return out, results, curves


def _find(rows, variant, seed):
    (row,) = [r for r in rows
              if r["variant"] == variant and int(r["seed"]) == seed]
    return row


def test_writes_outputs(run):
    out, results, curves = run
    for name in ("results.md", "results.csv", "curves.csv",
                 "generalization.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "generalization.png").read_bytes()[:8] == (
        b"\x89PNG\r\n\x1a\n")
    assert [(r["variant"], int(r["seed"])) for r in results] == [
        (v, s) for v in VARIANTS for s in range(SEEDS)]
    assert len(curves) == len(VARIANTS) * SEEDS * (EPOCHS + 1)
    for r in results:
        if r["variant"] == "plain":
            continue
        # One teleport, within the loss guard, that lowered the sharpness on
        # its teleport batch, and lowered the measured sharpness too.
        made, rejected = (int(float(r[k])) for k in ("teleports", "rejected"))
        assert (made, rejected) == (1, 0)
        assert 0 < float(r["loss_drift"]) <= 0.05
        assert float(r["objective_after"]) < float(r["objective_before"])
        assert float(r["sharpness_after"]) < float(r["sharpness_before"])
    text = (out / "results.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} |" in text


def test_paired_differences_match_curves(example, run):
    """The table's paired differences, recomputed from curves.csv."""
    out, results, curves = run
    val = {(c["variant"], int(c["seed"]), int(c["epoch"])):
           float(c["val_loss"]) for c in curves}
    # Every variant shares plain's curve up to the teleport.
    for seed in range(SEEDS):
        for epoch in range(TELEPORT_EPOCH + 1):
            assert val[("min_sharpness", seed, epoch)] == (
                val[("plain", seed, epoch)])
    deltas = []
    for seed in range(SEEDS):
        r = _find(results, "min_sharpness", seed)
        delta = val[("min_sharpness", seed, EPOCHS)] - val[("plain", seed,
                                                           EPOCHS)]
        assert float(r["delta_val_loss_final"]) == pytest.approx(
            delta, abs=1e-12)
        assert float(r["val_loss_final"]) == val[("min_sharpness", seed,
                                                  EPOCHS)]
        deltas.append(delta)
    mean, sd = np.mean(deltas), np.std(deltas, ddof=1)
    text = (out / "results.md").read_text()
    # The first table: validation loss and accuracy.
    line = next(l for l in text.splitlines()
                if l.startswith("| min_sharpness |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6] == f"{mean:+.4f} ± {sd:.4f}"
    below = sum(d < 0 for d in deltas)
    assert cells[7] == f"{below}/{SEEDS}"


def _uninterrupted(example, seed, optimizer, callbacks, data):
    """One `model.fit` over all epochs, no branching, the example's order."""
    (x, y), (x_val, y_val) = data
    model = example.build_model(seed)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=10)
    order = example.epoch_orders(seed, len(x), EPOCHS).reshape(-1)
    train = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(20)
    model.fit(train, epochs=EPOCHS, steps_per_epoch=len(x) // 20,
              shuffle=False, verbose=0, callbacks=callbacks)
    return model.evaluate(x_val, y_val, batch_size=10000, verbose=0)


def test_branches_match_uninterrupted_runs(example, run):
    """The example trains the epochs before the teleport once and branches;
    an uninterrupted fit with the same Teleport must end at the same point."""
    _, results, _ = run
    (x, y), (x_val, y_val), _ = load_mnist()
    data = ((x[:LIMIT], y[:LIMIT]), (x_val, y_val))
    seed = 1
    step = TELEPORT_EPOCH * (LIMIT // 20)
    plain = _uninterrupted(example, seed, keras.optimizers.SGD(1e-2), [], data)
    assert plain == pytest.approx(
        float(_find(results, "plain", seed)["val_loss_final"]), rel=1e-5)
    opt = keras_teleport.Teleport(
        keras.optimizers.SGD(1e-2), objective="min_sharpness", group="gl",
        at_steps=[step], steps=10, teleport_lr=0.05)
    teleported = _uninterrupted(
        example, seed, opt,
        [keras_teleport.TeleportData(*data[0], batch_size=TELEPORT_BATCH,
                                     seed=seed)], data)
    row = _find(results, "min_sharpness", seed)
    assert opt.teleport_metrics["teleports"] == 1
    assert opt.teleport_metrics["objective_after"] == pytest.approx(
        float(row["objective_after"]), rel=1e-6)
    assert teleported == pytest.approx(float(row["val_loss_final"]),
                                       rel=1e-6)
    assert not math.isclose(teleported, plain, rel_tol=1e-4)


def test_arguments(example):
    args = example.parse_args([])
    assert (args.seeds, args.epochs, args.teleport_epoch,
            args.teleport_batch, args.out) == (
        3, 40, 20, 2000, "runs/teleport_generalization")
    assert args.variants == list(example.VARIANTS)
    assert example.parse_args(["--variants", "max_curvature"]).variants == [
        "plain", "max_curvature"]
    for bad in (["--teleport-epoch", "40"], ["--variants", "sharp"],
                ["--train-limit", "1000"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad)
