"""Pure math of the group actions, against numpy and GradientTape."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import expm_np
from conftest import leaky_relu_np
from conftest import relu_np
from keras_teleport import groups as groups_lib
from keras_teleport import objectives
from keras_teleport.groups import DiagonalScaling
from keras_teleport.groups import GeneralLinear

IN, H, OUT, N = 4, 5, 3, 8
SEEDS = [0, 1, 2]

NP_ACT = {"relu": relu_np, "leaky_relu": leaky_relu_np, "linear": lambda x: x}
TF_ACT = {
    "relu": tf.nn.relu,
    "leaky_relu": lambda x: tf.nn.leaky_relu(x, alpha=0.2),
    "linear": tf.identity,
}
# (group, activation) pairs under which the network is exactly invariant.
CASES = [
    ("scaling", "relu"),
    ("scaling", "leaky_relu"),
    ("scaling", "linear"),
    ("gl", "linear"),
]


def random_problem(seed):
    rng = np.random.default_rng(seed)
    k1 = rng.normal(size=(IN, H))
    b1 = rng.normal(size=(H,))
    k2 = rng.normal(size=(H, OUT))
    x = rng.normal(size=(N, IN))
    y = rng.normal(size=(N, OUT))
    return rng, k1, b1, k2, x, y


def random_element(group_name, rng, scale=0.4):
    """(element as the group stores it, the matrix g in numpy)."""
    if group_name == "scaling":
        u = rng.normal(size=(H,)) * scale
        return tf.constant(u), np.diag(np.exp(u))
    m = rng.normal(size=(H, H)) * scale / np.sqrt(H)
    g, g_inv = expm_np(m), expm_np(-m)
    return (tf.constant(g), tf.constant(g_inv)), g


def group(name):
    return {"scaling": DiagonalScaling(), "gl": GeneralLinear()}[name]


def net_np(k1, b1, k2, x, act):
    return NP_ACT[act](x @ k1 + b1) @ k2


def tape_grads(k1, b1, k2, x, y, act):
    """Gradient of the mean squared error of `act(x K1 + b1) K2`."""
    k1, b1, k2 = (tf.constant(v) for v in (k1, b1, k2))
    with tf.GradientTape() as tape:
        tape.watch([k1, b1, k2])
        out = tf.matmul(TF_ACT[act](tf.matmul(x, k1) + b1), k2)
        loss = tf.reduce_mean(tf.square(out - y))
    return [g.numpy() for g in tape.gradient(loss, [k1, b1, k2])]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_name", ["scaling", "gl"])
def test_actions_match_numpy(group_name, seed):
    rng, k1, b1, k2, _, _ = random_problem(seed)
    element, g = random_element(group_name, rng)
    grp = group(group_name)
    np.testing.assert_allclose(grp.act_in(tf.constant(k1), element), k1 @ g,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grp.act_in(tf.constant(b1), element), b1 @ g,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grp.act_out(tf.constant(k2), element),
                               np.linalg.inv(g) @ k2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_name,act", CASES)
def test_action_preserves_network_outputs(group_name, act, seed):
    rng, k1, b1, k2, x, _ = random_problem(seed)
    element, g = random_element(group_name, rng, scale=0.8)
    grp = group(group_name)
    k1m = grp.act_in(tf.constant(k1), element).numpy()
    b1m = grp.act_in(tf.constant(b1), element).numpy()
    k2m = grp.act_out(tf.constant(k2), element).numpy()
    assert np.max(np.abs(k1m - k1)) > 1e-2  # the weights did move
    np.testing.assert_allclose(net_np(k1m, b1m, k2m, x, act),
                               net_np(k1, b1, k2, x, act),
                               rtol=1e-10, atol=1e-10)


def test_gl_is_not_an_exact_symmetry_through_relu():
    """Guards the test above: a non-diagonal g does change a relu network."""
    rng, k1, b1, k2, x, _ = random_problem(0)
    element, g = random_element("gl", rng, scale=0.8)
    grp = GeneralLinear()
    k1m = grp.act_in(tf.constant(k1), element).numpy()
    b1m = grp.act_in(tf.constant(b1), element).numpy()
    k2m = grp.act_out(tf.constant(k2), element).numpy()
    diff = net_np(k1m, b1m, k2m, x, "relu") - net_np(k1, b1, k2, x, "relu")
    assert np.max(np.abs(diff)) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_name,act", CASES)
def test_transported_gradient_equals_tape_gradient_at_moved_point(
    group_name, act, seed
):
    rng, k1, b1, k2, x, y = random_problem(seed)
    element, g = random_element(group_name, rng, scale=0.8)
    g1, gb1, g2 = tape_grads(k1, b1, k2, x, y, act)
    moved = tape_grads(k1 @ g, b1 @ g, np.linalg.inv(g) @ k2, x, y, act)
    grp = group(group_name)
    got = [
        grp.grad_in(tf.constant(g1), element).numpy(),
        grp.grad_in(tf.constant(gb1), element).numpy(),
        grp.grad_out(tf.constant(g2), element).numpy(),
    ]
    for a, b in zip(got, moved):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
    # The gradient really changes along the orbit.
    assert max(np.max(np.abs(a - b)) for a, b in zip(got, (g1, gb1, g2))) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_name", ["scaling", "gl"])
def test_lie_gradient_is_derivative_of_transported_norm(group_name, seed):
    rng = np.random.default_rng(seed)
    g1 = tf.constant(rng.normal(size=(IN, H)))
    gb1 = tf.constant(rng.normal(size=(H,)))
    g2 = tf.constant(rng.normal(size=(H, OUT)))
    if group_name == "scaling":
        m = tf.Variable(tf.zeros([H], tf.float64))
        make_g = lambda: tf.linalg.diag(tf.exp(m))
    else:
        m = tf.Variable(tf.zeros([H, H], tf.float64))
        make_g = lambda: tf.linalg.expm(m)
    with tf.GradientTape() as tape:
        g = make_g()
        g_inv_t = tf.transpose(tf.linalg.inv(g))
        f = (
            tf.reduce_sum(tf.square(tf.matmul(g1, g_inv_t)))
            + tf.reduce_sum(tf.square(tf.matmul(gb1[None, :], g_inv_t)))
            + tf.reduce_sum(tf.square(tf.matmul(g, g2, transpose_a=True)))
        )
    expected = tape.gradient(f, m).numpy()
    got = group(group_name).lie_gradient([g1, gb1], g2).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_scaling_compose_is_exp_additive(seed):
    rng = np.random.default_rng(seed)
    u, s = rng.normal(size=H), rng.normal(size=H)
    got = DiagonalScaling().compose(tf.constant(u), tf.constant(s)).numpy()
    np.testing.assert_allclose(np.diag(np.exp(got)),
                               np.diag(np.exp(u)) @ np.diag(np.exp(s)),
                               rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gl_compose_matches_numpy_expm(seed):
    rng = np.random.default_rng(seed)
    element, g = random_element("gl", rng)
    step = rng.normal(size=(H, H)) * 0.3
    new_g, new_inv = GeneralLinear().compose(element, tf.constant(step))
    np.testing.assert_allclose(new_g, g @ expm_np(step), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(new_inv, np.linalg.inv(g @ expm_np(step)),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_name", ["scaling", "gl"])
def test_identity_and_distance(group_name, seed):
    rng = np.random.default_rng(seed)
    grp = group(group_name)
    ident = grp.identity(H, tf.float64)
    x = rng.normal(size=(IN, H))
    np.testing.assert_array_equal(grp.act_in(tf.constant(x), ident), x)
    assert float(grp.distance(ident)) == 0.0
    element, g = random_element(group_name, rng)
    if group_name == "scaling":
        expected = np.linalg.norm(np.log(np.diag(g)))
    else:
        expected = np.linalg.norm(g - np.eye(H))
    np.testing.assert_allclose(float(grp.distance(element)), expected,
                               rtol=1e-12)


@pytest.mark.parametrize("group_name", ["scaling", "gl"])
def test_record_accumulates_elements_in_order(group_name):
    """A record composed with g1 then g2 acts like K1 g1 g2."""
    rng = np.random.default_rng(3)
    grp = group(group_name)
    e1, m1 = random_element(group_name, rng)
    e2, m2 = random_element(group_name, rng)
    if group_name == "scaling":
        record = tf.zeros([H], tf.float64)
        record = grp.record_compose(grp.record_compose(record, e1), e2)
        as_matrix = np.diag(np.exp(record.numpy()))
    else:
        record = tf.eye(H, dtype=tf.float64)
        record = grp.record_compose(grp.record_compose(record, e1), e2)
        as_matrix = record.numpy()
    np.testing.assert_allclose(as_matrix, m1 @ m2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_scaling_square_and_abs_maps_are_exact(seed):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=H)
    d = np.exp(u)
    g_in = rng.normal(size=(IN, H))
    g_b = rng.normal(size=(H,))
    g_out = rng.normal(size=(H, OUT))
    grp, e = DiagonalScaling(), tf.constant(u)
    np.testing.assert_allclose(grp.square_in(tf.constant(g_in**2), e),
                               (g_in / d) ** 2, rtol=1e-12)
    np.testing.assert_allclose(grp.square_in(tf.constant(g_b**2), e),
                               (g_b / d) ** 2, rtol=1e-12)
    np.testing.assert_allclose(grp.square_out(tf.constant(g_out**2), e),
                               (d[:, None] * g_out) ** 2, rtol=1e-12)
    np.testing.assert_allclose(grp.abs_in(tf.constant(np.abs(g_in)), e),
                               np.abs(g_in / d), rtol=1e-12)
    np.testing.assert_allclose(grp.abs_out(tf.constant(np.abs(g_out)), e),
                               np.abs(d[:, None] * g_out), rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gl_square_and_abs_maps_use_the_correlated_bound(seed):
    rng = np.random.default_rng(seed)
    element, g = random_element("gl", rng, scale=0.8)
    a_in = np.linalg.inv(g).T  # G1 -> G1 A_in
    a_out = g.T  # G2 -> A_out G2
    v_in = rng.uniform(0.1, 2.0, size=(IN, H))
    v_b = rng.uniform(0.1, 2.0, size=(H,))
    v_out = rng.uniform(0.1, 2.0, size=(H, OUT))
    grp = GeneralLinear()
    np.testing.assert_allclose(grp.square_in(tf.constant(v_in), element),
                               (np.sqrt(v_in) @ np.abs(a_in)) ** 2, rtol=1e-10)
    np.testing.assert_allclose(grp.square_in(tf.constant(v_b), element),
                               (np.sqrt(v_b) @ np.abs(a_in)) ** 2, rtol=1e-10)
    np.testing.assert_allclose(grp.square_out(tf.constant(v_out), element),
                               (np.abs(a_out) @ np.sqrt(v_out)) ** 2,
                               rtol=1e-10)
    np.testing.assert_allclose(grp.abs_in(tf.constant(v_in), element),
                               v_in @ np.abs(a_in), rtol=1e-10)
    np.testing.assert_allclose(grp.abs_out(tf.constant(v_out), element),
                               np.abs(a_out) @ v_out, rtol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_gl_square_map_of_a_diagonal_element_is_exact(seed):
    rng = np.random.default_rng(seed)
    d = np.exp(rng.normal(size=H))
    element = (tf.constant(np.diag(d)), tf.constant(np.diag(1 / d)))
    g_in = rng.normal(size=(IN, H))
    g_out = rng.normal(size=(H, OUT))
    grp = GeneralLinear()
    np.testing.assert_allclose(grp.square_in(tf.constant(g_in**2), element),
                               (g_in / d) ** 2, rtol=1e-12)
    np.testing.assert_allclose(grp.square_out(tf.constant(g_out**2), element),
                               (d[:, None] * g_out) ** 2, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gl_transport_keeps_second_moment_above_squared_mean(seed):
    """v >= m^2 before (m an EMA of gradients, v of their squares) => after."""
    rng = np.random.default_rng(seed)
    element, g = random_element("gl", rng, scale=1.0)
    history_in = rng.normal(size=(6, IN, H))
    history_out = rng.normal(size=(6, H, OUT))
    weights = 0.5 ** np.arange(6)[::-1]
    weights = weights / weights.sum()
    m_in = np.tensordot(weights, history_in, axes=1)
    v_in = np.tensordot(weights, history_in**2, axes=1)
    m_out = np.tensordot(weights, history_out, axes=1)
    v_out = np.tensordot(weights, history_out**2, axes=1)
    assert np.all(v_in >= m_in**2) and np.all(v_out >= m_out**2)
    grp = GeneralLinear()
    m_in2 = grp.grad_in(tf.constant(m_in), element).numpy()
    v_in2 = grp.square_in(tf.constant(v_in), element).numpy()
    m_out2 = grp.grad_out(tf.constant(m_out), element).numpy()
    v_out2 = grp.square_out(tf.constant(v_out), element).numpy()
    np.testing.assert_allclose(m_in2, m_in @ np.linalg.inv(g).T, rtol=1e-9)
    np.testing.assert_allclose(m_out2, g.T @ m_out, rtol=1e-9)
    assert np.all(v_in2 >= m_in2**2 * (1 - 1e-12))
    assert np.all(v_out2 >= m_out2**2 * (1 - 1e-12))
    # And the bound is not trivially loose: it is the square of the mapped
    # root mean square, which a non-diagonal g makes strictly larger.
    assert np.any(v_in2 > (np.sqrt(v_in) @ np.linalg.inv(g).T) ** 2 + 1e-6)


def test_get_group_by_name():
    assert isinstance(groups_lib.get("scaling"), DiagonalScaling)
    assert isinstance(groups_lib.get("gl"), GeneralLinear)
    with pytest.raises(ValueError, match="nope"):
        groups_lib.get("nope")


# Plans over several junctions (objectives.py) ----------------------------


def chain_problem(seed, act):
    """A 3-layer chain: K2 is the outgoing kernel of junction 0 and the
    incoming kernel of junction 1."""
    rng = np.random.default_rng(seed)
    w = [
        rng.normal(size=(IN, H)), rng.normal(size=(H,)),
        rng.normal(size=(H, H)), rng.normal(size=(H,)),
        rng.normal(size=(H, OUT)),
    ]
    x, y = rng.normal(size=(N, IN)), rng.normal(size=(N, OUT))
    return rng, w, x, y


def chain_np(w, x, act):
    s = NP_ACT[act]
    return s(s(x @ w[0] + w[1]) @ w[2] + w[3]) @ w[4]


def chain_grads(w, x, y, act):
    values = [tf.constant(v) for v in w]
    s = TF_ACT[act]
    with tf.GradientTape() as tape:
        tape.watch(values)
        h = s(tf.matmul(x, values[0]) + values[1])
        h = s(tf.matmul(h, values[2]) + values[3])
        loss = tf.reduce_mean(tf.square(tf.matmul(h, values[4]) - y))
    return [g.numpy() for g in tape.gradient(loss, values)]


def chain_plan(group_name):
    grp = groups_lib.get(group_name)
    return [
        objectives.JunctionIndices(grp, H, (0, 1), 2),
        objectives.JunctionIndices(grp, H, (2, 3), 4),
    ]


def chain_move_np(w, g_a, g_b):
    return [
        w[0] @ g_a, w[1] @ g_a,
        np.linalg.inv(g_a) @ w[2] @ g_b, w[3] @ g_b,
        np.linalg.inv(g_b) @ w[4],
    ]


@pytest.mark.parametrize("group_name,act", CASES)
def test_transport_over_two_junctions_sharing_a_kernel(group_name, act):
    rng, w, x, y = chain_problem(4, act)
    e_a, g_a = random_element(group_name, rng, scale=0.7)
    e_b, g_b = random_element(group_name, rng, scale=0.7)
    plan = chain_plan(group_name)
    tensors = {i: tf.constant(v) for i, v in enumerate(w)}
    moved = objectives.transport(plan, [e_a, e_b], tensors, "weight")
    expected = chain_move_np(w, g_a, g_b)
    for i in range(5):
        np.testing.assert_allclose(moved[i], expected[i], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(chain_np(expected, x, act), chain_np(w, x, act),
                               rtol=1e-9, atol=1e-9)
    grads = chain_grads(w, x, y, act)
    moved_grads = objectives.transport(
        plan, [e_a, e_b], {i: tf.constant(v) for i, v in enumerate(grads)},
        "linear",
    )
    for i, expected_grad in enumerate(chain_grads(expected, x, y, act)):
        np.testing.assert_allclose(moved_grads[i], expected_grad,
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("max_ratio", [1.5, 5.0])
@pytest.mark.parametrize("group_name,act", [("scaling", "relu"), ("gl", "linear")])
def test_maximize_grad_norm_result_is_consistent(group_name, act, max_ratio):
    rng, w, x, y = chain_problem(5, act)
    grads = chain_grads(w, x, y, act)
    plan = chain_plan(group_name)
    norm0 = sum(np.sum(g**2) for g in grads)
    elements, f0, f1, taken = objectives.maximize_grad_norm(
        plan, {i: tf.constant(v) for i, v in enumerate(grads)},
        steps=10, learning_rate=0.5, limit=max_ratio**2 * norm0,
    )
    if group_name == "scaling":
        mats = [np.diag(np.exp(e.numpy())) for e in elements]
    else:
        mats = [e[0].numpy() for e in elements]
        for g, g_inv in elements:
            np.testing.assert_allclose(g.numpy() @ g_inv.numpy(), np.eye(H),
                                       atol=1e-9)
    moved = chain_grads(chain_move_np(w, *mats), x, y, act)
    norm1 = sum(np.sum(g**2) for g in moved)
    np.testing.assert_allclose(float(f0), norm0, rtol=1e-10)
    np.testing.assert_allclose(float(f1), norm1, rtol=1e-8)
    assert 1 <= int(taken) <= 10
    assert norm1 > norm0 * (1 + 1e-3)
    assert norm1 <= max_ratio**2 * norm0 * (1 + 1e-9)


def test_maximize_grad_norm_with_zero_gradient_takes_no_step():
    plan = chain_plan("scaling")
    zeros = {0: tf.zeros([IN, H], tf.float64), 1: tf.zeros([H], tf.float64),
             2: tf.zeros([H, H], tf.float64), 3: tf.zeros([H], tf.float64),
             4: tf.zeros([H, OUT], tf.float64)}
    elements, f0, f1, taken = objectives.maximize_grad_norm(
        plan, zeros, steps=3, learning_rate=0.5, limit=0.0
    )
    assert int(taken) == 0
    for e in elements:
        np.testing.assert_array_equal(e.numpy(), np.zeros(H))
