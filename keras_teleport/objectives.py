"""Teleport objectives and the ascent over group elements, as pure math.

A teleport plan is a list of `JunctionIndices`: for each junction, its group
and the positions of its incoming kernel (and bias) and outgoing kernel in a
list of variables. Tensors are passed as dicts from position to tensor, so a
kernel shared by two junctions is moved by both.
"""

import dataclasses

import tensorflow as tf

# "grad_norm" (needs the mini-batch gradient, which the train step has):
#   maximise the gradient norm, for faster convergence.
# "min_norm" (data-free): minimise the weight norm over positive scalings
#   (equi-normalization).
# "min_sharpness", "max_sharpness" (need teleport data): lower or raise the
#   paper's sharpness, the mean loss at random perturbations of the weights.
# "max_curvature", "min_curvature" (data-free): raise or lower the mean
#   curvature of the symmetry orbits through the weights.
# "none" moves nothing and only applies the slot policy: the control run
#   that separates what a teleport buys from what a state reset buys.
OBJECTIVES = ("grad_norm", "min_norm", "min_sharpness", "max_sharpness",
              "max_curvature", "min_curvature", "none")
SHARPNESS_OBJECTIVES = ("min_sharpness", "max_sharpness")
CURVATURE_OBJECTIVES = ("max_curvature", "min_curvature")
# Objectives evaluated on teleport batches (`keras_teleport.TeleportData`).
DATA_OBJECTIVES = SHARPNESS_OBJECTIVES
# The paper's MNIST radii and the number of random directions per teleport.
SHARPNESS_RADII = (0.001, 0.005, 0.01, 0.05, 0.1, 0.2)
OBJECTIVE_DIRECTIONS = 10


def maximizes(objective):
    """Whether `objective` is raised (True) or lowered (False)."""
    return not objective.startswith("min_")


@dataclasses.dataclass(frozen=True)
class JunctionIndices:
    """Where a junction's variables sit in the optimizer's variable list."""

    group: object
    width: int
    in_indices: tuple
    out_index: int


def transport(plan, elements, tensors, kind):
    """Moves `tensors` (dict position -> tensor) by the plan's elements.

    Args:
        plan: list of `JunctionIndices`.
        elements: one group element per junction.
        tensors: dict from variable position to tensor; positions that no
            junction touches are returned unchanged.
        kind: `"weight"` (`K1 g`, `g^-1 K2`), `"linear"` (gradients:
            `G1 g^-T`, `g^T G2`), `"square"` (elementwise squares of
            gradients) or `"abs"` (absolute values of gradients).

    Returns:
        A new dict with the moved tensors.
    """
    method_in, method_out = {
        "weight": ("act_in", "act_out"),
        "linear": ("grad_in", "grad_out"),
        "square": ("square_in", "square_out"),
        "abs": ("abs_in", "abs_out"),
    }[kind]
    moved = dict(tensors)
    for junction, element in zip(plan, elements):
        for i in junction.in_indices:
            if i in moved:
                moved[i] = getattr(junction.group, method_in)(moved[i], element)
        if junction.out_index in moved:
            moved[junction.out_index] = getattr(junction.group, method_out)(
                moved[junction.out_index], element
            )
    return moved


def squared_norm(tensors):
    return tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors.values()])


def maximize_grad_norm(plan, grads, steps, learning_rate, limit):
    """Ascends `||grad L(g·w)||^2` over the plan's groups.

    The gradient at `g·w` is the transported gradient, so no forward pass is
    needed. Each step ascends `log ||G'||^2` (so the step size is free of
    the loss's scale): every junction's element is multiplied by
    `exp(lr * grad_M / f)`, where `grad_M` is the Lie-algebra gradient of
    `f = ||G'||^2` at the current point. A step is kept only if `f` stays
    finite, does not decrease and stays within `limit`;
    otherwise it is dropped and `lr` is halved (backtracking). The loop
    always runs `steps` times, which keeps it one static XLA while loop.

    Args:
        plan: list of `JunctionIndices`.
        grads: dict from position to the gradient at `w` (the positions of
            the plan's variables).
        steps: Python int, the number of ascent steps.
        learning_rate: step size in the Lie algebra of `log f`.
        limit: cap on `||G'||^2`.

    Returns:
        `(elements, f_0, f_final, steps_taken)`.
    """
    dtype = next(iter(grads.values())).dtype
    elements = [j.group.identity(j.width, dtype) for j in plan]
    f0 = squared_norm(grads)
    limit = tf.cast(limit, dtype)
    lr = tf.cast(learning_rate, dtype)

    def body(taken, lr, elements, moved, f):
        candidates = []
        for junction, element in zip(plan, elements):
            in_grads = [moved[i] for i in junction.in_indices]
            lie = junction.group.lie_gradient(in_grads, moved[junction.out_index])
            candidates.append(junction.group.compose(element, lr * lie / f))
        moved_c = transport(plan, candidates, grads, "linear")
        f_c = squared_norm(moved_c)
        ok = tf.logical_and(tf.math.is_finite(f_c), f_c >= f)
        ok = tf.logical_and(ok, f_c <= limit)
        pick = lambda new, old: tf.nest.map_structure(
            lambda a, b: tf.where(ok, a, b), new, old
        )
        return (
            taken + tf.cast(ok, tf.int32),
            tf.where(ok, lr, lr / 2),
            pick(candidates, elements),
            pick(moved_c, moved),
            tf.where(ok, f_c, f),
        )

    state = (tf.constant(0, tf.int32), lr, elements, dict(grads), f0)
    taken, _, elements, _, f = tf.while_loop(
        lambda *_: True, body, state, maximum_iterations=steps
    )
    return elements, f0, f, taken


def maximize_grad_norm_scaling(plan, grads, steps, learning_rate, limit):
    """`maximize_grad_norm` for plans of positive scalings only, faster.

    Under `d = exp(u)` a gradient entry moves as `G_ij e^(u_i - v_j)` (`u`
    the scales of the junction the kernel leaves, `v` of the one it
    enters), so with `S = G * G`, computed once,

        f(u) = sum over kernels of  r^T S c,   r = e^(2u), c = e^(-2v)

    and each junction's Lie gradient is `2 (r * (S c) - c * (S^T r))`
    summed over its kernels. Every ascent step is then two matrix-vector
    products per kernel, instead of transporting every gradient and
    squaring it again. The steps, backtracking and cap are
    `maximize_grad_norm`'s, and so are the results, up to rounding.

    Args and returns: as `maximize_grad_norm`; every junction of `plan`
    must be a `DiagonalScaling` one.
    """
    dtype = next(iter(grads.values())).dtype
    sides = _sides(plan)
    squares = {}
    for p, (left, _) in sides.items():
        g = tf.square(grads[p])
        if g.shape.rank == 1:
            squares[p] = g[None, :]
        else:
            squares[p] = tf.reshape(g, [g.shape[0], -1] if left is not None
                                    else [-1, g.shape[-1]])
    limit = tf.cast(limit, dtype)
    lr = tf.cast(learning_rate, dtype)

    def products(elements):
        """Row sums (`"<p>r"`) and column sums (`"<p>c"`) of each moved
        squared gradient, on the sides a junction acts on."""
        out = {}
        for p, (left, right) in sides.items():
            square = squares[p]
            if left is not None:
                r = tf.exp(2.0 * elements[left])
                sc = (tf.linalg.matvec(square, tf.exp(-2.0 * elements[right]))
                      if right is not None else tf.reduce_sum(square, axis=1))
                out[f"{p}r"] = r * sc
            if right is not None:
                c = tf.exp(-2.0 * elements[right])
                sr = (tf.linalg.matvec(square, tf.exp(2.0 * elements[left]),
                                       transpose_a=True)
                      if left is not None else tf.reduce_sum(square, axis=0))
                out[f"{p}c"] = c * sr
        return out

    def value(prods):
        return tf.add_n([
            tf.reduce_sum(prods[f"{p}r"] if left is not None else prods[f"{p}c"])
            for p, (left, _) in sides.items()])

    def lie(prods):
        result = [tf.zeros([j.width], dtype) for j in plan]
        for p, (left, right) in sides.items():
            if left is not None:
                result[left] = result[left] + 2.0 * prods[f"{p}r"]
            if right is not None:
                result[right] = result[right] - 2.0 * prods[f"{p}c"]
        return result

    def body(taken, lr, elements, prods, f):
        candidates = [e + lr * m / f for e, m in zip(elements, lie(prods))]
        prods_c = products(candidates)
        f_c = value(prods_c)
        ok = tf.logical_and(tf.math.is_finite(f_c), f_c >= f)
        ok = tf.logical_and(ok, f_c <= limit)
        pick = lambda new, old: tf.nest.map_structure(
            lambda a, b: tf.where(ok, a, b), new, old)
        return (taken + tf.cast(ok, tf.int32), tf.where(ok, lr, lr / 2),
                pick(candidates, elements), pick(prods_c, prods),
                tf.where(ok, f_c, f))

    elements = [j.group.identity(j.width, dtype) for j in plan]
    prods = products(elements)
    f0 = squared_norm(grads)
    state = (tf.constant(0, tf.int32), lr, elements, prods, f0)
    taken, _, elements, _, f = tf.while_loop(
        lambda *_: True, body, state, maximum_iterations=steps)
    return elements, f0, f, taken


def minimize_weight_norm(plan, weights, steps):
    """Equi-normalization: the point of the scaling orbit of least norm.

    For one junction, `||K1 d||^2 + ||b1 d||^2 + ||d^-1 K2||^2` is
    `sum_k a_k d_k^2 + c_k / d_k^2` (`a_k`: squared norm of unit k's
    incoming weights, `c_k`: of its outgoing ones), minimised at
    `d_k^4 = c_k / a_k`, where both sides balance. Junctions that share a
    kernel are balanced in turn, `steps` sweeps (Sinkhorn-like coordinate
    descent; each sweep can only lower the norm). Units with no incoming or
    no outgoing weight are left alone.

    Args:
        plan: list of `JunctionIndices` whose groups are `DiagonalScaling`.
        weights: dict from position to weight tensor.
        steps: Python int, the number of sweeps.

    Returns:
        One element (log-scales) per junction.
    """
    dtype = next(iter(weights.values())).dtype
    elements = [j.group.identity(j.width, dtype) for j in plan]
    for _ in range(steps):
        for n, junction in enumerate(plan):
            moved = transport(plan, elements, weights, "weight")
            incoming = tf.add_n([
                tf.reduce_sum(tf.square(tf.reshape(moved[i], [-1, junction.width])),
                              axis=0)
                for i in junction.in_indices
            ])
            outgoing = tf.reduce_sum(tf.square(moved[junction.out_index]), axis=1)
            usable = tf.logical_and(incoming > 0, outgoing > 0)
            ratio = tf.where(usable, outgoing, 1.0) / tf.where(usable, incoming, 1.0)
            elements[n] = elements[n] + 0.25 * tf.math.log(ratio)
    return elements


# Sharpness and curvature -------------------------------------------------


def sharpness_directions(variables, count, seed):
    """`count` random directions over `variables`, each of unit norm.

    The paper's directions: entries `U[0, 1]`, then normalised over all
    variables together. `seed` is a stateless seed (shape `(2,)`).
    """
    directions = []
    for k in range(count):
        parts = [
            tf.random.stateless_uniform(
                tf.shape(v), seed=seed + tf.constant([k, n], seed.dtype),
                dtype=v.dtype)
            for n, v in enumerate(variables)
        ]
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(p)) for p in parts]))
        directions.append([p / norm for p in parts])
    return directions


def sharpness(loss_at, weights, directions, radii=SHARPNESS_RADII):
    """The paper's sharpness: the mean of `L(w + r d)` over radii and directions.

    Args:
        loss_at: `fn(list of weights) -> scalar loss` on fixed data.
        weights: list of weight tensors.
        directions: list of unit directions, each a list like `weights`.
        radii: the radii `r`. Defaults to the paper's MNIST radii.

    Returns:
        A scalar tensor.
    """
    values = []
    for direction in directions:
        for r in radii:
            values.append(loss_at([w + r * d for w, d in zip(weights, direction)]))
    return tf.add_n(values) / len(values)


def curvature_directions(plan, count, seed, dtype=tf.float32):
    """`count` random Lie-algebra directions, stacked: one `(count, ...)`
    tensor per junction.

    As the curvature measure: entries `U[0, 1]` (the diagonal for the
    scaling group), each direction of unit Frobenius norm over all
    junctions together.
    """
    parts = [
        tf.random.stateless_uniform(
            (count,) + tuple(j.group.record_shape(j.width)),
            seed=seed + tf.constant([0, n], seed.dtype), dtype=dtype)
        for n, j in enumerate(plan)
    ]
    norms = tf.sqrt(tf.add_n([_batch_sum(tf.square(p)) for p in parts]))
    return [p / tf.reshape(norms, [-1] + [1] * (p.shape.rank - 1))
            for p in parts]


def _batch_sum(x):
    """Sums over every axis but the first."""
    return tf.reduce_sum(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)


# The orbit's derivatives below work on a leading batch axis of directions:
# `x` is `(1 or K, ...)` (a weight or a derivative), `m` is `(K, ...)`.


def _algebra_in(group, x, m):
    """`x m` for an incoming kernel or bias and algebra elements `m`."""
    if group.name == "scaling":
        return x * (m[:, None, :] if x.shape.rank == 3 else m)
    if x.shape.rank == 2:  # bias
        return tf.einsum("kh,khj->kj", tf.broadcast_to(
            x, [tf.shape(m)[0], x.shape[-1]]), m)
    return tf.matmul(x, m)


def _algebra_out(group, x, m):
    """`m x` for an outgoing kernel."""
    if group.name == "scaling":
        return x * m[:, :, None]
    return tf.matmul(m, x)


def _sides(plan):
    """position -> (junction number acting on the left, on the right)."""
    sides = {}
    for n, j in enumerate(plan):
        for i in j.in_indices:
            sides.setdefault(i, [None, None])[1] = n
        sides.setdefault(j.out_index, [None, None])[0] = n
    return sides


def orbit_jet(plan, weights, directions):
    """Velocities and accelerations at `t = 0` of `t -> exp(t M)·w`.

    A kernel `W` moved on the left by junction A and on the right by
    junction B follows `exp(-t A) W exp(t B)`, so `W' = W B - A W` and
    `W'' = W B^2 - 2 A W B + A^2 W`: closed forms, differentiable in `w`.

    Args:
        plan: list of `JunctionIndices`.
        weights: dict from position to weight tensor.
        directions: one `(K, ...)` stack of algebra elements per junction
            (K directions at once).

    Returns:
        `(velocity, acceleration)`, lists over the plan's positions of
        `(K, ...)` tensors.
    """
    first, second = [], []
    for p, (left, right) in sorted(_sides(plan).items()):
        w = weights[p][None]
        v = a = tf.zeros_like(w)
        right_w = w
        if right is not None:
            group, m = plan[right].group, directions[right]
            right_w = _algebra_in(group, w, m)
            v = right_w
            a = _algebra_in(group, right_w, m)
        if left is not None:
            group, m = plan[left].group, directions[left]
            left_w = _algebra_out(group, w, m)
            v = v - left_w
            a = a + _algebra_out(group, left_w, m)
            if right is not None:
                a = a - 2.0 * _algebra_out(group, right_w, m)
        first.append(v)
        second.append(a)
    return first, second


def curve_curvature(first, second, total=tf.reduce_sum):
    """`sqrt(|g'|^2 |g''|^2 - (g'.g'')^2) / |g'|^3` over lists of tensors.

    `total` sums a tensor's entries; `_batch_sum` keeps a leading axis of
    curves.
    """
    dot = lambda a, b: tf.add_n([total(p * q) for p, q in zip(a, b)])
    v2, a2, va = dot(first, first), dot(second, second), dot(first, second)
    return tf.sqrt(tf.maximum(v2 * a2 - va ** 2, 0.0)) / v2 ** 1.5


def orbit_curvature(plan, weights, directions):
    """Mean curvature at `w` of the orbit curves along `directions`.

    Args:
        plan: list of `JunctionIndices`.
        weights: dict from position to weight tensor.
        directions: as from `curvature_directions`.
    """
    first, second = orbit_jet(plan, weights, directions)
    return tf.reduce_mean(curve_curvature(first, second, _batch_sum))


def tangent_move(plan, weights, step):
    """`w + d/dt (exp(t M)·w)` at `t = 0` with `M = step`: first order."""
    moved = dict(weights)
    step = [m[None] for m in step]
    for p, (left, right) in _sides(plan).items():
        w = weights[p][None]
        if right is not None:
            moved[p] = moved[p] + _algebra_in(plan[right].group, w, step[right])[0]
        if left is not None:
            moved[p] = moved[p] - _algebra_out(plan[left].group, w, step[left])[0]
    return moved


def _unit(tensors):
    """`tensors / ||tensors||` over the list; zeros stay zero."""
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors]))
    return [tf.math.divide_no_nan(t, norm) for t in tensors]


def ascend(plan, value_fn, weights, grads, steps, learning_rate, limit,
           maximize=True):
    """Raises (or lowers) `value_fn(g·w)` over the plan's exact groups.

    Each step moves every junction's element by `exp(lr * M / ||M||)`,
    where `M` is the Lie-algebra gradient of `±value_fn` at the current
    point (the norm over all junctions: each step has length `lr` in the
    algebra, whatever the value's scale), taken through the orbit's
    first-order move at `t = 0`: no gradient flows through `expm`. A step is
    kept only if the value improves and stays finite and the squared norm
    of the transported gradient stays within `limit` (the cap that keeps
    the next optimizer step sane); otherwise `lr` is halved. Always `steps`
    iterations: one static loop, XLA-friendly.

    Args:
        plan: list of `JunctionIndices`.
        value_fn: `fn(dict position -> weight) -> positive scalar`.
        weights: dict from position to weight at `w`.
        grads: dict from position to the gradient at `w`, for the cap.
        steps: Python int, the number of steps.
        learning_rate: length of a step in the Lie algebra.
        limit: cap on the squared norm of the transported gradient.
        maximize: raise (True) or lower (False) the value.

    Returns:
        `(elements, value_0, value_final, f_0, f_final, steps_taken)`, `f`
        the squared gradient norms.
    """
    dtype = next(iter(weights.values())).dtype
    sign = 1.0 if maximize else -1.0
    elements = [j.group.identity(j.width, dtype) for j in plan]
    zeros = [tf.zeros(j.group.record_shape(j.width), dtype) for j in plan]
    lr = tf.cast(learning_rate, dtype)
    limit = tf.cast(limit, dtype)

    def lie_gradient(moved):
        with tf.GradientTape() as tape:
            tape.watch(zeros)
            value = sign * value_fn(tangent_move(plan, moved, zeros))
        return _unit(tape.gradient(value, zeros))

    def body(taken, lr, elements, moved, value, f):
        lie = lie_gradient(moved)
        candidates = [j.group.compose(e, lr * m)
                      for j, e, m in zip(plan, elements, lie)]
        moved_c = transport(plan, candidates, weights, "weight")
        value_c = value_fn(moved_c)
        f_c = squared_norm(transport(plan, candidates, grads, "linear"))
        ok = tf.logical_and(tf.math.is_finite(value_c), value_c > 0)
        ok = tf.logical_and(ok, sign * value_c >= sign * value)
        ok = tf.logical_and(ok, tf.logical_and(tf.math.is_finite(f_c), f_c <= limit))
        pick = lambda new, old: tf.nest.map_structure(
            lambda a, b: tf.where(ok, a, b), new, old)
        return (taken + tf.cast(ok, tf.int32), tf.where(ok, lr, lr / 2),
                pick(candidates, elements), pick(moved_c, moved),
                tf.where(ok, value_c, value), tf.where(ok, f_c, f))

    value0 = value_fn(weights)
    f0 = squared_norm(grads)
    state = (tf.constant(0, tf.int32), lr, elements, dict(weights), value0, f0)
    taken, _, elements, _, value, f = tf.while_loop(
        lambda *_: True, body, state, maximum_iterations=steps)
    return elements, value0, value, f0, f, taken
