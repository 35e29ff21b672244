"""Sharpness and curvature measures of a model at its current weights.

Every measure evaluates the model at other weights with
`model.stateless_call`, so the model is never modified; each is one compiled
function per batch, seeded, and averaged over batches weighted by their
size.

- `sharpness(kind="paper")`: the ICLR'24 definition, the mean loss
  `L(w + r d / ||d||)` over radii `r` and directions `d ~ U[0, 1]^P`.
- `sharpness(kind="isotropic")`: the usual one, the mean loss *change*
  `L(w + r d / ||d||) - L(w)` with `d` uniform on the sphere, each `d`
  evaluated with its opposite `-d` so that the first-order term cancels.
- `orbit_curvature`: the mean curvature at `t = 0` of the orbit curves
  `t -> expm(t M) · w` over random Lie-algebra directions `M`; data-free.
- `hessian_top_eigenvalue` (power iteration on Hessian-vector products) and
  `hessian_trace` (Hutchinson's estimator with Rademacher vectors).
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_teleport import symmetries
from keras_teleport.objectives import curve_curvature  # noqa: F401 (public here)

DEFAULT_RADII = (0.001, 0.005, 0.01, 0.05, 0.1, 0.2)


def _loss_fn(model, loss):
    if loss is not None:
        return keras.losses.get(loss)
    from keras_teleport.teleport import _loss_function

    return _loss_function(model)


def _batches(x, y, batch_size):
    n = len(x)
    size = n if batch_size is None else batch_size
    for start in range(0, n, size):
        yield x[start:start + size], y[start:start + size]


def _model_loss(model, loss_fn):
    """`f(trainable values, x, y) -> mean loss` that never touches state."""
    non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]

    def f(trainable, x, y):
        outputs, _ = model.stateless_call(trainable, non_trainable, x)
        return loss_fn(y, outputs)

    return f


def _averaged(compiled, x, y, batch_size, direction):
    total, count = 0.0, 0
    for bx, by in _batches(x, y, batch_size):
        value = compiled(direction, tf.convert_to_tensor(bx),
                         tf.convert_to_tensor(by))
        total += float(value) * len(bx)
        count += len(bx)
    return total / count


def sharpness(model, x, y, kind="paper", radii=DEFAULT_RADII, directions=10,
              seed=0, loss=None, batch_size=None):
    """Mean loss around the weights, the paper's way or the isotropic way.

    The isotropic estimate uses antithetic pairs: each sampled direction `d`
    is evaluated at `w + r d/||d||` and at `w - r d/||d||`, and the change is
    the mean of the two minus `L(w)`. Since `-d` is as likely as `d`, this
    estimates the same mean change without bias, and the first-order term
    `r g.d/||d||` cancels exactly instead of dominating the estimate away
    from a minimum; for a quadratic loss what remains is
    `r^2/2 d^T H d/||d||^2`.

    Args:
        model: A built `keras.Model`.
        x: Inputs (array).
        y: Targets (array).
        kind: `"paper"` (mean of `L(w + r d/||d||)`, `d ~ U[0,1]^P`) or
            `"isotropic"` (mean of `L(w + r d/||d||) - L(w)`, `d` uniform on
            the sphere, in antithetic pairs `d, -d`). Defaults to `"paper"`.
        radii: Radii `r`, a non-empty sequence of finite positive numbers.
            Defaults to `DEFAULT_RADII` (0.001 to 0.2).
        directions: Random directions `d` (the same for every radius), a
            positive integer. With `"isotropic"` each is evaluated together
            with its opposite `-d`, so the loss is evaluated at
            `2 * directions` points per radius; with `"paper"` at
            `directions` points. Defaults to `10`.
        seed: Seed of the directions; the same directions serve every
            batch. Defaults to `0`.
        loss: Loss (name or callable), or `None` for the compiled one.
            Defaults to `None`.
        batch_size: Examples per evaluation, a positive integer, or `None`
            for all at once. Defaults to `None`.

    Returns:
        A Python float.
    """
    if kind not in ("paper", "isotropic"):
        raise ValueError(
            f"Unknown `kind` {kind!r}. Accepted values: ['paper', 'isotropic']."
        )
    radii = _check_radii(radii)
    _check_count("directions", directions)
    _check_batch_size(batch_size)
    f = _model_loss(model, _loss_fn(model, loss))
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    radii = tf.constant(radii, weights[0].dtype)

    def moved(r, direction):
        return [w + r * u for w, u in zip(weights, direction)]

    # One trace serves every direction and batch.
    @tf.function(autograph=False)
    def mean_over_radii(direction, bx, by):
        if kind == "paper":
            return tf.reduce_mean(
                tf.map_fn(lambda r: f(moved(r, direction), bx, by), radii))
        # Antithetic pair: the linear term cancels between `d` and `-d`.
        values = tf.map_fn(
            lambda r: (f(moved(r, direction), bx, by)
                       + f(moved(-r, direction), bx, by)) / 2,
            radii,
        )
        return tf.reduce_mean(values) - f(weights, bx, by)

    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(directions):
        if kind == "paper":
            d = [rng.uniform(size=w.shape) for w in weights]
        else:
            d = [rng.normal(size=w.shape) for w in weights]
        norm = np.sqrt(sum((a ** 2).sum() for a in d))
        direction = [tf.constant(a / norm, w.dtype) for a, w in zip(d, weights)]
        total += _averaged(mean_over_radii, x, y, batch_size, direction)
    return total / directions


def orbit_derivatives(curve, t0=0.0):
    """`(gamma'(t0), gamma''(t0))` of `curve(t) -> list of tensors`.

    Forward-mode automatic differentiation, nested for the second
    derivative, always in a graph: called eagerly, it traces a
    `tf.function` for the call.

    Args:
        curve: A function of a float32 scalar tensor `t` returning a list
            of tensors, the point `gamma(t)`; it must be traceable by
            `tf.function`.
        t0: Where to differentiate. Defaults to `0.0`.

    Returns:
        A pair of lists of tensors, `gamma'(t0)` and `gamma''(t0)`.
    """
    if tf.executing_eagerly():
        # Eager nested forward mode breaks in TF 2.21 once the process has
        # traced an op's JVP for 32 shapes: TF then switches to shape-relaxed
        # JVP functions, on which the outer accumulator fails ("Inputs to
        # operation ... AddN ... must have the same size and shape"). The
        # same computation in a graph does not.
        return tf.function(lambda: _orbit_derivatives(curve, t0),
                           autograph=False)()
    return _orbit_derivatives(curve, t0)


def _orbit_derivatives(curve, t0):
    t = tf.constant(t0, tf.float32)
    one = tf.constant(1.0, tf.float32)
    # Nested accumulators on the same `t` give d/dt and d2/dt2.
    with tf.autodiff.ForwardAccumulator(t, one) as outer:
        with tf.autodiff.ForwardAccumulator(t, one) as inner:
            points = curve(t)
        first = [inner.jvp(p) for p in points]
    second = [outer.jvp(d) for d in first]
    return list(first), list(second)


def _exp_jet(a):
    """`I + a + a^2/2`: agrees with `expm(a)` to second order.

    The curvature needs the curve's first two derivatives at `t = 0`, where
    this polynomial and `expm(t M)` agree. Nested forward-mode derivatives
    of `tf.linalg.expm` come out wrong in TF 2.21 (the second derivative of
    `expm(tM)` at 0 as `3 M^2`, and a cubic term of `t` also leaks into
    it), while this quadratic differentiates exactly.
    """
    eye = tf.eye(a.shape[0], dtype=a.dtype)
    return eye + a + tf.matmul(a, a) / 2


def _junction_curve(junctions, directions, exp=None):
    """The orbit curve `t -> expm(t M)·w` over all junctions at once.

    `exp` computes the matrix exponential; `_exp_jet` (the default) for
    derivatives at `t = 0`, `tf.linalg.expm` for points along the curve.
    """
    exp = exp or _exp_jet
    weights = {}
    for j in junctions:
        for v in (j.in_kernel, j.in_bias, j.out_kernel):
            if v is not None:
                weights[id(v)] = tf.convert_to_tensor(v)

    def curve(t):
        moved = dict(weights)
        for j, m in zip(junctions, directions):
            m = tf.cast(m, moved[id(j.in_kernel)].dtype)
            t = tf.cast(t, m.dtype)
            g = exp(t * m)
            g_inv = exp(-t * m)
            moved[id(j.in_kernel)] = tf.matmul(moved[id(j.in_kernel)], g)
            if j.in_bias is not None:
                moved[id(j.in_bias)] = tf.linalg.matvec(
                    g, moved[id(j.in_bias)], transpose_a=True)
            moved[id(j.out_kernel)] = tf.matmul(g_inv, moved[id(j.out_kernel)])
        return list(moved.values())

    return curve


def orbit_curvature(model, directions=10, group="auto", seed=0):
    """Mean curvature of the symmetry orbits through the current weights.

    For each random direction `M` (one `h x h` matrix per junction, entries
    `U[0, 1]`, unit Frobenius norm over all junctions; diagonal for the
    scaling group), the curvature at `t = 0` of `gamma(t) = expm(t M)·w`,
    with derivatives from forward-mode autodiff, in one compiled function
    traced once per call. Data-free.

    Args:
        model: A built `keras.Model` with exact junctions
            (`keras_teleport.find_symmetries`).
        directions: Number of random directions, a positive integer.
            Defaults to `10`.
        group: `"auto"` (GL where exact, scaling elsewhere), `"scaling"` or
            `"gl"` (only junctions where GL is exact). Defaults to `"auto"`.
        seed: Seed of the directions. Defaults to `0`.

    Returns:
        A Python float.
    """
    if group not in ("auto", "scaling", "gl"):
        raise ValueError(
            f"Unknown `group` {group!r}. Accepted values: "
            "['auto', 'scaling', 'gl']."
        )
    _check_count("directions", directions)
    found = symmetries.find_symmetries(model)
    junctions, diagonal = [], []
    for j in found.junctions:
        chosen = j.groups[-1] if group == "auto" else group
        if chosen in j.groups:
            junctions.append(j)
            diagonal.append(chosen == "scaling")
    if not junctions:
        raise ValueError(
            f"Model {model.name!r} has no junction for group={group!r}:\n"
            + found.describe()
        )

    # The directions are arguments of fixed shapes: one trace per call.
    @tf.function(autograph=False)
    def curvature(ms):
        first, second = orbit_derivatives(_junction_curve(junctions, ms))
        return curve_curvature(first, second)

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(directions):
        ms = []
        for j, diag in zip(junctions, diagonal):
            m = rng.uniform(size=(j.width, j.width))
            ms.append(np.diag(np.diag(m)) if diag else m)
        norm = np.sqrt(sum((m ** 2).sum() for m in ms))
        ms = [tf.constant(m / norm, tf.float32) for m in ms]
        values.append(float(curvature(ms)))
    return float(np.mean(values))


def _hvp_fn(model, loss_fn):
    f = _model_loss(model, loss_fn)
    zero = tf.UnconnectedGradients.ZERO

    @tf.function(autograph=False)
    def hvp(weights, vector, bx, by):
        with tf.autodiff.ForwardAccumulator(weights, vector) as acc:
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss = f(weights, bx, by)
            # Zeros, not None, where the loss (or its gradient) does not
            # depend on a weight: a linear loss has a zero Hessian.
            grads = tape.gradient(loss, weights, unconnected_gradients=zero)
        return [acc.jvp(g, unconnected_gradients=zero) for g in grads]

    return hvp


def _batched_hvp(hvp, weights, vector, x, y, batch_size):
    total, count = None, 0
    for bx, by in _batches(x, y, batch_size):
        out = hvp(weights, vector, tf.convert_to_tensor(bx), tf.convert_to_tensor(by))
        out = [o * len(bx) for o in out]
        total = out if total is None else [a + b for a, b in zip(total, out)]
        count += len(bx)
    return [t / count for t in total]


def hessian_top_eigenvalue(model, x, y, iterations=20, seed=0, loss=None,
                           batch_size=None, tolerance=None):
    """Largest-magnitude Hessian eigenvalue by power iteration.

    Each iteration is one Hessian-vector product (forward-over-reverse
    autodiff) averaged over batches; returns the Rayleigh quotient of the
    last iterate. With a `tolerance`, the iteration stops early once the
    Rayleigh quotient changes by at most `tolerance` relative to its new
    value, `|q_k - q_{k-1}| <= tolerance * |q_k|`; `iterations` is then the
    maximum. A small change is not proof of convergence when the top two
    eigenvalue magnitudes are close. If a Hessian-vector product is exactly
    zero, returns its Rayleigh quotient, `0.0`.

    Args:
        model: A built `keras.Model`.
        x: Inputs (array).
        y: Targets (array).
        iterations: Power iterations (the maximum, with a `tolerance`), a
            positive integer. Defaults to `20`.
        seed: Seed of the start vector. Defaults to `0`.
        loss: Loss (name or callable), or `None` for the compiled one.
            Defaults to `None`.
        batch_size: Examples per Hessian-vector product, a positive
            integer, or `None` for all. Defaults to `None`.
        tolerance: Relative change of the Rayleigh quotient between two
            iterations at or below which to stop early, a finite number
            `>= 0`, or `None` to always run all `iterations`. Defaults to
            `None`.

    Returns:
        A Python float.
    """
    _check_count("iterations", iterations)
    _check_batch_size(batch_size)
    if tolerance is not None and not (
            isinstance(tolerance, numbers.Real)
            and not isinstance(tolerance, bool)
            and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(
            "`tolerance` must be None or a finite number >= 0. Received: "
            f"tolerance={tolerance!r}"
        )
    hvp = _hvp_fn(model, _loss_fn(model, loss))
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    rng = np.random.default_rng(seed)
    v = [tf.constant(rng.normal(size=w.shape), w.dtype) for w in weights]
    value = None
    for _ in range(iterations):
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(a * a) for a in v]))
        if float(norm) == 0.0:
            break  # H v = 0 for the last iterate: its quotient is 0.
        v = [a / norm for a in v]
        hv = _batched_hvp(hvp, weights, v, x, y, batch_size)
        previous = value
        value = float(tf.add_n([tf.reduce_sum(a * b) for a, b in zip(v, hv)]))
        v = hv
        if (tolerance is not None and previous is not None
                and abs(value - previous) <= tolerance * abs(value)):
            break
    return 0.0 if value is None else value


def hessian_trace(model, x, y, samples=20, seed=0, loss=None,
                  batch_size=None):
    """Hutchinson's estimate of the Hessian trace, `mean v^T H v`.

    Args:
        model: A built `keras.Model`.
        x: Inputs (array).
        y: Targets (array).
        samples: Rademacher vectors `v`, a positive integer. Defaults to
            `20`.
        seed: Seed of the vectors. Defaults to `0`.
        loss: Loss (name or callable), or `None` for the compiled one.
            Defaults to `None`.
        batch_size: Examples per Hessian-vector product, a positive
            integer, or `None` for all. Defaults to `None`.

    Returns:
        A Python float.
    """
    _check_count("samples", samples)
    _check_batch_size(batch_size)
    hvp = _hvp_fn(model, _loss_fn(model, loss))
    weights = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        v = [tf.constant(rng.choice([-1.0, 1.0], size=w.shape), w.dtype)
             for w in weights]
        hv = _batched_hvp(hvp, weights, v, x, y, batch_size)
        values.append(float(tf.add_n([tf.reduce_sum(a * b) for a, b in zip(v, hv)])))
    return float(np.mean(values))


def _is_positive_int(value):
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value > 0)


def _check_count(name, value):
    """Raises unless `value` is a positive integer."""
    if not _is_positive_int(value):
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def _check_batch_size(batch_size):
    """Raises unless `batch_size` is `None` or a positive integer."""
    if batch_size is not None and not _is_positive_int(batch_size):
        raise ValueError(
            "`batch_size` must be None or a positive integer. Received: "
            f"batch_size={batch_size!r}"
        )


def _check_radii(radii):
    """`radii` as a tuple of floats; raises unless non-empty, finite, > 0."""
    try:
        values = (None if isinstance(radii, (str, bytes))
                  else tuple(float(r) for r in radii))
    except (TypeError, ValueError):
        values = None
    if not values or not all(math.isfinite(r) and r > 0 for r in values):
        raise ValueError(
            "`radii` must be a non-empty sequence of finite numbers > 0. "
            f"Received: radii={radii!r}"
        )
    return values
