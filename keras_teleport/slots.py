"""How each optimizer slot transforms under a teleport.

`slots="transport"` maps every slot to the value it would hold had its whole
history been observed at the teleported point. For a gradient `G` that moves
to `G'`, that depends only on how the slot is built from gradients:

- `"linear"`: a linear combination of past gradients (momentum, Adam's first
  moment, centered RMSprop's mean gradient, gradient accumulators) maps
  exactly like a gradient, under any group element.
- `"square"`: a combination of past elementwise squares (Adam's and RMSprop's
  second moment, Adagrad's accumulator, AMSGrad's maximum) maps exactly
  under a diagonal element; the slot's initial value (Adagrad's
  `initial_accumulator_value`) is not a gradient and is kept out of the map.
  Under a non-diagonal element the group's diagonal-covariance
  approximation applies (see `keras_teleport.GeneralLinear`).
- `"abs"`: a combination of past absolute values (Adamax's `u`), exact under
  a diagonal element.
- `"invariant"`: a combination of normalised updates `G / sqrt(v)`
  (RMSprop's momentum); unchanged by a diagonal element up to the
  optimizer's epsilon, and kept as it is.
- `"weight"`: a copy of the weights (the EMA of weights), which moves like
  the weights themselves.

The names of the slot attributes are private to Keras; `resolve` checks each
one after the optimizer is built and fails loudly if a Keras upgrade renamed
it.
"""

import keras

# (optimizer class, attribute, kind, condition on the optimizer) in order of
# specificity; the first class in an optimizer's MRO found here applies.
_SLOTS = {
    "SGD": (("momentums", "linear", lambda o: o.momentum != 0),),
    "Adam": (
        ("_momentums", "linear", None),
        ("_velocities", "square", None),
        ("_velocity_hats", "square", lambda o: o.amsgrad),
    ),
    "Adagrad": (("_accumulators", "square", None),),
    "RMSprop": (
        ("_velocities", "square", None),
        ("_momentums", "invariant", lambda o: o.momentum > 0),
        ("_average_gradients", "linear", lambda o: o.centered),
    ),
    "Adamax": (("_m", "linear", None), ("_u", "abs", None)),
    "Nadam": (("_momentums", "linear", None), ("_velocities", "square", None)),
    "Lion": (("_momentums", "linear", None),),
}

# Slots every Keras optimizer may carry, whatever its class.
_BASE_SLOTS = (
    ("_model_variables_moving_average", "weight", lambda o: o.use_ema),
    (
        "_accumulated_gradients",
        "linear",
        lambda o: bool(o.gradient_accumulation_steps),
    ),
)


def _optimizer_class(optimizer):
    classes = {getattr(keras.optimizers, name, None): name for name in _SLOTS}
    for cls in type(optimizer).__mro__:
        if cls in classes:
            return classes[cls]
    return None


def supports_transport(optimizer):
    """Whether every slot of `optimizer` has a known transform."""
    return _optimizer_class(optimizer) is not None


def supported_optimizers():
    return sorted(_SLOTS)


def resolve(optimizer, variables):
    """Maps each variable's index to `[(slot variable, kind, offset)]`.

    `offset` is the slot's initial value, which is not built from gradients
    and so does not move (`v -> offset + transform(v - offset)`).

    Must run after `optimizer.build(variables)`.
    """
    name = _optimizer_class(optimizer)
    specs = _SLOTS[name] + _BASE_SLOTS
    by_variable = {i: [] for i in range(len(variables))}
    for attribute, kind, condition in specs:
        if condition is not None and not condition(optimizer):
            continue
        slot_list = getattr(optimizer, attribute, None)
        if slot_list is None or len(slot_list) != len(variables):
            raise RuntimeError(
                f"keras_teleport expected {type(optimizer).__name__} to keep "
                f"its {kind} slots in `{attribute}` (one per variable), but "
                "found none: this Keras version renamed them. Use "
                "slots='reset' or slots='keep', and report the Keras version."
            )
        for variable in variables:
            index = optimizer._get_variable_index(variable)
            slot = slot_list[index]
            if slot is not None:
                offset = 0.0
                if name == "Adagrad" and kind == "square":
                    offset = float(optimizer.initial_accumulator_value)
                by_variable[index].append((slot, kind, offset))
    return by_variable
