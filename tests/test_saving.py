"""Saving, loading and exporting models trained with Teleport."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_teleport  # noqa: F401  (registers the serializable classes)
from conftest import make_data
from conftest import make_mlp
from conftest import weights_numpy
from keras_teleport import SymmetricDensePair
from keras_teleport import Teleport


def compile_teleport(model, inner, **kwargs):
    model.compile(optimizer=Teleport(inner, **kwargs), loss="mse")


def by_kind(metrics):
    """Metrics with junction names (which depend on layer names) dropped:
    per-junction values are kept in junction order."""
    plain = {k: v for k, v in metrics.items() if "/" not in k}
    plain["junctions"] = [v for k, v in metrics.items() if "/" in k]
    return plain


@pytest.mark.parametrize("name,make_inner", [
    ("adam", lambda: keras.optimizers.Adam(0.01)),
    ("rmsprop_centered", lambda: keras.optimizers.RMSprop(
        0.01, momentum=0.5, centered=True)),
])
def test_resume_from_keras_file_matches_uninterrupted(tmp_path, name,
                                                      make_inner):
    x, y = make_data(32)
    fit_kwargs = dict(batch_size=8, shuffle=False, verbose=0)

    keras.utils.set_random_seed(0)
    model = make_mlp()
    compile_teleport(model, make_inner(), every=3)
    model.fit(x, y, epochs=3, **fit_kwargs)  # 12 steps, teleports at 0,3,6,9
    uninterrupted = weights_numpy(model)
    final_metrics = model.optimizer.teleport_metrics
    assert final_metrics["teleports"] == 4

    keras.utils.set_random_seed(0)
    model = make_mlp()
    compile_teleport(model, make_inner(), every=3)
    model.fit(x, y, epochs=1, **fit_kwargs)  # 4 steps, teleports at 0,3
    saved_metrics = model.optimizer.teleport_metrics
    assert saved_metrics["teleports"] == 2
    saved_state = [v.numpy() for v in model.optimizer.variables]
    path = tmp_path / "mid.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, Teleport)
    assert loaded.optimizer.every == 3
    assert isinstance(loaded.optimizer.inner_optimizer,
                      type(model.optimizer.inner_optimizer))
    assert loaded.optimizer.teleport_metrics == saved_metrics
    loaded_state = [v.numpy() for v in loaded.optimizer.variables]
    assert len(loaded_state) == len(saved_state)
    for a, b in zip(loaded_state, saved_state):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights_numpy(loaded), weights_numpy(model)):
        np.testing.assert_array_equal(a, b)

    loaded.fit(x, y, epochs=2, **fit_kwargs)
    resumed_metrics = loaded.optimizer.teleport_metrics
    assert resumed_metrics["teleports"] == final_metrics["teleports"]
    assert resumed_metrics["rejected"] == final_metrics["rejected"]
    resumed, final = by_kind(resumed_metrics), by_kind(final_metrics)
    assert sorted(resumed) == sorted(final)
    assert len(final["junctions"]) == 2
    for key, value in final.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-5,
                                   err_msg=key)
    for a, b in zip(weights_numpy(loaded), uninterrupted):
        np.testing.assert_allclose(a, b, rtol=1e-6,
                                   atol=1e-6 * np.max(np.abs(b)))


def test_resume_check_detects_lost_optimizer_state(tmp_path):
    """Guards the test above: restarting with a fresh Teleport differs."""
    x, y = make_data(32)
    fit_kwargs = dict(batch_size=8, shuffle=False, verbose=0)
    keras.utils.set_random_seed(0)
    model = make_mlp()
    compile_teleport(model, keras.optimizers.Adam(0.01), every=3)
    model.fit(x, y, epochs=3, **fit_kwargs)
    uninterrupted = weights_numpy(model)

    keras.utils.set_random_seed(0)
    model = make_mlp()
    compile_teleport(model, keras.optimizers.Adam(0.01), every=3)
    model.fit(x, y, epochs=1, **fit_kwargs)
    compile_teleport(model, keras.optimizers.Adam(0.01), every=3)
    model.fit(x, y, epochs=2, **fit_kwargs)
    difference = max(np.max(np.abs(a - b))
                     for a, b in zip(weights_numpy(model), uninterrupted))
    assert difference > 1e-4


def test_export_serves_the_same_outputs(tmp_path):
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(32)
    compile_teleport(model, keras.optimizers.Adam(0.01), every=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert model.optimizer.teleport_metrics["teleports"] == 2
    path = str(tmp_path / "exported")
    model.export(path, format="tf_saved_model")
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(x).numpy(),
                               model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    # The serving model carries the layers' weights and nothing else.
    exported = sorted(tuple(v.shape) for v in served.variables)
    assert exported == sorted(tuple(w.shape) for w in model.weights)


@pytest.mark.parametrize("group,hidden", [("scaling", "relu"),
                                          ("gl", "linear")])
def test_symmetric_dense_pair_round_trip(tmp_path, group, hidden):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        SymmetricDensePair(6, 5, hidden_activation=hidden, group=group,
                           activation="relu",
                           bias_initializer="random_normal"),
        keras.layers.Dense(3),
    ])
    x, y = make_data(32)
    compile_teleport(model, keras.optimizers.Adam(0.01), every=2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    pair = model.layers[0]
    record = pair.group_element.numpy()
    identity = np.zeros(6) if group == "scaling" else np.eye(6)
    assert np.max(np.abs(record - identity)) > 1e-3
    path = tmp_path / "pair.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded_pair = loaded.layers[0]
    assert isinstance(loaded_pair, SymmetricDensePair)
    assert loaded_pair.get_config() == pair.get_config()
    np.testing.assert_array_equal(loaded_pair.group_element.numpy(), record)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    # The restored optimizer accumulates into the restored record.
    assert loaded.optimizer.teleport_metrics == model.optimizer.teleport_metrics
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert loaded.optimizer.teleport_metrics["teleports"] == 4
    assert np.max(np.abs(loaded_pair.group_element.numpy() - record)) > 1e-4
