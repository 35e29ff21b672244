"""Finding the exact parameter symmetries of a Keras model.

A junction is admitted only when the group acts on it exactly: the model's
outputs are the same function of its inputs before and after the action, for
all data. Anything that could break that (a non-homogeneous activation, a
normalization layer, a regularizer or constraint on a moved weight, a layer
used twice, a hidden tensor that is read elsewhere) makes the junction
refused, with the reason.
"""

import dataclasses

import keras

# Activations `s` with `s(x d) = s(x) d` for every `d > 0`. The value is the
# widest group that acts exactly through it.
_ACTIVATION_GROUPS = {
    "linear": ("scaling", "gl"),
    "relu": ("scaling",),
    "leaky_relu": ("scaling",),
}

# Layers that may stand between two Dense layers of a junction: elementwise
# and positively homogeneous, so positive scaling commutes with them.
# Dropout multiplies each unit by its own mask, so it does not commute
# with a change of basis.
_TRANSPARENT = {
    "Activation": None,  # decided by its activation function
    "ReLU": None,
    "LeakyReLU": ("scaling",),
    "Dropout": ("scaling",),
    "Identity": ("scaling", "gl"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Junction:
    """A hidden layer whose units a group can move without changing outputs.

    Attributes:
        name: Readable name, `"<layer A> -> <layer B>"`.
        in_kernel: The kernel `K1` of shape `(in, h)` that feeds the units.
        in_bias: Their bias `b1` of shape `(h,)`, or `None`.
        out_kernel: The kernel `K2` of shape `(h, out)` that reads them.
        groups: Names of the groups that act exactly, narrowest first
            (`("scaling",)` or `("scaling", "gl")`).
        activation: Name of the activation between them.
        record: A layer-owned variable holding the accumulated group element
            (see `keras_teleport.SymmetricDensePair`), or `None`.
    """

    name: str
    in_kernel: object
    in_bias: object
    out_kernel: object
    groups: tuple
    activation: str
    record: object = None

    @property
    def width(self):
        return int(self.in_kernel.shape[-1])


@dataclasses.dataclass(frozen=True)
class RefusedJunction:
    """A pair of layers that is not an exact junction, and why."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Symmetries:
    """What `find_symmetries` found: admitted and refused junctions."""

    junctions: tuple
    refused: tuple

    def describe(self):
        lines = [f"{len(self.junctions)} junction(s):"]
        lines += [
            f"  {j.name}: {j.activation}, groups {list(j.groups)}"
            for j in self.junctions
        ]
        lines.append(f"{len(self.refused)} refused:")
        lines += [f"  {r.name}: {r.reason}" for r in self.refused]
        return "\n".join(lines)


def activation_name(fn):
    """Name of a Keras activation function, or `None` if unrecognised."""
    for name in _ACTIVATION_GROUPS:
        if fn is keras.activations.get(name):
            return name
    return getattr(fn, "__name__", None)


def _activation_groups(fn):
    name = activation_name(fn)
    for known, groups in _ACTIVATION_GROUPS.items():
        if fn is keras.activations.get(known):
            return name, groups, None
    return name, (), (
        f"activation {name!r} is not positively homogeneous (accepted: "
        f"{sorted(_ACTIVATION_GROUPS)})"
    )


def _transparent_groups(layer):
    """(groups, reason) for a layer between the two Dense layers."""
    kind = type(layer).__name__
    if kind not in _TRANSPARENT:
        return (), (
            f"{kind} {layer.name!r} between them breaks exact invariance"
        )
    if kind == "Activation":
        _, groups, reason = _activation_groups(layer.activation)
        return groups, reason
    if kind == "ReLU":
        if layer.max_value is not None or float(layer.threshold) != 0.0:
            return (), (
                f"ReLU {layer.name!r} has max_value or threshold set, so it "
                "is not positively homogeneous"
            )
        return ("scaling",), None
    return _TRANSPARENT[kind], None


def _dense_problems(layer, side, uses=1):
    """Reasons why a Dense layer cannot take part on `side` ('in'/'out')."""
    problems = []
    if not layer.trainable:
        problems.append(f"{layer.name!r} is not trainable")
    if uses > 1:
        problems.append(f"{layer.name!r} is used more than once")
    if getattr(layer, "lora_enabled", False):
        # Its `kernel` is computed from the LoRA factors: nothing to move.
        return problems + [f"{layer.name!r} has LoRA enabled"]
    if getattr(layer, "quantization_mode", None):
        return problems + [f"{layer.name!r} is quantized"]
    kernel_reg, kernel_con = _kernel_extras(layer, side)
    if kernel_reg is not None:
        problems.append(f"{layer.name!r} has a kernel regularizer")
    if kernel_con is not None:
        problems.append(f"{layer.name!r} has a kernel constraint")
    if side == "in":
        if getattr(layer, "activity_regularizer", None) is not None:
            problems.append(f"{layer.name!r} has an activity regularizer")
        bias = _in_bias(layer)
        if bias is not None and bias.regularizer is not None:
            problems.append(f"{layer.name!r} has a bias regularizer")
        if bias is not None and bias.constraint is not None:
            problems.append(f"{layer.name!r} has a bias constraint")
    return problems


def _pair_problems(layer, uses=1):
    problems = []
    if not layer.trainable:
        problems.append(f"{layer.name!r} is not trainable")
    if uses > 1:
        problems.append(f"{layer.name!r} is used more than once")
    return problems


def _kernel_extras(layer, side):
    kernel = _out_kernel(layer) if side == "in" else _in_kernel(layer)
    return kernel.regularizer, kernel.constraint


# Dense-like views: a Dense layer is its own input and output side; a
# SymmetricDensePair reads with `kernel_1` and writes with `kernel_2`.
def _is_pair(layer):
    from keras_teleport.layers import SymmetricDensePair

    return isinstance(layer, SymmetricDensePair)


def _is_dense_like(layer):
    return isinstance(layer, keras.layers.Dense) or _is_pair(layer)


def _in_kernel(layer):
    return layer.kernel_1 if _is_pair(layer) else layer.kernel


def _out_kernel(layer):
    return layer.kernel_2 if _is_pair(layer) else layer.kernel


def _in_bias(layer):
    """The bias of the units a junction moves (the side that writes)."""
    return layer.bias_2 if _is_pair(layer) else layer.bias


def _out_activation(layer):
    return layer.activation


def _pair_junction(layer):
    groups = layer.symmetry_groups()
    return Junction(
        name=f"{layer.name} (internal)",
        in_kernel=layer.kernel_1,
        in_bias=layer.bias_1,
        out_kernel=layer.kernel_2,
        groups=groups,
        activation=activation_name(layer.hidden_activation),
        record=layer.group_element,
    )


def _graph_nodes(model):
    """The node keys of the model's own graph, or None without a graph.

    Layers keep every node they were ever called in (deserialization adds
    spare ones), so uses and consumers count only the model's own nodes.
    """
    graph = model
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
    nodes = getattr(graph, "_nodes", None)
    return set(nodes) if nodes is not None else None


def _node_key(node):
    from keras.src.ops.function import make_node_key

    operation = node.operation
    return make_node_key(operation, operation._inbound_nodes.index(node))


def _uses(layer, nodes):
    if nodes is None:
        return 1
    return sum(
        make_key in nodes
        for make_key in (_node_key(n) for n in layer._inbound_nodes)
    )


def _next_layer(layer, model, nodes, output_ids):
    """The one layer that reads `layer`'s output: (layer or None, reason)."""
    if nodes is None:  # a Sequential model without a symbolic graph
        layers = list(model.layers)
        index = layers.index(layer)
        return (layers[index + 1] if index + 1 < len(layers) else None), None
    own = [n for n in layer._inbound_nodes if _node_key(n) in nodes]
    readers = [
        n for n in getattr(layer, "_outbound_nodes", [])
        if _node_key(n) in nodes
    ]
    outputs = own[0].outputs if own else []
    if readers and any(id(t) in output_ids for t in outputs):
        return None, f"the output of {layer.name!r} is also a model output"
    if len(readers) > 1:
        return None, f"the output of {layer.name!r} is read by several layers"
    if not readers:
        return None, None
    return readers[0].operation, None


def find_symmetries(model):
    """Returns the exact junctions of a Keras model and the refused ones.

    Walks Sequential and functional models built from `Dense` layers (and
    `keras_teleport.SymmetricDensePair`), following each Dense layer's
    output through elementwise, positively homogeneous layers
    (`Activation`, `ReLU`, `LeakyReLU`, `Dropout`, `Identity`) to the next
    Dense layer. The internal junction of every `SymmetricDensePair` is
    found in any model, subclassed ones included.

    A junction is returned only if its invariance is exact for all inputs;
    every candidate pair that fails gets a `RefusedJunction` with the reason.

    Args:
        model: A built `keras.Model`.

    Returns:
        A `Symmetries` with `junctions` (tuple of `Junction`) and `refused`
        (tuple of `RefusedJunction`).

    Example:

    ```python
    model = keras.Sequential([keras.Input((784,)),
                              keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    found = keras_teleport.find_symmetries(model)
    print(found.describe())
    ```
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r}"
        )
    if not model.built:
        raise ValueError(
            "`model` must be built (call it once, or give it an Input) "
            "before its symmetries can be found."
        )
    junctions, refused = [], []
    nodes = _graph_nodes(model)
    all_layers = list(model._flatten_layers(include_self=False))
    for layer in all_layers:
        if _is_pair(layer):
            problems = _pair_problems(layer, _uses(layer, nodes))
            if problems:
                refused.append(
                    RefusedJunction(f"{layer.name} (internal)", "; ".join(problems))
                )
            else:
                junctions.append(_pair_junction(layer))

    is_graph = isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model)
        and type(model).__name__ == "Functional"
    )
    if not is_graph:
        if not junctions:
            refused.append(
                RefusedJunction(
                    model.name,
                    "subclassed model: its call graph is unknown, so only "
                    "SymmetricDensePair layers can declare junctions in it",
                )
            )
        return Symmetries(tuple(junctions), tuple(refused))

    output_ids = {id(t) for t in (model.outputs or [])}
    for first in [l for l in model.layers if _is_dense_like(l)]:
        act_name, groups, reason = _activation_groups(_out_activation(first))
        groups = set(groups)
        reasons = [reason] if reason else []
        current, second, branched = first, None, False
        # Follow the hidden tensor to the next Dense-like layer.
        while True:
            current, why = _next_layer(current, model, nodes, output_ids)
            if why:
                reasons.append(why)
                branched = True
                break
            if current is None:
                break
            if _is_dense_like(current):
                second = current
                break
            more_groups, why = _transparent_groups(current)
            if why:
                reasons.append(why)
            groups &= set(more_groups)
            if type(current).__name__ != "Dropout":
                act_name = f"{act_name}+{type(current).__name__}"
        if second is None and not branched:
            continue  # no Dense layer reads these units: nothing to move
        name = f"{first.name} -> {second.name if second else '?'}"
        if second is not None:
            reasons += _dense_problems(first, "in", _uses(first, nodes))
            reasons += _dense_problems(second, "out", _uses(second, nodes))
        if not groups and not reasons:
            reasons.append("no group acts exactly through the layers between")
        if reasons:
            refused.append(RefusedJunction(name, "; ".join(reasons)))
            continue
        junctions.append(
            Junction(
                name=name,
                in_kernel=_out_kernel(first),
                in_bias=_in_bias(first),
                out_kernel=_in_kernel(second),
                groups=tuple(g for g in ("scaling", "gl") if g in groups),
                activation=act_name,
            )
        )
    return Symmetries(tuple(junctions), tuple(refused))
