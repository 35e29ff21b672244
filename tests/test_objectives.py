"""Sharpness and curvature teleport objectives: the pure math against
hand-derived cases and forward-mode autodiff, and each objective, in `fit`,
moving its measure the requested way while the loss stays put (exact
groups) or within the guard (the data-dependent action)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_teleport
from conftest import MODES
from keras_teleport import groups
from keras_teleport import measures
from keras_teleport import objectives

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(activation, seed=0, width=(6, 5)):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8,))]
    layers += [keras.layers.Dense(w, activation=activation) for w in width]
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, rng.integers(0, 3, n)


def plan_of(model, group):
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    return [
        objectives.JunctionIndices(
            groups.get(group), j.width,
            (position[id(j.in_kernel)], position[id(j.in_bias)]),
            position[id(j.out_kernel)])
        for j in keras_teleport.find_symmetries(model).junctions
    ]


def weights_of(model):
    return {i: tf.convert_to_tensor(v)
            for i, v in enumerate(model.trainable_variables)}


# The pure math ---------------------------------------------------------------


def test_curvature_of_a_one_unit_scaling_orbit_is_the_hyperbola_formula():
    # One hidden unit, no bias: the orbit of (a, b) is (a e^t, b e^-t), whose
    # curvature at t = 0 is 2ab / (a^2 + b^2)^(3/2).
    a, b = 1.5, 0.4
    plan = [objectives.JunctionIndices(groups.get("scaling"), 1, (0,), 1)]
    weights = {0: tf.constant([[a]]), 1: tf.constant([[b]])}
    value = objectives.orbit_curvature(plan, weights, [tf.constant([[1.0]])])
    np.testing.assert_allclose(float(value), 2 * a * b / (a * a + b * b) ** 1.5,
                               rtol=1e-6)


@pytest.mark.parametrize("activation,group", [("linear", "gl"),
                                              ("relu", "scaling")])
def test_closed_form_orbit_jet_matches_forward_mode(activation, group):
    # Two junctions share a kernel, so both sides of the closed form count.
    model = mlp(activation)
    plan = plan_of(model, group)
    directions = objectives.curvature_directions(
        plan, 3, tf.constant([3, 4], tf.int64))
    ours = float(objectives.orbit_curvature(plan, weights_of(model), directions))
    junctions = keras_teleport.find_symmetries(model).junctions
    reference = []
    for k in range(3):
        ms = [tf.linalg.diag(m[k]) if group == "scaling" else m[k]
              for m in directions]
        first, second = measures.orbit_derivatives(
            measures._junction_curve(junctions, ms))
        reference.append(float(measures.curve_curvature(first, second)))
    np.testing.assert_allclose(ours, np.mean(reference), rtol=1e-5)


def test_paper_sharpness_of_a_quadratic_matches_numpy():
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(3, 2)).astype("float32"), rng.normal(size=4).astype("float32")]
    directions = objectives.sharpness_directions(
        [tf.constant(v) for v in w], 4, tf.constant([1, 2], tf.int64))
    loss_at = lambda ws: 0.5 * tf.add_n([tf.reduce_sum(t ** 2) for t in ws])
    value = objectives.sharpness(loss_at, [tf.constant(v) for v in w],
                                 directions, radii=(0.1, 0.5))
    flat_w = np.concatenate([v.ravel() for v in w])
    expected = []
    for d in directions:
        flat_d = np.concatenate([t.numpy().ravel() for t in d])
        np.testing.assert_allclose(np.linalg.norm(flat_d), 1.0, rtol=1e-6)
        assert (flat_d >= 0).all()  # the paper's U[0, 1] directions
        expected += [0.5 * np.sum((flat_w + r * flat_d) ** 2) for r in (0.1, 0.5)]
    np.testing.assert_allclose(float(value), np.mean(expected), rtol=1e-6)


def test_one_ascent_step_has_length_lr_and_raises_the_curvature():
    model = mlp("relu")
    plan = plan_of(model, "scaling")
    weights = weights_of(model)
    directions = objectives.curvature_directions(
        plan, 2, tf.constant([0, 0], tf.int64))
    value_fn = lambda w: objectives.orbit_curvature(plan, w, directions)
    grads = {p: tf.ones_like(t) for p, t in weights.items()
             if p in {i for j in plan for i in j.in_indices + (j.out_index,)}}
    elements, v0, v1, _, _, taken = objectives.ascend(
        plan, value_fn, weights, grads, steps=1, learning_rate=0.01,
        limit=1e9)
    assert int(taken) == 1 and float(v1) > float(v0)
    length = np.sqrt(sum(float(tf.reduce_sum(e ** 2)) for e in elements))
    np.testing.assert_allclose(length, 0.01, rtol=1e-5)
    # The reported value is the curvature recomputed at the moved weights.
    moved = objectives.transport(plan, elements, weights, "weight")
    np.testing.assert_allclose(float(value_fn(moved)), float(v1), rtol=1e-6)


def test_ascent_keeps_nothing_when_every_step_breaks_the_cap():
    model = mlp("relu")
    plan = plan_of(model, "scaling")
    weights = weights_of(model)
    grads = {p: tf.ones_like(weights[p]) for p in weights}
    directions = objectives.curvature_directions(
        plan, 2, tf.constant([0, 0], tf.int64))
    elements, v0, v1, f0, f1, taken = objectives.ascend(
        plan, lambda w: objectives.orbit_curvature(plan, w, directions),
        weights, grads, steps=5, learning_rate=0.1,
        limit=float(objectives.squared_norm(grads)) * (1 - 1e-6))
    assert int(taken) == 0
    assert float(v1) == float(v0) and float(f1) == float(f0)
    for e in elements:
        assert not np.any(e.numpy())


# Objectives in fit -----------------------------------------------------------


def teleported(model, objective, mode="graph", inner=None, **kwargs):
    """Fits one step (lr 0) with a teleport at step 0; returns the optimizer."""
    optimizer = keras_teleport.Teleport(
        inner or keras.optimizers.SGD(0.0), at_steps=[0], objective=objective,
        **kwargs)
    model.compile(optimizer=optimizer, loss=XENT, **MODES[mode])
    return optimizer


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("objective", objectives.CURVATURE_OBJECTIVES)
def test_curvature_objective_moves_the_measure_and_keeps_the_outputs(
        objective, mode):
    model = mlp("relu")
    x, y = data()
    curvature = measures.orbit_curvature(model, directions=60, seed=11)
    outputs = model.predict(x, verbose=0)
    optimizer = teleported(model, objective, mode)
    model.fit(x, y, batch_size=len(x), verbose=0)
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] == 1 and metrics["distance"] > 0
    after = measures.orbit_curvature(model, directions=60, seed=11)
    if objective == "max_curvature":
        assert after > curvature * 1.02
    else:
        assert after < curvature / 1.02
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", objectives.CURVATURE_OBJECTIVES)
def test_curvature_objective_under_gl_on_linear_junctions(objective):
    model = mlp("linear")
    x, y = data()
    curvature = measures.orbit_curvature(model, directions=60, seed=11)
    outputs = model.predict(x, verbose=0)
    optimizer = teleported(model, objective)  # group="auto": GL here
    model.fit(x, y, batch_size=len(x), verbose=0)
    assert optimizer._plan.indices[0].group.name == "gl"
    assert optimizer.teleport_metrics["teleports"] == 1
    after = measures.orbit_curvature(model, directions=60, seed=11)
    assert (after > curvature) if objective == "max_curvature" else (
        after < curvature)
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs,
                               rtol=1e-4, atol=1e-5)


def test_curvature_teleport_then_step_uses_the_gradient_at_the_new_point():
    # SGD after a teleport: w' = g·w - lr grad L(g·w), with g read off the
    # optimizer's record and the gradient taken by a tape at g·w.
    model = mlp("relu")
    x, y = data(32)
    before = [v.numpy() for v in model.trainable_variables]
    optimizer = teleported(model, "max_curvature",
                           inner=keras.optimizers.SGD(0.1))
    model.fit(x, y, batch_size=32, verbose=0)
    records = [v.numpy() for v in optimizer.variables
               if "group_element" in v.path]
    scales = [np.exp(u) for u in records]
    moved = list(before)
    for n, d in enumerate(scales):
        moved[2 * n] = moved[2 * n] * d
        moved[2 * n + 1] = moved[2 * n + 1] * d
        moved[2 * n + 2] = moved[2 * n + 2] / d[:, None]
    twin = mlp("relu")
    twin.set_weights(moved)
    with tf.GradientTape() as tape:
        loss = XENT(y, twin(x))
    grads = tape.gradient(loss, twin.trainable_variables)
    for v, w, g in zip(model.trainable_variables, moved, grads):
        np.testing.assert_allclose(v.numpy(), w - 0.1 * g.numpy(),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", objectives.SHARPNESS_OBJECTIVES)
def test_sharpness_objective_with_exact_scaling(objective):
    model = mlp("relu")
    x, y = data(256)
    model.compile(loss=XENT)
    sharp = measures.sharpness(model, x, y, directions=20, seed=7)
    loss = model.evaluate(x, y, verbose=0)
    optimizer = teleported(model, objective, group="scaling",
                           teleport_lr=0.1)
    # The pool is the teleport batch, so the loss is checked where the
    # teleport evaluates it; lr 0 leaves the teleport as the only move.
    model.fit(x, y, batch_size=len(x), verbose=0,
              callbacks=[keras_teleport.TeleportData(x, y, batch_size=len(x))])
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] == 1
    after = measures.sharpness(model, x, y, directions=20, seed=7)
    if objective == "min_sharpness":
        assert after < sharp and metrics["objective_after"] < metrics["objective_before"]
    else:
        assert after > sharp and metrics["objective_after"] > metrics["objective_before"]
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), loss, rtol=1e-5)


@pytest.mark.parametrize("objective", objectives.SHARPNESS_OBJECTIVES)
def test_sharpness_objective_with_data_dependent_gl_stays_within_the_guard(
        objective):
    model = mlp("leaky_relu")
    x, y = data(64)
    model.compile(loss=XENT)
    sharp = measures.sharpness(model, x, y, directions=20, seed=7)
    loss = model.evaluate(x, y, verbose=0)
    tolerance = 0.02
    optimizer = teleported(model, objective, group="gl", teleport_lr=0.05,
                           loss_tolerance=tolerance)
    # A teleport at step 0 runs when training begins (TeleportData).
    model.fit(x, y, batch_size=len(x), verbose=0,
              callbacks=[keras_teleport.TeleportData(x, y, batch_size=len(x))])
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] == 1 and metrics["distance"] > 0
    after_loss = model.evaluate(x, y, verbose=0)
    change = abs(after_loss - loss) / loss
    assert change <= tolerance * 1.001
    np.testing.assert_allclose(metrics["loss_drift"], change, rtol=1e-2,
                               atol=1e-6)
    after = measures.sharpness(model, x, y, directions=20, seed=7)
    assert (after < sharp) if objective == "min_sharpness" else (after > sharp)


def test_sharpness_objective_needs_teleport_data():
    model = mlp("relu")
    x, y = data(32)
    teleported(model, "min_sharpness")
    with pytest.raises(ValueError, match="TeleportData"):
        model.fit(x, y, batch_size=32, verbose=0)


def test_curvature_objective_refuses_the_data_dependent_action():
    model = mlp("leaky_relu")
    x, y = data(32)
    teleported(model, "max_curvature", group="gl")
    with pytest.raises(ValueError, match="max_curvature"):
        model.fit(x, y, batch_size=32, verbose=0)


def test_teleport_now_on_an_in_step_objective_says_so():
    model = mlp("relu")
    x, y = data(32)
    optimizer = teleported(model, "max_curvature")
    model.fit(x, y, batch_size=32, verbose=0)
    with pytest.raises(ValueError, match="inside the train step"):
        optimizer.teleport_now()


def test_unknown_objective_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="min_sharpness"):
        keras_teleport.Teleport(keras.optimizers.SGD(), objective="flat")


@pytest.mark.parametrize("objective", ["max_curvature", "min_sharpness"])
def test_new_objectives_round_trip_through_config(objective):
    optimizer = keras_teleport.Teleport(keras.optimizers.Adam(), every=5,
                                        objective=objective)
    restored = keras_teleport.Teleport.from_config(optimizer.get_config())
    assert restored.objective == objective
    assert restored.get_config() == optimizer.get_config()


@pytest.mark.parametrize("ratio", [1e9, 1.01])
@pytest.mark.parametrize("seed", [0, 1])
def test_scaling_fast_ascent_matches_the_general_one(seed, ratio):
    # Shared kernels, a junction without bias, and (ratio 1.01) a binding
    # cap, so backtracking is exercised too.
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((7,)),
        keras.layers.Dense(6, activation="relu"),
        keras.layers.Dense(5, activation="relu", use_bias=False),
        keras.layers.Dense(4, activation="relu"),
        keras.layers.Dense(3),
    ])
    position = {id(v): i for i, v in enumerate(model.trainable_variables)}
    plan = []
    for j in keras_teleport.find_symmetries(model).junctions:
        ins = (position[id(j.in_kernel)],) + (
            (position[id(j.in_bias)],) if j.in_bias is not None else ())
        plan.append(objectives.JunctionIndices(
            groups.get("scaling"), j.width, ins, position[id(j.out_kernel)]))
    rng = np.random.default_rng(seed)
    grads = {p: tf.constant(rng.normal(size=v.shape), tf.float32)
             for p, v in enumerate(model.trainable_variables)
             if any(p in j.in_indices + (j.out_index,) for j in plan)}
    limit = ratio * float(objectives.squared_norm(grads))
    general = objectives.maximize_grad_norm(plan, grads, 10, 0.05, limit)
    fast = objectives.maximize_grad_norm_scaling(plan, grads, 10, 0.05, limit)
    assert int(fast[3]) == int(general[3])
    if ratio < 2:
        assert int(fast[3]) < 10  # the cap stopped some steps
    np.testing.assert_allclose(float(fast[2]), float(general[2]), rtol=1e-5)
    for a, b in zip(fast[0], general[0]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    # And the fast path's value is the squared norm of the moved gradient.
    moved = objectives.transport(plan, fast[0], grads, "linear")
    np.testing.assert_allclose(
        float(fast[2]), sum(float(tf.reduce_sum(g ** 2)) for g in moved.values()),
        rtol=1e-5)
