"""The `Teleport` optimizer wrapper."""

import math
import sys

import keras
import tensorflow as tf
from keras.src.utils import tracking

from keras_teleport import data_dependent
from keras_teleport import groups as groups_lib
from keras_teleport import objectives
from keras_teleport import slots as slots_lib
from keras_teleport import symmetries

SLOT_POLICIES = ("transport", "reset", "keep")
GROUP_CHOICES = ("auto", "scaling", "gl")
_METRICS = ("grad_norm_before", "grad_norm_after", "distance", "loss_drift",
            "objective_before", "objective_after")


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

    Teleports compose: a Teleport may wrap another one, each with its own
    group, objective and schedule, e.g. exact scaling teleports around the
    paper's data-dependent GL ones. The outer one moves the weights (and,
    under `"transport"`, the innermost optimizer's slots) before the inner
    one sees the gradients; `slots="reset"` belongs on the innermost
    Teleport, which owns the state.

    Args:
        optimizer: The `keras.optimizers.Optimizer` to wrap.
        every: Teleport before every `every`-th step (steps `0, every,
            2 * every, ...`, counted from 0). Defaults to `None`.
        at_steps: Iterable of step indices (from 0) to teleport at, in
            addition to `every`. With neither, the wrapper never teleports
            and matches the inner optimizer exactly. Defaults to `None`.
        steps: Ascent steps per teleport. Defaults to `10`.
        teleport_lr: Step size of the ascent on `log ||grad||^2` in the Lie
            algebra (dimensionless). Defaults to `0.05`.
        objective: What the teleport optimises.
            `"grad_norm"`: maximise the squared norm of the gradient of the
            moved variables on the current mini-batch (on the teleport
            batch for the data-dependent action); needs the mini-batch
            gradient, which the train step has.
            `"min_norm"`: the point of least weight norm over positive
            scalings (equi-normalization; data-free; `steps` balancing
            sweeps).
            `"min_sharpness"` / `"max_sharpness"`: lower or raise the
            paper's sharpness (mean loss at `w + r d` over the radii
            `0.001..0.2` and 10 random directions `d ~ U[0, 1]^P` of unit
            norm, drawn afresh for each teleport); needs teleport data
            (`keras_teleport.TeleportData`), teleports after the step like
            the data-dependent action, works with any group and needs no
            leaky activation.
            `"max_curvature"` / `"min_curvature"`: raise or lower the mean
            curvature of the orbit curves `t -> expm(t M)·w` over 10 random
            Lie-algebra directions `M` (drawn afresh for each teleport);
            data-free, exact groups only.
            Sharpness and curvature take backtracking steps of length
            `teleport_lr` along their gradient in the Lie algebra (in `T`
            for the data-dependent action), within the gradient norm cap.
            `"none"`: move nothing, only apply the `slots` policy at the
            scheduled steps (a reset-only control run). Defaults to
            `"grad_norm"`.
        max_grad_norm_ratio: Cap on the growth of that gradient norm (the
            orbit is unbounded). Teleports on consecutive steps count as
            one burst, capped against the norm before its first teleport.
            For the data-dependent action, the cap applies per teleport.
            Must be > 1. Defaults to `5.0`.
        slots: `"transport"`, `"reset"` or `"keep"`. Defaults to
            `"transport"`.
        group: `"auto"` (the widest exact group of each junction: GL for
            linear activations, positive scaling otherwise), `"scaling"` or
            `"gl"`. With `"gl"` on a Sequential model with leaky_relu
            junctions, the paper's data-dependent action applies (see
            `keras_teleport.TeleportData`); it runs after the optimizer's
            update of the step before the scheduled one, so the scheduled
            step's gradient is computed at the teleported point, and takes
            plain ascent steps of `teleport_lr` on the squared gradient norm
            (the reference's rule, so its step sizes carry over). Defaults
            to `"auto"`.
        form: Data-dependent action only: `"iclr"` (refit the outgoing
            kernel) or `"neurips"` (refit the incoming one). Defaults to
            `"iclr"`.
        parametrization: Data-dependent action only: `"identity_plus"`
            (`g = I + T`, as the reference; compiles with XLA) or `"expm"`
            (`g = expm(T)`, always invertible; its gradient does not compile
            with XLA). Defaults to `"identity_plus"`.
        loss_tolerance: Data-dependent action only: largest relative change
            of the loss on the teleport batch a teleport may cause; above
            it the teleport is rolled back. `None` disables the guard (the
            reference has none). Defaults to `0.05`.
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
        teleport_lr=0.05,
        objective="grad_norm",
        max_grad_norm_ratio=5.0,
        slots="transport",
        group="auto",
        form="iclr",
        parametrization="identity_plus",
        loss_tolerance=0.05,
        name=None,
        **kwargs,
    ):
        if not isinstance(optimizer, Teleport) and isinstance(
            getattr(optimizer, "inner_optimizer", None), Teleport
        ):
            raise ValueError(
                f"`optimizer` is a {type(optimizer).__name__} around a "
                "Teleport: wrap the Teleport instead (e.g. "
                "LossScaleOptimizer(Teleport(Teleport(inner))))."
            )
        if isinstance(optimizer, Teleport) and slots == "reset":
            raise ValueError(
                "slots='reset' on a Teleport that wraps another Teleport: "
                "set slots='reset' on the inner one, which owns the state. "
                f"Accepted here: {['transport', 'keep']}."
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
        if objective == "min_norm" and group == "gl":
            raise ValueError(
                "objective='min_norm' balances positive scalings: use "
                "group='scaling' or group='auto' (which then means scaling). "
                f"Received: group={group!r}"
            )
        if slots not in SLOT_POLICIES:
            raise ValueError(
                f"Unknown `slots` policy {slots!r}. Accepted values: "
                f"{list(SLOT_POLICIES)}."
            )
        if slots == "transport" and not slots_lib.supports_transport(
                _innermost(optimizer)):
            raise ValueError(
                f"slots='transport' does not know how the slots of "
                f"{type(_innermost(optimizer)).__name__} transform. Supported: "
                f"{slots_lib.supported_optimizers()}. Use slots='reset' or "
                "slots='keep' with this optimizer."
            )
        if group not in GROUP_CHOICES:
            raise ValueError(
                f"Unknown `group` {group!r}. Accepted values: "
                f"{list(GROUP_CHOICES)}."
            )
        if form not in data_dependent.FORMS:
            raise ValueError(
                f"Unknown `form` {form!r}. Accepted values: "
                f"{list(data_dependent.FORMS)}."
            )
        if parametrization not in data_dependent.PARAMETRIZATIONS:
            raise ValueError(
                f"Unknown `parametrization` {parametrization!r}. Accepted "
                f"values: {list(data_dependent.PARAMETRIZATIONS)}."
            )
        if loss_tolerance is not None and (
            not isinstance(loss_tolerance, (int, float))
            or isinstance(loss_tolerance, bool)
            or not loss_tolerance >= 0
        ):
            raise ValueError(
                "`loss_tolerance` must be a number >= 0 or None. Received: "
                f"loss_tolerance={loss_tolerance!r}"
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
        self.form = form
        self.parametrization = parametrization
        self.loss_tolerance = (
            None if loss_tolerance is None else float(loss_tolerance)
        )
        self._plan = None

    @property
    def teleports(self):
        """Whether any step is scheduled for a teleport."""
        return self.every is not None or bool(self.at_steps)

    @property
    def uses_teleport_data(self):
        """Whether teleports draw batches of teleport data (after `build`)."""
        return self._plan is not None and bool(getattr(self._plan, "data", False))

    # Building -----------------------------------------------------------

    def _make_plan_junctions(self, model, var_list):
        """(junctions, JunctionIndices) usable on `var_list`, or raises."""
        found = symmetries.find_symmetries(model)
        position = {id(v): i for i, v in enumerate(var_list)}
        junctions, indices = [], []
        refused = [f"{r.name}: {r.reason}" for r in found.refused]
        for junction in found.junctions:
            wanted = "gl" if self.group == "gl" else "scaling"
            if self.group == "auto" and self.objective != "min_norm":
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
        chain = loss_fn = None
        if self.teleports:
            model = model or _find_calling_model(var_list)
            if model is None:
                raise ValueError(
                    "Teleport needs the model to find its symmetries, but was "
                    "built outside of Keras' fit/compile. Call "
                    "`optimizer.build(model.trainable_variables, model=model)`."
                )
            chain = self._data_chain(model, var_list)
            if chain is None:
                junctions, indices = self._make_plan_junctions(model, var_list)
            else:
                junctions, indices = _chain_junctions(chain, var_list)
            if chain is not None or self.objective in objectives.DATA_OBJECTIVES:
                if _multi_replica() or tf.distribute.has_strategy():
                    raise ValueError(
                        f"objective={self.objective!r} teleports on teleport "
                        "batches, which do not support tf.distribute yet.")
                loss_fn = _loss_function(model)
                forward = _model_forward(model, var_list, chain)
        # Outside the no-tracking scope below: optimizers such as Nadam
        # track some state only through attribute assignment.
        if isinstance(self.inner_optimizer, Teleport):
            self.inner_optimizer.build(var_list, model=model)
        else:
            self.inner_optimizer.build(var_list)
        resets = []
        if self.teleports and self.slots == "reset":
            resets = self._initial_fills(var_list)
        self._build_own(var_list, junctions, indices, chain, loss_fn, resets)
        if loss_fn is not None:
            self._plan.forward = forward

    @tracking.no_automatic_dependency_tracking
    def _build_own(self, var_list, junctions, indices, chain, loss_fn,
                   resets):
        slots = {}
        if self.teleports and self.slots == "transport":
            slots = slots_lib.resolve(_innermost(self.inner_optimizer),
                                      var_list)
        if self.teleports and self.slots == "reset":
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
        self._anchor = self.add_variable(
            shape=(), dtype="float32", initializer="zeros",
            name="grad_norm_anchor",
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
        self._plan.chain = chain
        # Teleports on teleport batches, after the step.
        self._plan.data = loss_fn is not None
        if chain is not None and self.objective == "grad_norm":
            self._plan.data_ascent = self._make_data_ascent(chain, loss_fn)
        self._plan.loss_fn = loss_fn
        super().build(var_list)

    def _make_ascent(self, indices):
        """The ascent as one XLA cluster: its many small ops, fused, cost a
        fraction of a train step even when the train step itself is not
        compiled (the gradient-norm ascent everywhere, curvature on GPU)."""

        if self.objective in objectives.CURVATURE_OBJECTIVES:

            def ascent(weights, grads, limit, seed):
                dtype = next(iter(weights.values())).dtype
                directions = objectives.curvature_directions(
                    indices, objectives.OBJECTIVE_DIRECTIONS, seed, dtype)
                return objectives.ascend(
                    indices,
                    lambda w: objectives.orbit_curvature(indices, w, directions),
                    weights, grads, self.steps, self.teleport_lr, limit,
                    maximize=objectives.maximizes(self.objective),
                )

        else:
            maximize = objectives.maximize_grad_norm
            if indices and all(j.group.name == "scaling" for j in indices):
                maximize = objectives.maximize_grad_norm_scaling

            def ascent(grads, limit):
                return maximize(
                    indices, grads, self.steps, self.teleport_lr, limit
                )

        # The curvature ascent is larger and meant for rare teleports: on
        # CPU its XLA compile costs seconds that the runs never repay.
        jit = self.objective == "grad_norm" or bool(
            tf.config.list_logical_devices("GPU"))
        return tf.function(ascent, jit_compile=jit, autograph=False)

    def _data_chain(self, model, var_list):
        """The chain for the data-dependent action, or None if not used.

        `group="gl"` on a junction with a leaky (invertible, not linear)
        activation needs the data-dependent action.
        """
        if self.group != "gl":
            return None
        found = symmetries.find_symmetries(model)
        if all("gl" in j.groups for j in found.junctions):
            return None
        if self.objective in objectives.CURVATURE_OBJECTIVES:
            raise ValueError(
                f"objective={self.objective!r} follows exact symmetry orbits, "
                "and group='gl' is not exact through a leaky activation: use "
                "group='scaling' or group='auto' there."
            )
        if _multi_replica() or tf.distribute.has_strategy():
            raise ValueError(
                "The data-dependent GL action (group='gl' on leaky_relu "
                "junctions) does not support tf.distribute yet; use "
                "group='scaling' there."
            )
        chain = data_dependent.make_chain(model, var_list)
        if not chain.junctions:
            return None
        return chain

    def _make_data_ascent(self, chain, loss_fn):
        def ascent(weights, x, y):
            return data_dependent.ascend(
                loss_fn, chain, weights, x, y, self.steps, self.teleport_lr,
                self.max_grad_norm_ratio, self.form, self.parametrization,
            )

        # XLA pays off on accelerators only: on CPU it compiles for
        # seconds and runs no faster. expm's gradient does not compile.
        jit = self.parametrization != "expm" and bool(
            tf.config.list_logical_devices("GPU")
        )
        return tf.function(ascent, jit_compile=jit, autograph=False)

    def _initial_fills(self, var_list):
        """Each inner slot with the constant it starts from, for resets.

        Read off a twin of the inner optimizer built eagerly: the inner one
        may be built inside a trace, where its values cannot be read.
        """
        inner = self.inner_optimizer
        fills = []
        with tf.init_scope():
            twin = type(inner).from_config(inner.get_config())
            twin.build(var_list)
            skip = {id(twin._iterations),
                    id(getattr(twin, "_learning_rate", None))}
            values = [
                keras.ops.convert_to_numpy(v) for v in twin.variables
                if id(v) not in skip
            ]
        variables = [
            v for v in inner.variables
            if v is not inner._iterations
            and v is not getattr(inner, "_learning_rate", None)
        ]
        if len(values) != len(variables):
            raise ValueError(
                f"slots='reset' could not match the variables of "
                f"{type(inner).__name__}; use slots='keep'."
            )
        for variable, value in zip(variables, values):
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

        # Not converted by autograph: a converted per-instance closure can
        # collide in autograph's cache with another instance's.
        @tf.autograph.experimental.do_not_convert
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
        if self.teleports and self._plan.data:
            # The data-dependent action moves the gradient in no closed
            # form: teleport after this step, so the next step's gradient
            # is computed at the teleported point.
            self.inner_optimizer.apply(grads, trainable_variables)
            self._iterations.assign_add(1)
            due = self._is_teleport_step(tf.cast(self._iterations, tf.int64))
            tf.cond(due, self._data_teleport, lambda: tf.constant(False))
            return
        if self.teleports:
            variables = list(trainable_variables or self._trainable_variables)
            grads = self._teleport(grads, variables)
        self.inner_optimizer.apply(grads, trainable_variables)
        self._iterations.assign_add(1)

    # The data-dependent action -------------------------------------------

    def set_teleport_data(self, x, y, batch_size=200, seed=0):
        """Gives the data-dependent action the data it draws batches from.

        Each teleport draws a fresh batch of `batch_size` examples from
        `(x, y)`, without replacement, seeded by `seed` and the step. The
        arrays are kept in non-trainable variables that are not saved with
        the optimizer. Usually called by `keras_teleport.TeleportData`.

        Args:
            x: Array of teleport inputs.
            y: Array of their targets.
            batch_size: Examples per teleport batch. Defaults to `200`.
            seed: Integer seed of the batch draws. Defaults to `0`.
        """
        if self._plan is None or not self._plan.data:
            raise ValueError(
                "Teleport data is used only by the data-dependent GL action "
                "(group='gl' on leaky_relu junctions) and by the sharpness "
                "objectives, after build; this optimizer has "
                f"group={self.group!r}, objective={self.objective!r}."
            )
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(
                "`batch_size` must be a positive integer. Received: "
                f"batch_size={batch_size!r}"
            )
        if len(x) != len(y) or len(x) < batch_size:
            raise ValueError(
                f"`x` and `y` must have the same length, at least "
                f"batch_size={batch_size}. Received {len(x)} and {len(y)}."
            )
        plan = self._plan
        x = tf.convert_to_tensor(x, self._trainable_variables[0].dtype)
        y = tf.convert_to_tensor(y)
        with tf.init_scope():
            if getattr(plan, "pool", None) is None:
                plan.pool = (
                    tf.Variable(x, trainable=False,
                                shape=tf.TensorShape(None)),
                    tf.Variable(y, trainable=False,
                                shape=tf.TensorShape(None)),
                )
                plan.pool_batch = batch_size
                plan.shapes = (tuple(x.shape[1:]), tuple(y.shape[1:]))
                plan.seed = tf.Variable(int(seed), dtype=tf.int64,
                                        trainable=False)
            else:
                if batch_size != plan.pool_batch:
                    raise ValueError(
                        "`batch_size` cannot change once set: "
                        f"{plan.pool_batch} before, {batch_size} now."
                    )
                if (tuple(x.shape[1:]), tuple(y.shape[1:])) != plan.shapes:
                    raise ValueError(
                        "Teleport data must keep its example shape: "
                        f"{plan.shapes} before, {(x.shape[1:], y.shape[1:])} "
                        "now."
                    )
                plan.pool[0].assign(x)
                plan.pool[1].assign(y)
                plan.seed.assign(int(seed))

    def teleport_now(self):
        """Runs one teleport on teleport data now (eagerly compiled).

        For the teleports that run after the step on teleport data (the
        data-dependent action, the sharpness objectives); the others run
        inside the train step, from its gradient.
        """
        if not self.uses_teleport_data:
            raise ValueError(
                "teleport_now() runs teleports on teleport data (group='gl' "
                "on leaky_relu junctions, or a sharpness objective), after "
                f"build; this optimizer (group={self.group!r}, "
                f"objective={self.objective!r}) teleports inside the train "
                "step, from its mini-batch gradient.")
        if getattr(self._plan, "teleport_fn", None) is None:
            self._plan.teleport_fn = tf.function(self._data_teleport)
        return bool(self._plan.teleport_fn())

    def _teleport_batch(self):
        plan = self._plan
        if getattr(plan, "pool", None) is None:
            raise ValueError(
                "The data-dependent GL action and the sharpness objectives "
                "need teleport data: add "
                "`keras_teleport.TeleportData(x, y)` to fit's callbacks, or "
                "call `optimizer.set_teleport_data(x, y)` before training."
            )
        x_pool, y_pool = plan.pool
        seed = tf.stack([plan.seed, tf.cast(self._iterations, tf.int64)])
        # The top k of uniform keys: a uniform draw without replacement,
        # cheaper than sorting all keys.
        # The variable's own shape: `tf.shape` would read (copy) it whole
        # once it has been gathered from; XLA sees this as a constant.
        count = tf.raw_ops.VariableShape(input=x_pool.handle)[0]
        keys = tf.random.stateless_uniform([count], seed=seed)
        take = tf.math.top_k(keys, plan.pool_batch, sorted=False).indices
        batch = [plan.pool_batch]
        return (
            tf.ensure_shape(tf.gather(x_pool, take), batch + list(plan.shapes[0])),
            tf.ensure_shape(tf.gather(y_pool, take), batch + list(plan.shapes[1])),
        )

    def _data_teleport(self):
        """One teleport on a teleport batch with its loss guard; writes state."""
        plan = self._plan
        x, y = self._teleport_batch()
        weights = [tf.convert_to_tensor(v) for v in self._trainable_variables]
        dtype = weights[0].dtype
        loss_at = lambda w: plan.loss_fn(y, plan.forward(w, x))

        def gradient(w):
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = loss_at(w)
            return tape.gradient(loss, w)

        grad_norm = lambda w: objectives.squared_norm(dict(enumerate(gradient(w))))
        before = loss_at(weights)
        v0 = v1 = tf.constant(0.0, dtype)
        moved = weights
        if self.objective == "none":
            if plan.chain is not None:
                elements = [(tf.eye(j.width, dtype=dtype),) * 2
                            for j in plan.indices]
            else:
                elements = [j.group.identity(j.width, dtype)
                            for j in plan.indices]
            f0 = f1 = grad_norm(weights)
        elif self.objective == "grad_norm":
            ts, moved, f0, f1 = plan.data_ascent(weights, x, y)
            elements = _chain_elements(ts, self.parametrization)
            v0, v1 = tf.sqrt(f0), tf.sqrt(f1)
        else:  # sharpness
            seed = tf.stack([plan.seed, tf.cast(self._iterations, tf.int64)])
            directions = objectives.sharpness_directions(
                weights, objectives.OBJECTIVE_DIRECTIONS, seed)
            value = lambda w: objectives.sharpness(loss_at, w, directions)
            maximize = objectives.maximizes(self.objective)
            grads = gradient(weights)
            f0 = objectives.squared_norm(dict(enumerate(grads)))
            limit = tf.cast(self.max_grad_norm_ratio, dtype) ** 2 * f0
            if plan.chain is not None:

                def admissible(w):
                    f = grad_norm(w)
                    ok = tf.logical_and(tf.math.is_finite(f), f <= limit)
                    if self.loss_tolerance is None:
                        return ok
                    change = tf.abs(loss_at(w) - before)
                    return tf.logical_and(ok, change <= self.loss_tolerance
                                          * tf.maximum(tf.abs(before), 1e-12))

                ts, moved, v0, v1 = data_dependent.ascend_value(
                    value, admissible, plan.chain, weights, x,
                    self.steps, self.teleport_lr, maximize, self.form,
                    self.parametrization)
                elements = _chain_elements(ts, self.parametrization)
            else:
                at = {p: weights[p] for p in plan.positions}

                def value_at(w):
                    full = list(weights)
                    for p, t in w.items():
                        full[p] = t
                    return value(full)

                elements, v0, v1, _, _, _ = objectives.ascend(
                    plan.indices, value_at, at,
                    {p: grads[p] for p in plan.positions}, self.steps,
                    self.teleport_lr, limit, maximize)
                moved = list(weights)
                for p, t in objectives.transport(
                        plan.indices, elements, at, "weight").items():
                    moved[p] = t
            f1 = grad_norm(moved)
        after = loss_at(moved)
        drift = tf.abs(after - before) / tf.maximum(tf.abs(before), 1e-12)
        # As in the reference, any finite ascent counts, even one that
        # ended lower: only the loss guard can reject it.
        ok = tf.math.is_finite(drift)
        if self.loss_tolerance is not None:
            ok = tf.logical_and(ok, drift <= self.loss_tolerance)
        weights_at = {p: moved[p] for p in plan.positions}
        values, accepted = self._teleported_values(
            elements, ok, f0, f1, weights_at, drift, (v0, v1)
        )
        targets, _ = self._targets()
        with tf.control_dependencies(_write(targets, values)):
            return tf.identity(accepted)

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
        targets += [self._anchor, self._counts, self._last]
        roles += [("anchor", None, None), ("counts", None, None),
                  ("last", None, None)]
        return targets, roles

    def _compute(self, shared, local):
        """Pure: (accepted, moved local grads, new values of `_targets`)."""
        plan = self._plan
        if self.objective == "none":
            dtype = next(iter(shared.values())).dtype
            elements = [j.group.identity(j.width, dtype) for j in plan.indices]
            f0 = f1 = objectives.squared_norm(shared)
            taken = tf.constant(1)
        elif self.objective == "min_norm":
            weights = {p: tf.convert_to_tensor(self._trainable_variables[p])
                       for p in plan.positions}
            elements = objectives.minimize_weight_norm(
                plan.indices, weights, self.steps)
            f0 = objectives.squared_norm(shared)
            f1 = objectives.squared_norm(
                objectives.transport(plan.indices, elements, shared, "linear"))
            v0 = tf.sqrt(objectives.squared_norm(weights))
            v1 = tf.sqrt(objectives.squared_norm(objectives.transport(
                plan.indices, elements, weights, "weight")))
            taken = tf.constant(1)
        elif self.objective in objectives.CURVATURE_OBJECTIVES:
            weights = {p: tf.convert_to_tensor(self._trainable_variables[p])
                       for p in plan.positions}
            anchor = self._grad_norm_anchor(objectives.squared_norm(shared))
            limit = tf.cast(self.max_grad_norm_ratio, anchor.dtype) ** 2 * anchor
            # The same directions on every replica: seeded by the step.
            seed = tf.stack([tf.constant(0, tf.int64),
                             tf.cast(self._iterations, tf.int64)])
            elements, v0, v1, f0, f1, taken = plan.ascent(
                weights, shared, limit, seed)
        else:
            anchor = self._grad_norm_anchor(objectives.squared_norm(shared))
            limit = tf.cast(self.max_grad_norm_ratio, anchor.dtype) ** 2 * anchor
            elements, f0, f1, taken = plan.ascent(shared, limit)
            v0, v1 = tf.sqrt(f0), tf.sqrt(f1)
        if self.objective == "none":
            v0 = v1 = tf.zeros_like(f0)
        values, accepted = self._teleported_values(
            elements, taken > 0, f0, f1, objective_values=(v0, v1))
        if self.objective == "grad_norm" or (
                self.objective in objectives.CURVATURE_OBJECTIVES):
            values[-3] = tf.cast(anchor, tf.float32)
        moved_local = objectives.transport(
            plan.indices, elements, local, "linear"
        )
        grads = [tf.where(accepted, moved_local[p], local[p])
                 for p in plan.positions]
        return accepted, grads, values

    def _grad_norm_anchor(self, f0):
        """The squared gradient norm the growth cap is measured from.

        Teleports on consecutive steps form one burst, capped against the
        norm before its first teleport: per-teleport caps would compound
        (eight teleports capped at 5x each allow 5^8x).
        """
        step = tf.cast(self._iterations, tf.int64)
        in_burst = tf.logical_and(step > 0, self._is_teleport_step(step - 1))
        stored = tf.cast(self._anchor, f0.dtype)
        return tf.where(tf.logical_and(in_burst, stored > 0), stored, f0)

    def _teleported_values(self, elements, ok, f0, f1, weights=None,
                           drift=0.0, objective_values=(0.0, 0.0)):
        """New values of `_targets` after moving by `elements`.

        Args:
            elements: one group element per junction of the plan.
            ok: whether the ascent found a better point.
            f0, f1: squared gradient norms before and after.
            weights: position -> moved weight, where the action is not the
                group's linear one (the data-dependent action).
            drift: relative loss change of the move.
            objective_values: the objective's value before and after.

        Returns:
            `(values, accepted)`; a rejected teleport keeps every value but
            its counter.
        """
        plan = self._plan

        def move(tensor, p, kind):
            return objectives.transport(
                plan.indices, elements, {p: tensor}, kind
            )[p]

        targets, roles = self._targets()
        currents = [tf.convert_to_tensor(t) for t in targets]
        values = []
        for current, (kind, key, extra) in zip(currents, roles):
            if kind == "weight" and weights is not None:
                values.append(tf.cast(weights[key], current.dtype))
            elif kind in ("weight", "linear", "abs"):
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
            for v in values if v.dtype.is_floating
        ]
        accepted = tf.logical_and(ok, tf.reduce_all(finite))
        distance = tf.sqrt(tf.add_n([
            tf.square(j.group.distance(e))
            for j, e in zip(plan.indices, elements)
        ]))
        counts = currents[-2] + tf.where(
            accepted, tf.constant([1, 0], tf.int64),
            tf.constant([0, 1], tf.int64),
        )
        last = tf.cast(
            tf.stack([tf.sqrt(f0), tf.sqrt(f1), distance,
                      tf.cast(drift, f0.dtype)]
                     + [tf.cast(v, f0.dtype) for v in objective_values]),
            tf.float32,
        )
        values = [tf.where(accepted, v, c) for v, c in zip(values, currents)]
        values[-2] = counts
        values[-1] = tf.where(accepted, last, currents[-1])
        return values, accepted  # values[-3], the anchor, is the caller's

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
        - `loss_drift`: the relative change of the loss on the teleport
          batch at the last teleport made on teleport data (0 otherwise:
          exact groups keep the loss exactly).
        - `objective_before`, `objective_after`: the value of the
          objective at the last teleport: the gradient norm, the weight
          norm (`"min_norm"`), the sharpness or the orbit curvature.
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
            "form": self.form,
            "parametrization": self.parametrization,
            "loss_tolerance": self.loss_tolerance,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _chain_junctions(chain, var_list):
    """Junctions and indices of a data-dependent chain (GL elements)."""
    junctions, indices = [], []
    for a, b, slope in chain.junctions:
        first, second = chain.layers[a], chain.layers[b]
        k1, b1 = chain.kernels[a]
        k2 = chain.kernels[b][0]
        junctions.append(symmetries.Junction(
            name=f"{first.name} -> {second.name}",
            in_kernel=var_list[k1],
            in_bias=var_list[b1] if b1 is not None else None,
            out_kernel=var_list[k2],
            groups=("gl",),
            activation=f"leaky_relu({slope:g}), data-dependent",
        ))
        indices.append(objectives.JunctionIndices(
            group=groups_lib.get("gl"),
            width=int(first.units),
            in_indices=(k1,) if b1 is None else (k1, b1),
            out_index=k2,
        ))
    return tuple(junctions), tuple(indices)


def _innermost(optimizer):
    """The optimizer that holds the state, under nested Teleports."""
    while isinstance(optimizer, Teleport):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _chain_elements(ts, parametrization):
    """GL elements `(g, g^-1)` of the data-dependent action's `T`s."""
    elements = []
    for t in ts:
        g = data_dependent._group_element(t, parametrization)
        elements.append((g, tf.linalg.inv(g)))
    return elements


def _model_forward(model, var_list, chain):
    """`fn(weights in var_list order, x) -> output`, state untouched."""
    if chain is not None:
        return lambda weights, x: data_dependent.forward(chain, weights, x)
    position = {id(v): i for i, v in enumerate(var_list)}
    trainable = list(model.trainable_variables)

    def forward(weights, x):
        values = [weights[position[id(v)]] if id(v) in position
                  else tf.convert_to_tensor(v) for v in trainable]
        others = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
        outputs, _ = model.stateless_call(values, others, x, training=False)
        return outputs

    return forward


def _loss_function(model):
    """The model's compiled loss as `fn(y_true, y_pred) -> scalar`."""
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "Teleports on teleport data (the data-dependent GL action, the "
            "sharpness objectives) need a model compiled with a single "
            f"loss; {model.name!r} has loss={loss!r}."
        )
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    return lambda y_true, y_pred: tf.reduce_mean(loss(y_true, y_pred))


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
