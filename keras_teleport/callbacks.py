"""Callbacks that surface teleport metrics during `fit`."""

import keras


def find_teleport(optimizer):
    """The `Teleport` inside `optimizer` (through LossScaleOptimizer), or None."""
    from keras_teleport.teleport import Teleport

    while optimizer is not None:
        if isinstance(optimizer, Teleport):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


class TeleportLogger(keras.callbacks.Callback):
    """Adds the Teleport optimizer's metrics to the `logs` of `fit`.

    At the end of each epoch (and each batch with `per_batch=True`) the
    entries of `Teleport.teleport_metrics` are added to `logs` under
    `teleport/<name>`, so `History`, `CSVLogger` and `TensorBoard` record
    them. Place it before those callbacks in the `callbacks` list.

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
        teleport = find_teleport(getattr(self.model, "optimizer", None))
        if teleport is None:
            raise ValueError(
                "TeleportLogger needs a model compiled with "
                "keras_teleport.Teleport; found optimizer "
                f"{getattr(self.model, 'optimizer', None)!r}."
            )
        for name, value in teleport.teleport_metrics.items():
            logs[f"teleport/{name}"] = value

    def on_train_batch_end(self, batch, logs=None):
        if self.per_batch:
            self._add(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._add(logs)
