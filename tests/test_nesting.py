"""Teleports wrapping Teleports: each keeps its own group and schedule, and
together they act as one wrapper with both schedules."""

import keras
import numpy as np
import pytest

import keras_teleport
from conftest import make_data
from conftest import make_mlp
from conftest import weights_numpy
from keras_teleport import Teleport


def fit(model, optimizer, x, y, epochs=1, callbacks=None, **compile_kwargs):
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False,
                     verbose=0, callbacks=callbacks)


def innermost_state(optimizer):
    while isinstance(optimizer, Teleport):
        optimizer = optimizer.inner_optimizer
    return [np.array(v.numpy()) for v in optimizer.variables
            if v is not optimizer.iterations]


def test_idle_outer_teleport_is_the_inner_teleport_exactly():
    x, y = make_data(16)
    keras.utils.set_random_seed(0)
    single_model = make_mlp()
    single = Teleport(keras.optimizers.Adam(0.01), at_steps=[1])
    fit(single_model, single, x, y)
    keras.utils.set_random_seed(0)
    nested_model = make_mlp()
    nested = Teleport(Teleport(keras.optimizers.Adam(0.01), at_steps=[1]))
    fit(nested_model, nested, x, y)
    for a, b in zip(weights_numpy(single_model), weights_numpy(nested_model)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(innermost_state(single), innermost_state(nested)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("inner_factory", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    lambda: keras.optimizers.Adam(0.01),
], ids=["momentum", "adam"])
def test_split_schedules_match_one_wrapper_with_both(inner_factory):
    # Teleports at steps 0 and 2 (not consecutive, so each has its own
    # growth cap): one wrapper, or the outer one at 0 and the inner at 2.
    x, y = make_data(16)
    keras.utils.set_random_seed(0)
    one_model = make_mlp()
    one = Teleport(inner_factory(), at_steps=[0, 2])
    fit(one_model, one, x, y)
    keras.utils.set_random_seed(0)
    two_model = make_mlp()
    inner = Teleport(inner_factory(), at_steps=[2])
    two = Teleport(inner, at_steps=[0])
    fit(two_model, two, x, y)
    assert one.teleport_metrics["teleports"] == 2
    assert two.teleport_metrics["teleports"] == 1
    assert inner.teleport_metrics["teleports"] == 1
    for a, b in zip(weights_numpy(one_model), weights_numpy(two_model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(innermost_state(one), innermost_state(two)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def paper_like_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((12,)),
        keras.layers.Dense(8, use_bias=False),
        keras.layers.LeakyReLU(0.1),
        keras.layers.Dense(6, use_bias=False),
        keras.layers.LeakyReLU(0.1),
        keras.layers.Dense(3, use_bias=False),
    ])


def test_scaling_around_data_dependent_gl_in_fit_and_saved(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = paper_like_model()
    inner = Teleport(keras.optimizers.Adagrad(0.01), group="gl",
                     slots="reset", at_steps=[2, 3], teleport_lr=1e-3)
    outer = Teleport(inner, group="scaling", at_steps=[2, 3])
    model.compile(
        optimizer=outer, steps_per_execution=4,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(
        x, y, batch_size=8, epochs=1, verbose=0,
        callbacks=[keras_teleport.TeleportData(x, y, batch_size=8),
                   keras_teleport.TeleportLogger()])
    assert outer.teleport_metrics["teleports"] == 2
    assert inner.teleport_metrics["teleports"] == 2
    assert history.history["teleport/teleports"] == [2]
    assert history.history["teleport_1/teleports"] == [2]
    # The inner reset restarted the inner step count after its teleports;
    # the outer one counts every step.
    assert int(outer.iterations) == 8
    assert int(inner.inner_optimizer.iterations) < 8
    path = tmp_path / "nested.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.optimizer.get_config() == outer.get_config()
    assert isinstance(restored.optimizer.inner_optimizer, Teleport)
    for a, b in zip(restored.optimizer.variables, outer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_outer_reset_is_refused_and_names_the_inner_one():
    with pytest.raises(ValueError, match="slots='reset'.*inner one"):
        Teleport(Teleport(keras.optimizers.Adam()), every=2, slots="reset")


def test_teleport_around_loss_scale_around_teleport_is_refused():
    wrapped = keras.optimizers.LossScaleOptimizer(
        Teleport(keras.optimizers.SGD(), every=1))
    with pytest.raises(ValueError, match="wrap the Teleport instead"):
        Teleport(wrapped, every=1)
