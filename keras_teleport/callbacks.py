"""Callbacks that surface teleport metrics during `fit`."""

import keras


def find_teleports(optimizer):
    """Every `Teleport` in `optimizer`, outermost first (through
    LossScaleOptimizer and nested Teleports)."""
    from keras_teleport.teleport import Teleport

    found = []
    while optimizer is not None:
        if isinstance(optimizer, Teleport):
            found.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return found


class TeleportLogger(keras.callbacks.Callback):
    """Adds the Teleport optimizer's metrics to the `logs` of `fit`.

    At the end of each epoch (and each batch with `per_batch=True`) the
    entries of `Teleport.teleport_metrics` are added to `logs` under
    `teleport/<name>`, so `History`, `CSVLogger` and `TensorBoard` record
    them. Place it before those callbacks in the `callbacks` list. A
    Teleport nested inside another logs under `teleport_1/<name>` (then
    `teleport_2/`, ...).

    Args:
        per_batch: Also add them to every batch's logs. Defaults to `False`.

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_teleport.TeleportLogger(),
                               keras.callbacks.TensorBoard("logs")])
    ```

    References:
        - Zhao et al., "Improving Convergence and Generalization Using
          Parameter Symmetries", ICLR 2024.
    """

    def __init__(self, per_batch=False):
        super().__init__()
        if not isinstance(per_batch, bool):
            raise TypeError(
                f"`per_batch` must be a bool. Received: per_batch={per_batch!r}"
            )
        self.per_batch = per_batch

    def _add(self, logs):
        if logs is None:
            return
        teleports = find_teleports(getattr(self.model, "optimizer", None))
        if not teleports:
            raise ValueError(
                "TeleportLogger needs a model compiled with "
                "keras_teleport.Teleport; found optimizer "
                f"{getattr(self.model, 'optimizer', None)!r}."
            )
        for depth, teleport in enumerate(teleports):
            prefix = "teleport" if depth == 0 else f"teleport_{depth}"
            for name, value in teleport.teleport_metrics.items():
                logs[f"{prefix}/{name}"] = value

    def on_train_batch_end(self, batch, logs=None):
        if self.per_batch:
            self._add(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._add(logs)


class TeleportData(keras.callbacks.Callback):
    """Hands teleport data to a `Teleport` that teleports on data.

    The data-dependent GL action (`Teleport(..., group="gl")` on leaky_relu
    junctions) is exact only on a batch of data, and the sharpness
    objectives (`objective="min_sharpness"`, `"max_sharpness"`) evaluate
    the loss on one. This callback gives the
    optimizer the arrays it draws each teleport's batch from (a fresh
    shuffled batch of `batch_size` per teleport, drawn inside the compiled
    train step, so `steps_per_execution` and XLA keep working), and runs a
    teleport scheduled at step 0 before training starts.

    Args:
        x: Array of inputs to draw teleport batches from.
        y: Array of their targets.
        batch_size: Examples per teleport batch. Defaults to `200`.
        seed: Integer seed of the draws. Defaults to `0`.

    Example:

    ```python
    steps_per_epoch = len(x) // 20
    opt = keras_teleport.Teleport(
        keras.optimizers.Adagrad(1e-2), group="gl", slots="reset",
        at_steps=[2 * steps_per_epoch + i for i in range(8)],
        teleport_lr=1e-4)
    model.compile(optimizer=opt, loss=...)
    model.fit(x, y, batch_size=20, epochs=40,
              callbacks=[keras_teleport.TeleportData(x, y)])
    ```

    References:
        - Zhao et al., "Improving Convergence and Generalization Using
          Parameter Symmetries", ICLR 2024.
    """

    def __init__(self, x, y, batch_size=200, seed=0):
        super().__init__()
        if len(x) != len(y):
            raise ValueError(
                f"`x` and `y` must have the same length. Received {len(x)} "
                f"and {len(y)}."
            )
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.seed = seed

    def on_train_begin(self, logs=None):
        teleports = find_teleports(getattr(self.model, "optimizer", None))
        if not teleports:
            raise ValueError(
                "TeleportData needs a model compiled with "
                "keras_teleport.Teleport."
            )
        if not teleports[0].built:
            teleports[0].build(self.model.trainable_variables,
                               model=self.model)
        users = [t for t in teleports if t.uses_teleport_data]
        if not users:
            # Raises the error that says which teleports use data.
            teleports[0].set_teleport_data(self.x, self.y, self.batch_size,
                                           self.seed)
        for teleport in users:
            teleport.set_teleport_data(self.x, self.y, self.batch_size,
                                       self.seed)
            step = int(keras.ops.convert_to_numpy(teleport.iterations))
            if step == 0 and (
                (teleport.every is not None) or 0 in (teleport.at_steps or ())
            ):
                teleport.teleport_now()


class MeasuresLogger(keras.callbacks.Callback):
    """Logs sharpness and curvature measures during `fit`.

    Every `every` epochs, computes the chosen measures of
    `keras_teleport.measures` on `(x, y)` at the current weights and adds
    them to the epoch's `logs` as `measure/<name>`, so `History`,
    `CSVLogger` and `TensorBoard` record them (place it before those).
    With `verbose=1` a progress bar shows while the measures run.

    Available measures: `"sharpness"` (the paper's), `"isotropic_sharpness"`,
    `"orbit_curvature"` (data-free), `"hessian_top_eigenvalue"`,
    `"hessian_trace"`.

    Args:
        x: Inputs to measure on.
        y: Their targets.
        measures: Names of the measures. Defaults to
            `("sharpness", "orbit_curvature")`.
        every: Epoch period. Defaults to `1`.
        seed: Seed of every measure's random directions. Defaults to `0`.
        batch_size: Examples per evaluation, or `None` for all at once.
            Defaults to `None`.
        verbose: `1` for a progress bar. Defaults to `0`.

    Example:

    ```python
    model.fit(x, y, epochs=20, callbacks=[
        keras_teleport.MeasuresLogger(x_val[:2000], y_val[:2000], every=5),
        keras.callbacks.TensorBoard("logs"),
    ])
    ```

    References:
        - Zhao et al., "Improving Convergence and Generalization Using
          Parameter Symmetries", ICLR 2024, Section 4.
    """

    def __init__(self, x, y, measures=("sharpness", "orbit_curvature"),
                 every=1, seed=0, batch_size=None, verbose=0):
        super().__init__()
        from keras_teleport import measures as measures_lib

        table = {
            "sharpness": lambda m: measures_lib.sharpness(
                m, x, y, seed=seed, batch_size=batch_size),
            "isotropic_sharpness": lambda m: measures_lib.sharpness(
                m, x, y, kind="isotropic", seed=seed, batch_size=batch_size),
            "orbit_curvature": lambda m: measures_lib.orbit_curvature(
                m, seed=seed),
            "hessian_top_eigenvalue": lambda m: (
                measures_lib.hessian_top_eigenvalue(
                    m, x, y, seed=seed, batch_size=batch_size)),
            "hessian_trace": lambda m: measures_lib.hessian_trace(
                m, x, y, seed=seed, batch_size=batch_size),
        }
        unknown = [m for m in measures if m not in table]
        if unknown or not measures:
            raise ValueError(
                f"Unknown `measures` {unknown or measures!r}. Accepted "
                f"values: {sorted(table)}."
            )
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(
                f"`every` must be a positive integer. Received: every={every!r}"
            )
        self.measures = tuple(measures)
        self.every = every
        self.verbose = verbose
        self._table = table

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        bar = keras.utils.Progbar(len(self.measures), verbose=self.verbose)
        for n, name in enumerate(self.measures):
            logs[f"measure/{name}"] = self._table[name](self.model)
            bar.update(n + 1)
