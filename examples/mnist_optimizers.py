"""The paper's optimizer experiment (Zhao et al., ICLR 2024, Fig. 5) with `model.fit`.

Setup, as in the paper: real MNIST (the classic unshuffled 50k training
split), a 784-16-10-10 MLP without biases, leaky_relu(0.1) between the
layers, weights from U(+-1/sqrt(fan_in)), cross-entropy on logits, batch 20.
Five optimizers at the paper's learning rates (base 1e-2): SGD 1e-2, SGD with
momentum 0.9 at 1e-3, Adagrad 1e-2, RMSprop 1e-4, Adam 1e-4.

The teleport schedule is the paper's: the first 8 mini-batches of one epoch
(epoch 2 for SGD and Adagrad with `teleport_lr=1e-4`, epoch 0 for momentum,
RMSprop and Adam with `teleport_lr=5e-2`; epoch 0 if the run is shorter), 10
ascent steps each on a fresh batch of 200 training examples, with the
paper's data-dependent GL(16) x GL(10) action. Variants per optimizer, all
from the same initial weights (per seed):

- `plain`: the bare optimizer.
- `teleport`: the paper's reference, data-dependent GL with the inner
  optimizer's state reset after each teleport (`slots="reset"`).
- `reset-only`: the control: the same resets at the same steps, no move
  (`objective="none"`). A reset alone changes the trajectory (an Adagrad
  accumulator reset is a learning-rate boost), so `teleport` should be
  judged against it as well as against `plain`.
- `transport`: data-dependent GL, the state transported instead of reset.
- `scaling`: exact positive rescaling of the hidden units (no data needed),
  state transported, `teleport_lr=0.05`.
- `both`: the two groups together: `scaling`'s exact teleports wrapped
  around `teleport`'s data-dependent GL ones, at the same steps (a Teleport
  around a Teleport).

Each epoch records the loss on the whole training split (evaluated at the
epoch's end, and before training) and the cumulative training wall-clock
(`fit` time, evaluation excluded; it includes tracing and the one-off XLA
compile of the teleport ascent). At the end: validation loss and accuracy,
`teleport_metrics`, and the time teleports take, timed after training by
calling `opt.teleport_now()` on the run's own optimizer (median of 5 calls
after a warm-up, times the number of teleports made; eager calls, so a
slight over-estimate of the in-step cost). The extra wall-clock over the
plain run is reported too, noisy on a shared machine.

Writes `loss.png`, `results.md`, `results.csv` (the summary) and
`curves.csv` (every epoch of every run) to `--out`.

Usage:

    python examples/mnist_optimizers.py                        # 3 epochs
    python examples/mnist_optimizers.py --epochs 40 --seeds 5  # the paper's

Seeds can run in separate jobs and be merged (every run is kept in
`runs.json`): `--first-seed 1 --out runs/s1`, then
`--merge runs/s0 runs/s1 --out runs/all`.
"""

import argparse
import csv
import json
import math
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_teleport  # noqa: E402
from keras_teleport.datasets import load_mnist  # noqa: E402

# name -> (label, factory, teleport epoch, teleport_lr): the paper's values.
OPTIMIZERS = {
    "sgd": ("SGD(1e-2)", lambda: keras.optimizers.SGD(1e-2), 2, 1e-4),
    "momentum": (
        "SGD(1e-3, momentum=0.9)",
        lambda: keras.optimizers.SGD(1e-3, momentum=0.9), 0, 5e-2,
    ),
    "adagrad": ("Adagrad(1e-2)", lambda: keras.optimizers.Adagrad(1e-2), 2,
                1e-4),
    "rmsprop": ("RMSprop(1e-4)", lambda: keras.optimizers.RMSprop(1e-4), 0,
                5e-2),
    "adam": ("Adam(1e-4)", lambda: keras.optimizers.Adam(1e-4), 0, 5e-2),
}
VARIANTS = ("plain", "teleport", "reset-only", "transport", "scaling", "both")
# Variants that need teleport batches (the data-dependent action).
DATA_VARIANTS = ("teleport", "reset-only", "transport", "both")
BATCH_SIZE = 20
TELEPORTS = 8  # the first 8 mini-batches of the teleport epoch
ASCENT_STEPS = 10
TELEPORT_BATCH = 200
SCALING_LR = 0.05  # keras_teleport.Teleport's default
EVAL_BATCH = 10000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per variant, seeds F..F+N-1 (averaged)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="F, the first seed")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="train nothing: merge the runs.json of earlier "
                             "--out folders (same epochs) into --out")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma list from {list(OPTIMIZERS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list from {list(VARIANTS)}")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on the first N training examples only")
    parser.add_argument("--out", default="runs/mnist_optimizers")
    parser.add_argument("--steps-per-execution", type=int, default=50)
    parser.add_argument("--scaling-lr", type=float, default=SCALING_LR,
                        help="teleport_lr of the `scaling` variant")
    args = parser.parse_args(argv)
    for kind, known in (("optimizers", OPTIMIZERS), ("variants", VARIANTS)):
        chosen = [v.strip() for v in getattr(args, kind).split(",") if v.strip()]
        unknown = [v for v in chosen if v not in known]
        if unknown or not chosen:
            parser.error(f"--{kind}: unknown or empty {unknown or chosen}; "
                         f"choose from {list(known)}")
        # Keep the canonical order, whatever the command line's.
        setattr(args, kind, [v for v in known if v in chosen])
    if not args.scaling_lr > 0:
        parser.error("--scaling-lr must be > 0")
    if args.first_seed < 0:
        parser.error("--first-seed must be >= 0")
    if args.epochs < 1 or args.seeds < 1 or args.steps_per_execution < 1:
        parser.error("--epochs, --seeds and --steps-per-execution must be >= 1")
    if args.train_limit is not None and not (
        TELEPORT_BATCH <= args.train_limit <= 50000
    ):
        parser.error(f"--train-limit must be in [{TELEPORT_BATCH}, 50000]")
    return args


def build_model(seed):
    """The paper's 784-16-10-10 MLP, no biases, leaky_relu(0.1) junctions.

    Separate `LeakyReLU` layers, so the data-dependent action and
    `find_symmetries` see the activation between the kernels.
    """
    def uniform(fan_in, layer):
        limit = 1.0 / math.sqrt(fan_in)
        return keras.initializers.RandomUniform(-limit, limit,
                                                seed=1000 * seed + layer)

    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(16, use_bias=False,
                               kernel_initializer=uniform(784, 0)),
            keras.layers.LeakyReLU(negative_slope=0.1),
            keras.layers.Dense(10, use_bias=False,
                               kernel_initializer=uniform(16, 1)),
            keras.layers.LeakyReLU(negative_slope=0.1),
            keras.layers.Dense(10, use_bias=False,
                               kernel_initializer=uniform(10, 2)),
        ],
        name="mlp_784_16_10_10",
    )


def teleport_epoch(name, epochs):
    """The paper's teleport epoch for `name`, or 0 if the run is shorter."""
    epoch = OPTIMIZERS[name][2]
    return epoch if epoch < epochs else 0


def make_optimizer(name, variant, steps_per_epoch, epochs,
                   scaling_lr=SCALING_LR):
    """The optimizer of one run: the bare one or a `Teleport` around it."""
    inner = OPTIMIZERS[name][1]()
    if variant == "plain":
        return inner
    start = teleport_epoch(name, epochs) * steps_per_epoch
    at_steps = [start + i for i in range(TELEPORTS)]
    scaling = dict(group="scaling", slots="transport", at_steps=at_steps,
                   teleport_lr=scaling_lr, steps=ASCENT_STEPS)
    if variant == "scaling":
        return keras_teleport.Teleport(inner, **scaling)
    kwargs = dict(group="gl", at_steps=at_steps, steps=ASCENT_STEPS,
                  teleport_lr=OPTIMIZERS[name][3], loss_tolerance=None)
    if variant == "teleport":
        return keras_teleport.Teleport(inner, slots="reset", **kwargs)
    if variant == "both":
        return keras_teleport.Teleport(
            keras_teleport.Teleport(inner, slots="reset", **kwargs), **scaling)
    if variant == "reset-only":
        return keras_teleport.Teleport(inner, objective="none", slots="reset",
                                       **kwargs)
    if variant == "transport":
        return keras_teleport.Teleport(inner, slots="transport", **kwargs)
    raise ValueError(f"unknown variant {variant!r}")


class EpochRecorder(keras.callbacks.Callback):
    """Full training loss and cumulative training seconds at each epoch end.

    Seconds run from `start` (set just before `fit`) and exclude the time
    this callback spends evaluating.
    """

    def __init__(self, evaluate):
        super().__init__()
        self.evaluate = evaluate
        self.start = None
        self.excluded = 0.0
        self.seconds, self.losses = [], []

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.seconds.append(now - self.start - self.excluded)
        self.losses.append(self.evaluate())
        self.excluded += time.perf_counter() - now


def time_teleport(optimizer, repeats=5):
    """Median seconds of one `teleport_now()` after a warm-up call, or None.

    Run after training: it moves the weights and resets or transports state.
    Times the data-dependent teleport (the inner one under `both`).
    """
    while optimizer.group != "gl":  # scaling runs inside the step: no handle
        optimizer = optimizer.inner_optimizer
        if not isinstance(optimizer, keras_teleport.Teleport):
            return None
    optimizer.teleport_now()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.teleport_now()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_one(name, variant, seed, data, args):
    """Trains one model; returns its loss curve, timings and final metrics."""
    (x_train, y_train), (x_val, y_val) = data
    keras.utils.set_random_seed(seed)
    model = build_model(seed)
    steps_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    optimizer = make_optimizer(name, variant, steps_per_epoch, args.epochs,
                               args.scaling_lr)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
        steps_per_execution=args.steps_per_execution,
        jit_compile=False,  # on CPU, XLA is slower for this tiny net
    )

    def train_loss():
        return float(model.evaluate(x_train, y_train, batch_size=EVAL_BATCH,
                                    verbose=0, return_dict=True)["loss"])

    # Unshuffled, as in the paper: every run sees the same batch sequence.
    train = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .batch(BATCH_SIZE)
        .prefetch(tf.data.AUTOTUNE)
    )
    recorder = EpochRecorder(train_loss)
    # The recorder first, so the step-0 teleport of TeleportData counts.
    callbacks = [recorder]
    if variant in DATA_VARIANTS:
        callbacks.append(keras_teleport.TeleportData(
            x_train, y_train, batch_size=TELEPORT_BATCH, seed=seed))
    initial = train_loss()
    recorder.start = time.perf_counter()
    model.fit(train, epochs=args.epochs, shuffle=False, verbose=0,
              callbacks=callbacks)
    val = model.evaluate(x_val, y_val, batch_size=EVAL_BATCH, verbose=0,
                         return_dict=True)
    counts = {"teleports": 0, "rejected": 0}
    teleport_seconds = None
    if variant != "plain":
        nested = optimizer
        while isinstance(nested, keras_teleport.Teleport):
            for key in counts:
                counts[key] += nested.teleport_metrics[key]
            nested = nested.inner_optimizer
        one = time_teleport(optimizer)
        if one is not None:
            gl = optimizer if optimizer.group == "gl" else optimizer.inner_optimizer
            teleport_seconds = one * gl.teleport_metrics["teleports"]
    return {
        "seed": seed,
        "losses": [initial] + recorder.losses,
        "seconds": [0.0] + recorder.seconds,
        "val_loss": float(val["loss"]),
        "val_acc": float(val["acc"]),
        "teleports": counts["teleports"],
        "rejected": counts["rejected"],
        "teleport_seconds": teleport_seconds,
    }


def run_all(args, log=print):
    """Every (optimizer, variant, seed) run: `{(opt, variant): [run, ...]}`."""
    (x_train, y_train), (x_val, y_val), _ = load_mnist()
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    data = ((x_train, y_train), (x_val, y_val))
    runs = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in args.optimizers:
            for variant in args.variants:
                run = train_one(name, variant, seed, data, args)
                runs.setdefault((name, variant), []).append(run)
                log(
                    f"{name:>8} {variant:>10} seed {seed}: train loss "
                    f"{run['losses'][0]:.4f} -> {run['losses'][-1]:.4f}, val "
                    f"acc {run['val_acc']:.4f}, {run['seconds'][-1]:.1f}s, "
                    f"teleports {run['teleports']} (rejected "
                    f"{run['rejected']})", flush=True,
                )
    return runs


# Summaries ------------------------------------------------------------------


def mean_curve(group):
    """(mean losses, min losses, max losses, mean seconds) over seeds."""
    losses = np.array([r["losses"] for r in group])
    seconds = np.array([r["seconds"] for r in group])
    return losses.mean(0), losses.min(0), losses.max(0), seconds.mean(0)


def time_to_reach(losses, seconds, target):
    """(epochs, seconds) at which the curve first reaches `target`.

    Interpolated linearly in log-loss between epoch ends; None if never.
    """
    for e in range(len(losses)):
        if losses[e] <= target:
            if e == 0:
                return 0.0, 0.0
            hi, lo = math.log(losses[e - 1]), math.log(losses[e])
            frac = 1.0 if hi == lo else (hi - math.log(target)) / (hi - lo)
            frac = min(max(frac, 0.0), 1.0)
            return (e - 1 + frac,
                    seconds[e - 1] + frac * (seconds[e] - seconds[e - 1]))
    return None


def report_epochs(epochs):
    """The epochs the table reports: 1, the middle one and the last."""
    return sorted({1, max(1, (epochs + 1) // 2), epochs})


def _mean(runs, key):
    values = [r[key] for r in runs if r[key] is not None]
    return float(np.mean(values)) if values else None


def summary_rows(runs, args):
    epochs = report_epochs(args.epochs)
    header = (["optimizer", "variant"]
              + [f"train loss @{e}" for e in epochs]
              + ["val loss", "val acc", "epochs to plain's final loss",
                 "seconds to plain's final loss", "teleports (rejected)",
                 "teleport s (timed)", "extra s vs plain"])
    rows = []
    for name in args.optimizers:
        plain = runs.get((name, "plain"))
        for variant in args.variants:
            group = runs[(name, variant)]
            losses, _, _, seconds = mean_curve(group)
            row = {"optimizer": OPTIMIZERS[name][0], "variant": variant}
            for e in epochs:
                row[f"train loss @{e}"] = f"{losses[e]:.4f}"
            row["val loss"] = f"{_mean(group, 'val_loss'):.4f}"
            row["val acc"] = f"{_mean(group, 'val_acc'):.4f}"
            reach = extra = None
            if plain is not None:
                plain_losses, _, _, plain_seconds = mean_curve(plain)
                reach = time_to_reach(losses, seconds, plain_losses[-1])
                extra = seconds[-1] - plain_seconds[-1]
            row["epochs to plain's final loss"] = (
                "—" if reach is None else f"{reach[0]:.1f}")
            row["seconds to plain's final loss"] = (
                "—" if reach is None else f"{reach[1]:.1f}")
            if variant == "plain":
                row["teleports (rejected)"] = "—"
                row["teleport s (timed)"] = "—"
                row["extra s vs plain"] = "—"
            else:
                row["teleports (rejected)"] = (
                    f"{_mean(group, 'teleports'):g} "
                    f"({_mean(group, 'rejected'):g})")
                timed = _mean(group, "teleport_seconds")
                row["teleport s (timed)"] = (
                    "in-step" if timed is None else f"{timed:.3f}")
                row["extra s vs plain"] = (
                    "—" if extra is None else f"{extra:+.1f}")
            rows.append(row)
    return header, rows


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines)


# Line style (and marker) per variant; one color per optimizer.
STYLES = {
    "plain": dict(linestyle=":"),
    "teleport": dict(linestyle="-"),
    "reset-only": dict(linestyle="--"),
    "transport": dict(linestyle="-."),
    "scaling": dict(linestyle=(0, (5, 1.5, 1, 1.5, 1, 1.5)), marker="x",
                    markersize=4),
    "both": dict(linestyle="-", marker="o", markersize=3),
}


def plot(runs, args, path):
    """Training loss against epochs and against seconds: mean, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    handles = []
    for i, name in enumerate(args.optimizers):
        color = colors[i % len(colors)]
        handles.append(Line2D([], [], color=color, lw=2,
                              label=OPTIMIZERS[name][0]))
        for variant in args.variants:
            losses, low, high, seconds = mean_curve(runs[(name, variant)])
            style = dict(color=color, lw=1.4, **STYLES[variant])
            epochs = np.arange(len(losses))
            axes[0].plot(epochs, losses, **style)
            axes[1].plot(seconds, losses, **style)
            if args.seeds > 1:
                axes[0].fill_between(epochs, low, high, color=color,
                                     alpha=0.08, lw=0)
                axes[1].fill_between(seconds, low, high, color=color,
                                     alpha=0.08, lw=0)
    handles.append(Line2D([], [], linestyle="", label=""))
    for variant in args.variants:
        handles.append(Line2D([], [], color="gray", lw=1.4, label=variant,
                              **STYLES[variant]))
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training wall-clock, s (fit only; includes tracing "
                       "and the teleport's one-off compile)")
    n = args.train_limit or 50000
    axes[0].set_ylabel(f"training loss, all {n} examples (clipped)")
    # Diverging runs would squeeze the others: clip above the initial loss.
    curves = np.array([r["losses"] for g in runs.values() for r in g])
    finite = curves[np.isfinite(curves)]
    start = float(np.nanmax(curves[:, 0]))
    for ax in axes:
        ax.set_yscale("log")
        ax.set_ylim(0.95 * float(finite.min()), 1.1 * start)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    seeds = (f"mean of {args.seeds} seeds, min-max band" if args.seeds > 1
             else "1 seed")
    fig.suptitle(
        f"MNIST, 784-16-10-10 leaky-ReLU MLP, batch {BATCH_SIZE}, {seeds}; "
        f"{TELEPORTS} teleports at the start of one epoch"
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
    schedule = "; ".join(
        f"{OPTIMIZERS[o][0]}: epoch {teleport_epoch(o, args.epochs)}, "
        f"teleport_lr {OPTIMIZERS[o][3]:g}" for o in args.optimizers)
    note = (
        f"{args.epochs} epoch(s), {args.seeds} seed(s) (means), {n} training "
        f"examples, batch {BATCH_SIZE}, steps_per_execution "
        f"{args.steps_per_execution}; total {elapsed:.0f}s.\n\n"
        f"Train loss: on all {n} training examples at the end of that epoch. "
        "Epochs/seconds to plain's final loss: when the run first reaches "
        "the final training loss of the plain run of the same optimizer "
        "(interpolated between epoch ends; — if never). Seconds: fit "
        "wall-clock, evaluation excluded, tracing and the teleport's one-off "
        "compile included. Teleport s (timed): teleports made x median "
        "time of one `opt.teleport_now()` call, timed after training (eager "
        "calls of the compiled teleport; `in-step` for scaling, which runs "
        "inside the train step). Extra s vs plain: final wall-clock minus "
        "the plain run's (noisy on a shared machine).\n\n"
        f"Teleports: data-dependent GL, {ASCENT_STEPS} ascent steps on a "
        f"fresh batch of {TELEPORT_BATCH}, before each of the first "
        f"{TELEPORTS} mini-batches of the teleport epoch ({schedule}); "
        f"scaling: teleport_lr {args.scaling_lr:g}, same steps; both: "
        "scaling's teleports around the data-dependent ones (teleports "
        "counts both)."
    )
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
            for run in group:
                seed = run["seed"]
                for epoch, (s, loss) in enumerate(
                    zip(run["seconds"], run["losses"])
                ):
                    writer.writerow([name, variant, seed, epoch, f"{s:.3f}",
                                     f"{loss:.6f}"])
    plot(runs, args, out / "loss.png")
    return table, note


def save_runs(runs, path):
    with open(path, "w") as f:
        json.dump([{"optimizer": name, "variant": variant, "runs": group}
                   for (name, variant), group in runs.items()], f)


def merge_runs(folders, args):
    """The runs of earlier `--out` folders, with `args` set to match them."""
    runs = {}
    for folder in folders:
        with open(pathlib.Path(folder) / "runs.json") as f:
            for entry in json.load(f):
                key = (entry["optimizer"], entry["variant"])
                runs.setdefault(key, []).extend(entry["runs"])
    epochs = {len(r["losses"]) - 1 for group in runs.values() for r in group}
    sizes = {len(group) for group in runs.values()}
    if len(epochs) != 1 or len(sizes) != 1:
        raise SystemExit(f"--merge: runs differ in epochs {sorted(epochs)} or "
                         f"in seeds per variant {sorted(sizes)}")
    args.epochs, args.seeds = epochs.pop(), sizes.pop()
    args.optimizers = [o for o in OPTIMIZERS if any(k[0] == o for k in runs)]
    args.variants = [v for v in VARIANTS if any(k[1] == v for k in runs)]
    missing = [(o, v) for o in args.optimizers for v in args.variants
               if (o, v) not in runs]
    if missing:
        raise SystemExit(f"--merge: no runs for {missing}")
    return runs


def main(argv=None):
    """Runs the experiment; returns the output directory."""
    args = parse_args(argv)
    # Every run builds its own model and train function: TensorFlow's
    # "retracing" warnings count those across runs and are false alarms here.
    tf.get_logger().setLevel("ERROR")
    start = time.perf_counter()
    runs = merge_runs(args.merge, args) if args.merge else run_all(args)
    table, note = write_outputs(runs, args, time.perf_counter() - start)
    save_runs(runs, pathlib.Path(args.out) / "runs.json")
    print()
    print(table)
    print()
    print(note)
    print(f"\nWrote {args.out}/loss.png, results.md, results.csv, curves.csv, "
          "runs.json")
    return pathlib.Path(args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
