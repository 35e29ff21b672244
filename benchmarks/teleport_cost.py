"""What the paper's data-dependent teleport costs in a `fit` run on real MNIST.

The paper's MLP (784-16-10-10, no biases, leaky_relu(0.1), batch 20),
Adagrad(1e-2) wrapped in `Teleport(group="gl", slots="reset",
teleport_lr=1e-4, steps=10, loss_tolerance=None)` with teleport batches of
200 drawn from the 50k training split. Measured side by side in one process:

(a) One teleport (10 ascent steps on a fresh batch of 200) in units of one
    training step (batch 20, `steps_per_execution` as given):
    - eager: median time of one `opt.teleport_now()` call, after a warm-up
      call that traces and compiles it (includes the Python dispatch of a
      `tf.function` call, so an upper bound on the in-step cost);
    - in-step: `fit` of N steps with a teleport before every step
      (`every=1`) against a plain `fit` of the same N steps, interleaved.
(b) An epoch (2500 steps) containing 8 teleports against a plain epoch, both
    models warmed up, epochs interleaved over `--repeats`, medians; and the
    one-off cost of the first teleporting epoch (tracing the teleport and
    its XLA compile) over the first plain epoch.

From (b) it projects a full run of `--run-epochs` epochs with the paper's 8
teleports over its plain baseline (target <= 1.02), with and without the
one-off compile. Absolute times on shared machines are noise; ratios of
interleaved medians are the result.

    python benchmarks/teleport_cost.py [--repeats 7] [--run-epochs 40]
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

import keras_teleport  # noqa: E402
from keras_teleport.datasets import load_mnist  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import mnist_optimizers  # noqa: E402

BATCH = 20
TELEPORT_BATCH = 200
TELEPORTS_PER_RUN = 8


def build_model(seed=0):
    """The paper's MLP, exactly as the experiment builds it."""
    return mnist_optimizers.build_model(seed)


def compiled(optimizer, steps_per_execution):
    model = build_model()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
        jit_compile=False,
    )
    return model


def teleporting(steps_per_execution, x, y, **schedule):
    """A compiled model whose optimizer is the paper's Adagrad teleport."""
    optimizer = keras_teleport.Teleport(
        keras.optimizers.Adagrad(1e-2), group="gl", slots="reset",
        teleport_lr=1e-4, steps=10, loss_tolerance=None, **schedule,
    )
    model = compiled(optimizer, steps_per_execution)
    optimizer.build(model.trainable_variables, model=model)
    optimizer.set_teleport_data(x, y, batch_size=TELEPORT_BATCH, seed=0)
    return model, optimizer


def time_fit(model, data):
    start = time.perf_counter()
    model.fit(data, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--run-epochs", type=int, default=40,
                        help="length of the run to project the cost onto")
    parser.add_argument("--in-step-steps", type=int, default=200,
                        help="N for the every=1 measurement")
    parser.add_argument("--teleport-calls", type=int, default=20)
    parser.add_argument("--steps-per-execution", type=int, default=50)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use the first N training examples (tests)")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # retracing warnings: one model each

    (x, y), _, _ = load_mnist()
    if args.train_limit:
        x, y = x[: args.train_limit], y[: args.train_limit]
    spe = math.ceil(len(x) / BATCH)
    epoch_data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
                  .cache().prefetch(tf.data.AUTOTUNE))
    n = args.in_step_steps
    short = epoch_data.repeat().take(n)
    spx = args.steps_per_execution

    # (b) first: fresh models, so the first epochs show the one-off costs.
    plain = compiled(keras.optimizers.Adagrad(1e-2), spx)
    # 8 teleports in every epoch: steps k*spe + 0..7 (the one at k*spe runs
    # at the end of epoch k-1, after its last step).
    tele, tele_opt = teleporting(
        spx, x, y, at_steps=[k * spe + i for k in range(args.repeats + 2)
                             for i in range(TELEPORTS_PER_RUN)])
    first_plain = time_fit(plain, epoch_data)
    first_tele = time_fit(tele, epoch_data)
    epochs = {"plain": [], "teleport": []}
    for _ in range(args.repeats):
        epochs["plain"].append(time_fit(plain, epoch_data))
        epochs["teleport"].append(time_fit(tele, epoch_data))
    made = tele_opt.teleport_metrics["teleports"]
    expected = TELEPORTS_PER_RUN * (args.repeats + 1)
    if made + tele_opt.teleport_metrics["rejected"] != expected:
        raise RuntimeError(f"expected {expected} teleports, saw {made}")

    # (a) one teleport, eagerly and in the step.
    step_model = compiled(keras.optimizers.Adagrad(1e-2), spx)
    every, every_opt = teleporting(spx, x, y, every=1)
    for model in (step_model, every):  # trace, compile, warm up
        model.fit(short.take(2 * spx), epochs=1, shuffle=False, verbose=0)
    fits = {"plain": [], "every=1": []}
    for _ in range(args.repeats):
        fits["plain"].append(time_fit(step_model, short))
        fits["every=1"].append(time_fit(every, short))
    _, now_opt = teleporting(spx, x, y, at_steps=[0])
    now_opt.teleport_now()  # traces and compiles
    calls = []
    for _ in range(args.teleport_calls):
        start = time.perf_counter()
        now_opt.teleport_now()
        calls.append(time.perf_counter() - start)

    step = statistics.median(fits["plain"]) / n
    eager = statistics.median(calls)
    in_step = (statistics.median(fits["every=1"])
               - statistics.median(fits["plain"])) / n
    epoch_plain = statistics.median(epochs["plain"])
    epoch_tele = statistics.median(epochs["teleport"])
    extra = epoch_tele - epoch_plain  # 8 teleports
    one_off = first_tele - first_plain - extra
    run = args.run_epochs * epoch_plain
    projected = (run + extra) / run
    projected_compile = (run + extra + one_off) / run

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"\nTeleport cost on {device} ({os.cpu_count()} cores visible), "
          f"MNIST {len(x)} examples, batch {BATCH}, steps_per_execution "
          f"{spx}, XLA off for the step (and for the ascent on CPU); "
          f"medians of {args.repeats} interleaved repeats.\n")
    rows = [
        ("train step (batch 20), plain fit", f"{1e3 * step:.3f} ms", "1"),
        ("one teleport, `teleport_now()` (eager call)",
         f"{1e3 * eager:.2f} ms", f"{eager / step:.0f} steps"),
        (f"one teleport, in the step (every=1 fit of {n} steps - plain)",
         f"{1e3 * in_step:.2f} ms", f"{in_step / step:.0f} steps"),
        (f"plain epoch ({spe} steps)", f"{epoch_plain:.3f} s", "1"),
        (f"epoch with {TELEPORTS_PER_RUN} teleports",
         f"{epoch_tele:.3f} s", f"{epoch_tele / epoch_plain:.3f}"),
        (f"  so one teleport (epoch extra / {TELEPORTS_PER_RUN})",
         f"{1e3 * extra / TELEPORTS_PER_RUN:.2f} ms",
         f"{extra / TELEPORTS_PER_RUN / step:.0f} steps"),
        ("one-off: first teleporting epoch - first plain epoch - the above",
         f"{one_off:.2f} s", f"{one_off / epoch_plain:.1f} epochs"),
        (f"projected {args.run_epochs}-epoch run with {TELEPORTS_PER_RUN} "
         "teleports / plain, compile excluded (target <= 1.02)",
         f"{run + extra:.1f} s / {run:.1f} s", f"**{projected:.4f}**"),
        (f"projected {args.run_epochs}-epoch run / plain, one-off compile "
         "included", f"{run + extra + one_off:.1f} s / {run:.1f} s",
         f"**{projected_compile:.4f}**"),
    ]
    print("| quantity | time | ratio |")
    print("|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nraw: plain epochs {[round(t, 3) for t in epochs['plain']]}, "
          f"teleport epochs {[round(t, 3) for t in epochs['teleport']]}, "
          f"first epochs {first_plain:.2f} s / {first_tele:.2f} s, "
          f"teleports made {made} (rejected "
          f"{tele_opt.teleport_metrics['rejected']}).")
    return {"step": step, "eager": eager, "in_step": in_step,
            "epoch_ratio": epoch_tele / epoch_plain, "projected": projected,
            "projected_compile": projected_compile}


if __name__ == "__main__":
    main()
