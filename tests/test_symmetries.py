"""find_symmetries: which junctions are admitted, which refused, and why."""

import keras
import numpy as np
import pytest

from conftest import dense
from conftest import make_mlp
from keras_teleport import SymmetricDensePair
from keras_teleport import find_symmetries

EXPECTED_GROUPS = {
    "relu": ("scaling",),
    "leaky_relu": ("scaling",),
    "linear": ("scaling", "gl"),
}


def dense_layers(model):
    return [l for l in model.layers if isinstance(l, keras.layers.Dense)]


def functional(inputs, outputs):
    return keras.Model(inputs, outputs)


def refusal_text(found):
    return " | ".join(f"{r.name}: {r.reason}" for r in found.refused)


# Chains ------------------------------------------------------------------


@pytest.mark.parametrize("functional_model", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "linear"])
def test_chain_junctions(activation, depth, use_bias, functional_model):
    widths = (4,) + (5, 6, 4)[: depth - 1] + (3,)
    model = make_mlp(widths, activation, use_bias, functional=functional_model)
    layers = dense_layers(model)
    assert len(layers) == depth
    found = find_symmetries(model)
    assert len(found.junctions) == depth - 1, found.describe()
    assert found.refused == ()
    for junction, first, second in zip(found.junctions, layers, layers[1:]):
        assert junction.in_kernel is first.kernel
        assert junction.out_kernel is second.kernel
        if use_bias:
            assert junction.in_bias is first.bias
        else:
            assert junction.in_bias is None
        assert junction.groups == EXPECTED_GROUPS[activation]
        assert junction.width == first.units


def test_single_dense_has_no_junction():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    found = find_symmetries(model)
    assert found.junctions == ()


def test_unbuilt_model_and_non_model_are_rejected():
    with pytest.raises(ValueError, match="built"):
        find_symmetries(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(TypeError, match="model"):
        find_symmetries(keras.layers.Dense(3))


# Refusals ----------------------------------------------------------------


def seq(*layers, input_dim=4):
    return keras.Sequential([keras.Input((input_dim,))] + list(layers))


REFUSED = {
    "tanh": (
        lambda: seq(dense(5, "tanh"), dense(3)),
        "tanh",
    ),
    "sigmoid": (
        lambda: seq(dense(5, "sigmoid"), dense(3)),
        "sigmoid",
    ),
    "relu6_layer": (
        lambda: seq(dense(5), keras.layers.ReLU(max_value=6.0), dense(3)),
        "max_value",
    ),
    "batchnorm_between": (
        lambda: seq(dense(5, "relu"), keras.layers.BatchNormalization(),
                    dense(3)),
        "BatchNormalization",
    ),
    "kernel_regularizer_first": (
        lambda: seq(dense(5, "relu", kernel_regularizer="l2"), dense(3)),
        "kernel regularizer",
    ),
    "kernel_regularizer_second": (
        lambda: seq(dense(5, "relu"), dense(3, kernel_regularizer="l2")),
        "kernel regularizer",
    ),
    "bias_regularizer_first": (
        lambda: seq(dense(5, "relu", bias_regularizer="l2"), dense(3)),
        "bias regularizer",
    ),
    "activity_regularizer": (
        lambda: seq(dense(5, "relu", activity_regularizer="l2"), dense(3)),
        "activity regularizer",
    ),
    "kernel_constraint_first": (
        lambda: seq(dense(5, "relu", kernel_constraint="non_neg"), dense(3)),
        "kernel constraint",
    ),
    "kernel_constraint_second": (
        lambda: seq(dense(5, "relu"), dense(3, kernel_constraint="max_norm")),
        "kernel constraint",
    ),
    "bias_constraint_first": (
        lambda: seq(dense(5, "relu", bias_constraint="non_neg"), dense(3)),
        "bias constraint",
    ),
    "non_trainable": (
        lambda: seq(dense(5, "relu", trainable=False), dense(3)),
        "not trainable",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_reason(case):
    build, cause = REFUSED[case]
    model = build()
    found = find_symmetries(model)
    assert found.junctions == (), found.describe()
    assert len(found.refused) == 1, found.describe()
    assert cause in found.refused[0].reason, refusal_text(found)
    first, second = dense_layers(model)
    assert first.name in found.refused[0].name
    assert second.name in found.refused[0].name


def test_refusal_only_touches_the_affected_junction():
    """A regularizer on the middle kernel refuses both junctions it is in,
    and a later junction stays admitted."""
    model = seq(dense(5, "relu"), dense(6, "relu", kernel_regularizer="l1"),
                dense(4, "relu"), dense(3))
    layers = dense_layers(model)
    found = find_symmetries(model)
    assert len(found.refused) == 2, found.describe()
    assert len(found.junctions) == 1, found.describe()
    assert found.junctions[0].in_kernel is layers[2].kernel
    assert found.junctions[0].out_kernel is layers[3].kernel


def test_lora_dense_is_refused():
    first, second = dense(5, "relu"), dense(3)
    model = seq(first, second)
    first.enable_lora(2)
    found = find_symmetries(model)
    assert found.junctions == ()
    assert "LoRA" in refusal_text(found)


def test_quantized_dense_is_refused():
    model = seq(dense(8, "relu"), dense(4))
    model.quantize("int8")
    found = find_symmetries(model)
    assert found.junctions == ()
    assert "quantized" in refusal_text(found)


def test_layer_used_twice_is_refused():
    x = inputs = keras.Input((4,))
    shared = dense(4, "relu", seed=3)
    h = dense(4, "relu")(x)
    h = shared(shared(h))
    out = dense(3, seed=5)(h)
    model = functional(inputs, out)
    found = find_symmetries(model)
    text = refusal_text(found)
    assert "more than once" in text, text
    for junction in found.junctions:
        assert junction.in_kernel is not shared.kernel, found.describe()
        assert junction.out_kernel is not shared.kernel, found.describe()


def test_hidden_output_that_is_a_model_output_is_refused():
    x = inputs = keras.Input((4,))
    first = dense(5, "relu")
    h = first(x)
    out = dense(3, seed=2)(h)
    model = functional(inputs, [out, h])
    found = find_symmetries(model)
    assert found.junctions == (), found.describe()
    assert "model output" in refusal_text(found)


def test_hidden_output_after_activation_layer_that_is_a_model_output():
    x = inputs = keras.Input((4,))
    h = dense(5)(x)
    a = keras.layers.ReLU()(h)
    out = dense(3, seed=2)(a)
    model = functional(inputs, [out, a])
    found = find_symmetries(model)
    assert found.junctions == (), found.describe()
    assert "model output" in refusal_text(found)


def test_hidden_output_read_by_two_layers_is_refused():
    x = inputs = keras.Input((4,))
    h = dense(5, "relu")(x)
    out = keras.layers.Add()([dense(3, seed=2)(h), dense(3, seed=3)(h)])
    model = functional(inputs, out)
    found = find_symmetries(model)
    assert found.junctions == (), found.describe()
    assert "several layers" in refusal_text(found)


def test_hidden_output_read_by_a_dense_and_a_non_dense_is_refused():
    x = inputs = keras.Input((4,))
    h = dense(5, "relu")(x)
    out = keras.layers.Concatenate()([dense(3, seed=2)(h), h])
    model = functional(inputs, out)
    found = find_symmetries(model)
    assert found.junctions == (), found.describe()
    assert "several layers" in refusal_text(found)


# Layers between the Dense layers -----------------------------------------


TRANSPARENT = {
    "activation_relu": (
        lambda: [dense(5), keras.layers.Activation("relu"), dense(3)],
        ("scaling",),
    ),
    "activation_linear": (
        lambda: [dense(5), keras.layers.Activation("linear"), dense(3)],
        ("scaling", "gl"),
    ),
    "relu_layer": (
        lambda: [dense(5), keras.layers.ReLU(), dense(3)],
        ("scaling",),
    ),
    "leaky_relu_layer": (
        lambda: [dense(5), keras.layers.LeakyReLU(negative_slope=0.3),
                 dense(3)],
        ("scaling",),
    ),
    "dropout_linear": (
        lambda: [dense(5), keras.layers.Dropout(0.3), dense(3)],
        ("scaling",),
    ),
    "dropout_after_relu": (
        lambda: [dense(5, "relu"), keras.layers.Dropout(0.3), dense(3)],
        ("scaling",),
    ),
    "relu_then_dropout_then_relu": (
        lambda: [dense(5, "relu"), keras.layers.Dropout(0.2),
                 keras.layers.ReLU(), dense(3)],
        ("scaling",),
    ),
    "identity": (
        lambda: [dense(5), keras.layers.Identity(), dense(3)],
        ("scaling", "gl"),
    ),
}


@pytest.mark.parametrize("functional_model", [False, True])
@pytest.mark.parametrize("case", sorted(TRANSPARENT))
def test_layers_between_dense_layers(case, functional_model):
    build, groups = TRANSPARENT[case]
    layers = build()
    if functional_model:
        x = inputs = keras.Input((4,))
        for layer in layers:
            x = layer(x)
        model = functional(inputs, x)
    else:
        model = seq(*layers)
    found = find_symmetries(model)
    assert len(found.junctions) == 1, found.describe()
    junction = found.junctions[0]
    assert junction.groups == groups
    assert junction.in_kernel is layers[0].kernel
    assert junction.out_kernel is layers[-1].kernel


def test_activation_layer_with_tanh_between_is_refused():
    model = seq(dense(5), keras.layers.Activation("tanh"), dense(3))
    found = find_symmetries(model)
    assert found.junctions == ()
    assert "tanh" in refusal_text(found)


# SymmetricDensePair --------------------------------------------------------


class PairModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.pair = SymmetricDensePair(5, 3, hidden_activation="relu")
        self.head = keras.layers.Dense(2)

    def call(self, x):
        return self.head(self.pair(x))


@pytest.mark.parametrize("group,activation,groups", [
    ("scaling", "relu", ("scaling",)),
    ("scaling", "leaky_relu", ("scaling",)),
    ("gl", "linear", ("scaling", "gl")),
])
def test_pair_internal_junction(group, activation, groups):
    pair = SymmetricDensePair(5, 3, hidden_activation=activation, group=group)
    model = seq(pair)
    found = find_symmetries(model)
    assert len(found.junctions) == 1, found.describe()
    junction = found.junctions[0]
    assert junction.in_kernel is pair.kernel_1
    assert junction.in_bias is pair.bias_1
    assert junction.out_kernel is pair.kernel_2
    assert junction.groups == groups
    assert junction.record is pair.group_element


def test_pair_inside_subclassed_model():
    model = PairModel()
    model(np.zeros((2, 4), "float32"))
    found = find_symmetries(model)
    assert len(found.junctions) == 1, found.describe()
    assert found.junctions[0].in_kernel is model.pair.kernel_1
    assert found.junctions[0].out_kernel is model.pair.kernel_2


def test_subclassed_model_without_pair_is_refused():
    class Plain(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(5, activation="relu")
            self.b = keras.layers.Dense(3)

        def call(self, x):
            return self.b(self.a(x))

    model = Plain()
    model(np.zeros((2, 4), "float32"))
    found = find_symmetries(model)
    assert found.junctions == ()
    assert "subclassed" in refusal_text(found)


def test_pair_next_to_dense_layers():
    first = dense(5, "relu")
    pair = SymmetricDensePair(6, 4, hidden_activation="relu",
                              activation="relu")
    last = dense(3)
    model = seq(first, pair, last)
    found = find_symmetries(model)
    assert len(found.junctions) == 3, found.describe()
    by_in = {id(j.in_kernel): j for j in found.junctions}
    assert by_in[id(first.kernel)].out_kernel is pair.kernel_1
    assert by_in[id(pair.kernel_1)].out_kernel is pair.kernel_2
    assert by_in[id(pair.kernel_2)].out_kernel is last.kernel
    assert by_in[id(pair.kernel_2)].in_bias is pair.bias_2


def test_pair_with_linear_hidden_cannot_declare_gl_through_relu():
    with pytest.raises(ValueError, match="group"):
        SymmetricDensePair(5, 3, hidden_activation="relu", group="gl")


# Property: every admitted junction is exact --------------------------------


def random_model(rng):
    """A random Sequential or functional MLP with random layers between."""
    widths = [int(w) for w in rng.integers(3, 7, size=rng.integers(3, 6))]
    use_bias = bool(rng.integers(2))
    layers = []
    for i, width in enumerate(widths[:-1]):
        kind = rng.choice(["relu", "leaky_relu", "linear", "tanh", "pair"],
                          p=[0.3, 0.2, 0.25, 0.1, 0.15])
        seed = int(rng.integers(1 << 20))
        if kind == "pair":
            hidden = str(rng.choice(["relu", "leaky_relu", "linear"]))
            group = "gl" if hidden == "linear" and rng.integers(2) else "scaling"
            layers.append(SymmetricDensePair(
                width + 1, width, hidden_activation=hidden, group=group,
                activation=str(rng.choice(["relu", "linear"])),
                use_bias=use_bias,
                bias_initializer=keras.initializers.RandomUniform(
                    -0.5, 0.5, seed=seed),
            ))
        else:
            layers.append(dense(width, kind, use_bias, seed=seed))
        extra = rng.choice(["none", "relu", "leaky", "dropout", "act_linear",
                            "identity"], p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
        layers += {
            "none": [],
            "relu": [keras.layers.ReLU()],
            "leaky": [keras.layers.LeakyReLU(negative_slope=0.1)],
            "dropout": [keras.layers.Dropout(0.25, seed=seed)],
            "act_linear": [keras.layers.Activation("linear")],
            "identity": [keras.layers.Identity()],
        }[str(extra)]
    layers.append(dense(widths[-1], None, use_bias, seed=7))
    if rng.integers(2):
        return seq(*layers, input_dim=4)
    x = inputs = keras.Input((4,))
    for layer in layers:
        x = layer(x)
    return functional(inputs, x)


def random_group_matrix(group, width, rng):
    if group == "scaling":
        return np.diag(np.exp(rng.normal(size=width)))
    from conftest import expm_np

    return expm_np(rng.normal(size=(width, width)) / np.sqrt(width))


def training_outputs(model, x):
    """Outputs in training mode with each Dropout's mask replayed."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Dropout):
            layer.seed_generator.state.assign(
                np.array([7, 0], dtype=layer.seed_generator.state.dtype)
            )
    return keras.ops.convert_to_numpy(model(x, training=True))


@pytest.mark.parametrize("seed", range(16))
def test_every_admitted_junction_is_exact(seed):
    rng = np.random.default_rng(seed)
    model = random_model(rng)
    x = rng.normal(size=(16, 4)).astype("float32")
    before = model.predict(x, verbose=0)
    before_train = training_outputs(model, x)
    np.testing.assert_allclose(training_outputs(model, x), before_train)
    found = find_symmetries(model)
    assert found.junctions, found.describe()
    for junction in found.junctions:
        for group in junction.groups:
            saved = [v.numpy() for v in
                     (junction.in_kernel, junction.in_bias, junction.out_kernel)
                     if v is not None]
            g = random_group_matrix(group, junction.width, rng)
            junction.in_kernel.assign(junction.in_kernel.numpy() @ g)
            if junction.in_bias is not None:
                junction.in_bias.assign(junction.in_bias.numpy() @ g)
            junction.out_kernel.assign(np.linalg.solve(
                g, junction.out_kernel.numpy().astype(np.float64)))
            after = model.predict(x, verbose=0)
            scale = max(np.max(np.abs(before)), 1e-3)
            np.testing.assert_allclose(
                after, before, rtol=0, atol=1e-5 * scale,
                err_msg=f"{junction.name} under {group}\n{found.describe()}")
            np.testing.assert_allclose(
                training_outputs(model, x), before_train, rtol=0,
                atol=1e-5 * scale,
                err_msg=f"{junction.name} under {group} (training)")
            variables = [junction.in_kernel, junction.in_bias,
                         junction.out_kernel]
            for v, value in zip([v for v in variables if v is not None], saved):
                v.assign(value)


def test_property_check_detects_a_non_exact_junction():
    """The check above fails for a junction that is not exact (tanh)."""
    rng = np.random.default_rng(0)
    first, second = dense(5, "tanh"), dense(3)
    model = seq(first, second)
    x = rng.normal(size=(16, 4)).astype("float32")
    before = model.predict(x, verbose=0)
    g = random_group_matrix("scaling", 5, rng)
    first.kernel.assign(first.kernel.numpy() @ g)
    first.bias.assign(first.bias.numpy() @ g)
    second.kernel.assign(np.linalg.solve(g, second.kernel.numpy()))
    after = model.predict(x, verbose=0)
    assert np.max(np.abs(after - before)) > 1e-3 * np.max(np.abs(before))
