"""Teleporting for generalization (Zhao et al., ICLR 2024, Section 4) on MNIST.

The paper's protocol: train the 784-16-10-10 leaky-ReLU(0.1) MLP without
biases (`mnist_optimizers.build_model`) on real MNIST (the classic 50k
training split) with SGD(1e-2), batch 20, cross-entropy on logits; teleport
once at the start of epoch `--teleport-epoch` (default 20; 10 ascent steps,
on a teleport batch of 2000 training examples where the objective needs
data); train on to `--epochs` (default 40) and follow the validation loss
(the 10k held-out split). SGD(1e-2) and batch 20 are the paper's MNIST
settings. The data are reshuffled every epoch; the seed sets
the initial weights, the epoch orders and the teleport batch, and every
variant of a seed shares them. Variants (`--variants`, a comma list):

- `plain`: never teleports.
- `min_sharpness`: lower the paper's sharpness (mean loss at `w + r d`,
  `d ~ U[0, 1]^P` of unit norm, radii 0.001..0.2) with the paper's
  data-dependent GL(16) x GL(10) action (`group="gl"`), which keeps the loss
  only approximately: the default loss guard (`loss_tolerance=0.05`, the
  relative change of the loss on the teleport batch) applies, and the drift
  is reported.
- `min_sharpness_scaling`: the same objective over the exact positive
  rescalings of the hidden units (`group="scaling"`).
- `max_curvature`, `min_curvature`: raise or lower the mean curvature of
  the orbit curves `t -> expm(t M)·w` (data-free; `group="scaling"`, exact).
  The paper reports that higher curvature generalizes better; the sign was
  disputed in review.
- `max_sharpness`: the sanity control, data-dependent GL like
  `min_sharpness`, the other way.

Each teleport is `keras_teleport.Teleport(SGD, objective=..., group=...,
at_steps=[teleport_epoch * steps_per_epoch], steps=10, teleport_lr=0.05)`
(`teleport_lr`: the length of each ascent step, in the Lie algebra or in
`T`). To save compute (tracing a teleport costs seconds), the epochs before
the teleport are trained once per seed with plain SGD, and every variant
branches from that point: a wrapper around SGD(0) whose step count is set
to the teleport step makes the teleport alone (through `teleport_now()` for
teleports on teleport data, which in a run follow the step before the
scheduled one; in a train step on the epoch's first mini-batch for exact
groups), then training goes on with SGD(1e-2), which is what the wrapper
does after its only teleport. For exact groups the step after the teleport
then uses the gradient recomputed at the teleported point rather than the
transported one: equal up to rounding. The teleport batch and random
directions are the ones an uninterrupted run draws (seeded by the seed and
the step count); `tests/test_example_generalization.py` checks that a
branch ends where an uninterrupted `model.fit` with the same `Teleport`
ends.

Measured per run, with fixed random directions (seed 0) for every model:
the paper's sharpness and the isotropic one (`keras_teleport.measures`, on
the first `--measure-examples` training examples) and the orbit curvature
over positive scalings, at three points: just before the teleport (shared
by all variants), just after it, and at the end of the teleport epoch. Per
epoch: loss and accuracy on all training examples and on the validation
split. Per teleport: its own `teleport_metrics` (its objective before and
after on the teleport batch, loss drift, distance, teleports made and
rejected).

Writes `results.md` (means +- sd over seeds, and changes against `plain`
paired by seed), `results.csv` (one row per variant and seed), `curves.csv`
(every epoch of every run) and `generalization.png` to `--out`.

Usage:

    python examples/teleport_generalization.py                  # 3 seeds
    python examples/teleport_generalization.py --seeds 5
    python examples/teleport_generalization.py --train-limit 5000 \\
        --epochs 6 --teleport-epoch 3 --variants plain,min_sharpness
"""

import argparse
import csv
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_teleport  # noqa: E402
from keras_teleport import measures  # noqa: E402
from keras_teleport.datasets import load_mnist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_optimizers import build_model  # noqa: E402

# name -> Teleport keyword arguments (None: no teleport).
VARIANTS = {
    "plain": None,
    "min_sharpness": dict(objective="min_sharpness", group="gl"),
    "min_sharpness_scaling": dict(objective="min_sharpness", group="scaling"),
    "max_curvature": dict(objective="max_curvature", group="scaling"),
    "min_curvature": dict(objective="min_curvature", group="scaling"),
    "max_sharpness": dict(objective="max_sharpness", group="gl"),
}
LEARNING_RATE = 1e-2
BATCH_SIZE = 20
EVAL_BATCH = 10000
MEASURE_SEED = 0  # the same directions for every model and every point
# name -> label; `sharpness_excess` is the paper's sharpness minus the loss
# at the weights themselves, on the same examples: the part due to the
# perturbations.
MEASURES = {"sharpness": "sharpness", "sharpness_excess": "sharpness - loss",
            "sharpness_isotropic": "isotropic sharpness",
            "curvature": "orbit curvature"}
POINTS = ("before", "after", "epoch")  # the teleport; end of its epoch
TELEPORT_METRICS = ("teleports", "rejected", "objective_before",
                    "objective_after", "loss_drift", "distance",
                    "grad_norm_before", "grad_norm_after")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs per variant, seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--teleport-epoch", type=int, default=20,
                        help="teleport at the start of this epoch (0-based: "
                        "after this many epochs)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list from {list(VARIANTS)}")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on the first N training examples only")
    parser.add_argument("--teleport-batch", type=int, default=2000,
                        help="examples per teleport batch")
    parser.add_argument("--teleport-steps", type=int, default=10)
    parser.add_argument("--teleport-lr", type=float, default=0.05,
                        help="length of each ascent step (Lie algebra or T)")
    parser.add_argument("--measure-examples", type=int, default=2000,
                        help="sharpness on the first N training examples")
    parser.add_argument("--directions", type=int, default=10,
                        help="random directions of the measures")
    parser.add_argument("--steps-per-execution", type=int, default=50)
    parser.add_argument("--out", default="runs/teleport_generalization")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        parser.error(f"--variants: unknown or empty {unknown or chosen}; "
                     f"choose from {list(VARIANTS)}")
    # Canonical order, plain first: the paired differences need it.
    args.variants = [v for v in VARIANTS if v in chosen]
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    for name in ("seeds", "epochs", "teleport_batch", "teleport_steps",
                 "measure_examples", "directions", "steps_per_execution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.teleport_epoch < args.epochs:
        parser.error("--teleport-epoch must be in [0, --epochs)")
    if not (args.teleport_lr > 0 and math.isfinite(args.teleport_lr)):
        parser.error("--teleport-lr must be > 0")
    n = args.train_limit or 50000
    if not 1 <= n <= 50000:
        parser.error("--train-limit must be in [1, 50000]")
    if args.teleport_batch > n or args.measure_examples > n:
        parser.error("--teleport-batch and --measure-examples must be <= the "
                     "number of training examples")
    return args


# Data ------------------------------------------------------------------------


def epoch_orders(seed, n, epochs):
    """The example order of every epoch: one permutation each, from `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(epochs)])


def epoch_dataset(x, y, order, batch_size=BATCH_SIZE):
    """Batches of `(x, y)` (tensors) in the order `order`."""
    return (
        tf.data.Dataset.from_tensor_slices(order)
        .batch(batch_size)
        .map(lambda i: (tf.gather(x, i), tf.gather(y, i)),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def steps_per_epoch(n):
    return math.ceil(n / BATCH_SIZE)


# Models ----------------------------------------------------------------------


def make_optimizer(variant, teleport_step, args, learning_rate=LEARNING_RATE):
    """SGD, or a Teleport around it that teleports once at `teleport_step`."""
    inner = keras.optimizers.SGD(learning_rate)
    spec = VARIANTS[variant]
    if spec is None:
        return inner
    return keras_teleport.Teleport(
        inner, at_steps=[teleport_step], steps=args.teleport_steps,
        teleport_lr=args.teleport_lr, **spec)


def on_teleport_data(variant):
    """Whether the variant teleports on teleport data (after the step)."""
    spec = VARIANTS[variant]
    return spec is not None and (
        spec["objective"] in ("min_sharpness", "max_sharpness")
        or spec["group"] == "gl")


def compile_model(model, optimizer, steps_per_execution):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        steps_per_execution=steps_per_execution,
        jit_compile=False,  # on CPU, XLA is slower for this tiny net
    )
    return model


def compiled_model(seed, weights, optimizer, steps_per_execution):
    """`build_model(seed)` with `weights` (if given), compiled with
    `optimizer` (SGD(1e-2) if None)."""
    model = build_model(seed)
    if weights is not None:
        model.set_weights(weights)
    optimizer = optimizer or keras.optimizers.SGD(LEARNING_RATE)
    return compile_model(model, optimizer, steps_per_execution)


def teleport(model, variant, teleport_step, first_batch, data, seed, args):
    """Teleports `model` in place as `variant` would at `teleport_step`.

    The wrapper is built with its step count at `teleport_step`, around
    SGD(0) so that only the teleport moves the weights. Teleports on teleport
    data run through `teleport_now()` (in a run they follow the step before,
    at this step count); exact-group teleports run in a train step on the
    teleport epoch's first mini-batch (`first_batch`), which the run then
    takes with SGD from the teleported point. Returns `teleport_metrics`.
    """
    optimizer = make_optimizer(variant, teleport_step, args,
                               learning_rate=0.0)
    compile_model(model, optimizer, 1)
    optimizer.build(model.trainable_variables, model=model)
    optimizer.iterations.assign(teleport_step)
    if on_teleport_data(variant):
        (x_train, y_train) = data[0]
        optimizer.set_teleport_data(x_train, y_train,
                                    batch_size=args.teleport_batch, seed=seed)
        optimizer.teleport_now()
    else:
        model.train_on_batch(*first_batch)
    return teleport_metrics(optimizer)


def evaluate(model, data):
    """Loss and accuracy on all training examples and on the validation
    split."""
    (x_train, y_train), (x_val, y_val) = data[:2]
    row = {}
    for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
        result = model.evaluate(x, y, batch_size=EVAL_BATCH, verbose=0,
                                return_dict=True)
        row[f"{split}_loss"] = float(result["loss"])
        row[f"{split}_acc"] = float(result["acc"])
    return row


def measure(model, data, args):
    x, y = data[2]
    common = dict(directions=args.directions, seed=MEASURE_SEED)
    sharpness = measures.sharpness(model, x, y, kind="paper", **common)
    loss = model.evaluate(x, y, batch_size=EVAL_BATCH, verbose=0,
                          return_dict=True)["loss"]
    return {
        "sharpness": sharpness,
        "sharpness_excess": sharpness - float(loss),
        "sharpness_isotropic": measures.sharpness(model, x, y,
                                                  kind="isotropic", **common),
        "curvature": measures.orbit_curvature(model, group="scaling",
                                              **common),
    }


def train_epochs(model, tensors, orders, start, end, data, on_epoch=None):
    """Trains epochs `start..end-1`; returns one evaluation row per epoch."""
    rows = []
    for epoch in range(start, end):
        model.fit(epoch_dataset(*tensors, orders[epoch]), epochs=1,
                  verbose=0, shuffle=False)
        row = evaluate(model, data)
        rows.append(row)
        if on_epoch is not None:
            on_epoch(epoch, model)
    return rows


def teleport_metrics(optimizer):
    metrics = optimizer.teleport_metrics
    return {k: metrics[k] for k in TELEPORT_METRICS}


def run_seed(seed, data, args, log=print):
    """The shared prefix, then every variant from it: `{variant: run}`."""
    (x_train, y_train) = data[0]
    n = len(x_train)
    spe = steps_per_epoch(n)
    teleport_step = args.teleport_epoch * spe
    orders = epoch_orders(seed, n, args.epochs)
    tensors = (tf.constant(x_train), tf.constant(y_train))
    spx = args.steps_per_execution

    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    prefix = compiled_model(seed, None, keras.optimizers.SGD(LEARNING_RATE),
                            spx)
    curve = [evaluate(prefix, data)]
    curve += train_epochs(prefix, tensors, orders, 0, args.teleport_epoch,
                          data)
    weights = prefix.get_weights()
    before = measure(prefix, data, args)
    prefix_seconds = time.perf_counter() - start
    # The first mini-batch of the teleport epoch: the batch of the step
    # exact-group teleports run in.
    first = orders[args.teleport_epoch][:BATCH_SIZE]
    first_batch = (x_train[first], y_train[first])

    runs = {}
    for variant in args.variants:
        start = time.perf_counter()
        keras.utils.set_random_seed(seed)
        model = compiled_model(seed, weights, None, spx)
        run = {"seed": seed, "curve": list(curve), "before": before,
               "at_teleport": curve[-1], "after": before, "metrics": {}}
        if variant != "plain":
            run["metrics"] = teleport(model, variant, teleport_step,
                                      first_batch, data, seed, args)
            run["after"] = measure(model, data, args)
            run["at_teleport"] = evaluate(model, data)
        # After its one teleport, Teleport(SGD) is SGD.
        compile_model(model, keras.optimizers.SGD(LEARNING_RATE), spx)

        def after_epoch(epoch, model, run=run):
            if epoch == args.teleport_epoch:
                run["epoch"] = measure(model, data, args)

        run["curve"] += train_epochs(model, tensors, orders,
                                     args.teleport_epoch, args.epochs, data,
                                     after_epoch)
        run["seconds"] = prefix_seconds + time.perf_counter() - start
        runs[variant] = run
        m = run["metrics"]
        log(f"seed {seed} {variant:>21}: val loss "
            f"{curve[-1]['val_loss']:.4f} -> "
            f"{run['at_teleport']['val_loss']:.4f} (teleport) -> "
            f"{run['curve'][-1]['val_loss']:.4f} (epoch {args.epochs}), "
            f"sharpness {before['sharpness']:.4f} -> "
            f"{run['after']['sharpness']:.4f}, curvature "
            f"{before['curvature']:.4f} -> {run['after']['curvature']:.4f}"
            + (f", teleports {m['teleports']} (rejected {m['rejected']}), "
               f"drift {m['loss_drift']:.2e}" if m else "")
            + f", {run['seconds']:.0f}s", flush=True)
    return runs


def run_all(args, log=print):
    """`{variant: [run per seed]}`."""
    (x_train, y_train), (x_val, y_val), _ = load_mnist()
    if args.train_limit:
        limit = args.train_limit
        x_train, y_train = x_train[:limit], y_train[:limit]
    m = args.measure_examples
    data = ((x_train, y_train), (x_val, y_val), (x_train[:m], y_train[:m]))
    runs = {v: [] for v in args.variants}
    for seed in range(args.seeds):
        for variant, run in run_seed(seed, data, args, log).items():
            runs[variant].append(run)
    return runs


# Summaries -------------------------------------------------------------------


def result_rows(runs, args):
    """One flat row per (variant, seed), with the differences to plain."""
    te, last = args.teleport_epoch + 1, args.epochs
    rows = []
    for variant, group in runs.items():
        for run, plain in zip(group, runs["plain"]):
            row = {"variant": variant, "seed": run["seed"]}
            for key in ("val_loss", "val_acc", "train_loss"):
                row[f"{key}_before"] = run["curve"][te - 1][key]
                row[f"{key}_teleport"] = run["at_teleport"][key]
                row[f"{key}_epoch"] = run["curve"][te][key]
                row[f"{key}_final"] = run["curve"][last][key]
                for when, epoch in (("epoch", te), ("final", last)):
                    row[f"delta_{key}_{when}"] = (
                        run["curve"][epoch][key] - plain["curve"][epoch][key])
            for name in MEASURES:
                for point in POINTS:
                    row[f"{name}_{point}"] = run[point][name]
            for key in TELEPORT_METRICS:
                row[key] = run["metrics"].get(key, math.nan)
            row["seconds"] = run["seconds"]
            rows.append(row)
    return rows


def _stats(values):
    values = np.asarray(values, np.float64)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), sd


def pm(values, digits=4, signed=False, kind="f"):
    """`mean ± sd` over seeds (sd with ddof 1; just the mean for one seed)."""
    mean, sd = _stats(values)
    text = f"{mean:{'+' if signed else ''}.{digits}{kind}}"
    return text if math.isnan(sd) else f"{text} ± {sd:.{digits}{kind}}"


def _column(rows, variant, key):
    return [r[key] for r in rows if r["variant"] == variant]


def markdown_tables(rows, args):
    te, last = args.teleport_epoch + 1, args.epochs
    header = ["variant", f"val loss @{te}", "Δ vs plain",
              f"val acc @{te}", "Δ vs plain", f"val loss @{last}",
              "Δ vs plain", "below plain", f"val acc @{last}", "Δ vs plain"]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for variant in args.variants:
        col = lambda key: _column(rows, variant, key)
        below = sum(d < 0 for d in col("delta_val_loss_final"))
        cells = [variant, pm(col("val_loss_epoch")),
                 pm(col("delta_val_loss_epoch"), signed=True),
                 pm(col("val_acc_epoch")),
                 pm(col("delta_val_acc_epoch"), signed=True),
                 pm(col("val_loss_final")),
                 pm(col("delta_val_loss_final"), signed=True),
                 "—" if variant == "plain"
                 else f"{below}/{len(col('seed'))}",
                 pm(col("val_acc_final")),
                 pm(col("delta_val_acc_final"), signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    generalization = "\n".join(lines)

    header = ["variant"] + [
        f"{label}: {when}" for label in MEASURES.values()
        for when in ("at teleport, Δ vs before", f"@{te}, Δ vs plain")]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for variant in args.variants:
        col = lambda key: _column(rows, variant, key)
        cells = [variant]
        for name in MEASURES:
            after, before = col(f"{name}_after"), col(f"{name}_before")
            epoch = col(f"{name}_epoch")
            plain = _column(rows, "plain", f"{name}_epoch")
            # Small loss changes: 3 significant digits.
            f = (dict(digits=2, kind="e")
                 if name in ("sharpness_isotropic", "sharpness_excess")
                 else {})
            for value, reference in ((after, before), (epoch, plain)):
                change = pm(np.subtract(value, reference), signed=True, **f)
                cells.append(f"{pm(value, **f)} ({change})")
        lines.append("| " + " | ".join(cells) + " |")
    measured = "\n".join(lines)

    header = ["variant", "teleports (rejected)", "objective before",
              "objective after", "loss drift (teleport batch)",
              "distance", "Δ val loss at teleport",
              "Δ train loss at teleport"]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for variant in args.variants:
        if variant == "plain":
            continue
        col = lambda key: _column(rows, variant, key)
        cells = [variant, f"{int(sum(col('teleports')))} "
                          f"({int(sum(col('rejected')))})",
                 pm(col("objective_before")), pm(col("objective_after")),
                 pm(col("loss_drift"), digits=5), pm(col("distance")),
                 pm(np.subtract(col("val_loss_teleport"),
                                col("val_loss_before")), digits=5,
                    signed=True),
                 pm(np.subtract(col("train_loss_teleport"),
                                col("train_loss_before")), digits=5,
                    signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    teleports = "\n".join(lines)
    return generalization, measured, teleports


STYLES = {
    "plain": dict(color="black", linestyle=":"),
    "min_sharpness": dict(color="tab:blue"),
    "min_sharpness_scaling": dict(color="tab:cyan", linestyle="--"),
    "max_curvature": dict(color="tab:red"),
    "min_curvature": dict(color="tab:orange", linestyle="--"),
    "max_sharpness": dict(color="tab:green", linestyle="-."),
}


def plot(runs, args, path):
    """Validation loss per epoch, and its paired difference to plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    plain = np.array([[e["val_loss"] for e in r["curve"]]
                      for r in runs["plain"]])
    epochs = np.arange(plain.shape[1])
    for variant in args.variants:
        curves = np.array([[e["val_loss"] for e in r["curve"]]
                           for r in runs[variant]])
        style = STYLES[variant]
        axes[0].plot(epochs, curves.mean(0), lw=1.4, label=variant, **style)
        diff = curves - plain
        axes[1].plot(epochs, diff.mean(0), lw=1.4, label=variant, **style)
        if args.seeds > 1:
            axes[0].fill_between(epochs, curves.min(0), curves.max(0),
                                 color=style["color"], alpha=0.1, lw=0)
            axes[1].fill_between(epochs, diff.min(0), diff.max(0),
                                 color=style["color"], alpha=0.1, lw=0)
    for ax in axes:
        ax.axvline(args.teleport_epoch, color="gray", lw=1)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation loss (10k held-out)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("validation loss - plain's, same seed")
    axes[1].set_xlim(max(0, args.teleport_epoch - 2), args.epochs)
    axes[0].legend(fontsize=9)
    spread = (f"mean of {args.seeds} seeds, min-max band" if args.seeds > 1
              else "1 seed")
    fig.suptitle(
        f"MNIST 784-16-10-10 leaky-ReLU MLP, SGD({LEARNING_RATE:g}), batch "
        f"{BATCH_SIZE}, one teleport at epoch {args.teleport_epoch} "
        f"(gray line); {spread}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _number(value):
    # Full precision, so the tables can be recomputed from the CSVs.
    return value if isinstance(value, (int, str)) else repr(float(value))


def write_outputs(runs, args, elapsed):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(runs, args)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _number(v) for k, v in r.items()} for r in rows)
    fields = ("train_loss", "train_acc", "val_loss", "val_acc")
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("variant", "seed", "epoch") + fields)
        for variant, group in runs.items():
            for run in group:
                for epoch, row in enumerate(run["curve"]):
                    writer.writerow([variant, run["seed"], epoch]
                                    + [_number(row[k]) for k in fields])
    generalization, measured, teleports = markdown_tables(rows, args)
    n = args.train_limit or 50000
    te = args.teleport_epoch
    note = (
        f"{args.seeds} seed(s) (0..{args.seeds - 1}; cells are mean ± sd "
        f"over seeds, sd with ddof 1), {args.epochs} epochs on {n} MNIST "
        f"training examples reshuffled every epoch, SGD({LEARNING_RATE:g}), "
        f"batch {BATCH_SIZE}, steps_per_execution {args.steps_per_execution}; "
        f"total {elapsed:.0f}s. Validation: the 10k held-out split.\n\n"
        f"One teleport at the start of epoch {te} (after {te} epochs, step "
        f"{te * steps_per_epoch(n)}): {args.teleport_steps} steps of length "
        f"{args.teleport_lr:g}; sharpness objectives on a teleport batch of "
        f"{args.teleport_batch} training examples. `@{te + 1}`: at the end of "
        f"the teleport epoch; `@{args.epochs}`: at the end. Δ vs plain: the "
        f"variant minus plain of the same seed (same initial weights, data "
        f"order and weights before the teleport); 'below plain': seeds whose "
        f"final validation loss is below plain's.\n\n"
        f"Measures at fixed directions (seed {MEASURE_SEED}, "
        f"{args.directions} directions): the paper's sharpness (mean loss at "
        f"w + r d, d ~ U[0,1]^P, radii {list(measures.DEFAULT_RADII)}) and "
        f"the isotropic one (mean loss change, d uniform on the sphere) on "
        f"the first {args.measure_examples} training examples, and the "
        f"paper's sharpness minus the loss at the weights on them; the orbit "
        f"curvature over positive scalings of the hidden units. 'At "
        f"teleport': just after it, against just before.\n\n"
        "Teleport table: `teleport_metrics` summed (teleports) or averaged "
        "over seeds; the objective is the library's own, on its teleport "
        "batch (sharpness) or data-free (curvature), at random directions "
        "drawn per teleport; loss drift is the relative change of the loss "
        "on the teleport batch (0 for exact groups); Δ losses at the "
        "teleport are over the whole training and validation sets."
    )
    text = (f"## Validation loss and accuracy\n\n{generalization}\n\n"
            f"## Sharpness and curvature\n\n{measured}\n\n"
            f"## Teleports\n\n{teleports}\n\n{note}\n")
    (out / "results.md").write_text(text)
    plot(runs, args, out / "generalization.png")
    return text


def main(argv=None):
    """Runs the experiment; returns the output directory."""
    args = parse_args(argv)
    # Every run builds its own model, train and measure functions:
    # TensorFlow's "retracing" warnings count those and are false alarms.
    tf.get_logger().setLevel("ERROR")
    start = time.perf_counter()
    runs = run_all(args)
    text = write_outputs(runs, args, time.perf_counter() - start)
    print()
    print(text)
    print(f"Wrote {args.out}/results.md, results.csv, curves.csv, "
          "generalization.png")
    return pathlib.Path(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
