"""Step-time overhead of the Teleport wrapper, measured side by side.

For each model and inner optimizer X, times `model.fit` with X, with
`Teleport(X)` that never teleports, with a Teleport whose schedule is not due
in the run (the per-step check), with `Teleport(X, every=1, steps=10)`, and
with the same but the general ascent instead of the one specialised for
scaling groups (which these ReLU nets use), interleaving the five over
several repeats, and prints the ratios of the median times to X's. Absolute times on shared machines are noise; the
ratios are the result.

    python benchmarks/overhead.py [--xla] [--repeats 5] [--steps 200]
"""

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_teleport  # noqa: E402
from keras_teleport import objectives  # noqa: E402

MODELS = {  # name: (hidden widths, batch size)
    "paper": ((16, 10), 20),
    "wide": ((1024, 1024), 256),
}
OPTIMIZERS = {
    "SGD": lambda: keras.optimizers.SGD(1e-2),
    "momentum": lambda: keras.optimizers.SGD(1e-3, momentum=0.9),
    "Adagrad": lambda: keras.optimizers.Adagrad(1e-2),
    "RMSprop": lambda: keras.optimizers.RMSprop(1e-4),
    "Adam": lambda: keras.optimizers.Adam(1e-4),
}
VARIANTS = {
    "plain": lambda opt: opt,
    "never": lambda opt: keras_teleport.Teleport(opt),
    # Scheduled but not due within the run: the cost of the per-step check.
    "not due": lambda opt: keras_teleport.Teleport(opt, at_steps=[10**9]),
    "every=1": lambda opt: keras_teleport.Teleport(opt, every=1, steps=10),
    "every=1, general": lambda opt: keras_teleport.Teleport(opt, every=1,
                                                            steps=10),
}


@contextlib.contextmanager
def general_ascent():
    """Builds see the general ascent where they would take the scaling one."""
    fast = objectives.maximize_grad_norm_scaling
    objectives.maximize_grad_norm_scaling = objectives.maximize_grad_norm
    try:
        yield
    finally:
        objectives.maximize_grad_norm_scaling = fast


def build(hidden, optimizer, jit_compile):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((784,))]
    layers += [keras.layers.Dense(h, activation="relu") for h in hidden]
    layers.append(keras.layers.Dense(10))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def dataset(batch, steps):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch * 16, 784)).astype("float32")
    y = rng.integers(0, 10, size=(batch * 16,))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    return data.repeat().take(steps).cache().prefetch(tf.data.AUTOTUNE)


def time_fit(model, data):
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--xla", action="store_true", help="jit_compile=True")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()

    rows = []
    for model_name in args.models.split(","):
        hidden, batch = MODELS[model_name]
        data = dataset(batch, args.steps)
        for opt_name in args.optimizers.split(","):
            models = {
                v: build(hidden, make(OPTIMIZERS[opt_name]()), args.xla)
                for v, make in VARIANTS.items()
            }
            for v, model in models.items():  # build, trace and warm up
                scope = (general_ascent() if v == "every=1, general"
                         else contextlib.nullcontext())
                with scope:
                    model.fit(data.take(5), epochs=1, verbose=0)
            times = {v: [] for v in models}
            for _ in range(args.repeats):
                for v, model in models.items():
                    times[v].append(time_fit(model, data))
            base = statistics.median(times["plain"])
            rows.append(
                (
                    model_name,
                    opt_name,
                    1e3 * base / args.steps,
                    statistics.median(times["never"]) / base,
                    statistics.median(times["not due"]) / base,
                    statistics.median(times["every=1"]) / base,
                    statistics.median(times["every=1, general"]) / base,
                )
            )
            print(rows[-1], flush=True)

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(
        f"\nOverhead on {device}, XLA {'on' if args.xla else 'off'}, "
        f"{args.steps} steps x {args.repeats} repeats (median):\n"
    )
    print("Models: paper = 784-16-10-10 relu, batch 20; "
          "wide = 784-1024-1024-10 relu, batch 256.\n")
    print("| model | optimizer | X ms/step | never / X | scheduled, not due / X "
          "| every=1 / X | every=1, general ascent / X |")
    print("|---|---|---|---|---|---|---|")
    for model_name, opt_name, ms, never, idle, every, general in rows:
        print(f"| {model_name} | {opt_name} | {ms:.2f} | {never:.3f} "
              f"| {idle:.3f} | {every:.3f} | {general:.3f} |")


if __name__ == "__main__":
    main()
