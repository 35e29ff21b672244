"""Teleport vs plain training on real MNIST, after Zhao et al. (ICLR 2024, Fig. 5).

The paper's setup: a 784-16-10-10 MLP without biases, leaky_relu(0.1),
weights drawn from U(+-1/sqrt(fan_in)), cross-entropy on logits, batch 20, the
unshuffled 50k training split. Each optimizer trains twice from the same
initial weights: plainly, and wrapped in `keras_teleport.Teleport`, which
teleports before each of the first 8 mini-batches of epoch 0 (the paper's
schedule for momentum, RMSprop and Adam). `--every N` adds a third run that
teleports every N steps for the whole run.

Differences from the paper, on purpose: the teleport ascends on the current
mini-batch (20 examples, no extra forward pass) instead of a fresh batch of
200, and the inner optimizer's state is transported (`slots="transport"`)
instead of reset.

`teleport_lr` is 0.05 here (the paper's value for momentum, RMSprop and Adam,
though its ascent is parametrised differently), not the library's 0.5: the
cap `max_grad_norm_ratio` bounds each teleport, so 8 teleports in a row can
grow the gradient norm by up to 5^8. With 0.5 every teleport hits the cap and
SGD diverges to NaN within 10 steps; `--teleport-lr 0.5` shows it.

Writes `results.md`, `results.csv` (the summary table), `curves.csv` (every
epoch of every run) and `loss.png` to `--out`.

Usage:

    python examples/mnist_teleport.py                    # default job
    python examples/mnist_teleport.py --epochs 40 --seeds 5   # the paper's
"""

import argparse
import csv
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_teleport  # noqa: E402
from keras_teleport.datasets import load_mnist  # noqa: E402

# name -> (label, factory). Learning rates are the paper's: base 1e-2, momentum
# lr/10, RMSprop and Adam lr/100.
OPTIMIZERS = {
    "sgd": ("SGD(1e-2)", lambda: keras.optimizers.SGD(1e-2)),
    "momentum": (
        "SGD(1e-3, momentum=0.9)",
        lambda: keras.optimizers.SGD(1e-3, momentum=0.9),
    ),
    "adagrad": ("Adagrad(1e-2)", lambda: keras.optimizers.Adagrad(1e-2)),
    "rmsprop": ("RMSprop(1e-4)", lambda: keras.optimizers.RMSprop(1e-4)),
    "adam": ("Adam(1e-4)", lambda: keras.optimizers.Adam(1e-4)),
}
BATCH_SIZE = 20
TELEPORT_STEPS = tuple(range(8))  # the first 8 mini-batches of epoch 0
EVAL_BATCH = 10000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=3,
                        help="training epochs per run")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per variant, seeds 0..N-1 (averaged)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma list from {sorted(OPTIMIZERS)}")
    parser.add_argument("--out", default="runs/mnist_teleport",
                        help="output directory")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on the first N examples only")
    parser.add_argument("--every", type=int, default=0,
                        help="also run Teleport(every=N); 0 skips it")
    parser.add_argument("--teleport-lr", type=float, default=0.05,
                        help="Teleport's teleport_lr (the library's default "
                        "0.5 diverges here, see the module docstring)")
    parser.add_argument("--max-grad-norm-ratio", type=float, default=5.0,
                        help="Teleport's cap on the gradient-norm growth "
                        "of one teleport")
    parser.add_argument("--slots", default="transport",
                        choices=("transport", "reset", "keep"),
                        help="what teleports do to the optimizer's state")
    parser.add_argument("--steps-per-execution", type=int, default=50,
                        help="train steps per compiled call (speed only)")
    args = parser.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(OPTIMIZERS)}")
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be >= 1")
    return args


def build_model():
    """The paper's 784-16-10-10 MLP: no biases, leaky_relu(0.1) layers.

    Separate LeakyReLU layers (not `activation=`) so that
    `keras_teleport.find_symmetries` sees the positively homogeneous
    activation between the kernels.
    """
    def uniform(fan_in):
        limit = 1.0 / np.sqrt(fan_in)
        return keras.initializers.RandomUniform(-limit, limit)

    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(16, use_bias=False, kernel_initializer=uniform(784)),
            keras.layers.LeakyReLU(negative_slope=0.1),
            keras.layers.Dense(10, use_bias=False, kernel_initializer=uniform(16)),
            keras.layers.LeakyReLU(negative_slope=0.1),
            keras.layers.Dense(10, use_bias=False, kernel_initializer=uniform(10)),
        ],
        name="mlp_784_16_10_10",
    )


def variants(args):
    """name -> Teleport kwargs (None for the plain run)."""
    common = dict(teleport_lr=args.teleport_lr,
                  max_grad_norm_ratio=args.max_grad_norm_ratio,
                  slots=args.slots)
    result = {"plain": None, "teleport": dict(at_steps=TELEPORT_STEPS, **common)}
    if args.every:
        result[f"every{args.every}"] = dict(every=args.every, **common)
    return result


def train_one(optimizer_name, teleport_kwargs, initial_weights, data, args):
    """Trains one model; returns its loss curve, timings and final metrics."""
    (x_train, y_train), (x_val, y_val) = data
    model = build_model()
    model.set_weights(initial_weights)
    optimizer = OPTIMIZERS[optimizer_name][1]()
    if teleport_kwargs is not None:
        optimizer = keras_teleport.Teleport(optimizer, **teleport_kwargs)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=args.steps_per_execution,
        jit_compile=False,  # XLA is slower than plain graphs for this tiny net
    )
    # Unshuffled, as in the paper: every run sees the same batch sequence.
    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .batch(BATCH_SIZE)
        .prefetch(tf.data.AUTOTUNE)
    )
    losses = [model.evaluate(x_train, y_train, batch_size=EVAL_BATCH,
                             verbose=0)[0]]
    seconds = [0.0]
    for _ in range(args.epochs):
        start = time.perf_counter()
        model.fit(train, epochs=1, shuffle=False, verbose=0)
        # Wall-clock counts training only, not the full-loss evaluation.
        seconds.append(seconds[-1] + time.perf_counter() - start)
        losses.append(model.evaluate(x_train, y_train, batch_size=EVAL_BATCH,
                                     verbose=0)[0])
    val_loss, val_acc = model.evaluate(x_val, y_val, batch_size=EVAL_BATCH,
                                       verbose=0)
    metrics = getattr(optimizer, "teleport_metrics", {}) or {}
    return {
        "losses": [float(v) for v in losses],
        "seconds": seconds,
        "val_loss": float(val_loss),
        "val_acc": float(val_acc),
        "teleports": metrics.get("teleports", 0),
        "rejected": metrics.get("rejected", 0),
    }


def run_all(args, log=print):
    """Every (optimizer, variant, seed) run: `{(opt, variant): [run, ...]}`."""
    (x_train, y_train), (x_val, y_val), _ = load_mnist()
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    data = ((x_train, y_train), (x_val, y_val))
    runs = {}
    for seed in range(args.seeds):
        keras.utils.set_random_seed(seed)
        # One draw per seed: plain and teleport start from the same weights.
        initial_weights = build_model().get_weights()
        for name in args.optimizers:
            for variant, kwargs in variants(args).items():
                keras.utils.set_random_seed(seed)
                run = train_one(name, kwargs, initial_weights, data, args)
                runs.setdefault((name, variant), []).append(run)
                log(
                    f"{name:>8} {variant:>9} seed {seed}: train loss "
                    f"{run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}, val acc "
                    f"{run['val_acc']:.4f}, {run['seconds'][-1]:.1f}s, "
                    f"teleports {run['teleports']} (rejected {run['rejected']})"
                )
    return runs


def _value(run, key):
    return run["losses"][-1] if key == "final_loss" else run[key]


def _fmt(runs, key, digits=4):
    values = [_value(r, key) for r in runs]
    text = f"{np.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {np.std(values):.{digits}f}"
    return text


def summary_rows(runs, args):
    """One row per optimizer: plain vs teleport (and every-N) side by side."""
    header = ["optimizer", "plain train loss", "teleport train loss",
              "plain val acc", "teleport val acc", "teleports"]
    names = list(variants(args))
    extra = [v for v in names if v not in ("plain", "teleport")]
    for v in extra:
        header.insert(header.index("plain val acc"), f"{v} train loss")
        header.insert(header.index("teleports"), f"{v} val acc")
    rows = []
    for name in args.optimizers:
        plain, tele = runs[(name, "plain")], runs[(name, "teleport")]
        row = {
            "optimizer": OPTIMIZERS[name][0],
            "plain train loss": _fmt(plain, "final_loss"),
            "teleport train loss": _fmt(tele, "final_loss"),
            "plain val acc": _fmt(plain, "val_acc"),
            "teleport val acc": _fmt(tele, "val_acc"),
            "teleports": f"{np.mean([r['teleports'] for r in tele]):g}",
        }
        for v in extra:
            other = runs[(name, v)]
            row[f"{v} train loss"] = _fmt(other, "final_loss")
            row[f"{v} val acc"] = _fmt(other, "val_acc")
        rows.append(row)
    return header, rows


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


def plot(runs, args, path):
    """Training loss against epochs and against seconds, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    styles = {"plain": "--", "teleport": "-"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    handles = []
    for i, name in enumerate(args.optimizers):
        color = colors[i % len(colors)]
        handles.append(Line2D([], [], color=color, lw=2,
                              label=OPTIMIZERS[name][0]))
        for variant in variants(args):
            group = runs[(name, variant)]
            losses = np.mean([r["losses"] for r in group], axis=0)
            seconds = np.mean([r["seconds"] for r in group], axis=0)
            style = dict(color=color, linestyle=styles.get(variant, ":"),
                         marker="o", markersize=3)
            axes[0].plot(range(len(losses)), losses, **style)
            axes[1].plot(seconds, losses, **style)
    # Colors name optimizers, line styles name variants: two short legends.
    handles.append(Line2D([], [], linestyle="", label=""))
    for variant in variants(args):
        label = {"plain": "plain",
                 "teleport": "Teleport, steps 0-7"}.get(
            variant, f"Teleport every {args.every}")
        handles.append(Line2D([], [], color="gray",
                              linestyle=styles.get(variant, ":"), label=label))
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training wall-clock (s, first epoch includes tracing)")
    axes[0].set_ylabel("training loss" + (
        "" if args.train_limit else " (full 50k split)"))
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    seeds = f"mean of {args.seeds} seeds" if args.seeds > 1 else "1 seed"
    fig.suptitle(
        f"MNIST, 784-16-10-10 leaky-ReLU MLP, batch {BATCH_SIZE}, {seeds}: "
        "Teleport (solid) vs plain (dashed)"
    )
    fig.legend(handles=handles, loc="center right", fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 0.83, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(runs, args, elapsed):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = summary_rows(runs, args)
    table = markdown_table(header, rows)
    n = args.train_limit or 50000
    note = (f"{args.epochs} epoch(s), {args.seeds} seed(s), {n} training "
            f"examples, batch {BATCH_SIZE}; final full training loss and "
            f"validation accuracy; total {elapsed:.0f}s.")
    (out / "results.md").write_text(f"{table}\n\n{note}\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "variant", "seed", "epoch", "seconds",
                         "train_loss"])
        for (name, variant), group in runs.items():
            for seed, run in enumerate(group):
                for epoch, (s, loss) in enumerate(
                    zip(run["seconds"], run["losses"])
                ):
                    writer.writerow([name, variant, seed, epoch, f"{s:.3f}",
                                     f"{loss:.6f}"])
    plot(runs, args, out / "loss.png")
    return table, note


def main(argv=None):
    """Runs the comparison; returns the output directory."""
    args = parse_args(argv)
    start = time.perf_counter()
    runs = run_all(args)
    table, note = write_outputs(runs, args, time.perf_counter() - start)
    print()
    print(table)
    print()
    print(note)
    print(f"Wrote {args.out}/results.md, results.csv, curves.csv, loss.png")
    return pathlib.Path(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
