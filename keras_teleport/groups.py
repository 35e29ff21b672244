"""Group actions on a junction, as pure tensor math.

A junction is the hidden layer between Dense A (kernel `K1` of shape
`(in, h)`, bias `b1` of shape `(h,)`, activation `s`) and Dense B (kernel `K2`
of shape `(h, out)`). A group element `g` acts as

    K1 -> K1 g,    b1 -> b1 g,    K2 -> g^-1 K2

and, because the loss is unchanged, the gradient at the moved point follows
from the gradient at the old one with no new forward pass:

    G1 -> G1 g^-T,    Gb1 -> Gb1 g^-T,    G2 -> g^T G2.

Each group below implements these maps for the *incoming* side (`K1`, `b1`:
the element acts on the last axis from the right) and the *outgoing* side
(`K2`: the element acts on the first axis from the left). A kernel shared by
two junctions (`K2` of one is `K1` of the next) gets the outgoing map of the
first and the incoming map of the second; the two commute, so the order does
not matter.

Teleportation ascends an objective over the group. Both groups here take
ascent steps in the Lie algebra *at the current point*: the new element is
`g exp(M)` where `M` is a multiple of the gradient of the objective at the
identity. At the identity the differential of `exp` is the identity map, so
no gradient ever flows through `expm` (XLA cannot compile that gradient), and
every iterate is exactly a group element.

Nothing in this module knows about Keras layers or optimizers: every function
takes and returns tensors.
"""

import tensorflow as tf


def _right_matmul(x, m):
    """`x @ m` on the last axis, for rank-1 (bias) or rank-2 (kernel) `x`."""
    if x.shape.rank == 1:
        return tf.linalg.matvec(m, x, transpose_a=True)
    return tf.matmul(x, m)


class DiagonalScaling:
    """Positive rescaling of hidden units, `g = diag(exp(u))`.

    Exact for every positively homogeneous activation (`relu`, `leaky_relu`,
    linear): `s(x d) = s(x) d` for `d > 0`. The element is stored as the
    log-scales `u` (shape `(h,)`), so it stays positive and invertible for
    any real `u`, and composition is addition.

    Squared-gradient slots transform exactly: `(G / d)^2 = G^2 / d^2`.
    The distance of an element from the identity is `||u||_2`
    (`= ||log g||_F`).

    References:
        - Zhao et al., "Symmetry Teleportation for Accelerated Optimization",
          NeurIPS 2022.
        - Neyshabur et al., "Path-SGD: Path-Normalized Optimization in Deep
          Neural Networks", NeurIPS 2015.
    """

    name = "scaling"

    def identity(self, width, dtype):
        return tf.zeros([width], dtype)

    def compose(self, element, step):
        """`element · exp(step)`."""
        return element + step

    def distance(self, element):
        return tf.norm(element)

    def act_in(self, x, element):
        """`x g` for an incoming kernel or bias."""
        return x * tf.exp(element)

    def act_out(self, x, element):
        """`g^-1 x` for an outgoing kernel."""
        return x * tf.exp(-element)[:, None]

    def grad_in(self, grad, element):
        """`G g^-T` for the gradient of an incoming kernel or bias."""
        return grad * tf.exp(-element)

    def grad_out(self, grad, element):
        """`g^T G` for the gradient of an outgoing kernel."""
        return grad * tf.exp(element)[:, None]

    def square_in(self, square, element):
        """How `G^2` (elementwise) of an incoming kernel transforms: exact."""
        return square * tf.exp(-2.0 * element)

    def square_out(self, square, element):
        return square * tf.exp(2.0 * element)[:, None]

    def abs_in(self, value, element):
        """How `|G|` of an incoming kernel transforms: exact."""
        return self.grad_in(value, element)

    def abs_out(self, value, element):
        return self.grad_out(value, element)

    def lie_gradient(self, in_grads, out_grad):
        """Gradient of `sum ||transported grads||^2` at the identity.

        With `g = exp(diag(m))`, `d/dm` of `||G1 g^-T||^2 + ||Gb1 g^-T||^2 +
        ||g^T G2||^2` at `m = 0` is `2 (rowsq(G2) - colsq(G1) - Gb1^2)`.
        """
        result = 2.0 * tf.reduce_sum(tf.square(out_grad), axis=1)
        for grad in in_grads:
            columns = tf.reshape(grad, [-1, grad.shape[-1]])
            result -= 2.0 * tf.reduce_sum(tf.square(columns), axis=0)
        return result

    def record_shape(self, width):
        return (width,)

    def record_identity(self):
        return "zeros"

    def record_compose(self, record, element):
        """Accumulate a teleport's element into a junction's record."""
        return record + element


class GeneralLinear:
    """Any invertible change of basis of the hidden layer, `g in GL(h)`.

    Exact for linear (identity) activations only. The element is stored as
    the pair `(g, g^-1)`. Each ascent step multiplies it by `exp(M)` (and
    the inverse by `exp(-M)`): the matrix exponential keeps every iterate
    invertible without a condition-number guard and gives the inverse
    without a solve, whereas `g = I + T` needs a guard against singular
    `I + T`. Steps are taken at the identity of the current point, where
    `d expm = id`, so no gradient flows through `expm`.

    Squared-gradient slots have no exact transform under a non-diagonal `g`:
    a slot keeps only the diagonal of the gradient's second moment, and the
    mixed entries need the off-diagonal ones. They are mapped with the
    fully-correlated bound `v -> (sqrt(v) |A|)^2` (`A` the matrix that maps
    the gradient, `|.|` elementwise), and absolute-value slots with
    `u -> u |A|`. Both are exact for diagonal (and permutation) `g`, and by
    the triangle inequality they keep `v >= m^2` for every linear slot `m`
    with `v >= m^2` before, so centered RMSprop's variance stays
    non-negative and no normalised step `m / sqrt(v)` grows.

    The distance of an element from the identity is `||g - I||_F`.

    References:
        - Zhao et al., "Improving Convergence and Generalization Using
          Parameter Symmetries", ICLR 2024.
    """

    name = "gl"

    def identity(self, width, dtype):
        eye = tf.eye(width, dtype=dtype)
        return (eye, eye)

    def compose(self, element, step):
        g, g_inv = element
        return (
            tf.matmul(g, tf.linalg.expm(step)),
            tf.matmul(tf.linalg.expm(-step), g_inv),
        )

    def distance(self, element):
        g = element[0]
        return tf.norm(g - tf.eye(g.shape[0], dtype=g.dtype))

    def act_in(self, x, element):
        return _right_matmul(x, element[0])

    def act_out(self, x, element):
        return tf.matmul(element[1], x)

    def grad_in(self, grad, element):
        return _right_matmul(grad, tf.transpose(element[1]))

    def grad_out(self, grad, element):
        return tf.matmul(element[0], grad, transpose_a=True)

    def square_in(self, square, element):
        return tf.square(self.abs_in(tf.sqrt(square), element))

    def square_out(self, square, element):
        return tf.square(self.abs_out(tf.sqrt(square), element))

    def abs_in(self, value, element):
        return _right_matmul(value, tf.abs(tf.transpose(element[1])))

    def abs_out(self, value, element):
        return tf.matmul(tf.abs(element[0]), value, transpose_a=True)

    def lie_gradient(self, in_grads, out_grad):
        """Gradient of `sum ||transported grads||^2` at the identity.

        With `g = exp(M)`, `d/dM` at `M = 0` is
        `2 (G2 G2^T - G1^T G1 - Gb1^T Gb1)`.
        """
        result = 2.0 * tf.matmul(out_grad, out_grad, transpose_b=True)
        for grad in in_grads:
            rows = tf.reshape(grad, [-1, grad.shape[-1]])
            result -= 2.0 * tf.matmul(rows, rows, transpose_a=True)
        return result

    def record_shape(self, width):
        return (width, width)

    def record_identity(self):
        return "identity"

    def record_compose(self, record, element):
        return tf.matmul(record, element[0])


GROUPS = {"scaling": DiagonalScaling(), "gl": GeneralLinear()}


def get(name):
    """Returns the group called `name` ("scaling" or "gl")."""
    if name not in GROUPS:
        raise ValueError(
            f"Unknown group {name!r}. Accepted values: {sorted(GROUPS)}."
        )
    return GROUPS[name]
