"""Layers that declare their own parameter symmetry."""

import keras

from keras_teleport import groups as groups_lib
from keras_teleport import symmetries


@keras.saving.register_keras_serializable(package="keras_teleport")
class SymmetricDensePair(keras.layers.Layer):
    """Two Dense kernels around one hidden activation, with a declared group.

    Computes

        y = activation(hidden_activation(x K1 + b1) K2 + b2)

    and declares the group that moves its hidden units without changing `y`:
    positive scaling (`group="scaling"`, exact for `relu`, `leaky_relu` and
    linear hidden activations) or the general linear group (`group="gl"`,
    linear hidden activation only). `keras_teleport.Teleport` finds the
    junction in any model, subclassed ones included, and accumulates every
    teleport's element in the non-trainable weight `group_element`
    (log-scales of shape `(h,)` for scaling, a matrix `g` of shape `(h, h)`
    for GL), initialised to the identity, so users can see how far the
    junction has been moved. `group_element` is bookkeeping only: `call`
    never reads it, so an exported model does no extra work at inference.

    Args:
        hidden_units: Positive integer, the width `h` of the hidden layer.
        units: Positive integer, the output width.
        hidden_activation: Activation between the kernels. Defaults to
            `"relu"`.
        activation: Activation applied to the output. Defaults to `None`.
        group: `"scaling"` or `"gl"`. Defaults to `"scaling"`.
        use_bias: Whether both kernels have a bias. Defaults to `True`.
        kernel_initializer: Initializer of both kernels. Defaults to
            `"glorot_uniform"`.
        bias_initializer: Initializer of both biases. Defaults to `"zeros"`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((784,)),
        keras_teleport.SymmetricDensePair(128, 10, hidden_activation="relu"),
    ])
    model.compile(optimizer=keras_teleport.Teleport(keras.optimizers.SGD(0.1),
                                                    every=100),
                  loss="sparse_categorical_crossentropy")
    ```

    References:
        - Zhao et al., "Improving Convergence and Generalization Using
          Parameter Symmetries", ICLR 2024.
    """

    def __init__(
        self,
        hidden_units,
        units,
        hidden_activation="relu",
        activation=None,
        group="scaling",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for arg, value in (("hidden_units", hidden_units), ("units", units)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"`{arg}` must be a positive integer. Received: "
                    f"{arg}={value!r}"
                )
        groups_lib.get(group)  # validates the name
        self.hidden_units = hidden_units
        self.units = units
        self.hidden_activation = keras.activations.get(hidden_activation)
        self.activation = keras.activations.get(activation)
        admitted = symmetries._activation_groups(self.hidden_activation)[1]
        if group not in admitted:
            raise ValueError(
                f"`group={group!r}` does not act exactly through "
                f"hidden_activation={hidden_activation!r}. Accepted groups "
                f"for it: {list(admitted)}."
            )
        self.group = group
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        fan_in = input_shape[-1]
        h = self.hidden_units
        self.kernel_1 = self.add_weight(
            name="kernel_1", shape=(fan_in, h),
            initializer=self.kernel_initializer,
        )
        self.kernel_2 = self.add_weight(
            name="kernel_2", shape=(h, self.units),
            initializer=self.kernel_initializer,
        )
        self.bias_1 = self.bias_2 = None
        if self.use_bias:
            self.bias_1 = self.add_weight(
                name="bias_1", shape=(h,), initializer=self.bias_initializer
            )
            self.bias_2 = self.add_weight(
                name="bias_2", shape=(self.units,),
                initializer=self.bias_initializer,
            )
        group = groups_lib.get(self.group)
        self.group_element = self.add_weight(
            name="group_element",
            shape=group.record_shape(h),
            initializer=group.record_identity(),
            trainable=False,
        )

    def call(self, inputs):
        hidden = keras.ops.matmul(inputs, self.kernel_1)
        if self.use_bias:
            hidden = hidden + self.bias_1
        hidden = self.hidden_activation(hidden)
        outputs = keras.ops.matmul(hidden, self.kernel_2)
        if self.use_bias:
            outputs = outputs + self.bias_2
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def symmetry_groups(self):
        """The groups acting exactly on the hidden units, up to `group`."""
        order = ("scaling", "gl")
        return order[: order.index(self.group) + 1]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_units": self.hidden_units,
                "units": self.units,
                "hidden_activation": keras.activations.serialize(
                    self.hidden_activation
                ),
                "activation": keras.activations.serialize(self.activation),
                "group": self.group,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config
