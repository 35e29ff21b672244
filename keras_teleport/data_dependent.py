"""The paper's data-dependent GL(h) action for invertible activations.

For a junction with an invertible activation `s` (leaky_relu), no change of
basis of the hidden units commutes with `s`, so GL(h) is not an exact
symmetry. The paper makes it one on a batch `X` (the junction's input):

- ICLR'24 form: `K1 -> K1 g`, `b1 -> b1 g`, and the outgoing kernel is refit
  so the next layer sees the same pre-activations on the batch,
  `K2 -> pinv(s(X K1 g + b1 g)) s(X K1 + b1) K2`.
- NeurIPS'22 form: `K2 -> g^-1 K2`, and the incoming weights are refit so
  the hidden layer becomes `s(X K1 + b1) g` on the batch,
  `[K1; b1] -> pinv([X 1]) s^-1(s(X K1 + b1) g)`.

Both are exact on the batch only while the least-squares fit is: for the
ICLR form when the batch is no larger than the hidden width. Junctions are
moved one after the other along the network, and each junction's input is
recomputed from the already-moved layers before it (the reference code
caches them, which adds drift).

The ascent (as in the reference) parametrises `g = I + T` (or `expm(T)`),
starts from `T = 0`, and takes plain gradient steps on
`||grad_w L(g·w; batch)||^2`, differentiated through the action with nested
tapes. Least squares use a Cholesky solve (`tf.linalg.lstsq(fast=True)`),
whose gradient XLA compiles; `expm`'s gradient does not compile under XLA.

Everything here takes and returns tensors; the model enters as a `Chain`.
"""

import dataclasses

import keras
import tensorflow as tf

FORMS = ("iclr", "neurips")
PARAMETRIZATIONS = ("identity_plus", "expm")

# Weightless layers a chain may contain between its Dense layers.
_PASSIVE = ("InputLayer", "Activation", "ReLU", "LeakyReLU", "Dropout",
            "Identity", "Flatten")


@dataclasses.dataclass(frozen=True)
class Chain:
    """A model that is a plain chain of Dense and weightless layers.

    Attributes:
        layers: the model's layers in order.
        kernels: for each Dense layer (by position in `layers`), the
            positions of its kernel and bias (or None) in the weight list.
        junctions: tuples `(first dense position, second dense position,
            negative slope)` for every pair of consecutive Dense layers
            whose activation in between is leaky (invertible).
    """

    layers: tuple
    kernels: dict
    junctions: tuple


def _slope(layer):
    """Negative slope of a leaky activation layer/function, or None."""
    kind = type(layer).__name__
    if kind == "LeakyReLU":
        return float(layer.negative_slope)
    if kind in ("Dropout", "Identity", "Flatten", "InputLayer"):
        return 1.0
    fn = layer.activation if kind in ("Activation", "Dense") else None
    if fn is keras.activations.get("linear"):
        return 1.0
    if fn is keras.activations.get("leaky_relu"):
        return 0.2  # keras.activations.leaky_relu's default slope
    return None


def make_chain(model, variables):
    """Describes `model` as a `Chain` over `variables`, or raises ValueError.

    Args:
        model: a Sequential model of Dense and weightless layers.
        variables: the optimizer's variable list.
    """
    if not isinstance(model, keras.Sequential):
        raise ValueError(
            "The data-dependent GL action needs a keras.Sequential model of "
            f"Dense and weightless layers; {model.name!r} is "
            f"{type(model).__name__}."
        )
    position = {id(v): i for i, v in enumerate(variables)}
    layers = tuple(model.layers)
    kernels, dense = {}, []
    for n, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Dense):
            if id(layer.kernel) not in position or (
                layer.bias is not None and id(layer.bias) not in position
            ):
                raise ValueError(
                    f"Dense layer {layer.name!r} is not trained by this "
                    "optimizer."
                )
            kernels[n] = (
                position[id(layer.kernel)],
                position[id(layer.bias)] if layer.bias is not None else None,
            )
            dense.append(n)
        elif type(layer).__name__ not in _PASSIVE:
            raise ValueError(
                f"The data-dependent GL action does not know layer "
                f"{layer.name!r} ({type(layer).__name__}); accepted between "
                f"Dense layers: {list(_PASSIVE)}."
            )
    junctions = []
    for a, b in zip(dense, dense[1:]):
        slope = _slope(layers[a])
        for layer in layers[a + 1:b]:
            s = _slope(layer)
            slope = None if slope is None or s is None else slope * s
        if slope is not None and slope > 0:
            junctions.append((a, b, slope))
    return Chain(layers, kernels, tuple(junctions))


def _dense(chain, n, weights, h):
    kernel, bias = chain.kernels[n]
    out = tf.matmul(h, weights[kernel])
    if bias is not None:
        out = out + weights[bias]
    return chain.layers[n].activation(out)


def _passive(layer, h):
    if type(layer).__name__ == "InputLayer":
        return h
    return layer(h, training=False) if type(layer).__name__ == "Dropout" else layer(h)


def forward(chain, weights, x):
    """The model's output at `weights` (list of tensors) on `x`."""
    h = x
    for n, layer in enumerate(chain.layers):
        h = _dense(chain, n, weights, h) if n in chain.kernels else _passive(layer, h)
    return h


def _group_element(t, parametrization):
    if parametrization == "expm":
        return tf.linalg.expm(t)
    return tf.eye(t.shape[0], dtype=t.dtype) + t


def _leaky_inverse(y, slope):
    return tf.where(y >= 0, y, y / slope)


def act(chain, weights, x, ts, form="iclr", parametrization="identity_plus"):
    """Applies the data-dependent action junction by junction.

    Args:
        chain: a `Chain`.
        weights: list of weight tensors (the optimizer's variable order).
        x: the teleport batch (model input).
        ts: one `(h, h)` tensor `T` per junction of `chain`.
        form: `"iclr"` or `"neurips"`.
        parametrization: `"identity_plus"` (`g = I + T`) or `"expm"`.

    Returns:
        The moved weights (a new list).
    """
    weights = list(weights)
    by_first = {a: (b, slope, t) for (a, b, slope), t in zip(chain.junctions, ts)}
    h = x
    n = 0
    layers = chain.layers
    while n < len(layers):
        if n not in by_first:
            h = _dense(chain, n, weights, h) if n in chain.kernels else (
                _passive(layers[n], h))
            n += 1
            continue
        b, slope, t = by_first[n]
        g = _group_element(t, parametrization)
        k1, b1 = chain.kernels[n]
        k2 = chain.kernels[b][0]

        def hidden(w):
            out = _dense(chain, n, w, h)
            for layer in layers[n + 1:b]:
                out = _passive(layer, out)
            return out

        old = hidden(weights)
        if form == "iclr":
            weights[k1] = tf.matmul(weights[k1], g)
            if b1 is not None:
                weights[b1] = tf.linalg.matvec(g, weights[b1], transpose_a=True)
            new = hidden(weights)
            weights[k2] = tf.linalg.lstsq(
                new, tf.matmul(old, weights[k2]), fast=True
            )
        else:
            # Pre-activations that make the hidden layer `old g`; the
            # activation between the layers is leaky with this slope.
            target = _leaky_inverse(tf.matmul(old, g), slope)
            design = h
            if b1 is not None:
                design = tf.concat([h, tf.ones_like(h[:, :1])], axis=1)
            fit = tf.linalg.lstsq(design, target, fast=True)
            weights[k1] = fit[: h.shape[-1]]
            if b1 is not None:
                weights[b1] = fit[-1]
            weights[k2] = tf.linalg.solve(g, weights[k2])
            new = hidden(weights)
        h = new
        n = b
    return weights


def zero_ts(chain, dtype):
    """One `T = 0` (so `g = I`) per junction of `chain`."""
    return [tf.zeros([chain.layers[a].units] * 2, dtype)
            for a, _, _ in chain.junctions]


def squared_grad_norm(loss_fn, chain, weights, x, y):
    """`(L, ||grad_w L||^2)` at `weights` on `(x, y)`."""
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss = loss_fn(y, forward(chain, weights, x))
    grads = tape.gradient(loss, weights)
    norm = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads if g is not None])
    return loss, norm


def ascend(loss_fn, chain, weights, x, y, steps, learning_rate, max_ratio,
           form="iclr", parametrization="identity_plus"):
    """Maximises `||grad L(g·w)||^2` on the batch over the junctions' `T`.

    Plain gradient ascent on `T` from 0, as in the reference; the ascent
    stops before a step that makes the objective non-finite or larger than
    `max_ratio^2` times its starting value.

    Returns:
        `(ts, moved weights, f_0, f_final)`.
    """
    dtype = weights[0].dtype
    ts = zero_ts(chain, dtype)
    lr = tf.cast(learning_rate, dtype)

    def objective(ts):
        with tf.GradientTape() as tape:
            tape.watch(ts)
            moved = act(chain, weights, x, ts, form, parametrization)
            _, f = squared_grad_norm(loss_fn, chain, moved, x, y)
        return f, tape.gradient(f, ts)

    f0, grads0 = objective(ts)
    limit = tf.cast(max_ratio, dtype) ** 2 * f0

    def body(done, ts, f, grads):
        candidates = [t + lr * g for t, g in zip(ts, grads)]
        f_next, grads_next = objective(candidates)
        ok = tf.logical_and(tf.math.is_finite(f_next), f_next <= limit)
        ok = tf.logical_and(ok, tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads_next]))
        pick = lambda new, old: [tf.where(ok, a, b) for a, b in zip(new, old)]
        return (
            tf.logical_not(ok),
            pick(candidates, ts),
            tf.where(ok, f_next, f),
            pick(grads_next, grads),
        )

    _, ts, f, _ = tf.while_loop(
        lambda done, *_: tf.logical_not(done),
        body,
        (tf.constant(False), ts, f0, grads0),
        maximum_iterations=steps,
    )
    moved = act(chain, weights, x, ts, form, parametrization)
    return ts, moved, f0, f


def ascend_value(value_fn, admissible, chain, weights, x, steps,
                 learning_rate, maximize=True, form="iclr",
                 parametrization="identity_plus"):
    """Raises (or lowers) `value_fn(g·w)` over the junctions' `T`.

    For objectives other than the gradient norm (sharpness): backtracking
    steps `T <- T + lr * D / ||D||` from `T = 0`, `D = grad_T (±value)`
    (the norm over all junctions), so each step has length `lr` whatever
    the value's scale; a step is kept only if the value improves and
    stays finite and the moved weights are `admissible` (the gradient-norm
    cap, the loss guard: the ascent stays inside them rather than being
    rolled back), otherwise `lr` is halved.

    Args:
        value_fn: `fn(list of weights) -> positive scalar`.
        admissible: `fn(list of weights) -> boolean scalar`.
        chain, weights, x, form, parametrization: as for `act`.
        steps: Python int, the number of steps.
        learning_rate: length of a step in `T`.
        maximize: raise (True) or lower (False) the value.

    Returns:
        `(ts, moved weights, value_0, value_final)`.
    """
    dtype = weights[0].dtype
    sign = 1.0 if maximize else -1.0
    ts = zero_ts(chain, dtype)
    lr = tf.cast(learning_rate, dtype)

    def evaluate(ts):
        with tf.GradientTape() as tape:
            tape.watch(ts)
            moved = act(chain, weights, x, ts, form, parametrization)
            value = value_fn(moved)
            signed = sign * value
        grads = tape.gradient(signed, ts)
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        grads = [tf.math.divide_no_nan(g, norm) for g in grads]
        return value, grads, admissible(moved)

    value0, grads0, _ = evaluate(ts)

    def body(taken, lr, ts, value, grads):
        candidates = [t + lr * g for t, g in zip(ts, grads)]
        value_c, grads_c, admissible_c = evaluate(candidates)
        ok = tf.logical_and(tf.math.is_finite(value_c), value_c > 0)
        ok = tf.logical_and(ok, sign * value_c >= sign * value)
        ok = tf.logical_and(ok, admissible_c)
        ok = tf.logical_and(ok, tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads_c]))
        pick = lambda new, old: [tf.where(ok, a, b) for a, b in zip(new, old)]
        return (taken + tf.cast(ok, tf.int32), tf.where(ok, lr, lr / 2),
                pick(candidates, ts), tf.where(ok, value_c, value),
                pick(grads_c, grads))

    _, _, ts, value, _ = tf.while_loop(
        lambda *_: True, body,
        (tf.constant(0, tf.int32), lr, ts, value0, grads0),
        maximum_iterations=steps,
    )
    moved = act(chain, weights, x, ts, form, parametrization)
    return ts, moved, value0, value
