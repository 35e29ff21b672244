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
# "none" moves nothing and only applies the slot policy: the control run
#   that separates what a teleport buys from what a state reset buys.
OBJECTIVES = ("grad_norm", "min_norm", "none")


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
