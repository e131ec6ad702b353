"""The training and evaluation steps of a run, on one device or many, on TensorFlow or JAX.

One loop serves every mode. On TensorFlow it is written against tf.distribute's public API, as
TF Model Garden (Orbit) does: `strategy.distribute_datasets_from_function` feeds each replica,
`strategy.run` runs the step on every replica, gradients are summed by the optimizer's
all-reduce, and the step's statistics by one `all_reduce`. The same code runs under the default
strategy (one device), `MirroredStrategy` (local devices) and `MultiWorkerMirroredStrategy`
(several hosts); Keras' `model.fit` does not run under the last one with Keras 3.15 and
TensorFlow 2.21 (keras-team/keras#20585, tensorflow/tensorflow#72388). On JAX the step is a
pure function of the model's state (`stateless_call`, `stateless_apply`) compiled with
`jax.jit`; under `keras.distribution.DataParallel` the batch is one array sharded over the
devices and XLA inserts the gradient all-reduce.

Both compute what `model.fit` reports:

- `loss`: the mean over the epoch's steps of the step's loss, which is the mean cross-entropy of
  the global batch (label smoothing included) plus any regularization losses. Each replica
  divides its sum by the global batch size, so the replicas' gradients add up to the gradient
  of the global batch's loss.
- `accuracy`, `top5_accuracy`: `keras.metrics.categorical_accuracy` and
  `top_k_categorical_accuracy(k=5)` over every example of the epoch. Top-5 accuracy is left out
  with 5 classes or fewer, where every prediction is in the top 5 (`reports_top_k`).
- Evaluation: the same over every example of the split, the last batch padded with examples of
  weight 0 so that every replica runs the same number of equally shaped steps.

The learning rate follows the run's schedule: each step sets the optimizer's learning-rate
variable from the schedule at the optimizer's step counter, before the update and again after it
(`bnzoo.optimization.apply_learning_rate_schedule`), so the variable always holds the next
step's rate and a checkpoint saves a plain optimizer.

Mixed precision: the logits are cast to float32 before the loss, and the loss goes through the
optimizer's `scale_loss` (identity, or dynamic loss scaling under `mixed_float16`, where
`model.compile` wraps the optimizer in `keras.optimizers.LossScaleOptimizer`, as `fit` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from bnzoo.distribution import Distribution
from bnzoo.optimization import apply_learning_rate_schedule, learning_rate_variable_indices
from bnzoo.signals import raise_if_interrupted

#: Builds this worker's input batches `(images, one-hot labels)`: see `bnzoo.training_data`.
BatchesFactory = Callable[[], Any]
#: Called after every training step with the step index and the running logs.
StepCallback = Callable[[int, dict[str, float]], None]

TOP_K = 5


def reports_top_k(num_classes: int | None) -> bool:
    """Whether top-5 accuracy means anything: not with 5 classes or fewer (always 1)."""
    return num_classes is None or num_classes > TOP_K


def _per_example_statistics(loss_fn, labels, logits, top_k: bool = True):
    """Per-example loss, accuracy and top-5 accuracy (zeros without `top_k`), in float32."""
    logits = ops.cast(logits, "float32")
    labels = ops.cast(labels, "float32")
    loss = loss_fn(labels, logits)
    accuracy = ops.cast(keras.metrics.categorical_accuracy(labels, logits), "float32")
    if top_k:
        top5 = keras.metrics.top_k_categorical_accuracy(labels, logits, k=TOP_K)
        top5 = ops.cast(top5, "float32")
    else:
        # Every prediction is in the top 5: the value would be 1 and is never reported.
        top5 = ops.zeros_like(accuracy)
    return loss, accuracy, top5


class TrainingLoop:
    """Runs training epochs and evaluations of a compiled model; see the module docstring.

    Args:
        model: a model compiled with its optimizer (inside `distribution.scope()`).
        distribution: the started distribution.
        loss_fn: per-example loss (a Keras loss with `reduction=None`).
        global_batch_size: examples per step over all replicas.
        num_classes: the classifier's classes; with 5 or fewer the logs have no
            `top5_accuracy`. None: always report it.
        learning_rate_schedule: sets the optimizer's learning rate at every step, from its
            step counter; None: the optimizer's rate stays as it is.
    """

    def __init__(
        self,
        model: keras.Model,
        distribution: Distribution,
        loss_fn: keras.losses.Loss,
        global_batch_size: int,
        num_classes: int | None = None,
        learning_rate_schedule: keras.optimizers.schedules.LearningRateSchedule | None = None,
    ):
        self.model = model
        self.distribution = distribution
        self.loss_fn = loss_fn
        self.global_batch_size = global_batch_size
        self.num_classes = num_classes
        self.top_k = reports_top_k(num_classes)
        self.learning_rate_schedule = learning_rate_schedule

    def train_epoch(
        self, make_batches: BatchesFactory, steps: int, on_step: StepCallback | None = None
    ) -> dict[str, float]:
        """Train `steps` steps on the batches of `make_batches()`; returns the epoch's `loss`,
        `accuracy` and (see `num_classes`) `top5_accuracy`."""
        # The sums stay on the device until the epoch ends (unless a progress bar shows them),
        # so that no step waits for the host to read the previous one's numbers.
        totals = None
        for step, sums in enumerate(self._train_steps(make_batches, steps)):
            raise_if_interrupted()
            totals = sums if totals is None else totals + sums
            if on_step is not None:
                on_step(step, self._train_logs(self._to_host(totals), step + 1))
        return self._train_logs(self._to_host(totals), steps)

    def evaluate(self, make_batches: BatchesFactory) -> dict[str, float]:
        """`loss`, `accuracy` and (see `num_classes`) `top5_accuracy` over every
        (non-padding) example."""
        totals = None
        for sums in self._evaluation_steps(make_batches):
            raise_if_interrupted()
            totals = sums if totals is None else totals + sums
        totals = self._to_host(totals) if totals is not None else np.zeros(4)
        count = max(totals[3], 1.0)
        logs = {"loss": totals[0] / count, "accuracy": totals[1] / count}
        if self.top_k:
            logs["top5_accuracy"] = totals[2] / count
        return logs

    def _train_logs(self, totals: np.ndarray, steps: int) -> dict[str, float]:
        examples = steps * self.global_batch_size
        logs = {"loss": float(totals[0] / steps), "accuracy": float(totals[1] / examples)}
        if self.top_k:
            logs["top5_accuracy"] = float(totals[2] / examples)
        return logs

    def _train_steps(self, make_batches: BatchesFactory, steps: int):
        """Yields each step's sums (loss, correct, top-5 correct) as a device array."""
        raise NotImplementedError

    def _to_host(self, sums) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(sums), np.float64)

    def _evaluation_steps(self, make_batches: BatchesFactory):
        raise NotImplementedError


class TensorFlowLoop(TrainingLoop):
    """The loop on tf.distribute: `strategy.run` of one step per `tf.function` call."""

    def __init__(self, *args: Any, **kwargs: Any):
        import tensorflow as tf

        super().__init__(*args, **kwargs)
        # Keras' own rule for jit_compile="auto": XLA on a single GPU, not under tf.distribute
        # and not on CPU-only machines (where it is slower for these models).
        jit_compile = bool(self.model.jit_compile) and self.distribution.num_replicas == 1
        self._train_step = tf.function(self._distributed_train_step, jit_compile=None)
        self._evaluation_step = tf.function(self._distributed_evaluation_step)
        self._replica_train = (
            tf.function(self._replica_train_step, jit_compile=True)
            if jit_compile
            else self._replica_train_step
        )

    def _distribute(self, make_batches: BatchesFactory):
        strategy = self.distribution.strategy
        return strategy.distribute_datasets_from_function(lambda context: make_batches())

    def _train_steps(self, make_batches: BatchesFactory, steps: int):
        distribution = self.distribution
        strategy = distribution.strategy
        iterator = iter(self._distribute(make_batches))
        for _ in range(steps):
            # Each step is bounded by --collective-timeout on its own (one watchdog thread for
            # the run, not TensorFlow's thread per collective: bnzoo.collective_watchdog).
            with distribution.waiting_for_workers("a training step"):
                sums = self._train_step(iterator)
            yield strategy.experimental_local_results(sums)[0]

    def _evaluation_steps(self, make_batches: BatchesFactory):
        distribution = self.distribution
        strategy = distribution.strategy
        batches = iter(self._distribute(make_batches))
        while True:
            # Under MultiWorkerMirroredStrategy, fetching a batch is a collective too: the
            # workers agree whether any of them has one left.
            with distribution.waiting_for_workers("an evaluation step"):
                batch = next(batches, None)
                if batch is None:
                    return
                sums = self._evaluation_step(batch)
            yield strategy.experimental_local_results(sums)[0]

    def _distributed_train_step(self, iterator):
        images, labels = next(iterator)
        schedule = self.learning_rate_schedule
        if schedule is not None:  # in cross-replica context: every replica's copy at once
            apply_learning_rate_schedule(self.model.optimizer, schedule)
        sums = self.distribution.strategy.run(self._replica_train, args=(images, labels))
        if schedule is not None:
            apply_learning_rate_schedule(self.model.optimizer, schedule)
        return sums

    def _distributed_evaluation_step(self, batch):
        return self.distribution.strategy.run(self._replica_evaluation_step, args=batch)

    def _replica_train_step(self, images, labels):
        import tensorflow as tf

        model = self.model
        optimizer = model.optimizer
        num_replicas = self.distribution.num_replicas
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example, accuracy, top5 = _per_example_statistics(
                self.loss_fn, labels, logits, self.top_k
            )
            # Each replica's share of the global batch's mean loss: summed over replicas by
            # the gradient all-reduce, the gradients are those of the global batch.
            loss = ops.sum(per_example) / float(self.global_batch_size)
            if model.losses:
                loss = loss + ops.sum(ops.stack(model.losses)) / float(num_replicas)
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        sums = ops.stack([loss, ops.sum(accuracy), ops.sum(top5)])
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, sums)

    def _replica_evaluation_step(self, images, labels):
        import tensorflow as tf

        model = self.model
        logits = model(images, training=False)
        per_example, accuracy, top5 = _per_example_statistics(
            self.loss_fn, labels, logits, self.top_k
        )
        # Padding examples have an all-zero one-hot label: weight 0.
        weights = ops.sum(ops.cast(labels, "float32"), axis=-1)
        loss_sum = ops.sum(per_example * weights)
        if model.losses:
            # As in Keras' evaluate: the regularization losses are part of every batch's loss.
            loss_sum = loss_sum + ops.sum(ops.stack(model.losses)) * ops.sum(weights)
        sums = ops.stack(
            [loss_sum, ops.sum(accuracy * weights), ops.sum(top5 * weights), ops.sum(weights)]
        )
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, sums)


class JaxLoop(TrainingLoop):
    """The loop on JAX: jitted pure steps on the model's state; under
    `keras.distribution.DataParallel` each process passes its share of the global batch and the
    step sees one global array."""

    def __init__(self, *args: Any, **kwargs: Any):
        import jax

        super().__init__(*args, **kwargs)
        model = self.model
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        self._learning_rate_slots = (
            learning_rate_variable_indices(model.optimizer)
            if self.learning_rate_schedule is not None
            else None
        )
        state_shardings = None
        if keras.distribution.distribution() is not None:
            state_shardings = tuple(
                [v.value.sharding for v in variables] for variables in self._state_variables()
            )
        self._train_step = jax.jit(
            self._pure_train_step, donate_argnums=0, out_shardings=(state_shardings, None)
        )
        self._evaluation_step = jax.jit(self._pure_evaluation_step)

    def _state_variables(self):
        model = self.model
        return (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
        )

    def _state(self):
        return tuple([v.value for v in variables] for variables in self._state_variables())

    def _assign_state(self, state) -> None:
        for variables, values in zip(self._state_variables(), state, strict=True):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)

    def _global_batch(self, images, labels):
        """Numpy arrays of this process's examples -> arrays the jitted step can take."""
        distribution = keras.distribution.distribution()
        if distribution is None:
            return images, labels
        import jax

        arrays = []
        for array in (images, labels):
            layout = distribution.get_data_layout(array.shape)
            arrays.append(jax.make_array_from_process_local_data(layout.backend_layout, array))
        return tuple(arrays)

    def _pure_train_step(self, state, images, labels):
        import jax

        model = self.model
        optimizer = model.optimizer
        trainable, non_trainable, optimizer_values = state

        def loss_and_updates(trainable, non_trainable):
            logits, non_trainable, losses = model.stateless_call(
                trainable, non_trainable, images, training=True, return_losses=True
            )
            per_example, accuracy, top5 = _per_example_statistics(
                self.loss_fn, labels, logits, self.top_k
            )
            loss = ops.mean(per_example)
            if losses:
                loss = loss + ops.sum(ops.stack(losses))
            with keras.StatelessScope(
                state_mapping=list(zip(optimizer.variables, optimizer_values, strict=True))
            ):
                scaled_loss = optimizer.scale_loss(loss)
            return scaled_loss, (loss, accuracy, top5, non_trainable)

        gradient_fn = jax.value_and_grad(loss_and_updates, has_aux=True)
        (_, (loss, accuracy, top5, non_trainable)), gradients = gradient_fn(
            trainable, non_trainable
        )
        optimizer_values = self._scheduled(optimizer_values)
        trainable, optimizer_values = optimizer.stateless_apply(
            optimizer_values, gradients, trainable
        )
        optimizer_values = self._scheduled(optimizer_values)
        sums = ops.stack([loss, ops.sum(accuracy), ops.sum(top5)])
        return (trainable, non_trainable, optimizer_values), sums

    def _scheduled(self, optimizer_values):
        """The optimizer's state values with the learning rate set from the schedule at their
        step counter (`apply_learning_rate_schedule`, stateless)."""
        if self._learning_rate_slots is None:
            return optimizer_values
        rate, step = self._learning_rate_slots
        values = list(optimizer_values)
        values[rate] = ops.cast(self.learning_rate_schedule(values[step]), values[rate].dtype)
        return values

    def _pure_evaluation_step(self, trainable, non_trainable, images, labels):
        model = self.model
        logits, _, losses = model.stateless_call(
            trainable, non_trainable, images, training=False, return_losses=True
        )
        per_example, accuracy, top5 = _per_example_statistics(
            self.loss_fn, labels, logits, self.top_k
        )
        weights = ops.sum(ops.cast(labels, "float32"), axis=-1)
        loss_sum = ops.sum(per_example * weights)
        if losses:
            loss_sum = loss_sum + ops.sum(ops.stack(losses)) * ops.sum(weights)
        return ops.stack(
            [loss_sum, ops.sum(accuracy * weights), ops.sum(top5 * weights), ops.sum(weights)]
        )

    def _train_steps(self, make_batches: BatchesFactory, steps: int):
        state = self._state()
        try:
            for images, labels in make_batches().take(steps).as_numpy_iterator():
                state, sums = self._train_step(state, *self._global_batch(images, labels))
                yield sums
        finally:
            # The variables hold the trained values again, also when an error stopped the epoch
            # (the donated buffers of the last state are gone otherwise).
            self._assign_state(state)

    def _evaluation_steps(self, make_batches: BatchesFactory):
        trainable, non_trainable, _ = self._state()
        for images, labels in make_batches().as_numpy_iterator():
            yield self._evaluation_step(
                trainable, non_trainable, *self._global_batch(images, labels)
            )

    def _to_host(self, sums) -> np.ndarray:
        return _host_value(sums)


def _host_value(array) -> np.ndarray:
    """A replicated (possibly multi-process) JAX array's value, from this process's copy."""
    shards = getattr(array, "addressable_shards", None)
    if shards:
        return np.asarray(shards[0].data, np.float64)
    return np.asarray(array, np.float64)


def make_training_loop(
    model: keras.Model,
    distribution: Distribution,
    loss_fn: keras.losses.Loss,
    global_batch_size: int,
    num_classes: int | None = None,
    learning_rate_schedule: keras.optimizers.schedules.LearningRateSchedule | None = None,
) -> TrainingLoop:
    """The loop for the current Keras backend (arguments: `TrainingLoop`'s)."""
    arguments = (model, distribution, loss_fn, global_batch_size, num_classes)
    if keras.backend.backend() == "jax":
        return JaxLoop(*arguments, learning_rate_schedule)
    if keras.backend.backend() == "tensorflow":
        return TensorFlowLoop(*arguments, learning_rate_schedule)
    raise ValueError(
        f"train.py trains on the tensorflow or jax backend, not {keras.backend.backend()!r}; "
        "set KERAS_BACKEND"
    )
