"""Do sharpness and curvature predict generalization? (ICLR 2024, Section 4.)

Trains the paper's 784-16-10-10 leaky-ReLU MLP (`mnist_optimizers.build_model`)
once per seed on a subset of real MNIST, then measures each trained model
and correlates every measure with the test loss and the generalization gap
across seeds. The seed sets the initial weights and the shuffling; the
training subset (the first `--train-limit` examples) is the same for every
seed, and training on a subset leaves a spread of gaps between seeds.

Training: SGD(1e-2) (or Adagrad(1e-2), `--optimizer`), batch 20,
cross-entropy on logits, reshuffled every epoch with the seed.

Measures (`keras_teleport.measures`, at their default settings unless given),
on the first `--measure-examples` training examples (all seen in training)
with the same random directions and vectors for every model:

- `sharpness_paper`: mean of `L(w + r d/||d||)`, `d ~ U[0, 1]^P`.
- `sharpness_isotropic`: mean of `L(w + r d/||d||) - L(w)`, `d` isotropic.
- `orbit_curvature`: `group="auto"`, which on leaky_relu junctions is the
  positive scaling of the hidden units (diagonal `M`); the paper's curvature
  used its data-dependent GL action, which is not an exact symmetry here.
- `hessian_top_eigenvalue` (power iteration) and `hessian_trace`
  (Hutchinson).

Each is correlated with the test loss (10k test split) and the gap (test
loss - loss on the whole training subset): Pearson r and Spearman rho
(average ranks for ties), each with a two-sided permutation p-value (exact
enumeration when n! <= `--permutations`, else that many random
permutations with a fixed seed). The training loss is correlated too, as a
reference: a measure that only tracks how well a model fits the training
data adds nothing beyond it.

Writes `measures.csv` (one row per seed), `correlations.csv`, `results.md`
and `scatter.png` (each measure against the test loss) to `--out`.

Usage:

    python examples/correlation.py                          # 8 seeds
    python examples/correlation.py --seeds 24 --epochs 20
"""

import argparse
import csv
import itertools
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_teleport import measures  # noqa: E402
from keras_teleport.datasets import load_mnist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_optimizers import build_model  # noqa: E402

OPTIMIZERS = {  # the paper's learning rates
    "sgd": ("SGD(1e-2)", lambda: keras.optimizers.SGD(1e-2)),
    "adagrad": ("Adagrad(1e-2)", lambda: keras.optimizers.Adagrad(1e-2)),
}
BATCH_SIZE = 20
EVAL_BATCH = 5000
MEASURE_SEED = 0  # the same directions and vectors for every model
MEASURES = ("sharpness_paper", "sharpness_isotropic", "orbit_curvature",
            "hessian_top_eigenvalue", "hessian_trace")
REFERENCE = "train_loss"
TARGETS = ("test_loss", "gap")
COLUMNS = (("seed", "train_loss", "test_loss", "test_acc", "gap")
           + MEASURES + ("train_seconds", "measure_seconds"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=8,
                        help="models, seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-limit", type=int, default=5000,
                        help="train on the first N training examples")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                        default="sgd")
    parser.add_argument("--measure-examples", type=int, default=2000,
                        help="measure on the first N training examples")
    parser.add_argument("--measure-batch", type=int, default=1000,
                        help="batch_size of the measures (bounds memory)")
    parser.add_argument("--directions", type=int, default=10,
                        help="sharpness and curvature directions")
    parser.add_argument("--iterations", type=int, default=20,
                        help="power iterations of the top eigenvalue")
    parser.add_argument("--samples", type=int, default=20,
                        help="Hutchinson vectors of the trace")
    parser.add_argument("--permutations", type=int, default=10000,
                        help="permutations of the p-values")
    parser.add_argument("--steps-per-execution", type=int, default=50)
    parser.add_argument("--out", default="runs/correlation")
    args = parser.parse_args(argv)
    positive = ("seeds", "epochs", "train_limit", "measure_examples",
                "measure_batch", "directions", "iterations", "samples",
                "permutations", "steps_per_execution")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seeds < 3:
        parser.error("--seeds must be >= 3 (a correlation of 2 points is "
                     "always +-1)")
    if args.train_limit > 50000:
        parser.error("--train-limit must be <= 50000")
    if args.measure_examples > args.train_limit:
        parser.error("--measure-examples must be <= --train-limit (measures "
                     "use training data the model has seen)")
    return args


# Statistics ---------------------------------------------------------------


def _pair(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"need two 1-D arrays of one length; got shapes "
                         f"{x.shape} and {y.shape}")
    return x, y


def pearson(x, y):
    """Pearson's r of two 1-D arrays; NaN if either is constant."""
    x, y = _pair(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    scale = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / scale if scale > 0 else math.nan


def average_ranks(x):
    """Ranks 1..n of a 1-D array; tied values share their mean rank."""
    _, inverse, counts = np.unique(np.asarray(x, np.float64),
                                   return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based position of each value
    return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(x, y):
    """Spearman's rho: Pearson's r of the average ranks."""
    x, y = _pair(x, y)
    return pearson(average_ranks(x), average_ranks(y))


def permutation_pvalue(x, y, method="pearson", permutations=10000, seed=0):
    """Two-sided p-value of `method`'s correlation under shuffled pairings.

    The share of pairings with `|r| >= |r observed|`: all `n!` of them when
    `n! <= permutations` (exact), else `permutations` random ones drawn
    with `seed`, counted as `(hits + 1) / (permutations + 1)` so the
    estimate is never 0. NaN when the correlation is.
    """
    x, y = _pair(x, y)
    if method == "spearman":
        x, y = average_ranks(x), average_ranks(y)
    elif method != "pearson":
        raise ValueError(f"unknown method {method!r}")
    observed = pearson(x, y)
    if math.isnan(observed):
        return math.nan
    exact = math.factorial(len(x)) <= permutations
    if exact:
        shuffled = np.array(list(itertools.permutations(y)))
    else:
        rng = np.random.default_rng(seed)
        shuffled = rng.permuted(np.tile(y, (permutations, 1)), axis=1)
    dx = x - x.mean()
    dy = shuffled - y.mean()  # a permutation keeps the mean and the norm
    r = dy @ dx / math.sqrt(float(dx @ dx) * float(dy[0] @ dy[0]))
    # The tolerance keeps pairings that tie with the observed one (up to
    # rounding) counted as at least as extreme.
    hits = int(np.sum(np.abs(r) >= abs(observed) - 1e-12))
    if exact:
        return hits / len(shuffled)
    return (hits + 1) / (permutations + 1)


def correlation_rows(table, permutations=10000, seed=0):
    """One row per (measure, target): n, r and rho with their p-values.

    `table` maps column names to per-seed values; pairs where either value
    is not finite are left out (n says how many remain).
    """
    rows = []
    for name in MEASURES + (REFERENCE,):
        for target in TARGETS:
            x = np.asarray(table[name], np.float64)
            y = np.asarray(table[target], np.float64)
            keep = np.isfinite(x) & np.isfinite(y)
            x, y = x[keep], y[keep]
            row = {"measure": name, "target": target, "n": int(keep.sum())}
            for method, fn in (("pearson", pearson), ("spearman", spearman)):
                if len(x) >= 3:
                    row[method] = fn(x, y)
                    row[f"{method}_p"] = permutation_pvalue(
                        x, y, method, permutations, seed)
                else:
                    row[method] = row[f"{method}_p"] = math.nan
            rows.append(row)
    return rows


# Training and measuring ------------------------------------------------------


def train_one(seed, data, args):
    """Trains one model; returns it with its losses and training seconds."""
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = build_model(seed)
    model.compile(
        optimizer=OPTIMIZERS[args.optimizer][1](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        steps_per_execution=args.steps_per_execution,
        jit_compile=False,  # on CPU, XLA is slower for this tiny net
    )
    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(BATCH_SIZE)
        .prefetch(tf.data.AUTOTUNE)
    )
    start = time.perf_counter()
    # The dataset reshuffles itself; fit's own shuffle ignores datasets.
    model.fit(train, epochs=args.epochs, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    train_loss = model.evaluate(x_train, y_train, batch_size=EVAL_BATCH,
                                verbose=0, return_dict=True)["loss"]
    test = model.evaluate(x_test, y_test, batch_size=EVAL_BATCH, verbose=0,
                          return_dict=True)
    row = {"train_loss": float(train_loss), "test_loss": float(test["loss"]),
           "test_acc": float(test["acc"]), "train_seconds": seconds}
    row["gap"] = row["test_loss"] - row["train_loss"]
    return model, row


def measure_one(model, x, y, args):
    """The five measures of a trained model, by name."""
    common = dict(seed=MEASURE_SEED, batch_size=args.measure_batch)
    return {
        "sharpness_paper": measures.sharpness(
            model, x, y, kind="paper", directions=args.directions, **common),
        "sharpness_isotropic": measures.sharpness(
            model, x, y, kind="isotropic", directions=args.directions,
            **common),
        "orbit_curvature": measures.orbit_curvature(
            model, directions=args.directions, group="auto",
            seed=MEASURE_SEED),
        "hessian_top_eigenvalue": measures.hessian_top_eigenvalue(
            model, x, y, iterations=args.iterations, **common),
        "hessian_trace": measures.hessian_trace(
            model, x, y, samples=args.samples, **common),
    }


def run_all(args, log=print):
    """Trains and measures every seed; returns one row per seed."""
    (x_train, y_train), _, (x_test, y_test) = load_mnist()
    x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    data = ((x_train, y_train), (x_test, y_test))
    x_measure = x_train[: args.measure_examples]
    y_measure = y_train[: args.measure_examples]
    rows = []
    for seed in range(args.seeds):
        model, row = train_one(seed, data, args)
        start = time.perf_counter()
        row.update(measure_one(model, x_measure, y_measure, args))
        row["measure_seconds"] = time.perf_counter() - start
        row["seed"] = seed
        rows.append(row)
        log(f"seed {seed}: train {row['train_loss']:.4f} test "
            f"{row['test_loss']:.4f} gap {row['gap']:.4f} acc "
            f"{row['test_acc']:.4f} | "
            + " ".join(f"{m} {row[m]:.4g}" for m in MEASURES)
            + f" | {row['train_seconds']:.1f}s train, "
            f"{row['measure_seconds']:.1f}s measures",
            flush=True)
    return rows


# Outputs --------------------------------------------------------------------


def _cell(value, p):
    if math.isnan(value):
        return "—"
    return f"{value:+.3f} ({p:.3g})"


def markdown_table(correlations):
    by = {(r["measure"], r["target"]): r for r in correlations}
    header = ["measure"] + [f"{method} vs {target} (p)"
                            for target in TARGETS
                            for method in ("Pearson r", "Spearman rho")]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for name in MEASURES + (REFERENCE,):
        label = f"{name} (reference)" if name == REFERENCE else name
        cells = [label]
        for target in TARGETS:
            r = by[(name, target)]
            cells += [_cell(r["pearson"], r["pearson_p"]),
                      _cell(r["spearman"], r["spearman_p"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, correlations, path):
    """Each measure (and the training loss) against the test loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["measure"], r["target"]): r for r in correlations}
    names = MEASURES + (REFERENCE,)
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols,
                             figsize=(4.2 * cols, 3.6 * 2))
    test = np.array([r["test_loss"] for r in rows])
    for ax, name in zip(axes.flat, names):
        ax.scatter([r[name] for r in rows], test, s=18)
        r = by[(name, "test_loss")]
        ax.set_title(f"{name}\nr = {r['pearson']:+.2f}, "
                     f"rho = {r['spearman']:+.2f} (n = {r['n']})",
                     fontsize=10)
        ax.set_xlabel(name)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_ylabel("test loss")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value):
    # Full precision, so the correlations can be recomputed from the CSV.
    return value if isinstance(value, (int, str)) else repr(float(value))


def write_outputs(rows, args, elapsed):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {c: [r[c] for r in rows] for c in COLUMNS}
    correlations = correlation_rows(table, args.permutations)
    with open(out / "measures.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_number(row[c]) for c in COLUMNS])
    fields = ("measure", "target", "n", "pearson", "pearson_p", "spearman",
              "spearman_p")
    with open(out / "correlations.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in correlations:
            writer.writerow([_number(row[c]) for c in fields])
    markdown = markdown_table(correlations)
    spread = "; ".join(
        f"{c} {np.mean(table[c]):.4f} +- {np.std(table[c], ddof=1):.4f} "
        f"[{np.min(table[c]):.4f}, {np.max(table[c]):.4f}]"
        for c in ("train_loss", "test_loss", "gap", "test_acc"))
    exact = math.factorial(len(rows)) <= args.permutations
    note = (
        f"n = {len(rows)} seeds of the 784-16-10-10 leaky-ReLU MLP, "
        f"{OPTIMIZERS[args.optimizer][0]}, batch {BATCH_SIZE}, "
        f"{args.epochs} epoch(s) on the first {args.train_limit} MNIST "
        f"training examples (reshuffled per epoch with the seed); test loss "
        f"on the 10k test split; gap = test loss - training loss on the "
        f"{args.train_limit} examples. Total {elapsed:.0f}s.\n\n"
        f"Across seeds (mean +- sd [min, max]): {spread}.\n\n"
        f"Measures on the first {args.measure_examples} training examples, "
        f"batch_size {args.measure_batch}, seed {MEASURE_SEED} for every "
        f"model: sharpness with {args.directions} directions x radii "
        f"{list(measures.DEFAULT_RADII)}; orbit curvature over "
        f"{args.directions} directions, group 'auto' = positive scaling on "
        f"these leaky_relu junctions (not the paper's data-dependent GL "
        f"orbit); Hessian top eigenvalue from {args.iterations} power "
        f"iterations; trace from {args.samples} Hutchinson vectors.\n\n"
        f"Cells: correlation (two-sided permutation p-value, "
        + ("exact over all n! pairings" if exact else
           f"{args.permutations} random permutations, seed 0")
        + "). The training loss is a reference, not a measure."
    )
    (out / "results.md").write_text(f"{markdown}\n\n{note}\n")
    plot(rows, correlations, out / "scatter.png")
    return markdown, note


def main(argv=None):
    """Runs the experiment; returns the output directory."""
    args = parse_args(argv)
    # Every seed builds its own model and measure functions: TensorFlow's
    # "retracing" warnings count those and are false alarms here.
    tf.get_logger().setLevel("ERROR")
    start = time.perf_counter()
    rows = run_all(args)
    markdown, note = write_outputs(rows, args, time.perf_counter() - start)
    print()
    print(markdown)
    print()
    print(note)
    print(f"\nWrote {args.out}/results.md, measures.csv, correlations.csv, "
          "scatter.png")
    return pathlib.Path(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
