"""The `Teleport` optimizer wrapper."""

import math
import sys

import keras
import tensorflow as tf
from keras.src.utils import tracking

from keras_teleport import groups as groups_lib
from keras_teleport import objectives
from keras_teleport import slots as slots_lib
from keras_teleport import symmetries

SLOT_POLICIES = ("transport", "reset", "keep")
GROUP_CHOICES = ("auto", "scaling", "gl")
_METRICS = ("grad_norm_before", "grad_norm_after", "distance")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _find_calling_model(var_list):
    """The `keras.Model` whose method is building this optimizer, if any.

    An optimizer only ever sees variables, but `fit`, `compile` and
    `load_model` build it from a method of the model that owns them.
    """
    wanted = {id(v) for v in var_list}
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, keras.Model) and wanted <= {
            id(v) for v in candidate.trainable_variables
        }:
            return candidate
        frame = frame.f_back
    return None


class _Plan:
    """The teleport plan, kept out of the optimizer's variable tracking."""

    def __init__(self, junctions, indices, records, slots, resets):
        self.junctions = junctions  # tuple of symmetries.Junction
        self.indices = indices  # tuple of objectives.JunctionIndices
        self.records = records  # one variable per junction
        self.slots = slots  # position -> [(slot, kind, offset)]
        self.resets = resets  # [(inner variable, initial fill)]

    @property
    def positions(self):
        used = set()
        for j in self.indices:
            used.update(j.in_indices)
            used.add(j.out_index)
        return sorted(used)


@keras.saving.register_keras_serializable(package="keras_teleport")
class Teleport(keras.optimizers.Optimizer):
    """Wraps an optimizer and teleports the weights along exact symmetries.

    At scheduled steps, before the inner optimizer's update, the weights
    move along the model's parameter symmetries (see
    `keras_teleport.find_symmetries`) to a point of the same loss with a
    steeper gradient, then the inner optimizer steps from there:

        g* = argmax_g ||grad L(g·w)||^2      (a few ascent steps, capped)
        w <- g*·w
        w <- inner_update(w, grad L(g*·w))

    With exact groups the gradient at `g·w` is the current mini-batch
    gradient transported (`G1 g^-T`, `g^T G2`), so a teleport costs no
    forward or backward pass and runs inside the compiled train step
    (`tf.function`, XLA).

    The inner optimizer's state is handled by `slots`:

    - `"transport"`: every slot becomes the value it would hold if its
      whole history had been observed at the teleported point (exact for
      slots linear in the gradient, and for squared-gradient slots under
      positive scaling; see `keras_teleport.GeneralLinear` for the
      approximation under GL).
    - `"reset"`: fresh inner state after each teleport, including the step
      count used by Adam's bias correction, as in the ICLR'24 reference
      code. A learning-rate schedule keeps following the global step.
    - `"keep"`: state untouched, as in the NeurIPS'22 reference code.

    A teleport that gives a non-finite result, or can make no step within
    `max_grad_norm_ratio`, is rejected: weights and slots stay exactly as
    they were, and `teleport_metrics["rejected"]` counts it.

    `iterations` counts the steps taken by the wrapper. It equals the inner
    optimizer's own count except under `slots="reset"`, which restarts the
    latter.

    Args:
        optimizer: The `keras.optimizers.Optimizer` to wrap.
        every: Teleport before every `every`-th step (steps `0, every,
            2 * every, ...`, counted from 0). Defaults to `None`.
        at_steps: Iterable of step indices (from 0) to teleport at, in
            addition to `every`. With neither, the wrapper never teleports
            and matches the inner optimizer exactly. Defaults to `None`.
        steps: Ascent steps per teleport. Defaults to `10`.
        teleport_lr: Step size of the ascent on `log ||grad||^2` in the Lie
            algebra (dimensionless). Defaults to `0.5`.
        objective: What the teleport maximises. `"grad_norm"`: the squared
            norm of the gradient of the moved variables on the current
            mini-batch. Defaults to `"grad_norm"`.
        max_grad_norm_ratio: Cap on the growth of that gradient norm in one
            teleport (the orbit is unbounded). Must be > 1. Defaults to
            `5.0`.
        slots: `"transport"`, `"reset"` or `"keep"`. Defaults to
            `"transport"`.
        group: `"auto"` (the widest exact group of each junction: GL for
            linear activations, positive scaling otherwise), `"scaling"` or
            `"gl"` (junctions where GL is not exact are left out). Defaults
            to `"auto"`.
        name: Name of the optimizer. Defaults to `None`.

    Example:

    ```python
    model.compile(
        optimizer=keras_teleport.Teleport(keras.optimizers.Adam(1e-3),
                                          every=100),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, epochs=5)
    print(model.optimizer.teleport_metrics)
    ```

    In a custom training loop, build it with the model:
    `optimizer.build(model.trainable_variables, model=model)`.

    References:
        - Zhao, Dehmamy, Walters, Yu, "Symmetry Teleportation for Accelerated
          Optimization", NeurIPS 2022.
        - Zhao, Gower, Walters, Yu, "Improving Convergence and Generalization
          Using Parameter Symmetries", ICLR 2024.
    """

    def __init__(
        self,
        optimizer,
        every=None,
        at_steps=None,
        steps=10,
        teleport_lr=0.5,
        objective="grad_norm",
        max_grad_norm_ratio=5.0,
        slots="transport",
        group="auto",
        name=None,
        **kwargs,
    ):
        if isinstance(optimizer, Teleport) or isinstance(
            getattr(optimizer, "inner_optimizer", None), Teleport
        ):
            raise ValueError(
                "`optimizer` is already a Teleport: wrap the bare optimizer "
                "once."
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a keras.optimizers.Optimizer instance. "
                f"Received: optimizer={optimizer!r}"
            )
        if every is not None and (not _is_int(every) or every < 1):
            raise ValueError(
                f"`every` must be a positive integer or None. Received: "
                f"every={every!r}"
            )
        if at_steps is not None:
            try:
                at_steps = tuple(sorted(set(at_steps)))
            except TypeError:
                raise TypeError(
                    "`at_steps` must be an iterable of non-negative integers "
                    f"or None. Received: at_steps={at_steps!r}"
                ) from None
            if not all(_is_int(s) and s >= 0 for s in at_steps):
                raise ValueError(
                    "`at_steps` must contain non-negative integers. "
                    f"Received: at_steps={at_steps!r}"
                )
        if not _is_int(steps) or steps < 1:
            raise ValueError(
                f"`steps` must be a positive integer. Received: steps={steps!r}"
            )
        if (
            not isinstance(teleport_lr, (int, float))
            or isinstance(teleport_lr, bool)
            or not math.isfinite(teleport_lr)
            or teleport_lr <= 0
        ):
            raise ValueError(
                "`teleport_lr` must be a positive finite number. Received: "
                f"teleport_lr={teleport_lr!r}"
            )
        if objective not in objectives.OBJECTIVES:
            raise ValueError(
                f"Unknown `objective` {objective!r}. Accepted values: "
                f"{list(objectives.OBJECTIVES)}."
            )
        if (
            not isinstance(max_grad_norm_ratio, (int, float))
            or isinstance(max_grad_norm_ratio, bool)
            or not max_grad_norm_ratio > 1
            or not math.isfinite(max_grad_norm_ratio)
        ):
            raise ValueError(
                "`max_grad_norm_ratio` must be a finite number > 1. "
                f"Received: max_grad_norm_ratio={max_grad_norm_ratio!r}"
            )
        if slots not in SLOT_POLICIES:
            raise ValueError(
                f"Unknown `slots` policy {slots!r}. Accepted values: "
                f"{list(SLOT_POLICIES)}."
            )
        if slots == "transport" and not slots_lib.supports_transport(optimizer):
            raise ValueError(
                f"slots='transport' does not know how the slots of "
                f"{type(optimizer).__name__} transform. Supported: "
                f"{slots_lib.supported_optimizers()}. Use slots='reset' or "
                "slots='keep' with this optimizer."
            )
        if group not in GROUP_CHOICES:
            raise ValueError(
                f"Unknown `group` {group!r}. Accepted values: "
                f"{list(GROUP_CHOICES)}."
            )
        for key, value in kwargs.items():
            default = {"use_ema": False, "ema_momentum": 0.99}.get(key)
            if value is not None and value != default:
                raise ValueError(
                    f"Teleport does not support `{key}`. Set it on the inner "
                    "optimizer instead."
                )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.every = every
        self.at_steps = at_steps
        self.steps = steps
        self.teleport_lr = float(teleport_lr)
        self.objective = objective
        self.max_grad_norm_ratio = float(max_grad_norm_ratio)
        self.slots = slots
        self.group = group
        self._plan = None

    @property
    def teleports(self):
        """Whether any step is scheduled for a teleport."""
        return self.every is not None or bool(self.at_steps)

    # Building -----------------------------------------------------------

    def _make_plan_junctions(self, model, var_list):
        """(junctions, JunctionIndices) usable on `var_list`, or raises."""
        found = symmetries.find_symmetries(model)
        position = {id(v): i for i, v in enumerate(var_list)}
        junctions, indices = [], []
        refused = [f"{r.name}: {r.reason}" for r in found.refused]
        for junction in found.junctions:
            wanted = "gl" if self.group == "gl" else "scaling"
            if self.group == "auto":
                wanted = junction.groups[-1]
            if wanted not in junction.groups:
                refused.append(
                    f"{junction.name}: group={self.group!r} is not exact "
                    f"through {junction.activation!r} (exact: "
                    f"{list(junction.groups)})"
                )
                continue
            moved = [junction.in_kernel, junction.out_kernel]
            if junction.in_bias is not None:
                moved.append(junction.in_bias)
            if any(id(v) not in position for v in moved):
                refused.append(
                    f"{junction.name}: not all its weights are trained by "
                    "this optimizer"
                )
                continue
            ins = [position[id(junction.in_kernel)]]
            if junction.in_bias is not None:
                ins.append(position[id(junction.in_bias)])
            junctions.append(junction)
            indices.append(
                objectives.JunctionIndices(
                    group=groups_lib.get(wanted),
                    width=junction.width,
                    in_indices=tuple(ins),
                    out_index=position[id(junction.out_kernel)],
                )
            )
        if not junctions:
            detail = "\n".join(f"  - {r}" for r in refused) or "  (none)"
            raise ValueError(
                f"Teleport found no usable symmetry in model {model.name!r} "
                f"with group={self.group!r}. Refused junctions:\n{detail}"
            )
        return tuple(junctions), tuple(indices)

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list, model=None):
        """Builds the wrapper and the inner optimizer on `var_list`.

        Args:
            var_list: The model's trainable variables.
            model: The `keras.Model` that owns them. Found automatically when
                Keras builds the optimizer (`fit`, `load_model`); pass it in a
                custom training loop. Defaults to `None`.
        """
        var_list = list(var_list)
        junctions = indices = ()
        if self.teleports:
            model = model or _find_calling_model(var_list)
            if model is None:
                raise ValueError(
                    "Teleport needs the model to find its symmetries, but was "
                    "built outside of Keras' fit/compile. Call "
                    "`optimizer.build(model.trainable_variables, model=model)`."
                )
            junctions, indices = self._make_plan_junctions(model, var_list)
        self.inner_optimizer.build(var_list)
        slots = {}
        if self.teleports and self.slots == "transport":
            slots = slots_lib.resolve(self.inner_optimizer, var_list)
        resets = []
        if self.teleports and self.slots == "reset":
            resets = self._initial_fills()
            self._follow_global_step()
        records = []
        for junction, index in zip(junctions, indices):
            if junction.record is not None:
                records.append(junction.record)
                continue
            records.append(
                self.add_variable(
                    shape=index.group.record_shape(index.width),
                    initializer=index.group.record_identity(),
                    dtype=junction.in_kernel.dtype,
                    name=f"group_element_{len(records)}",
                )
            )
        self._counts = self.add_variable(
            shape=(2,), dtype="int64", initializer="zeros",
            name="teleport_counts",
        )
        self._last = self.add_variable(
            shape=(len(_METRICS),), dtype="float32", initializer="zeros",
            name="last_teleport",
        )
        self._plan = _Plan(junctions, indices, records, slots, resets)
        self._plan.ascent = self._make_ascent(indices)
        super().build(var_list)

    def _make_ascent(self, indices):
        """The ascent as one XLA cluster: its many small ops, fused, cost a
        fraction of a train step even when the train step itself is not
        compiled."""

        def ascent(grads):
            return objectives.maximize_grad_norm(
                indices, grads, self.steps, self.teleport_lr,
                self.max_grad_norm_ratio,
            )

        return tf.function(ascent, jit_compile=True, autograph=False)

    def _initial_fills(self):
        """Each inner slot with the constant it starts from, for resets."""
        inner = self.inner_optimizer
        skip = {id(inner._iterations), id(getattr(inner, "_learning_rate", None))}
        fills = []
        with tf.init_scope():
            for variable in inner.variables:
                if id(variable) in skip:
                    continue
                value = keras.ops.convert_to_numpy(variable)
                flat = value.reshape(-1)
                if flat.size and not (flat == flat[0]).all():
                    raise ValueError(
                        f"slots='reset' needs {type(inner).__name__}'s slot "
                        f"{variable.path!r} to start from a constant, and it "
                        "does not. Use slots='keep'."
                    )
                fills.append((variable, flat[0] if flat.size else 0))
        return fills

    def _follow_global_step(self):
        """Evaluates the inner schedule at the global step, not the reset one."""
        inner, outer = self.inner_optimizer, self
        original = type(inner)._get_current_learning_rate

        def current_learning_rate():
            schedule = inner._learning_rate
            if isinstance(
                schedule, keras.optimizers.schedules.LearningRateSchedule
            ):
                return schedule(outer.iterations)
            return original(inner)

        inner._get_current_learning_rate = current_learning_rate

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    # Applying -----------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables or self._trainable_variables)
            self.built = True
        grads = list(grads)
        if self.teleports:
            variables = list(trainable_variables or self._trainable_variables)
            grads = self._teleport(grads, variables)
        self.inner_optimizer.apply(grads, trainable_variables)
        self._iterations.assign_add(1)

    def _is_teleport_step(self, step):
        due = tf.constant(False)
        if self.every is not None:
            due = tf.equal(step % self.every, 0)
        if self.at_steps:
            listed = tf.constant(self.at_steps, dtype=step.dtype)
            due = tf.logical_or(due, tf.reduce_any(tf.equal(step, listed)))
        return due

    def _teleport(self, grads, variables):
        """Teleports if due, and returns the gradients at the new point."""
        positions = self._plan.positions
        where = {self._get_variable_index(v): n for n, v in enumerate(variables)}
        local = {}
        for p in positions:
            g = grads[where[p]]
            local[p] = tf.convert_to_tensor(
                g if g is not None else tf.zeros_like(variables[where[p]])
            )
        shared = local
        if _multi_replica():
            # Every replica must pick the same element: compute it from the
            # summed gradient, as the inner optimizer will see it.
            reduced = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, [local[p] for p in positions]
            )
            shared = dict(zip(positions, reduced))

        due = self._is_teleport_step(tf.cast(self._iterations, tf.int64))
        targets, _ = self._targets()

        def stay():
            return [tf.identity(local[p]) for p in positions]

        if not _multi_replica():

            def teleport():
                _, moved, values = self._compute(shared, local)
                with tf.control_dependencies(_write(targets, values)):
                    return [tf.identity(g) for g in moved]

            moved = tf.cond(due, teleport, stay)
        else:
            # Replicas write through the strategy from cross-replica
            # context (a plain assign would leave each replica with its own
            # value), and a cond in replica context may not merge_call: so
            # compute under the cond, write under the merge.
            def teleport():
                _, moved, values = self._compute(shared, local)
                return moved, values

            def stay_and_read():
                return stay(), [tf.convert_to_tensor(t) for t in targets]

            moved, values = tf.cond(due, teleport, stay_and_read)

            def cross_replica(distribution, due, values):
                due = distribution.experimental_local_results(due)[0]

                def write():
                    ops = _write(targets, values, distribution)
                    with tf.control_dependencies(tf.nest.flatten(ops)):
                        return tf.constant(True)

                tf.cond(due, write, lambda: tf.constant(False))

            tf.distribute.get_replica_context().merge_call(
                cross_replica, args=(due, values)
            )
        for p, g in zip(positions, moved):
            if grads[where[p]] is not None:
                grads[where[p]] = g
        return grads

    def _targets(self):
        """Variables a teleport writes, in a fixed order, and their roles.

        A role is `(kind, position or record number, offset or fill)`.
        """
        plan = self._plan
        positions = plan.positions
        targets, roles = [], []
        for p in positions:
            targets.append(self._trainable_variables[p])
            roles.append(("weight", p, None))
            for slot, kind, offset in plan.slots.get(p, ()):
                targets.append(slot)
                roles.append((kind, p, offset))
        for variable, fill in plan.resets:
            targets.append(variable)
            roles.append(("fill", None, fill))
        if plan.resets:
            targets.append(self.inner_optimizer._iterations)
            roles.append(("fill", None, 0))
        for n, record in enumerate(plan.records):
            targets.append(record)
            roles.append(("record", n, None))
        targets += [self._counts, self._last]
        roles += [("counts", None, None), ("last", None, None)]
        return targets, roles

    def _compute(self, shared, local):
        """Pure: (accepted, moved local grads, new values of `_targets`)."""
        plan = self._plan
        elements, f0, f1, taken = plan.ascent(shared)

        def move(tensor, p, kind):
            return objectives.transport(
                plan.indices, elements, {p: tensor}, kind
            )[p]

        targets, roles = self._targets()
        currents = [tf.convert_to_tensor(t) for t in targets]
        values = []
        for current, (kind, key, extra) in zip(currents, roles):
            if kind in ("weight", "linear", "abs"):
                values.append(move(current, key, kind))
            elif kind == "square":
                # The initial value is not built from gradients: it stays.
                offset = tf.cast(extra, current.dtype)
                values.append(offset + move(current - offset, key, "square"))
            elif kind == "fill":
                values.append(tf.fill(tf.shape(current),
                                      tf.cast(extra, current.dtype)))
            elif kind == "record":
                values.append(_compose_record(
                    current, plan.indices[key].group, elements[key]))
            else:  # "invariant" slots; counters are set below
                values.append(current)
        finite = [
            tf.reduce_all(tf.math.is_finite(v))
            for v, (kind, _, _) in zip(values, roles)
            if v.dtype.is_floating
        ]
        accepted = tf.logical_and(taken > 0, tf.reduce_all(finite))
        distance = tf.sqrt(tf.add_n([
            tf.square(j.group.distance(e))
            for j, e in zip(plan.indices, elements)
        ]))
        counts = currents[-2] + tf.where(
            accepted, tf.constant([1, 0], tf.int64),
            tf.constant([0, 1], tf.int64),
        )
        last = tf.cast(tf.stack([tf.sqrt(f0), tf.sqrt(f1), distance]),
                       tf.float32)
        # A rejected teleport leaves everything but its counter as it was.
        values = [tf.where(accepted, v, c) for v, c in zip(values, currents)]
        values[-2] = counts
        values[-1] = tf.where(accepted, last, currents[-1])
        moved_local = objectives.transport(
            plan.indices, elements, local, "linear"
        )
        grads = [tf.where(accepted, moved_local[p], local[p])
                 for p in plan.positions]
        return accepted, grads, values

    # Forwarding to the inner optimizer ----------------------------------

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # Metrics --------------------------------------------------------------

    @property
    def teleport_metrics(self):
        """Python numbers describing the teleports so far.

        - `teleports`, `rejected`: how many teleports were made and rejected.
        - `grad_norm_before`, `grad_norm_after`: the norm of the gradient of
          the moved variables on the mini-batch, at the last teleport.
        - `distance`: how far the last teleport moved (root sum of squares of
          each junction's distance from the identity: `||log d||` for
          scaling, `||g - I||_F` for GL).
        - `junction_distance/<junction>`: how far each junction has moved in
          total since training began.
        """
        if not self.built or self._plan is None or not self.teleports:
            return {}
        counts = keras.ops.convert_to_numpy(self._counts)
        last = keras.ops.convert_to_numpy(self._last)
        result = {"teleports": int(counts[0]), "rejected": int(counts[1])}
        result.update({k: float(v) for k, v in zip(_METRICS, last)})
        for junction, index, record in zip(
            self._plan.junctions, self._plan.indices, self._plan.records
        ):
            value = keras.ops.convert_to_tensor(record)
            if len(record.shape) == 1:
                moved = tf.norm(value)
            else:
                moved = tf.norm(value - tf.eye(record.shape[0], dtype=value.dtype))
            result[f"junction_distance/{junction.name}"] = float(moved)
        return result

    @property
    def junctions(self):
        """The junctions this optimizer teleports (after `build`)."""
        return self._plan.junctions if self._plan is not None else ()

    # Serialization --------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "every": self.every,
            "at_steps": list(self.at_steps) if self.at_steps else None,
            "steps": self.steps,
            "teleport_lr": self.teleport_lr,
            "objective": self.objective,
            "max_grad_norm_ratio": self.max_grad_norm_ratio,
            "slots": self.slots,
            "group": self.group,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _write(targets, values, distribution=None):
    """Assigns `values` to `targets`; through `distribution` if given."""
    ops = []
    for target, value in zip(targets, values):
        variable = target.value if isinstance(target, keras.Variable) else target
        if distribution is None:
            ops.append(variable.assign(tf.cast(value, variable.dtype)))
        else:
            ops.append(
                distribution.extended.update(
                    variable,
                    lambda v, x: v.assign(tf.cast(x, v.dtype)),
                    args=(value,),
                    group=True,
                )
            )
    return ops


def _multi_replica():
    context = tf.distribute.get_replica_context()
    return (
        tf.distribute.has_strategy()
        and context is not None
        and context.num_replicas_in_sync > 1
    )


def _compose_record(current, group, element):
    """Accumulates a teleport's element into a junction's record."""
    if len(current.shape) == 2 and group.name == "scaling":
        # A GL record (a SymmetricDensePair with group="gl") moved by scaling.
        return current * tf.exp(element)[None, :]
    return group.record_compose(current, element)
