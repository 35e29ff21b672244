"""Shared builders and independent reference computations for the tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Optimizer variants: name -> factory(learning_rate).
OPTIMIZERS = {
    "sgd": lambda lr: keras.optimizers.SGD(lr),
    "sgd_momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "sgd_nesterov": lambda lr: keras.optimizers.SGD(
        lr, momentum=0.9, nesterov=True
    ),
    "adagrad": lambda lr: keras.optimizers.Adagrad(lr),
    "rmsprop": lambda lr: keras.optimizers.RMSprop(lr),
    "rmsprop_momentum": lambda lr: keras.optimizers.RMSprop(lr, momentum=0.9),
    "rmsprop_centered": lambda lr: keras.optimizers.RMSprop(lr, centered=True),
    "adam": lambda lr: keras.optimizers.Adam(lr),
    "adam_amsgrad": lambda lr: keras.optimizers.Adam(lr, amsgrad=True),
}

# The four optimizer families, in their plain form.
BASE_OPTIMIZERS = ["adagrad", "adam", "rmsprop", "sgd"]

# compile() keyword arguments of each execution mode.
MODES = {
    "graph": dict(run_eagerly=False, jit_compile=False),
    "eager": dict(run_eagerly=True, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


@pytest.fixture(params=sorted(OPTIMIZERS))
def optimizer_name(request):
    return request.param


@pytest.fixture(params=sorted(MODES))
def mode(request):
    return request.param


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends with the float32 global policy."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


# Models ------------------------------------------------------------------


def dense(units, activation=None, use_bias=True, seed=0, **kwargs):
    """A Dense layer with a random (non-zero) bias, so biases are moved."""
    return keras.layers.Dense(
        units,
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        bias_initializer=keras.initializers.RandomUniform(-0.5, 0.5, seed=seed + 1000),
        **kwargs,
    )


def make_mlp(
    widths=(4, 6, 5, 3),
    activation="relu",
    use_bias=True,
    functional=False,
    seed=0,
):
    """MLP `widths[0] -> ... -> widths[-1]`, `activation` on hidden layers."""
    layers = [
        dense(w, activation, use_bias, seed=seed + 10 * i)
        for i, w in enumerate(widths[1:-1])
    ]
    layers.append(dense(widths[-1], None, use_bias, seed=seed + 999))
    if not functional:
        return keras.Sequential([keras.Input((widths[0],))] + layers)
    x = inputs = keras.Input((widths[0],))
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def make_data(n=16, in_dim=4, out_dim=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_dim)).astype("float32")
    y = rng.normal(size=(n, out_dim)).astype("float32")
    return x, y


def weights_numpy(model):
    return [np.array(w.numpy()) for w in model.trainable_weights]


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def assert_outputs_close(actual, expected, rtol=1e-5, atol=0.0):
    """Closeness relative to the largest output magnitude (or `atol`)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=max(rtol * scale, atol))


# Independent math ---------------------------------------------------------


def expm_np(m):
    """Matrix exponential by scaling and squaring of a Taylor series."""
    m = np.asarray(m, dtype=np.float64)
    norm = np.max(np.sum(np.abs(m), axis=1)) if m.size else 0.0
    squarings = max(0, int(np.ceil(np.log2(norm))) + 1) if norm > 0.5 else 0
    a = m / 2.0**squarings
    result = np.eye(m.shape[0])
    term = np.eye(m.shape[0])
    for k in range(1, 30):
        term = term @ a / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result


def relu_np(x):
    return np.maximum(x, 0.0)


def leaky_relu_np(x, slope=0.2):
    return np.where(x >= 0, x, slope * x)


ACTIVATIONS_NP = {
    "relu": relu_np,
    "leaky_relu": leaky_relu_np,
    "linear": lambda x: x,
}


def mlp_forward_np(weights, activation, use_bias, x):
    """Numpy forward pass of `make_mlp` given its trainable weights."""
    act = ACTIVATIONS_NP[activation]
    step = 2 if use_bias else 1
    kernels = weights[::step]
    biases = weights[1::2] if use_bias else [None] * len(kernels)
    h = np.asarray(x, np.float64)
    for i, (k, b) in enumerate(zip(kernels, biases)):
        h = h @ k
        if b is not None:
            h = h + b
        if i < len(kernels) - 1:
            h = act(h)
    return h


def abs_forward_np(weights, use_bias, x):
    """The forward pass on absolute values: bounds every partial sum of the
    float32 forward pass (relu, leaky_relu and linear have |s(t)| <= |t|)."""
    return mlp_forward_np([np.abs(w) for w in weights], "linear", use_bias,
                          np.abs(x))


def float32_error_bound(weights, use_bias, x, factor=32):
    """A bound on the float32 rounding error of the MLP's outputs."""
    return factor * np.finfo(np.float32).eps * float(
        np.max(abs_forward_np(weights, use_bias, x)))


def tape_gradients(model, weights, x, y, loss_fn=None):
    """Gradient of the mean squared error at `weights` (numpy arrays)."""
    loss_fn = loss_fn or keras.losses.MeanSquaredError()
    values = [tf.constant(w) for w in weights]
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = model.stateless_call(
            values, [v.value for v in model.non_trainable_weights], x
        )[0]
        loss = loss_fn(y, out)
    return [g.numpy() for g in tape.gradient(loss, values)]


def load_example(name):
    """Imports examples/<name>.py, skipping when MNIST cannot be had."""
    import importlib.util
    import pathlib

    import pytest

    from keras_teleport import datasets

    try:
        datasets.load_mnist()
    except RuntimeError as error:
        pytest.skip(f"MNIST unavailable offline: {error}")
    path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
