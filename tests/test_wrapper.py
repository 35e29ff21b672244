"""The Teleport wrapper as a Keras optimizer: schedule, validation,
rejection, forwarding, serialization, callbacks, Keras integrations."""

import glob
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import BASE_OPTIMIZERS
from conftest import MODES
from conftest import OPTIMIZERS
from conftest import make_data
from conftest import make_mlp
from conftest import tape_gradients
from conftest import weights_numpy
from keras_teleport import Teleport
from keras_teleport import TeleportLogger


def fit(model, optimizer, x, y, mode="graph", batch_size=8, epochs=1,
        callbacks=None, **compile_kwargs):
    model.compile(optimizer=optimizer, loss="mse", **MODES[mode],
                  **compile_kwargs)
    return model.fit(x, y, batch_size=batch_size, epochs=epochs,
                     shuffle=False, verbose=0, callbacks=callbacks)


def optimizer_state(optimizer):
    return [np.array(v.numpy()) for v in optimizer.variables]


# (a) A Teleport that never teleports is the inner optimizer ----------------


# Every variant eagerly and in graph mode; the four families under XLA too
# (XLA compiles are the slow part of the suite).
NEVER_CASES = [(name, mode) for name in sorted(OPTIMIZERS)
               for mode in ("eager", "graph")] + [
    (name, "xla") for name in BASE_OPTIMIZERS + ["adam_amsgrad",
                                                 "rmsprop_centered"]]


@pytest.mark.parametrize("optimizer_name,mode", NEVER_CASES)
def test_never_teleporting_is_bit_identical_to_inner(optimizer_name, mode):
    x, y = make_data(32)
    results = []
    for wrap in (False, True):
        keras.utils.set_random_seed(0)
        model = make_mlp()
        start = weights_numpy(model)
        inner = OPTIMIZERS[optimizer_name](0.01)
        optimizer = Teleport(inner) if wrap else inner
        fit(model, optimizer, x, y, mode)
        results.append((weights_numpy(model),
                        [v.numpy() for v in inner.variables]))
    (w_bare, s_bare), (w_wrapped, s_wrapped) = results
    assert max(np.max(np.abs(a - b)) for a, b in zip(w_bare, start)) > 1e-4
    for a, b in zip(w_wrapped, w_bare):
        np.testing.assert_array_equal(a, b)
    assert len(s_wrapped) == len(s_bare)
    for a, b in zip(s_wrapped, s_bare):
        np.testing.assert_array_equal(a, b)


# (b) The schedule ----------------------------------------------------------


class StepWeights(keras.callbacks.Callback):
    """Weights and the teleport counters after every batch."""

    def __init__(self):
        super().__init__()
        self.weights, self.attempts, self.accepted = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        metrics = self.model.optimizer.teleport_metrics
        self.weights.append(weights_numpy(self.model))
        self.attempts.append(metrics["teleports"] + metrics["rejected"])
        self.accepted.append(metrics["teleports"])


def steps_where_increased(counts):
    return [s for s, c in enumerate(np.diff([0] + counts)) if c]


@pytest.mark.parametrize("every,at_steps,expected", [
    (3, None, [0, 3, 6]),
    (None, [1, 4], [1, 4]),
    (5, [2, 5, 7], [0, 2, 5, 7]),
    (1, None, [0, 1, 2, 3, 4, 5, 6, 7]),
    (None, (s for s in [6, 0]), [0, 6]),
])
def test_teleports_exactly_at_scheduled_steps(every, at_steps, expected):
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(64)  # 8 steps of 8
    start = weights_numpy(model)
    optimizer = Teleport(keras.optimizers.SGD(0.0), every=every,
                         at_steps=at_steps)
    record = StepWeights()
    fit(model, optimizer, x, y, callbacks=[record])
    moved = []
    previous = start
    for step, weights in enumerate(record.weights):
        # With lr 0 only a teleport moves the weights.
        if max(np.max(np.abs(a - b)) for a, b in zip(weights, previous)) > 0:
            moved.append(step)
        previous = weights
    # A teleport is attempted at every scheduled step and only there; the
    # weights move exactly at the accepted ones.
    assert steps_where_increased(record.attempts) == expected
    accepted = steps_where_increased(record.accepted)
    assert moved == accepted
    # Teleports on consecutive steps share one growth cap (a burst), so
    # some of those may be rejected; isolated ones are all accepted here.
    isolated = [s for s in expected if s - 1 not in expected]
    assert set(isolated) <= set(accepted)
    assert len(accepted) >= min(len(expected), 2)


def test_teleport_metrics_match_tape_gradients():
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(16)
    optimizer = Teleport(keras.optimizers.SGD(0.0), at_steps=[0])
    optimizer.build(model.trainable_variables, model=model)
    before = weights_numpy(model)
    grads = tape_gradients(model, before, x, y)
    optimizer.apply([tf.constant(g) for g in grads], model.trainable_variables)
    after = weights_numpy(model)
    moved = tape_gradients(model, after, x, y)
    # The junctions move all kernels and the two hidden biases, not the
    # output bias.
    positions = [0, 1, 2, 3, 4]
    norm_before = math.sqrt(sum(np.sum(grads[p] ** 2) for p in positions))
    norm_after = math.sqrt(sum(np.sum(moved[p] ** 2) for p in positions))
    d0 = after[1] / before[1]
    d1 = after[3] / before[3]
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] == 1 and metrics["rejected"] == 0
    np.testing.assert_allclose(metrics["grad_norm_before"], norm_before,
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm_after"], norm_after,
                               rtol=1e-4)
    assert norm_before < norm_after <= 5.0 * norm_before * (1 + 1e-5)
    distance = math.sqrt(np.sum(np.log(d0) ** 2) + np.sum(np.log(d1) ** 2))
    np.testing.assert_allclose(metrics["distance"], distance, rtol=1e-4)
    junction_distances = sorted(
        v for k, v in metrics.items() if k.startswith("junction_distance/"))
    np.testing.assert_allclose(
        junction_distances,
        sorted([np.linalg.norm(np.log(d0)), np.linalg.norm(np.log(d1))]),
        rtol=1e-4)


# (c) Invalid arguments -------------------------------------------------------


def sgd():
    return keras.optimizers.SGD(0.1)


BAD_ARGUMENTS = [
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(optimizer=keras.optimizers.Adam), TypeError, "optimizer"),
    (dict(optimizer=Teleport(keras.optimizers.SGD()), slots="reset"),
     ValueError, "inner one"),
    (dict(every=0), ValueError, "every"),
    (dict(every=-1), ValueError, "every"),
    (dict(every=1.5), ValueError, "every"),
    (dict(every=True), ValueError, "every"),
    (dict(at_steps=[-1]), ValueError, "at_steps"),
    (dict(at_steps="x"), ValueError, "at_steps"),
    (dict(at_steps=[1.0]), ValueError, "at_steps"),
    (dict(at_steps=3), TypeError, "at_steps"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.0), ValueError, "steps"),
    (dict(teleport_lr=0), ValueError, "teleport_lr"),
    (dict(teleport_lr=-0.1), ValueError, "teleport_lr"),
    (dict(teleport_lr=float("nan")), ValueError, "teleport_lr"),
    (dict(teleport_lr=float("inf")), ValueError, "teleport_lr"),
    (dict(teleport_lr="0.5"), ValueError, "teleport_lr"),
    (dict(objective="nope"), ValueError, "objective"),
    (dict(max_grad_norm_ratio=1), ValueError, "max_grad_norm_ratio"),
    (dict(max_grad_norm_ratio=0.5), ValueError, "max_grad_norm_ratio"),
    (dict(max_grad_norm_ratio=float("inf")), ValueError,
     "max_grad_norm_ratio"),
    (dict(max_grad_norm_ratio=float("nan")), ValueError,
     "max_grad_norm_ratio"),
    (dict(slots="nope"), ValueError, "slots"),
    (dict(group="nope"), ValueError, "group"),
    (dict(optimizer=keras.optimizers.Adadelta()), ValueError, "slots"),
    (dict(optimizer=keras.optimizers.Ftrl()), ValueError, "slots"),
    (dict(clipnorm=1.0), ValueError, "clipnorm"),
    (dict(clipvalue=1.0), ValueError, "clipvalue"),
    (dict(global_clipnorm=1.0), ValueError, "global_clipnorm"),
    (dict(weight_decay=0.01), ValueError, "weight_decay"),
    (dict(use_ema=True), ValueError, "use_ema"),
    (dict(loss_scale_factor=2.0), ValueError, "loss_scale_factor"),
    (dict(gradient_accumulation_steps=2), ValueError,
     "gradient_accumulation_steps"),
]


@pytest.mark.parametrize(
    "kwargs,error,match", BAD_ARGUMENTS,
    ids=[f"{next(iter(k))}={k[next(iter(k))]!r}"[:40]
         for k, _, _ in BAD_ARGUMENTS])
def test_invalid_argument_raises(kwargs, error, match):
    kwargs = dict(kwargs)
    optimizer = kwargs.pop("optimizer", None) or sgd()
    kwargs.setdefault("every", 1)
    with pytest.raises(error, match=match):
        Teleport(optimizer, **kwargs)


def test_loss_scale_wrapped_teleport_is_refused():
    inner = Teleport(keras.optimizers.SGD(), every=1)
    wrapped = keras.optimizers.LossScaleOptimizer(inner)
    with pytest.raises(ValueError, match="wrap the Teleport instead"):
        Teleport(wrapped, every=1)


@pytest.mark.parametrize("factory", [keras.optimizers.Adadelta,
                                     keras.optimizers.Ftrl])
def test_reset_works_where_transport_is_unsupported(factory):
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(32)
    optimizer = Teleport(factory(learning_rate=0.01), every=2, slots="reset")
    history = fit(model, optimizer, x, y)
    assert optimizer.teleport_metrics["teleports"] == 2
    assert optimizer.teleport_metrics["rejected"] == 0
    assert np.all(np.isfinite(history.history["loss"]))
    # The inner optimizer restarted at the last teleport (step 2 of 4).
    assert int(optimizer.inner_optimizer.iterations.numpy()) == 2
    assert int(optimizer.iterations.numpy()) == 4


def test_model_without_symmetry_raises_at_build_listing_refusals():
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(6, activation="sigmoid"),
        keras.layers.Dense(3),
    ])
    optimizer = Teleport(keras.optimizers.Adam(0.01), every=1)
    count_before = len(optimizer.variables)
    inner_count_before = len(optimizer.inner_optimizer.variables)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = make_data(16)
    with pytest.raises(ValueError) as info:
        model.fit(x, y, verbose=0)
    message = str(info.value)
    assert "tanh" in message and "sigmoid" in message
    for layer in model.layers:
        assert layer.name in message
    assert not optimizer.built
    assert not optimizer.inner_optimizer.built
    assert len(optimizer.variables) == count_before
    assert len(optimizer.inner_optimizer.variables) == inner_count_before


def test_custom_loop_without_model_raises():
    model = make_mlp()
    optimizer = Teleport(keras.optimizers.SGD(0.1), every=1)
    with pytest.raises(ValueError, match="model"):
        optimizer.build(model.trainable_variables)
    assert not optimizer.inner_optimizer.built


# (d) Rejected teleports ------------------------------------------------------


def twin_setup(inner_factory, **teleport_kwargs):
    """A Teleport and a bare twin of its inner optimizer on equal models."""
    keras.utils.set_random_seed(0)
    model = make_mlp()
    keras.utils.set_random_seed(0)
    twin_model = make_mlp()
    optimizer = Teleport(inner_factory(), **teleport_kwargs)
    optimizer.build(model.trainable_variables, model=model)
    twin = inner_factory()
    twin.build(twin_model.trainable_variables)
    return model, optimizer, twin_model, twin


def group_records(optimizer):
    return [v.numpy() for v in optimizer.variables
            if "group_element" in v.path]


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_gradient_rejects_the_teleport(poison):
    model, optimizer, twin_model, twin = twin_setup(
        lambda: keras.optimizers.Adam(0.01), at_steps=[0, 2, 4])
    x, y = make_data(16)
    for _ in range(4):  # two accepted teleports first (steps 0 and 2)
        grads = tape_gradients(model, weights_numpy(model), x, y)
        optimizer.apply([tf.constant(g) for g in grads],
                        model.trainable_variables)
    assert optimizer.teleport_metrics["teleports"] == 2
    # Bring the twin to the same state.
    for v, w in zip(twin_model.trainable_variables, weights_numpy(model)):
        v.assign(w)
    for v, w in zip(twin.variables, optimizer.inner_optimizer.variables):
        v.assign(w)
    records = group_records(optimizer)
    grads = tape_gradients(model, weights_numpy(model), x, y)
    grads[2] = grads[2].copy()
    grads[2][0, 0] = poison  # a kernel both junctions move
    metrics_before = optimizer.teleport_metrics
    optimizer.apply([tf.constant(g) for g in grads], model.trainable_variables)
    twin.apply([tf.constant(g) for g in grads], twin_model.trainable_variables)
    metrics = optimizer.teleport_metrics
    assert metrics["rejected"] == metrics_before["rejected"] + 1
    assert metrics["teleports"] == metrics_before["teleports"]
    # Nothing moved: the step is exactly the bare optimizer's step.
    for a, b in zip(weights_numpy(model), weights_numpy(twin_model)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer.inner_optimizer.variables, twin.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(group_records(optimizer), records):
        np.testing.assert_array_equal(a, b)
    # The untouched variables stay finite.
    assert np.all(np.isfinite(weights_numpy(model)[0]))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rejected_teleport_leaves_weights_and_slots_exactly(mode):
    """A teleport that can make no step within the cap is rejected: with
    lr 0, weights are exactly as before, and every slot is exactly what
    the bare optimizer computes."""
    make_inner = lambda: keras.optimizers.RMSprop(0.0, momentum=0.9,
                                                  centered=True)
    model, optimizer, twin_model, twin = twin_setup(
        make_inner, every=1, steps=1, teleport_lr=1e6,
        max_grad_norm_ratio=1.0001)
    x, y = make_data(16)
    before = weights_numpy(model)
    grads = tape_gradients(model, before, x, y)
    apply = optimizer.apply
    twin_apply = twin.apply
    if mode != "eager":
        variables = model.trainable_variables
        twin_variables = twin_model.trainable_variables
        jit = mode == "xla"
        apply = tf.function(lambda g, _: optimizer.apply(g, variables),
                            jit_compile=jit, autograph=False)
        twin_apply = tf.function(lambda g, _: twin.apply(g, twin_variables),
                                 jit_compile=jit, autograph=False)
    for _ in range(2):
        apply([tf.constant(g) for g in grads], model.trainable_variables)
        twin_apply([tf.constant(g) for g in grads],
                   twin_model.trainable_variables)
    metrics = optimizer.teleport_metrics
    assert metrics["rejected"] == 2 and metrics["teleports"] == 0
    for a, b in zip(weights_numpy(model), before):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer.inner_optimizer.variables, twin.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for record in group_records(optimizer):
        np.testing.assert_array_equal(record, np.zeros_like(record))


def test_non_finite_batch_in_fit_rejects_the_teleport():
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(16)
    optimizer = Teleport(keras.optimizers.SGD(0.0), every=1)
    fit(model, optimizer, x, y, batch_size=16)
    assert optimizer.teleport_metrics["teleports"] == 1
    records = group_records(optimizer)
    bad = x.copy()
    bad[3, 1] = np.nan
    fit(model, optimizer, bad, y, batch_size=16)
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] == 1 and metrics["rejected"] == 1
    for a, b in zip(group_records(optimizer), records):
        np.testing.assert_array_equal(a, b)


# (e) Forwarding to the inner optimizer --------------------------------------


def test_learning_rate_getter_and_setter_forward():
    inner = keras.optimizers.Adam(0.01)
    optimizer = Teleport(inner, every=1)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.01)
    optimizer.learning_rate = 0.25
    np.testing.assert_allclose(float(inner.learning_rate), 0.25)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.25)


@pytest.mark.parametrize("make_callback,expected", [
    (lambda: keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: 0.1 * 0.5**epoch), 0.1 * 0.5**2),
    (lambda: keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1e9, cooldown=0,
        min_lr=0.0), 0.1 * 0.5**2),
])
def test_lr_callbacks_change_inner_learning_rate(make_callback, expected):
    x, y = make_data(32)
    histories = []
    for wrap in (False, True):
        keras.utils.set_random_seed(0)
        model = make_mlp()
        inner = keras.optimizers.SGD(0.1)
        optimizer = Teleport(inner) if wrap else inner
        history = fit(model, optimizer, x, y, epochs=3,
                      callbacks=[make_callback()])
        np.testing.assert_allclose(float(inner.learning_rate), expected,
                                   rtol=1e-6)
        histories.append((history.history["learning_rate"],
                          weights_numpy(model)))
    (lr_bare, w_bare), (lr_wrapped, w_wrapped) = histories
    np.testing.assert_allclose(lr_wrapped, lr_bare, rtol=1e-7)
    for a, b in zip(w_wrapped, w_bare):
        np.testing.assert_array_equal(a, b)


def test_iterations_and_variables():
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(40)
    inner = keras.optimizers.Adam(0.01)
    optimizer = Teleport(inner, every=2)
    fit(model, optimizer, x, y)  # 5 steps
    assert int(optimizer.iterations.numpy()) == 5
    assert int(inner.iterations.numpy()) == 5
    inner_ids = [id(v) for v in inner.variables]
    all_ids = [id(v) for v in optimizer.variables]
    assert len(set(all_ids)) == len(all_ids)
    own = all_ids[: len(all_ids) - len(inner_ids)]
    assert all_ids[len(own):] == inner_ids
    assert id(optimizer.iterations) in own
    assert id(optimizer.iterations) != id(inner.iterations)
    # No model weight is an optimizer variable.
    weights = {id(v) for v in model.weights}
    assert not weights & {id(v) for v in optimizer.variables}
    # Slots: Adam's two per trainable variable live in the inner optimizer.
    paths = [v.path for v in optimizer.variables]
    assert sum("momentum" in p for p in paths) == len(model.trainable_weights)
    assert sum("velocity" in p for p in paths) == len(model.trainable_weights)
    # Two junctions, one record each.
    assert sum("group_element" in p for p in paths) == 2


@pytest.mark.parametrize("name,make_inner", [
    *[(n, lambda f=OPTIMIZERS[n]: f(0.01)) for n in sorted(OPTIMIZERS)],
    ("nadam", lambda: keras.optimizers.Nadam(0.01)),
    ("adamax", lambda: keras.optimizers.Adamax(0.01)),
    ("lion", lambda: keras.optimizers.Lion(0.01)),
])
def test_every_inner_variable_is_tracked(name, make_inner):
    """Wrapping must not hide any inner variable from `variables` (which
    saving, loading and slots="reset" go through)."""
    model = make_mlp()
    bare = make_inner()
    bare.build(model.trainable_variables)
    inner = make_inner()
    optimizer = Teleport(inner, every=1)
    optimizer.build(model.trainable_variables, model=model)
    assert len(inner.variables) == len(bare.variables)
    ids = {id(v) for v in optimizer.variables}
    for attribute, value in vars(inner).items():
        if isinstance(value, keras.Variable):
            assert id(value) in ids, attribute


def test_get_config_from_config_round_trip():
    optimizer = Teleport(
        keras.optimizers.RMSprop(0.02, momentum=0.5, centered=True),
        every=7, at_steps=[3, 1], steps=4, teleport_lr=0.2,
        max_grad_norm_ratio=3.0, slots="reset", group="scaling",
        name="my_teleport")
    config = optimizer.get_config()
    restored = Teleport.from_config(config)
    assert restored.get_config() == config
    assert restored.every == 7 and tuple(restored.at_steps) == (1, 3)
    assert restored.steps == 4 and restored.teleport_lr == 0.2
    assert restored.max_grad_norm_ratio == 3.0
    assert restored.slots == "reset" and restored.group == "scaling"
    assert restored.name == "my_teleport"
    inner = restored.inner_optimizer
    assert isinstance(inner, keras.optimizers.RMSprop)
    assert inner.momentum == 0.5 and inner.centered
    np.testing.assert_allclose(float(inner.learning_rate), 0.02)


def test_keras_serialize_deserialize():
    optimizer = Teleport(keras.optimizers.Adam(0.003, amsgrad=True),
                         every=5, slots="keep")
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == "keras_teleport>Teleport"
    restored = keras.optimizers.deserialize(serialized)
    assert isinstance(restored, Teleport)
    assert restored.get_config() == optimizer.get_config()
    assert restored.inner_optimizer.amsgrad
    # And through the registered name alone.
    restored = keras.saving.get_registered_object("keras_teleport>Teleport")
    assert restored is Teleport


# (f) Callbacks -----------------------------------------------------------------


def test_teleport_logger_adds_metrics_to_history():
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(32)
    optimizer = Teleport(keras.optimizers.SGD(0.01), every=2)
    history = fit(model, optimizer, x, y, epochs=2,
                  callbacks=[TeleportLogger()])
    logged = history.history
    assert logged["teleport/teleports"] == [2, 4]
    assert logged["teleport/rejected"] == [0, 0]
    for key in ("grad_norm_before", "grad_norm_after", "distance"):
        assert len(logged[f"teleport/{key}"]) == 2
    final = optimizer.teleport_metrics
    for key, value in final.items():
        assert logged[f"teleport/{key}"][-1] == value


def test_teleport_logger_without_teleport_raises():
    model = make_mlp()
    x, y = make_data(16)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="Teleport"):
        model.fit(x, y, verbose=0, callbacks=[TeleportLogger()])


def test_tensorboard_with_teleport_logger(tmp_path):
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(32)
    optimizer = Teleport(keras.optimizers.Adam(0.01), every=2)
    fit(model, optimizer, x, y, epochs=2, callbacks=[
        TeleportLogger(), keras.callbacks.TensorBoard(str(tmp_path))])
    files = glob.glob(str(tmp_path / "train" / "events.out.tfevents*"))
    assert files
    tags = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if not value.tag.startswith("epoch_"):
                    continue
                tags.setdefault(value.tag, []).append(
                    float(tf.make_ndarray(value.tensor)))
    assert tags["epoch_teleport/teleports"] == [2.0, 4.0]
    np.testing.assert_allclose(tags["epoch_learning_rate"], [0.01, 0.01])


# (g) steps_per_execution ---------------------------------------------------


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_steps_per_execution(mode):
    x, y = make_data(64)  # 8 steps of 8
    results = []
    for steps in (1, 4):
        keras.utils.set_random_seed(0)
        model = make_mlp()
        optimizer = Teleport(keras.optimizers.Adam(0.01), every=3)
        fit(model, optimizer, x, y, mode, steps_per_execution=steps)
        results.append((optimizer.teleport_metrics["teleports"],
                        weights_numpy(model)))
    (count_1, w_1), (count_4, w_4) = results
    assert count_1 == count_4 == 3  # steps 0, 3, 6
    for a, b in zip(w_4, w_1):
        np.testing.assert_allclose(a, b, rtol=1e-5,
                                   atol=1e-6 * np.max(np.abs(b)))


# (h) Mixed precision -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_mixed_float16(mode):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = make_mlp()
        x, y = make_data(32)
        optimizer = Teleport(keras.optimizers.Adam(0.01), every=2)
        model.compile(optimizer=optimizer, loss="mse", **MODES[mode])
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.optimizer.inner_optimizer is optimizer
        before = weights_numpy(model)
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                            callbacks=[TeleportLogger()])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(history.history["loss"]))
    # The loss scale may skip steps whose scaled gradient overflowed:
    # teleports happen at the steps actually taken (every=2).
    taken = int(optimizer.iterations.numpy())
    assert taken >= 6
    expected = (taken + 1) // 2
    assert history.history["teleport/teleports"][-1] == expected
    assert optimizer.teleport_metrics["teleports"] == expected
    after = weights_numpy(model)
    assert all(w.dtype == np.float32 for w in after)
    assert all(np.all(np.isfinite(w)) for w in after)
    assert max(np.max(np.abs(a - b)) for a, b in zip(after, before)) > 1e-3


def test_consecutive_teleports_share_one_growth_cap():
    """every=1 on one batch: however many teleports in a row, the gradient
    norm of the moved variables stays within max_grad_norm_ratio of the
    norm before the first one (tape gradients at the start and the end)."""
    keras.utils.set_random_seed(0)
    model = make_mlp()
    x, y = make_data(16)
    start = weights_numpy(model)
    optimizer = Teleport(keras.optimizers.SGD(0.0), every=1, teleport_lr=2.0,
                         max_grad_norm_ratio=2.0)
    fit(model, optimizer, x, y, batch_size=16, epochs=5)
    metrics = optimizer.teleport_metrics
    assert metrics["teleports"] + metrics["rejected"] == 5
    assert metrics["teleports"] >= 1
    moved_positions = [0, 1, 2, 3, 4]  # all but the output bias
    norm = lambda grads: math.sqrt(sum(np.sum(grads[p] ** 2)
                                       for p in moved_positions))
    initial = norm(tape_gradients(model, start, x, y))
    final = norm(tape_gradients(model, weights_numpy(model), x, y))
    assert final > 1.2 * initial  # the teleports did raise it
    assert final <= 2.0 * initial * (1 + 1e-4)
