"""Teleports move the weights but never the function the model computes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import BASE_OPTIMIZERS
from conftest import MODES
from conftest import OPTIMIZERS
from conftest import assert_outputs_close
from conftest import float32_error_bound
from conftest import make_data
from conftest import make_mlp
from conftest import mlp_forward_np
from conftest import weights_numpy
from keras_teleport import SymmetricDensePair
from keras_teleport import Teleport

TELEPORTS = 3


def fit_with_teleports_only(model, optimizer, mode, x, y, teleports=TELEPORTS):
    """Compiles with `optimizer` (inner lr 0) and teleports `teleports` times."""
    model.compile(optimizer=optimizer, loss="mse", **MODES[mode])
    # One epoch of `teleports` batches (the same batch repeated).
    model.fit(np.concatenate([x] * teleports), np.concatenate([y] * teleports),
              batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def assert_teleported(optimizer):
    """Every step attempted a teleport (every=1). Consecutive teleports
    share one growth cap, so later ones of the burst may be rejected."""
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] + metrics["rejected"] == TELEPORTS, metrics
    assert metrics["teleports"] >= 1, metrics


def assert_moved(before, after, min_change=1e-2):
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(before, after))
    assert change > min_change, f"teleports did not move the weights ({change})"


def assert_scaling_structure(before, after, use_bias, rtol=1e-4):
    """Each junction's hidden unit j moved as K1[:, j] d_j, b1[j] d_j,
    K2[j, :] / d_j with d_j > 0 (a positive diagonal group element)."""
    step = 2 if use_bias else 1
    kernels_b, kernels_a = before[::step], after[::step]

    def close(actual, expected):
        np.testing.assert_allclose(
            actual, expected, rtol=0,
            atol=rtol * max(np.max(np.abs(expected)), 1e-6))

    prev = np.ones(kernels_b[0].shape[0])
    for i in range(len(kernels_b) - 1):
        # Undo the previous junction's 1/d on the rows, then read off d.
        unscaled = kernels_a[i] * prev[:, None]
        d = np.sum(unscaled * kernels_b[i], axis=0) / np.sum(
            kernels_b[i] ** 2, axis=0)
        assert np.all(d > 0), d
        close(unscaled, kernels_b[i] * d[None, :])
        if use_bias:
            close(after[2 * i + 1], before[2 * i + 1] * d)
        prev = d
    close(kernels_a[-1] * prev[:, None], kernels_b[-1])
    if use_bias:  # the output bias is never moved
        np.testing.assert_array_equal(after[-1], before[-1])


def teleport_in_custom_loop(model, optimizer, x, y, teleports=TELEPORTS):
    """Eager custom loop: `optimizer.build(..., model=model)`, then apply."""
    optimizer.build(model.trainable_variables, model=model)
    loss_fn = keras.losses.MeanSquaredError()
    for _ in range(teleports):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)


def check_invariance(optimizer_name, mode):
    keras.utils.set_random_seed(0)
    model = make_mlp((4, 6, 5, 3), "relu", use_bias=True)
    x, y = make_data(16)
    before_w = weights_numpy(model)
    before = model.predict(x, verbose=0)
    optimizer = Teleport(OPTIMIZERS[optimizer_name](0.0), every=1)
    fit_with_teleports_only(model, optimizer, mode, x, y)
    assert_teleported(optimizer)
    assert int(optimizer.iterations.numpy()) == TELEPORTS
    after_w = weights_numpy(model)
    assert_moved(before_w, after_w)
    assert_scaling_structure(before_w, after_w, use_bias=True)
    assert_outputs_close(model.predict(x, verbose=0), before)
    # Independently of Keras' forward pass as well.
    assert_outputs_close(mlp_forward_np(after_w, "relu", True, x),
                         mlp_forward_np(before_w, "relu", True, x))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("optimizer_name", BASE_OPTIMIZERS)
def test_invariance_across_optimizers_and_modes(optimizer_name, mode):
    check_invariance(optimizer_name, mode)


@pytest.mark.parametrize(
    "optimizer_name", sorted(set(OPTIMIZERS) - set(BASE_OPTIMIZERS)))
def test_invariance_optimizer_variants(optimizer_name):
    check_invariance(optimizer_name, "graph")


ARCHITECTURES = [
    (activation, depth, use_bias, group)
    for activation in ("relu", "leaky_relu", "linear")
    for depth in (2, 3, 4)
    for use_bias in (True, False)
    # "auto" is "scaling" except through linear activations.
    for group in (("scaling", "auto") if activation == "linear" else ("auto",))
    # GL teleports run eagerly are slow (expm): half of those cases suffice.
    if not (activation == "linear" and group == "auto"
            and (depth % 2 == 0) != use_bias)
]


@pytest.mark.parametrize("activation,depth,use_bias,group", ARCHITECTURES)
def test_invariance_across_architectures(activation, depth, use_bias, group):
    keras.utils.set_random_seed(1)
    widths = (4,) + (6, 5, 7)[: depth - 1] + (3,)
    model = make_mlp(widths, activation, use_bias=use_bias, seed=depth)
    x, y = make_data(16, seed=depth)
    before_w = weights_numpy(model)
    before = model.predict(x, verbose=0)
    optimizer = Teleport(keras.optimizers.Adam(0.0), every=1, group=group)
    teleport_in_custom_loop(model, optimizer, x, y)
    assert_teleported(optimizer)
    assert len(optimizer.junctions) == depth - 1
    after_w = weights_numpy(model)
    assert_moved(before_w, after_w)
    atol = 0.0
    if group == "auto" and activation == "linear":
        # A GL element mixes units: rounding grows with its conditioning.
        atol = float32_error_bound(after_w, use_bias, x)
    else:
        assert_scaling_structure(before_w, after_w, use_bias)
    assert_outputs_close(model.predict(x, verbose=0), before, atol=atol)
    assert_outputs_close(mlp_forward_np(after_w, activation, use_bias, x),
                         mlp_forward_np(before_w, activation, use_bias, x),
                         atol=atol)


def test_gl_teleport_is_not_diagonal_for_linear_models():
    """group="auto" on a linear MLP uses GL: the kernels mix hidden units."""
    keras.utils.set_random_seed(2)
    model = make_mlp((4, 6, 3), "linear", use_bias=True)
    x, y = make_data(16)
    before_w = weights_numpy(model)
    before = model.predict(x, verbose=0)
    optimizer = Teleport(keras.optimizers.SGD(0.0), every=1, group="gl")
    fit_with_teleports_only(model, optimizer, "graph", x, y)
    after_w = weights_numpy(model)
    # Solve K1_after = K1_before g for g (K1 has full row rank 4 < 6, so use
    # the bias row too): a diagonal g would leave the off-diagonal part ~0.
    stacked_b = np.vstack([before_w[0], before_w[1][None]])
    stacked_a = np.vstack([after_w[0], after_w[1][None]])
    g = np.linalg.lstsq(stacked_b, stacked_a, rcond=None)[0]
    off_diagonal = g - np.diag(np.diag(g))
    assert np.max(np.abs(off_diagonal)) > 1e-2
    assert_outputs_close(model.predict(x, verbose=0), before,
                         atol=float32_error_bound(after_w, True, x))


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_invariance_functional_with_layers_between(mode):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6)(inputs)
    h = keras.layers.LeakyReLU(negative_slope=0.1)(h)
    h = keras.layers.Dropout(0.0)(h)
    h = keras.layers.Dense(5, activation="relu",
                           bias_initializer="random_normal")(h)
    out = keras.layers.Dense(3)(h)
    model = keras.Model(inputs, out)
    x, y = make_data(16)
    before_w = weights_numpy(model)
    before = model.predict(x, verbose=0)
    optimizer = Teleport(keras.optimizers.RMSprop(0.0), every=1)
    fit_with_teleports_only(model, optimizer, mode, x, y)
    assert_teleported(optimizer)
    assert len(optimizer.junctions) == 2
    assert_moved(before_w, weights_numpy(model))
    assert_outputs_close(model.predict(x, verbose=0), before)


@pytest.mark.parametrize("group,hidden,mode", [
    ("scaling", "relu", "graph"), ("scaling", "relu", "xla"),
    ("gl", "linear", "eager"), ("gl", "linear", "graph"),
])
def test_invariance_symmetric_dense_pair(group, hidden, mode):
    keras.utils.set_random_seed(4)
    pair = SymmetricDensePair(6, 3, hidden_activation=hidden, group=group,
                              bias_initializer="random_normal")
    model = keras.Sequential([keras.Input((4,)), pair])
    x, y = make_data(16)
    k1, k2 = pair.kernel_1.numpy(), pair.kernel_2.numpy()
    before_w = weights_numpy(model)
    before = model.predict(x, verbose=0)
    optimizer = Teleport(keras.optimizers.Adam(0.0), every=1)
    fit_with_teleports_only(model, optimizer, mode, x, y)
    assert_teleported(optimizer)
    assert_moved(before_w, weights_numpy(model))
    as_mlp = [pair.kernel_1, pair.bias_1, pair.kernel_2, pair.bias_2]
    atol = float32_error_bound([v.numpy() for v in as_mlp], True, x)
    assert_outputs_close(model.predict(x, verbose=0), before, atol=atol)
    # The layer's record is the accumulated element: K1_after = K1_before g.
    record = pair.group_element.numpy().astype(np.float64)
    g = np.diag(np.exp(record)) if group == "scaling" else record
    assert np.max(np.abs(g - np.eye(6))) > 1e-2
    np.testing.assert_allclose(pair.kernel_1.numpy(), k1 @ g,
                               rtol=0, atol=1e-5 * np.max(np.abs(k1 @ g)))
    expected_k2 = np.linalg.solve(g, k2)
    np.testing.assert_allclose(pair.kernel_2.numpy(), expected_k2, rtol=0,
                               atol=1e-4 * np.max(np.abs(expected_k2)))
