"""Measures against closed forms, finite differences and dense Hessians."""

import os
import warnings

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
    # For a quadratic loss, L(w + r u) - L(w) = r g.u + r^2/2 u^T H u; the
    # antithetic pair u, -u cancels r g.u (and E[u] = 0 anyway), and over
    # the sphere E[u^T H u] = tr(H)/P, so the mean change over many
    # directions tends to r^2 tr(H) / (2P), averaged over radii.
    model, x, y = linear_regression()
    hessian = 2 * x.T.astype("float64") @ x / len(x)  # MSE in the kernel
    radii = (0.5, 1.0)
    expected = np.mean([r ** 2 for r in radii]) * np.trace(hessian) / (2 * 3)
    got = measures.sharpness(model, x, y, kind="isotropic", radii=radii,
                             directions=3000, seed=1)
    np.testing.assert_allclose(got, expected, rtol=0.1)


def quadratic_problem(a, b, w, dtype="float32"):
    """A model whose loss is exactly `0.5 w^T A w + b^T w` in its kernel.

    The inputs are the identity, so the outputs are the kernel `w` itself;
    the loss is passed as a callable (targets `b`).
    """
    p = len(w)
    model = keras.Sequential([
        keras.Input((p,)),
        keras.layers.Dense(1, use_bias=False, dtype=dtype),
    ])
    model.layers[0].kernel.assign(np.reshape(w, (p, 1)))
    a_tensor = tf.constant(a, dtype)

    def loss(y_true, y_pred):
        y_pred = tf.cast(y_pred, dtype)
        return (0.5 * tf.reduce_sum(y_pred * tf.matmul(a_tensor, y_pred))
                + tf.reduce_sum(tf.cast(y_true, dtype) * y_pred))

    x = np.eye(p, dtype=dtype)
    return model, x, np.reshape(b, (p, 1)).astype(dtype), loss


def sphere_directions(seed, count, p):
    """The isotropic directions of `sharpness` (one (P, 1) kernel)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        d = rng.normal(size=(p, 1)).ravel()
        out.append(d / np.linalg.norm(d))
    return np.array(out)


@pytest.mark.parametrize("directions", [1, 2, 7])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 2e-5)])
def test_isotropic_sharpness_of_scaled_identity_is_exact(directions, dtype,
                                                         rtol):
    # L(w) = c/2 |w|^2 + b.w with b != 0, so the gradient c w + b is not 0.
    # With antithetic pairs, (L(w + r u) + L(w - r u))/2 - L(w) = c r^2/2
    # |u|^2 = c r^2/2 for every unit u: exact for any number of directions.
    rng = np.random.default_rng(directions)
    p, c = 6, 1.7
    w, b = rng.normal(size=p), rng.normal(size=p) + 2.0
    radii = (0.05, 0.3, 1.0)
    model, x, y, loss = quadratic_problem(c * np.eye(p), b, w, dtype)
    got = measures.sharpness(model, x, y, kind="isotropic", radii=radii,
                             directions=directions, seed=4, loss=loss)
    expected = np.mean([c * r ** 2 / 2 for r in radii])
    np.testing.assert_allclose(got, expected, rtol=rtol)
    # One-sided directions would keep r g.u, which at these radii is far
    # larger than the tolerance: the check above can tell them apart.
    grad = c * w + b
    one_sided = np.mean([r * grad @ u + c * r ** 2 / 2 for r in radii
                         for u in sphere_directions(4, directions, p)])
    assert abs(one_sided - expected) > 100 * rtol * expected


def test_isotropic_sharpness_of_general_quadratic_matches_numpy():
    # A general symmetric (indefinite) A: the pairs leave exactly
    # r^2/2 u^T A u, so the estimate is mean_r r^2/2 * mean_u u^T A u over
    # the same seeded directions, with no trace of the gradient A w + b.
    rng = np.random.default_rng(0)
    p = 5
    m = rng.normal(size=(p, p))
    a = (m + m.T) / 2
    w, b = rng.normal(size=p), 3 * rng.normal(size=p)
    radii = (0.1, 0.7)
    model, x, y, loss = quadratic_problem(a, b, w, "float64")
    got = measures.sharpness(model, x, y, kind="isotropic", radii=radii,
                             directions=9, seed=11, loss=loss)
    u = sphere_directions(11, 9, p)
    quad = np.mean(np.einsum("ni,ij,nj->n", u, a, u))
    expected = np.mean([r ** 2 / 2 for r in radii]) * quad
    np.testing.assert_allclose(got, expected, rtol=1e-9)


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
    # With antithetic pairs the first-order term cancels for any symmetric
    # distribution, so uniformity shows in the second moment instead: for
    # u uniform on the sphere in R^P, E[u^T H u] = tr(H)/P and
    # Var[u^T H u] = 2 (P tr(H^2) - tr(H)^2) / (P^2 (P + 2)). The linear
    # model's loss is quadratic (P = 3), so each pair gives r^2/2 u^T H u.
    model, x, y = linear_regression(seed=3)
    hessian = 2 * x.T.astype("float64") @ x / len(x)
    p, n, r = 3, 4000, 0.5
    got = measures.sharpness(model, x, y, kind="isotropic", radii=(r,),
                             directions=n, seed=2)
    tr, tr2 = np.trace(hessian), np.trace(hessian @ hessian)
    expected = r ** 2 / 2 * tr / p
    spread = r ** 2 / 2 * np.sqrt(2 * (p * tr2 - tr ** 2)
                                  / (p ** 2 * (p + 2)) / n)
    assert abs(got - expected) < 4 * spread
    # Directions U[0, 1]^P (the paper's) would be far off: E[u^T H u] then
    # includes the off-diagonal entries of H.
    rng = np.random.default_rng(0)
    d = rng.uniform(size=(20000, p))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    orthant = r ** 2 / 2 * np.mean(np.einsum("ni,ij,nj->n", d, hessian, d))
    assert abs(orthant - expected) > 8 * spread


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


def finite_difference_orbits(model, seed, count):
    """`(directions, curvature)` of `orbit_curvature`'s seeded directions,
    the curvature from central finite differences of the true orbit."""
    from keras_teleport import find_symmetries

    junctions = find_symmetries(model).junctions
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
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
        out.append((ms, np.sqrt(max(d1 @ d1 * (d2 @ d2) - (d1 @ d2) ** 2, 0))
                    / (d1 @ d1) ** 1.5))
    return junctions, out


def test_orbit_curvature_matches_finite_differences():
    model, _, _ = small_model(seed=4)
    got = measures.orbit_curvature(model, directions=3, seed=5)
    # Rebuild the same directions and differentiate the orbit numerically.
    _, orbits = finite_difference_orbits(model, seed=5, count=3)
    np.testing.assert_allclose(got, np.mean([c for _, c in orbits]),
                               rtol=1e-3)


def test_orbit_derivatives_survive_shape_relaxed_forward_mode(monkeypatch):
    # Once an op's JVP has been traced for 32 shapes in a process, TF
    # switches forward mode to shape-relaxed JVP functions, on which eager
    # nested forward mode failed (AddN of mismatched shapes along the
    # junction matmuls); forcing the switch from the start reproduces it.
    from tensorflow.python.eager import forwardprop

    monkeypatch.setattr(forwardprop, "_TRACE_COUNT_LIMIT", 0)
    # Widths no other test uses: JVPs already traced for exact shapes would
    # be reused and hide the relaxed ones.
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((17,)),
        keras.layers.Dense(13, activation="relu"),
        keras.layers.Dense(11),
        keras.layers.Dense(2),
    ])
    junctions, orbits = finite_difference_orbits(model, seed=5, count=3)
    got = measures.orbit_curvature(model, directions=3, seed=5)
    np.testing.assert_allclose(got, np.mean([c for _, c in orbits]),
                               rtol=1e-3)
    # Called eagerly, as the reference in tests/test_objectives.py does.
    ms, expected = orbits[0]
    curve = measures._junction_curve(
        junctions, [tf.constant(m, tf.float32) for m in ms])
    first, second = measures.orbit_derivatives(curve)
    np.testing.assert_allclose(
        float(measures.curve_curvature(first, second)), expected, rtol=1e-3)


def test_orbit_curvature_is_compiled_once_per_call(monkeypatch):
    # The per-direction computation is one tf.function whose arguments are
    # the directions: its Python body (and so `orbit_derivatives`) runs only
    # while tracing, once per call however many directions there are.
    model, _, _ = small_model(seed=4)
    calls = []
    original = measures.orbit_derivatives

    def counting(curve, t0=0.0):
        calls.append(tf.executing_eagerly())
        return original(curve, t0)

    monkeypatch.setattr(measures, "orbit_derivatives", counting)
    measures.orbit_curvature(model, directions=5, seed=5)
    assert calls == [False]  # traced once, in graph mode
    measures.orbit_curvature(model, directions=2, seed=6)
    assert calls == [False, False]


def test_power_iteration_matches_dense_hessian():
    model, x, y = small_model()
    eigenvalues = np.linalg.eigvalsh(dense_hessian(model, x, y, XENT))
    expected = eigenvalues[np.argmax(np.abs(eigenvalues))]
    got = measures.hessian_top_eigenvalue(model, x, y, iterations=100)
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def counting_hvps(monkeypatch):
    """Counts the Hessian-vector products (one per power iteration)."""
    calls = []
    original = measures._batched_hvp

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(measures, "_batched_hvp", counting)
    return calls


def test_power_iteration_with_tolerance_stops_early_at_the_eigenvalue(
        monkeypatch):
    model, x, y = small_model()
    hessian = dense_hessian(model, x, y, XENT)
    eigenvalues = np.linalg.eigvalsh(hessian)
    expected = eigenvalues[np.argmax(np.abs(eigenvalues))]
    tolerance = 1e-4
    # Reference: the same power iteration on the dense Hessian in float64,
    # from the same seeded start vector, and where the rule stops it.
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(size=w.shape).ravel()
                        for w in model.trainable_variables])
    quotients = []
    for _ in range(200):
        v = v / np.linalg.norm(v)
        quotients.append(v @ hessian @ v)
        v = hessian @ v
        if (len(quotients) > 1 and abs(quotients[-1] - quotients[-2])
                <= tolerance * abs(quotients[-1])):
            break
    calls = counting_hvps(monkeypatch)
    got = measures.hessian_top_eigenvalue(model, x, y, iterations=1000,
                                          tolerance=tolerance)
    assert abs(len(calls) - len(quotients)) <= 1 and len(calls) < 50
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    np.testing.assert_allclose(got, quotients[len(calls) - 1], rtol=1e-4)
    # Without a tolerance every iteration runs.
    calls.clear()
    measures.hessian_top_eigenvalue(model, x, y, iterations=7)
    assert len(calls) == 7


def test_power_iteration_on_a_zero_hessian_is_zero(monkeypatch):
    # A loss linear in the weights: H = 0, so H v = 0 after the first
    # product; the estimate is 0 (not NaN from normalising a zero vector).
    model, x, y = linear_regression()
    calls = counting_hvps(monkeypatch)
    for tolerance in (None, 1e-3):
        got = measures.hessian_top_eigenvalue(
            model, x, y, iterations=5, tolerance=tolerance,
            loss=lambda y_true, y_pred: tf.reduce_sum(y_pred))
        assert got == 0.0
    assert len(calls) == 2


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


class UntouchableModel:
    """Fails on any use: arguments must be checked before any work."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before validation")


NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = (
    [("sharpness", "kind", v, "Accepted values") for v in ("nope", None)]
    + [("sharpness", "directions", v, "positive integer")
       for v in (0, -1, 2.5, True, "3", None)]
    + [("sharpness", "radii", v, "non-empty sequence of finite numbers > 0")
       for v in ((), [], (0.1, 0.0), (-0.1,), (NAN,), (0.1, INF), 0.1, "ab",
                 (None,))]
    + [("sharpness", "batch_size", v, "None or a positive integer")
       for v in (0, -2, 1.5, False)]
    + [("orbit_curvature", "directions", v, "positive integer")
       for v in (0, -1, 1.0, None)]
    + [("orbit_curvature", "group", "nope", "Accepted values")]
    + [("hessian_top_eigenvalue", "iterations", v, "positive integer")
       for v in (0, -1, 2.0, None)]
    + [("hessian_top_eigenvalue", "batch_size", v, "None or a positive "
        "integer") for v in (0, -4)]
    + [("hessian_top_eigenvalue", "tolerance", v, "None or a finite number "
        ">= 0") for v in (-1e-3, NAN, INF, "1e-3", True)]
    + [("hessian_trace", "samples", v, "positive integer")
       for v in (0, -3, 4.0, None)]
    + [("hessian_trace", "batch_size", v, "None or a positive integer")
       for v in (0, 2.5)]
)


@pytest.mark.parametrize("function,argument,value,accepted", BAD_ARGUMENTS)
def test_bad_arguments(function, argument, value, accepted):
    x, y = np.zeros((4, 4), "float32"), np.zeros(4)
    data = () if function == "orbit_curvature" else (x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning on the way
        with pytest.raises(ValueError) as info:
            getattr(measures, function)(UntouchableModel(), *data,
                                        **{argument: value})
    message = str(info.value)
    assert f"`{argument}`" in message and accepted in message


def test_valid_edge_arguments_are_accepted():
    # numpy integers count as integers; one direction, one radius, one
    # iteration, one sample and a batch of one are all valid.
    model, x, y = small_model()
    whole = measures.sharpness(model, x, y, directions=2, radii=[0.1])
    same = measures.sharpness(model, x, y, directions=np.int64(2),
                              radii=np.array([0.1]), batch_size=np.int32(1))
    np.testing.assert_allclose(same, whole, rtol=1e-5)
    assert np.isfinite(measures.orbit_curvature(model, directions=1))
    assert np.isfinite(measures.hessian_top_eigenvalue(
        model, x, y, iterations=1, tolerance=0))
    assert np.isfinite(measures.hessian_trace(model, x, y, samples=1))


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
