"""Measures against closed forms, finite differences and dense Hessians."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_teleport import measures  # noqa: E402

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="relu"),
        keras.layers.Dense(3),
        keras.layers.Dense(2),
    ])
    model.compile(loss=XENT)
    rng = np.random.default_rng(seed)
    return model, rng.normal(size=(24, 4)).astype("float32"), rng.integers(0, 2, 24)


def linear_regression(seed=0):
    """A linear model with MSE: the loss is quadratic in the weights."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(1, use_bias=False)])
    model.compile(loss="mse")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3)).astype("float32")
    return model, x, rng.normal(size=(40, 1)).astype("float32")


def dense_hessian(model, x, y, loss):
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    shapes = [w.shape for w in weights]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = tf.concat([tf.reshape(w, [-1]) for w in weights], 0)

    def loss_of(vector):
        parts = [tf.reshape(p, s) for p, s in zip(tf.split(vector, sizes), shapes)]
        out, _ = model.stateless_call(parts, [], x)
        return loss(y, out)

    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            value = loss_of(flat)
        grad = inner.gradient(value, flat)
    hessian = outer.jacobian(grad, flat).numpy().astype("float64")
    return (hessian + hessian.T) / 2


def test_isotropic_sharpness_of_quadratic_matches_closed_form():
    # For a quadratic loss, L(w + r u) - L(w) = r g.u + r^2/2 u^T H u; over
    # the sphere E[u] = 0 and E[u^T H u] = tr(H)/P, so the mean change over
    # many directions tends to r^2 tr(H) / (2P), averaged over radii.
    model, x, y = linear_regression()
    hessian = 2 * x.T.astype("float64") @ x / len(x)  # MSE in the kernel
    radii = (0.5, 1.0)
    expected = np.mean([r ** 2 for r in radii]) * np.trace(hessian) / (2 * 3)
    got = measures.sharpness(model, x, y, kind="isotropic", radii=radii,
                             directions=3000, seed=1)
    np.testing.assert_allclose(got, expected, rtol=0.1)


def test_paper_sharpness_of_quadratic_matches_numpy():
    # The paper's directions are U[0, 1]^P normalised; recompute the mean
    # loss with numpy at the same directions (seeded identically).
    model, x, y = linear_regression()
    w = model.get_weights()[0].astype("float64")
    radii = (0.01, 0.1)
    rng = np.random.default_rng(7)
    values = []
    for _ in range(5):
        d = rng.uniform(size=w.shape)
        d /= np.linalg.norm(d)
        for r in radii:
            values.append(np.mean((x @ (w + r * d) - y) ** 2))
    got = measures.sharpness(model, x, y, radii=radii, directions=5, seed=7)
    np.testing.assert_allclose(got, np.mean(values), rtol=1e-5)


def test_sharpness_is_the_same_batched():
    model, x, y = small_model()
    whole = measures.sharpness(model, x, y, directions=3)
    batched = measures.sharpness(model, x, y, directions=3, batch_size=8)
    np.testing.assert_allclose(batched, whole, rtol=1e-5)


def test_isotropic_directions_are_uniform_on_the_sphere():
    # Uniform on the sphere in R^P: each coordinate has mean 0 and second
    # moment 1/P; checked statistically on the linear model (P = 3) through
    # the loss change, which is linear in u for tiny radii:
    # mean change / r ~ g.E[u] = 0, with spread |g|/sqrt(P n).
    model, x, y = linear_regression(seed=3)
    r = 1e-3
    got = measures.sharpness(model, x, y, kind="isotropic", radii=(r,),
                             directions=4000, seed=2)
    w = model.get_weights()[0].astype("float64")
    grad = 2 * x.T @ (x @ w - y) / len(x)
    spread = np.linalg.norm(grad) / np.sqrt(3 * 4000)
    # The second-order term r^2 tr(H)/(2P) is negligible at r = 1e-3.
    assert abs(got / r) < 4 * spread


def test_curvature_of_circle_is_one_over_radius():
    # t -> (r cos t, r sin t) through the same code path as the orbits.
    for radius in (0.5, 2.0, 7.0):
        def curve(t):
            return [tf.stack([radius * tf.cos(t), radius * tf.sin(t)])]
        first, second = measures.orbit_derivatives(curve)
        np.testing.assert_allclose(
            float(measures.curve_curvature(first, second)), 1 / radius,
            rtol=1e-5)


def test_rotation_orbit_of_a_junction_is_a_circle():
    # A linear junction whose incoming kernel is one row of norm r and whose
    # outgoing kernel is 0: expm(tM) with M a unit-speed rotation generator
    # moves K1 on a circle of radius r (K2 stays 0), so kappa = 1/r.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(2, use_bias=False),
                              keras.layers.Dense(1, use_bias=False)])
    r = 3.0
    model.layers[0].kernel.assign([[r, 0.0]])
    model.layers[1].kernel.assign([[0.0], [0.0]])
    from keras_teleport import find_symmetries

    junctions = find_symmetries(model).junctions
    rotation = tf.constant([[0.0, -1.0], [1.0, 0.0]])
    curve = measures._junction_curve(junctions, [rotation])
    first, second = measures.orbit_derivatives(curve)
    np.testing.assert_allclose(float(measures.curve_curvature(first, second)),
                               1 / r, rtol=1e-5)


def test_orbit_curvature_matches_finite_differences():
    model, _, _ = small_model(seed=4)
    got = measures.orbit_curvature(model, directions=3, seed=5)
    # Rebuild the same directions and differentiate the orbit numerically.
    from keras_teleport import find_symmetries

    junctions = find_symmetries(model).junctions
    rng = np.random.default_rng(5)
    values = []
    for _ in range(3):
        ms = []
        for j in junctions:
            m = rng.uniform(size=(j.width, j.width))
            ms.append(np.diag(np.diag(m)) if j.groups[-1] == "scaling" else m)
        norm = np.sqrt(sum((m ** 2).sum() for m in ms))
        ms = [m / norm for m in ms]
        # Points on the true orbit (tf.linalg.expm), in float64 for a stable
        # finite difference.
        weights = {id(v): np.asarray(v, "float64") for j in junctions
                   for v in (j.in_kernel, j.in_bias, j.out_kernel)
                   if v is not None}

        def point(t):
            moved = dict(weights)
            for j, m in zip(junctions, ms):
                g = tf.linalg.expm(tf.constant(t * m)).numpy()
                g_inv = tf.linalg.expm(tf.constant(-t * m)).numpy()
                moved[id(j.in_kernel)] = moved[id(j.in_kernel)] @ g
                if j.in_bias is not None:
                    moved[id(j.in_bias)] = moved[id(j.in_bias)] @ g
                moved[id(j.out_kernel)] = g_inv @ moved[id(j.out_kernel)]
            return np.concatenate([np.ravel(p) for p in moved.values()])

        h = 1e-3
        p_minus, p0, p_plus = point(-h), point(0.0), point(h)
        d1 = (p_plus - p_minus) / (2 * h)
        d2 = (p_plus - 2 * p0 + p_minus) / h ** 2
        values.append(np.sqrt(max(d1 @ d1 * (d2 @ d2) - (d1 @ d2) ** 2, 0))
                      / (d1 @ d1) ** 1.5)
    np.testing.assert_allclose(got, np.mean(values), rtol=1e-3)


def test_power_iteration_matches_dense_hessian():
    model, x, y = small_model()
    eigenvalues = np.linalg.eigvalsh(dense_hessian(model, x, y, XENT))
    expected = eigenvalues[np.argmax(np.abs(eigenvalues))]
    got = measures.hessian_top_eigenvalue(model, x, y, iterations=100)
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_hutchinson_matches_dense_hessian_trace():
    model, x, y = small_model()
    expected = np.trace(dense_hessian(model, x, y, XENT))
    got = measures.hessian_trace(model, x, y, samples=1500, seed=3,
                                 batch_size=12)
    # Rademacher variance: 2 * sum of squared off-diagonal entries.
    hessian = dense_hessian(model, x, y, XENT)
    off = hessian - np.diag(np.diag(hessian))
    spread = np.sqrt(2 * (off ** 2).sum() / 1500)
    assert abs(got - expected) < 4 * spread


def test_bad_arguments():
    model, x, y = small_model()
    with pytest.raises(ValueError, match="kind"):
        measures.sharpness(model, x, y, kind="nope")
    with pytest.raises(ValueError, match="directions"):
        measures.sharpness(model, x, y, directions=0)
    with pytest.raises(ValueError, match="group"):
        measures.orbit_curvature(model, group="nope")


def test_measures_logger_adds_logs_and_tensorboard_runs(tmp_path):
    import keras_teleport

    model, x, y = small_model()
    model.compile(optimizer="sgd", loss=XENT)
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[
        keras_teleport.MeasuresLogger(x, y, measures=("sharpness",
                                                      "orbit_curvature"),
                                      every=2),
        keras.callbacks.TensorBoard(str(tmp_path)),
    ])
    # Only epoch 2 is measured; its value equals a direct computation.
    assert history.history["measure/sharpness"] == [
        pytest.approx(measures.sharpness(model, x, y), rel=1e-6)]
    assert history.history["measure/orbit_curvature"][0] > 0
    assert any(tmp_path.rglob("*.tfevents.*"))
    with pytest.raises(ValueError, match="measures"):
        keras_teleport.MeasuresLogger(x, y, measures=("nope",))


@pytest.mark.parametrize("depth", [2, 3])
def test_min_norm_teleport_balances_units_and_keeps_outputs(depth):
    import keras_teleport

    keras.utils.set_random_seed(depth)
    layers = [keras.Input((5,))]
    for _ in range(depth - 1):
        layers.append(keras.layers.Dense(
            6, activation="relu", kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)))
    layers.append(keras.layers.Dense(3))
    model = keras.Sequential(layers)
    opt = keras_teleport.Teleport(keras.optimizers.SGD(0.0), at_steps=[0],
                                  objective="min_norm", steps=50)
    model.compile(optimizer=opt, loss=XENT)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    before = model.predict(x, verbose=0)
    norm_before = sum((w ** 2).sum() for w in model.get_weights())
    model.fit(x, np.zeros(16), batch_size=16, verbose=0)
    assert opt.teleport_metrics["teleports"] == 1
    weights = model.get_weights()
    np.testing.assert_allclose(model.predict(x, verbose=0), before,
                               rtol=1e-4, atol=1e-5 * np.abs(before).max())
    assert sum((w ** 2).sum() for w in weights) < norm_before
    # At the minimum every hidden unit's incoming and outgoing squared
    # norms are equal (d/dd_k of a d^2 + c / d^2 = 0).
    kernels, biases = weights[0::2], weights[1::2]
    for k in range(depth - 1):
        incoming = (kernels[k] ** 2).sum(axis=0) + biases[k] ** 2
        outgoing = (kernels[k + 1] ** 2).sum(axis=1)
        np.testing.assert_allclose(incoming, outgoing, rtol=1e-3)
