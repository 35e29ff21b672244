"""What the inner optimizer sees after a teleport: gradients and slots.

Every expectation here is computed independently of the library: gradients
by GradientTape at the teleported weights, slots by a fresh optimizer
replayed over the same history at teleported points, group actions in numpy.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import MODES
from conftest import OPTIMIZERS
from conftest import make_data
from conftest import make_mlp
from conftest import tape_gradients
from conftest import weights_numpy
from keras_teleport import Teleport

WIDTHS = (4, 6, 5, 3)
N_HISTORY = 3


# Helpers -----------------------------------------------------------------


def records(optimizer, count):
    """The Teleport's accumulated group element of each junction, in order."""
    found = {
        v.path.rsplit("group_element_", 1)[1]: v.numpy()
        for v in optimizer.variables
        if "group_element_" in v.path
    }
    assert sorted(found) == [str(i) for i in range(count)], found.keys()
    return [found[str(i)].astype(np.float64) for i in range(count)]


def as_matrices(recs):
    """Records as group matrices g (log-scales for scaling, g for GL)."""
    return [np.diag(np.exp(r)) if r.ndim == 1 else r for r in recs]


def relative_matrices(before, after):
    """The element of one teleport, from the records before and after it."""
    return [np.linalg.solve(b, a) for b, a in zip(before, after)]


def move_weights_np(weights, mats, use_bias=True):
    """Junction i between Dense i and i+1: K_i g, b_i g, g^-1 K_{i+1}."""
    w = [np.asarray(v, np.float64) for v in weights]
    step = 2 if use_bias else 1
    for i, g in enumerate(mats):
        k, nk = step * i, step * (i + 1)
        w[k] = w[k] @ g
        if use_bias:
            w[k + 1] = w[k + 1] @ g
        w[nk] = np.linalg.solve(g, w[nk])
    return w


def move_grads_np(grads, mats, use_bias=True):
    """Gradients: G_i g^-T, Gb_i g^-T, g^T G_{i+1}."""
    w = [np.asarray(v, np.float64) for v in grads]
    step = 2 if use_bias else 1
    for i, g in enumerate(mats):
        k, nk = step * i, step * (i + 1)
        inv_t = np.linalg.inv(g).T
        w[k] = w[k] @ inv_t
        if use_bias:
            w[k + 1] = w[k + 1] @ inv_t
        w[nk] = g.T @ w[nk]
    return w


def batches(count, n=16, seed=0):
    return [make_data(n, WIDTHS[0], WIDTHS[-1], seed=seed + i)
            for i in range(count)]


def custom_step(model, optimizer, x, y):
    """One step by hand; returns the tape gradient it applied."""
    grads = tape_gradients(model, weights_numpy(model), x, y)
    optimizer.apply([tf.constant(g) for g in grads], model.trainable_variables)
    return grads


def assert_close_scaled(actual, expected, rtol, msg=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale,
                               err_msg=msg)


def replay(factory, lr, shapes, steps):
    """A fresh optimizer replayed over `steps`: list of (weights or None,
    grads). Weights, when given, are written into its variables first."""
    optimizer = factory(lr)
    variables = [keras.Variable(np.zeros(s, np.float32)) for s in shapes]
    optimizer.build(variables)
    for weights, grads in steps:
        if weights is not None:
            for v, w in zip(variables, weights):
                v.assign(np.asarray(w, np.float32))
        optimizer.apply([tf.constant(np.asarray(g, np.float32)) for g in grads],
                        variables)
    return optimizer, [v.numpy() for v in variables]


def slot_values(optimizer):
    """The optimizer's per-weight slots (its non-scalar variables), in
    order. Scalar state (the step count, the learning rate, Nadam's
    momentum-schedule product) is not built from gradients."""
    return [(v.path, v.numpy()) for v in optimizer.variables
            if len(v.shape) > 0]


def assert_same_slots(actual_opt, expected_opt, rtol=1e-5):
    actual, expected = slot_values(actual_opt), slot_values(expected_opt)
    assert len(actual) == len(expected)
    # Plain SGD is the only variant without slots.
    assert actual or isinstance(expected_opt, keras.optimizers.SGD)
    for (name, a), (_, e) in zip(actual, expected):
        assert a.shape == e.shape, name
        assert_close_scaled(a, e, rtol, msg=name)


# (a) The gradient the inner optimizer receives ---------------------------


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("group,activation", [("scaling", "relu"),
                                              ("gl", "linear")])
def test_inner_optimizer_gets_gradient_at_teleported_weights(
    group, activation, mode
):
    """With plain SGD, w_next = g·w - lr * grad L(g·w) at every teleport,
    where g is the teleport's element and the gradient is taken by
    GradientTape at the teleported weights on the same batch."""
    lr = 0.05
    keras.utils.set_random_seed(0)
    model = make_mlp(WIDTHS, activation, use_bias=True)
    # Teleports at steps 0 and 2; step 1 is a plain SGD step.
    optimizer = Teleport(keras.optimizers.SGD(lr), at_steps=[0, 2],
                         group=group)
    model.compile(optimizer=optimizer, loss="mse", **MODES[mode])
    previous = [np.eye(w) for w in WIDTHS[1:-1]]
    for step, (x, y) in enumerate(batches(3)):
        before = weights_numpy(model)
        model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
        after = weights_numpy(model)
        current = as_matrices(records(optimizer, len(WIDTHS) - 2))
        element = relative_matrices(previous, current)
        previous = current
        for g in element:
            if step == 1:
                np.testing.assert_allclose(g, np.eye(len(g)), atol=1e-12)
                continue
            assert np.max(np.abs(g - np.eye(len(g)))) > 1e-3, "no teleport"
            if group == "gl":
                assert np.max(np.abs(g - np.diag(np.diag(g)))) > 1e-3
        teleported = move_weights_np(before, element)
        grads = tape_gradients(model, [w.astype(np.float32) for w in teleported],
                               x, y)
        for i, (w_tel, g_tel, w_new) in enumerate(zip(teleported, grads, after)):
            # Reconstruct the gradient SGD applied: (g·w - w_next) / lr.
            applied = (w_tel - w_new) / lr
            scale = max(np.max(np.abs(w_tel)) / lr * 1e-6, 1e-6)
            np.testing.assert_allclose(
                applied, g_tel, rtol=2e-3,
                atol=max(2e-3 * np.max(np.abs(g_tel)), 4 * scale),
                err_msg=f"step {step}, variable {i}")
    assert optimizer.teleport_metrics["teleports"] == 2
    assert optimizer.teleport_metrics["rejected"] == 0


def test_gradient_check_detects_the_untransported_gradient():
    """Guards the test above: the gradient at the old weights differs."""
    keras.utils.set_random_seed(0)
    model = make_mlp(WIDTHS, "relu", use_bias=True)
    (x, y), = batches(1)
    optimizer = Teleport(keras.optimizers.SGD(0.0), at_steps=[0])
    optimizer.build(model.trainable_variables, model=model)
    before = weights_numpy(model)
    old = tape_gradients(model, before, x, y)
    custom_step(model, optimizer, x, y)
    new = tape_gradients(model, weights_numpy(model), x, y)
    differences = [np.max(np.abs(a - b)) / np.max(np.abs(b))
                   for a, b in zip(old, new)]
    assert max(differences) > 1e-2


# (b) Transported slots = slots replayed at the teleported points ----------


REPLAY_OPTIMIZERS = {
    **OPTIMIZERS,
    # RMSprop's momentum holds normalised steps g / sqrt(v + eps): invariant
    # under scaling only up to eps, so eps is taken negligible here.
    "rmsprop_momentum": lambda lr: keras.optimizers.RMSprop(
        lr, momentum=0.9, epsilon=1e-12),
    "rmsprop_centered_momentum": lambda lr: keras.optimizers.RMSprop(
        lr, momentum=0.9, centered=True, epsilon=1e-12),
    # The other optimizers with transportable slots, and the slots every
    # optimizer may carry (weight EMA, gradient accumulators).
    "adamw": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.1),
    "adamax": lambda lr: keras.optimizers.Adamax(lr),
    "nadam": lambda lr: keras.optimizers.Nadam(lr),
    "lion": lambda lr: keras.optimizers.Lion(lr),
    "adam_accumulation": lambda lr: keras.optimizers.Adam(
        lr, gradient_accumulation_steps=2),
}


def run_history_then_teleport(factory, lr, group, slots, activation="relu",
                              mode="eager", extra_steps=0):
    """N steps, a teleport at step N, then `extra_steps` more; by hand.

    Returns (model, optimizer, history grads, weights before step N,
    teleport element matrices, grads at the teleported weights, batches).
    """
    keras.utils.set_random_seed(0)
    model = make_mlp(WIDTHS, activation, use_bias=True)
    optimizer = Teleport(factory(lr), at_steps=[N_HISTORY], group=group,
                         slots=slots)
    optimizer.build(model.trainable_variables, model=model)
    data = batches(N_HISTORY + 1 + extra_steps)
    apply = optimizer.apply
    if mode != "eager":
        variables = model.trainable_variables
        # autograph=False, as Keras' own train step (do_not_convert).
        apply = tf.function(lambda grads, _: optimizer.apply(grads, variables),
                            jit_compile=(mode == "xla"), autograph=False)
    history = []
    for x, y in data[:N_HISTORY]:
        grads = tape_gradients(model, weights_numpy(model), x, y)
        apply([tf.constant(g) for g in grads], model.trainable_variables)
        history.append(grads)
    before = weights_numpy(model)
    x, y = data[N_HISTORY]
    grads = tape_gradients(model, before, x, y)
    apply([tf.constant(g) for g in grads], model.trainable_variables)
    element = as_matrices(records(optimizer, len(WIDTHS) - 2))
    teleported = move_weights_np(before, element)
    grads_tel = tape_gradients(
        model, [w.astype(np.float32) for w in teleported], x, y)
    assert optimizer.teleport_metrics["teleports"] == 1
    return dict(model=model, optimizer=optimizer, history=history,
                before=before, element=element, teleported=teleported,
                grads_tel=grads_tel, data=data, apply=apply)


@pytest.mark.parametrize("name", sorted(REPLAY_OPTIMIZERS))
def test_transported_slots_equal_replay_at_teleported_points(name):
    factory, lr = REPLAY_OPTIMIZERS[name], 0.01
    run = run_history_then_teleport(factory, lr, "scaling", "transport")
    shapes = [w.shape for w in run["before"]]
    steps = [(None, move_grads_np(g, run["element"])) for g in run["history"]]
    steps.append((run["teleported"], run["grads_tel"]))
    expected, expected_weights = replay(factory, lr, shapes, steps)
    inner = run["optimizer"].inner_optimizer
    assert_same_slots(inner, expected)
    if name == "nadam":  # gradient-free state, compared by attribute
        np.testing.assert_allclose(float(inner._u_product),
                                   float(expected._u_product), rtol=1e-6)
    for a, e in zip(weights_numpy(run["model"]), expected_weights):
        assert_close_scaled(a, e, 1e-5)


def test_weight_average_moves_like_the_weights():
    """The inner optimizer's EMA of the weights (use_ema) is transported
    like the weights: after a teleport by g, the average is that of the
    teleported history, m * g·EMA + (1 - m) * w_new (numpy recursion)."""
    momentum, lr = 0.5, 0.05
    factory = lambda lr: keras.optimizers.SGD(
        lr, momentum=0.9, use_ema=True, ema_momentum=momentum)
    keras.utils.set_random_seed(0)
    model = make_mlp(WIDTHS, "relu", use_bias=True)
    optimizer = Teleport(factory(lr), at_steps=[N_HISTORY], group="scaling")
    optimizer.build(model.trainable_variables, model=model)
    inner = optimizer.inner_optimizer
    average = None
    for step, (x, y) in enumerate(batches(N_HISTORY + 1)):
        before = weights_numpy(model)
        custom_step(model, optimizer, x, y)
        after = weights_numpy(model)
        if step == N_HISTORY:
            g = as_matrices(records(optimizer, len(WIDTHS) - 2))
            average = move_weights_np(average, g)
        if average is None:  # Keras: the first step copies the weights
            average = [w.astype(np.float64) for w in after]
        else:
            average = [momentum * a + (1 - momentum) * w
                       for a, w in zip(average, after)]
        actual = [v.numpy() for v in inner._model_variables_moving_average]
        assert len(actual) == len(average)
        for a, e in zip(actual, average):
            assert_close_scaled(a, e, 1e-5, msg=f"step {step}")
    assert max(np.max(np.abs(a - b)) for a, b in zip(after, before)) > 1e-3


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_transported_slots_equal_replay_compiled(mode):
    factory, lr = REPLAY_OPTIMIZERS["adam_amsgrad"], 0.01
    run = run_history_then_teleport(factory, lr, "scaling", "transport",
                                    mode=mode)
    shapes = [w.shape for w in run["before"]]
    steps = [(None, move_grads_np(g, run["element"])) for g in run["history"]]
    steps.append((run["teleported"], run["grads_tel"]))
    expected, _ = replay(factory, lr, shapes, steps)
    assert_same_slots(run["optimizer"].inner_optimizer, expected)


@pytest.mark.parametrize("name", ["sgd_momentum", "sgd_nesterov"])
def test_linear_slots_are_exact_under_gl(name):
    """Momentum is linear in the gradients: exact under any element."""
    factory, lr = REPLAY_OPTIMIZERS[name], 0.01
    run = run_history_then_teleport(factory, lr, "gl", "transport",
                                    activation="linear")
    for g in run["element"]:
        assert np.max(np.abs(g - np.diag(np.diag(g)))) > 1e-3
    shapes = [w.shape for w in run["before"]]
    steps = [(None, move_grads_np(g, run["element"])) for g in run["history"]]
    steps.append((run["teleported"], run["grads_tel"]))
    expected, expected_weights = replay(factory, lr, shapes, steps)
    assert_same_slots(run["optimizer"].inner_optimizer, expected, rtol=1e-4)
    for a, e in zip(weights_numpy(run["model"]), expected_weights):
        assert_close_scaled(a, e, 1e-4)


def test_adam_first_moment_is_exact_under_gl():
    factory, lr = REPLAY_OPTIMIZERS["adam"], 0.01
    run = run_history_then_teleport(factory, lr, "gl", "transport",
                                    activation="linear")
    shapes = [w.shape for w in run["before"]]
    steps = [(None, move_grads_np(g, run["element"])) for g in run["history"]]
    steps.append((run["teleported"], run["grads_tel"]))
    expected, _ = replay(factory, lr, shapes, steps)
    inner = run["optimizer"].inner_optimizer
    assert len(inner._momentums) == len(shapes)
    for a, e in zip(inner._momentums, expected._momentums):
        assert_close_scaled(a.numpy(), e.numpy(), 1e-4, msg=a.path)
    # Second moments use the correlated bound: v >= m^2 still holds.
    for m, v in zip(inner._momentums, inner._velocities):
        m, v = m.numpy(), v.numpy()
        b1, b2 = inner.beta_1, inner.beta_2
        # Bias-corrected moments of the same history: v_hat >= m_hat^2.
        t = N_HISTORY + 1
        assert np.all(v / (1 - b2**t) >= (m / (1 - b1**t)) ** 2 * (1 - 1e-4))


def test_replay_detects_untransported_slots():
    """Guards the replay test: slots that were not transported differ."""
    factory, lr = REPLAY_OPTIMIZERS["adam"], 0.01
    run = run_history_then_teleport(factory, lr, "scaling", "keep")
    shapes = [w.shape for w in run["before"]]
    steps = [(None, move_grads_np(g, run["element"])) for g in run["history"]]
    steps.append((run["teleported"], run["grads_tel"]))
    expected, _ = replay(factory, lr, shapes, steps)
    with pytest.raises(AssertionError):
        assert_same_slots(run["optimizer"].inner_optimizer, expected)


# (c) slots="reset" ---------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "adagrad", "rmsprop_centered",
                                  "sgd_momentum", "nadam"])
def test_reset_equals_fresh_optimizer_at_teleported_weights(name):
    factory, lr, extra = REPLAY_OPTIMIZERS[name], 0.01, 2
    run = run_history_then_teleport(factory, lr, "scaling", "reset",
                                    extra_steps=extra)
    model, optimizer = run["model"], run["optimizer"]
    # A fresh optimizer starting at the teleported weights...
    reference = factory(lr)
    variables = [keras.Variable(w.astype(np.float32)) for w in run["teleported"]]
    reference.build(variables)
    reference.apply([tf.constant(g) for g in run["grads_tel"]], variables)
    assert_same_slots(optimizer.inner_optimizer, reference)
    for a, e in zip(weights_numpy(model), variables):
        assert_close_scaled(a, e.numpy(), 1e-5)
    # ...and the next steps agree too (Adam's bias correction restarted).
    for x, y in run["data"][N_HISTORY + 1:]:
        grads = tape_gradients(model, weights_numpy(model), x, y)
        run["apply"]([tf.constant(g) for g in grads], model.trainable_variables)
        ref_grads = tape_gradients(model, [v.numpy() for v in variables], x, y)
        reference.apply([tf.constant(g) for g in ref_grads], variables)
        for a, e in zip(weights_numpy(model), variables):
            assert_close_scaled(a, e.numpy(), 1e-5)
    assert_same_slots(optimizer.inner_optimizer, reference)
    assert int(optimizer.inner_optimizer.iterations.numpy()) == extra + 1
    assert int(optimizer.iterations.numpy()) == N_HISTORY + 1 + extra


def test_reset_schedule_follows_global_step():
    """The inner schedule keeps following the wrapper's step after a reset:
    each update uses schedule(global step), not schedule(inner step)."""
    initial, rate = 0.05, 0.7
    schedule = keras.optimizers.schedules.ExponentialDecay(
        initial, decay_steps=1, decay_rate=rate)
    extra = 2
    run = run_history_then_teleport(lambda lr: keras.optimizers.SGD(schedule),
                                    None, "scaling", "reset", extra_steps=extra)
    model, optimizer = run["model"], run["optimizer"]
    global_step = N_HISTORY + 1
    np.testing.assert_allclose(float(optimizer.learning_rate),
                               initial * rate**global_step, rtol=1e-6)
    np.testing.assert_allclose(
        float(optimizer.inner_optimizer.learning_rate),
        initial * rate**global_step, rtol=1e-6)
    # The update at the teleport used schedule(N): w = g·w - lr_N grad(g·w).
    lr_n = initial * rate**N_HISTORY
    weights = [w - lr_n * g for w, g in zip(run["teleported"], run["grads_tel"])]
    # The steps after it: lr = schedule(global step).
    for x, y in run["data"][N_HISTORY + 1:]:
        grads = tape_gradients(model, [w.astype(np.float32) for w in weights],
                               x, y)
        before_step = weights_numpy(model)
        for a, e in zip(before_step, weights):
            assert_close_scaled(a, e, 1e-5)
        run["apply"]([tf.constant(g) for g in grads], model.trainable_variables)
        lr_t = initial * rate**global_step
        weights = [w - lr_t * g for w, g in zip(weights, grads)]
        global_step += 1
    for a, e in zip(weights_numpy(model), weights):
        assert_close_scaled(a, e, 1e-5)
    np.testing.assert_allclose(float(optimizer.learning_rate),
                               initial * rate**global_step, rtol=1e-6)


# (d) slots="keep" ----------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "rmsprop_centered", "sgd_momentum"])
def test_keep_leaves_slots_untouched(name):
    factory, lr = OPTIMIZERS[name], 0.01
    run = run_history_then_teleport(factory, lr, "scaling", "keep")
    shapes = [w.shape for w in run["before"]]
    steps = [(None, g) for g in run["history"]]
    steps.append((run["teleported"], run["grads_tel"]))
    expected, expected_weights = replay(factory, lr, shapes, steps)
    assert_same_slots(run["optimizer"].inner_optimizer, expected)
    for a, e in zip(weights_numpy(run["model"]), expected_weights):
        assert_close_scaled(a, e, 1e-5)
