"""Runs Teleport under a two-replica MirroredStrategy; prints JSON results.

Run by tests/test_distribute.py in a subprocess: the two logical CPU devices
must be configured before TensorFlow initialises its devices.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_data  # noqa: E402
from conftest import make_mlp  # noqa: E402

from keras_teleport import Teleport  # noqa: E402

# name -> (inner optimizer factory, Teleport keyword arguments)
OPTIMIZERS = {
    "sgd": (lambda: keras.optimizers.SGD(0.05), {}),
    "adam": (lambda: keras.optimizers.Adam(0.01), {}),
    "adam_curvature": (lambda: keras.optimizers.Adam(0.01),
                       {"objective": "max_curvature"}),
}
GLOBAL_BATCH = 16
EVERY = 2


def components(variable):
    """The per-replica values of a (possibly mirrored) Keras variable."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    strategy = tf.distribute.get_strategy()
    return [v.numpy() for v in strategy.experimental_local_results(value)]


def train(name, strategy, x, y):
    with strategy.scope():
        model = make_mlp((4, 6, 5, 3), "relu", use_bias=True)
        factory, kwargs = OPTIMIZERS[name]
        optimizer = Teleport(factory(), every=EVERY, **kwargs)
        model.compile(optimizer=optimizer, loss="mse")
    start = [np.array(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
              verbose=0)
    with strategy.scope():
        weights = [components(v) for v in model.trainable_variables]
        state = [components(v) for v in optimizer.variables]
    return model, optimizer, start, weights, state


def max_spread(per_variable):
    """Largest difference between replicas over all variables."""
    spread = 0.0
    for values in per_variable:
        for other in values[1:]:
            spread = max(spread, float(np.max(np.abs(other - values[0]))))
    return spread


def main():
    assert len(tf.config.list_logical_devices("CPU")) == 2
    x, y = make_data(64)
    results = {}
    for name in OPTIMIZERS:
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        model, optimizer, start, weights, state = train(name, mirrored, x, y)
        single = tf.distribute.get_strategy()  # the default: one device
        s_model, s_optimizer, s_start, s_weights, _ = train(name, single, x,
                                                            y)
        replica_weights = [w[0] for w in weights]
        results[name] = {
            "replicas": mirrored.num_replicas_in_sync,
            "components": min(len(w) for w in weights),
            "teleports": optimizer.teleport_metrics["teleports"],
            "rejected": optimizer.teleport_metrics["rejected"],
            "single_teleports": s_optimizer.teleport_metrics["teleports"],
            "iterations": int(optimizer.iterations.numpy()),
            "weight_spread": max_spread(weights),
            "state_spread": max_spread(state),
            "same_start": max(float(np.max(np.abs(a - b)))
                              for a, b in zip(start, s_start)),
            "moved": max(float(np.max(np.abs(a - b)))
                         for a, b in zip(replica_weights, start)),
            "vs_single": max(
                float(np.max(np.abs(a - b[0])))
                for a, b in zip(replica_weights, s_weights)
            ),
            "weight_scale": max(float(np.max(np.abs(w)))
                                for w in replica_weights),
            "loss_mirrored": float(model.evaluate(x, y, verbose=0)),
            "loss_single": float(s_model.evaluate(x, y, verbose=0)),
        }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
