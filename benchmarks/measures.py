"""What each measure of `keras_teleport.measures` costs, in training epochs.

The paper's MLP (784-16-10-10, no biases, leaky_relu(0.1)), measured side
by side in one process, repeats interleaved:

- one training epoch as `examples/mnist_optimizers.py` trains: SGD(1e-2),
  the unshuffled 50k training split, batch 20, `steps_per_execution` as
  given, XLA off (the epoch's data pipeline included; a warm-up epoch that
  traces the train function is excluded);
- each of the five measures at its default settings (10 directions x 6
  radii for the sharpnesses, 10 directions for the curvature, 20 power
  iterations, 20 Hutchinson vectors) on the first `--examples` training
  examples with `batch_size=--batch-size`, on the weights after the
  warm-up epoch. One call each, after a warm-up call. Every call builds and
  traces its own `tf.function`, so each timed call includes its tracing;
  the "100 examples" column (one small batch) shows that fixed part.

Medians over `--repeats`. Absolute times on shared machines are noise; the
ratios of interleaved medians are the result.

    python benchmarks/measures.py [--repeats 5] [--examples 10000]
"""

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_teleport import measures  # noqa: E402
from keras_teleport.datasets import load_mnist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import mnist_optimizers  # noqa: E402

BATCH = 20
SMALL = 100  # examples of the fixed-cost call

MEASURES = {  # name: fn(model, x, y, batch_size), defaults otherwise
    "sharpness (paper)": lambda m, x, y, b: measures.sharpness(
        m, x, y, kind="paper", batch_size=b),
    "sharpness (isotropic)": lambda m, x, y, b: measures.sharpness(
        m, x, y, kind="isotropic", batch_size=b),
    "orbit curvature (data-free)": lambda m, x, y, b: measures.orbit_curvature(
        m),
    "Hessian top eigenvalue": lambda m, x, y, b:
        measures.hessian_top_eigenvalue(m, x, y, batch_size=b),
    "Hessian trace": lambda m, x, y, b: measures.hessian_trace(
        m, x, y, batch_size=b),
}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=10000,
                        help="training examples the measures see")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="batch_size of the measures")
    parser.add_argument("--steps-per-execution", type=int, default=50)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="epoch of the first N examples only (tests)")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # retracing warnings: one per call

    (x, y), _, _ = load_mnist()
    x_measure, y_measure = x[: args.examples], y[: args.examples]
    if args.train_limit:
        x, y = x[: args.train_limit], y[: args.train_limit]
    model = mnist_optimizers.build_model(0)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=args.steps_per_execution,
        jit_compile=False,
    )
    # As the experiment feeds it: unshuffled, batched, prefetched.
    epoch_data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
                  .prefetch(tf.data.AUTOTUNE))

    def epoch():
        model.fit(epoch_data, epochs=1, shuffle=False, verbose=0)

    small = (x_measure[:SMALL], y_measure[:SMALL])
    calls = {name: lambda fn=fn: fn(model, x_measure, y_measure,
                                    args.batch_size)
             for name, fn in MEASURES.items()}
    fixed = {name: lambda fn=fn: fn(model, *small, None)
             for name, fn in MEASURES.items()}

    epoch()  # traces the train function
    for fn in list(calls.values()) + list(fixed.values()):
        fn()  # first calls: one-off graph and kernel setup
    times = {name: [] for name in ["epoch"] + list(calls) + [
        f"{n} small" for n in fixed]}
    for _ in range(args.repeats):
        times["epoch"].append(timed(epoch))
        for name in calls:
            times[name].append(timed(calls[name]))
            times[f"{name} small"].append(timed(fixed[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["epoch"]

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    steps = math.ceil(len(x) / BATCH)
    print(f"\nMeasure cost on {device} ({os.cpu_count()} cores visible); "
          f"epoch = {len(x)} examples, batch {BATCH} ({steps} steps), "
          f"steps_per_execution {args.steps_per_execution}; measures on "
          f"{len(x_measure)} examples, batch_size {args.batch_size}; "
          f"medians of {args.repeats} interleaved repeats.\n")
    print(f"| quantity | seconds | / epoch | seconds on {SMALL} examples "
          "(fixed part) |")
    print("|---|---:|---:|---:|")
    print(f"| training epoch, SGD(1e-2) | {base:.3f} | 1 | — |")
    for name in calls:
        print(f"| {name} | {median[name]:.3f} | {median[name] / base:.3f} "
              f"| {median[f'{name} small']:.3f} |")
    print(f"\nraw: epochs {[round(t, 3) for t in times['epoch']]}")
    return {name: median[name] / base for name in calls}


if __name__ == "__main__":
    main()
