"""The data-dependent GL action: exactness, loss guard, ascent, reset."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_teleport  # noqa: E402
from keras_teleport import data_dependent  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def leaky_mlp(widths=(6, 8, 5, 4), use_bias=False, slope=0.1, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((widths[0],))]
    for w in widths[1:-1]:
        layers.append(keras.layers.Dense(w, use_bias=use_bias,
                                         bias_initializer="random_normal"))
        layers.append(keras.layers.LeakyReLU(negative_slope=slope))
    layers.append(keras.layers.Dense(widths[-1], use_bias=use_bias))
    return keras.Sequential(layers)


def data(n, width=6, classes=4, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, width)).astype("float32"),
            rng.integers(0, classes, size=n))


def numpy_loss(model, weights, x, y):
    """Cross-entropy of `model` at `weights`, evaluated by Keras' predict."""
    clone = keras.models.clone_model(model)
    clone.set_weights([np.asarray(w) for w in weights])
    logits = clone.predict(x, verbose=0).astype("float64")
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean(), clone.predict(x, verbose=0)


def random_ts(chain, scale=0.1, seed=2):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(scale * rng.normal(size=(chain.layers[a].units,) * 2),
                    tf.float32)
        for a, _, _ in chain.junctions
    ]


@pytest.mark.parametrize("form", ["iclr", "neurips"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_action_is_exact_on_small_batch(form, use_bias):
    # ICLR form: exact when the batch is no larger than the hidden width;
    # NeurIPS form: when it is no larger than the input width (+1 bias).
    model = leaky_mlp(widths=(9, 8, 7, 4), use_bias=use_bias)
    x, _ = data(5, width=9)
    chain = data_dependent.make_chain(model, model.trainable_variables)
    assert len(chain.junctions) == 2
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    moved = data_dependent.act(chain, weights, tf.constant(x),
                               random_ts(chain), form=form)
    before = model.predict(x, verbose=0)
    clone = keras.models.clone_model(model)
    clone.set_weights([np.asarray(w) for w in moved])
    after = clone.predict(x, verbose=0)
    assert max(np.max(np.abs(np.asarray(a) - np.asarray(b)))
               for a, b in zip(weights, moved)) > 1e-3
    np.testing.assert_allclose(after, before, rtol=1e-4,
                               atol=1e-5 * np.abs(before).max())


def test_action_drifts_on_large_batch():
    model = leaky_mlp()
    x, _ = data(200)
    chain = data_dependent.make_chain(model, model.trainable_variables)
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    moved = data_dependent.act(chain, weights, tf.constant(x),
                               random_ts(chain, scale=0.3))
    clone = keras.models.clone_model(model)
    clone.set_weights([np.asarray(w) for w in moved])
    assert np.max(np.abs(clone.predict(x, verbose=0)
                         - model.predict(x, verbose=0))) > 1e-4


def teleporting_model(n_pool, tolerance, slots="keep", lr=0.05, seed=0):
    model = leaky_mlp(seed=seed)
    opt = keras_teleport.Teleport(
        keras.optimizers.SGD(0.0), group="gl", at_steps=[1],
        teleport_lr=lr, steps=5, loss_tolerance=tolerance, slots=slots,
        max_grad_norm_ratio=100.0,
    )
    model.compile(optimizer=opt, loss=LOSS)
    x, y = data(n_pool, seed=seed + 5)
    return model, opt, x, y


def fit_one_step(model, x, y):
    # One step with the inner lr at 0: weights move only by the teleport,
    # which runs after step 0, before step 1.
    model.fit(x[:4], y[:4], batch_size=4, epochs=1, verbose=0)


def test_reported_drift_equals_measured_loss_change():
    # With a pool of exactly one batch, the teleport batch is the pool.
    model, opt, x, y = teleporting_model(200, tolerance=None)
    opt.build(model.trainable_variables, model=model)
    opt.set_teleport_data(x, y, batch_size=200)
    before_weights = [np.asarray(v) for v in model.trainable_variables]
    loss_before, _ = numpy_loss(model, before_weights, x, y)
    fit_one_step(model, x, y)
    metrics = opt.teleport_metrics
    assert metrics["teleports"] == 1
    loss_after, _ = numpy_loss(model, model.get_weights(), x, y)
    measured = abs(loss_after - loss_before) / abs(loss_before)
    assert measured > 0
    np.testing.assert_allclose(metrics["loss_drift"], measured, rtol=1e-2,
                               atol=1e-6)


def test_guard_rolls_back_above_tolerance():
    # Adam with lr 0: the step fills the slots but moves no weight, so a
    # rejected teleport (drift above a tiny tolerance) must leave weights at
    # their start and slots equal to a bare Adam's after the same step.
    model = leaky_mlp()
    opt = keras_teleport.Teleport(
        keras.optimizers.Adam(0.0), group="gl", at_steps=[1], steps=5,
        teleport_lr=0.5, loss_tolerance=1e-9, slots="reset",
    )
    model.compile(optimizer=opt, loss=LOSS)
    bare = keras.models.clone_model(model)
    bare.set_weights(model.get_weights())
    bare.compile(optimizer=keras.optimizers.Adam(0.0), loss=LOSS)
    x, y = data(200, seed=5)
    start = model.get_weights()
    model.fit(x[:4], y[:4], batch_size=4, epochs=1, verbose=0,
              callbacks=[keras_teleport.TeleportData(x, y, batch_size=200)])
    bare.fit(x[:4], y[:4], batch_size=4, epochs=1, verbose=0)
    metrics = opt.teleport_metrics
    assert metrics["rejected"] == 1 and metrics["teleports"] == 0
    for w, v in zip(start, model.get_weights()):
        np.testing.assert_array_equal(w, v)
    slots = [v for v in opt.inner_optimizer.variables
             if "momentum" in v.path or "velocity" in v.path]
    bare_slots = [v for v in bare.optimizer.variables
                  if "momentum" in v.path or "velocity" in v.path]
    assert len(slots) == len(bare_slots) == 6
    assert any(np.abs(np.asarray(v)).max() > 0 for v in slots)
    for a, b in zip(slots, bare_slots):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(opt.inner_optimizer.iterations.numpy()) == 1


def test_ascent_increases_gradient_norm_on_teleport_batch():
    model, opt, x, y = teleporting_model(200, tolerance=None, lr=0.5)
    opt.build(model.trainable_variables, model=model)
    opt.set_teleport_data(x, y, batch_size=200)

    def grad_norm():
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        return float(sum(tf.reduce_sum(g * g) for g in grads))

    before = grad_norm()
    fit_one_step(model, x, y)
    assert opt.teleport_metrics["teleports"] == 1
    assert grad_norm() > before * 1.01


@pytest.mark.parametrize("inner", ["adam", "adagrad", "rmsprop", "momentum"])
def test_reset_matches_fresh_optimizer_at_teleported_point(inner):
    make = {
        "adam": lambda: keras.optimizers.Adam(1e-2),
        "adagrad": lambda: keras.optimizers.Adagrad(1e-2),
        "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
        "momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
    }[inner]
    x, y = data(64, seed=3)
    model = leaky_mlp()
    opt = keras_teleport.Teleport(make(), group="gl", at_steps=[3],
                                  slots="reset", teleport_lr=0.1, steps=3,
                                  loss_tolerance=None)
    model.compile(optimizer=opt, loss=LOSS)
    callbacks = [keras_teleport.TeleportData(x, y, batch_size=32)]
    # Steps 0..2, then the teleport after step 2.
    model.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0,
              shuffle=False, callbacks=callbacks)
    assert opt.teleport_metrics["teleports"] == 1
    teleported = [np.asarray(v) for v in model.trainable_variables]

    reference = keras.models.clone_model(model)
    reference.set_weights(teleported)
    reference.compile(optimizer=make(), loss=LOSS)
    tail_x, tail_y = x[24:48], y[24:48]
    model.fit(tail_x, tail_y, batch_size=8, epochs=1, verbose=0,
              shuffle=False)
    reference.fit(tail_x, tail_y, batch_size=8, epochs=1, verbose=0,
                  shuffle=False)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_relu_is_refused_for_gl():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(3)])
    model.compile(optimizer=keras_teleport.Teleport(
        keras.optimizers.SGD(), group="gl", every=1), loss=LOSS)
    with pytest.raises(ValueError, match="relu"):
        model.fit(np.zeros((4, 4)), np.zeros(4), verbose=0)


def test_missing_teleport_data_is_a_clear_error():
    model, opt, x, y = teleporting_model(50, tolerance=None)
    with pytest.raises(ValueError, match="TeleportData"):
        fit_one_step(model, x, y)
