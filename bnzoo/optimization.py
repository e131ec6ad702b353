"""The optimizer, its learning-rate schedule and the loss of a training run.

The optimizer holds its learning rate as a plain float variable, which the training loop sets
from `WarmupSchedule` at the optimizer's step counter (`apply_learning_rate_schedule`) instead
of handing Keras the schedule. A checkpoint then saves an ordinary Keras optimizer: it loads with
`keras.saving.load_model` after importing only `layers` and `models`, and resuming continues the
schedule exactly, because the schedule is a function of the restored step counter.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from bnzoo.config import TrainConfig


# Registered so that checkpoints of bnzoo's first format, whose optimizer serialized the
# schedule, still load where bnzoo is imported.
@keras.saving.register_keras_serializable(package="bnzoo")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to a peak learning rate, then constant, exponential or cosine decay.

    Warmup keeps the first steps from blowing up while the freshly initialized network's
    activations are far from normalized; Batch Normalization then tolerates the high peak rate
    (Ioffe & Szegedy 2015, section 3.3), and the decay anneals it.

    With `w = warmup_steps`, `t = step - w` and `T = total_steps - w`:

    - warmup (`step < w`): `peak * (step + 1) / w`, so the first step already moves;
    - constant: `peak`;
    - exponential: `peak * decay_rate ** (t / steps_per_epoch)`, a factor `decay_rate` per epoch;
      with `staircase_steps`, `peak * decay_rate ** floor(t / staircase_steps)`: a factor
      `decay_rate` once every `staircase_steps` steps, the way GoogLeNet was trained ("decreasing
      the learning rate by 4% every 8 epochs", Szegedy et al. 2014, section 6; Caffe's "step"
      policy);
    - cosine: `peak * (1 + cos(pi * min(t, T) / T)) / 2`, reaching 0 at `total_steps`.

    Args:
        peak_learning_rate: the rate at the end of the warmup.
        warmup_steps: number of warmup steps (0 for none).
        total_steps: all training steps; the cosine reaches 0 there.
        decay: "constant", "exponential" or "cosine".
        steps_per_epoch: steps per epoch, the unit of `decay_rate`; a fraction is allowed (an
            experiment may let a step stand for part of another dataset's epoch).
        decay_rate: exponential decay factor per epoch (per `staircase_steps` with those).
        staircase_steps: None for a smooth exponential decay, else the steps between two
            drops of the staircase (a fraction is allowed: the drops fall at the first whole
            step past each multiple).
        name: the schedule's name.

    Example:

    ```python
    schedule = bnzoo.optimization.WarmupSchedule(0.1, warmup_steps=400, total_steps=5000)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    ```
    """

    def __init__(
        self,
        peak_learning_rate: float,
        warmup_steps: int,
        total_steps: int,
        decay: str = "cosine",
        steps_per_epoch: float = 1,
        decay_rate: float = 0.9,
        staircase_steps: float | None = None,
        name: str = "warmup_schedule",
    ):
        if decay not in ("constant", "exponential", "cosine"):
            raise ValueError(f"decay must be constant, exponential or cosine, got {decay!r}")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}"
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        if staircase_steps is not None and not staircase_steps > 0:
            raise ValueError(f"staircase_steps must be positive or None, got {staircase_steps}")
        self.total_steps = int(total_steps)
        self.decay = decay
        # A whole number stays an int, so the configs of existing checkpoints are unchanged.
        self.steps_per_epoch = _int_if_whole(steps_per_epoch)
        self.decay_rate = float(decay_rate)
        self.staircase_steps = None if staircase_steps is None else _int_if_whole(staircase_steps)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = ops.cast(self.peak_learning_rate, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warmup_rate = peak * ops.minimum((step + 1.0) / warmup, 1.0)
        t = ops.maximum(step - float(self.warmup_steps), 0.0)
        if self.decay == "constant":
            decayed = peak
        elif self.decay == "exponential":
            if self.staircase_steps is None:
                exponent = t / float(self.steps_per_epoch)
            else:
                exponent = ops.floor(t / float(self.staircase_steps))
            decayed = peak * ops.power(ops.cast(self.decay_rate, "float32"), exponent)
        else:
            span = float(self.total_steps - self.warmup_steps)
            progress = ops.minimum(t, span) / span
            decayed = 0.5 * peak * (1.0 + ops.cos(math.pi * progress))
        if self.warmup_steps == 0:
            return decayed * ops.ones_like(step)
        return ops.where(step < float(self.warmup_steps), warmup_rate, decayed)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "decay": self.decay,
            "steps_per_epoch": self.steps_per_epoch,
            "decay_rate": self.decay_rate,
            "staircase_steps": self.staircase_steps,
            "name": self.name,
        }


def _int_if_whole(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def build_schedule(config: TrainConfig, steps_per_epoch: float) -> WarmupSchedule:
    """The learning-rate schedule of `config`, in optimizer steps.

    `steps_per_epoch` is the run's steps per epoch; an experiment may pass a fraction, to let
    each of its steps stand for a share of another dataset's epoch (the paper's schedules are
    in ImageNet epochs).
    """
    config = config.resolved()
    total_steps = math.floor(config.epochs * steps_per_epoch)
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    staircase_steps = None
    if config.lr_decay_epochs is not None:
        staircase_steps = config.lr_decay_epochs * steps_per_epoch
    return WarmupSchedule(
        config.lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=config.lr_schedule,
        steps_per_epoch=steps_per_epoch,
        decay_rate=config.lr_decay_rate,
        staircase_steps=staircase_steps,
    )


def build_optimizer(
    config: TrainConfig, model: keras.Model, steps_per_epoch: int
) -> keras.optimizers.Optimizer:
    """SGD with momentum, Adam or AdamW for `config`, with its weight decay.

    The optimizer's learning rate is a variable holding the rate of `config`'s schedule
    (`build_schedule`) at step 0; a training loop keeps it on the schedule with
    `apply_learning_rate_schedule`.

    With `weight_decay_form="decoupled"` (the default) Keras applies `weight_decay` decoupled
    from the gradient for every optimizer (`w -= lr * weight_decay * w`), so `adam` with a
    weight decay behaves like `adamw`; the two names differ in their defaults only. With
    `"l2"` the decay is the paper's "L2 weight regularization" instead (`add_l2_regularization`):
    a loss term whose gradient goes through momentum. Either way it is applied to kernels, not
    to biases or to BN's gamma and beta: shrinking gamma only rescales a normalized activation,
    which the next layer undoes, so decaying it regularizes nothing and fights the
    normalization.
    """
    config = config.resolved()
    learning_rate = float(ops.convert_to_numpy(build_schedule(config, steps_per_epoch)(0)))
    weight_decay = config.weight_decay or None
    if config.weight_decay_form == "l2":
        add_l2_regularization(model, config.weight_decay)
        weight_decay = None
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=config.momentum, weight_decay=weight_decay
        )
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)
    elif config.optimizer == "adamw":
        # AdamW's own default decay is 0.004; with the l2 form the loss term replaces it.
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay or 0.0)
    else:
        raise ValueError(f"--optimizer must be sgd, adam or adamw, got {config.optimizer!r}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1]
        )
    return optimizer


def add_l2_regularization(model: keras.Model, coefficient: float) -> None:
    """Regularize every kernel of `model` with the loss `coefficient / 2 * sum(w ** 2)`.

    Its gradient, `coefficient * w`, is added to the loss gradient and goes through momentum
    with it: the "L2 loss on the model parameters" of Inception's training that §4.2.1 of the
    paper divides by 5, Caffe's `weight_decay` and TF-slim's `l2_regularizer` (`tf.nn.l2_loss`
    halves the sum of squares), so their coefficients mean the same here. With momentum `m`
    this shrinks weights about `1 / (1 - m)` times faster than the decoupled decay of the same
    coefficient, once momentum has built up.

    The regularizer is attached to the variables (`Variable.regularizer`, which `model.losses`
    reads): the layers' configurations are untouched, so a saved model carries no training
    loss. Kernels are the variables of rank 2 and more; biases, BN's gamma and beta are left
    alone. `coefficient` 0 (or None) removes a regularizer set before.
    """
    regularizer = keras.regularizers.L2(coefficient / 2) if coefficient else None
    for variable in model.trainable_variables:
        if len(variable.shape) > 1:
            variable.regularizer = regularizer


def apply_learning_rate_schedule(
    optimizer: keras.optimizers.Optimizer, schedule: keras.optimizers.schedules.LearningRateSchedule
) -> None:
    """Set the optimizer's learning-rate variable to `schedule` at the optimizer's step counter.

    Called by the training loop (inside its compiled step, before and after the update), so the
    variable always holds the rate of the next step: the rate `current_learning_rate` reports and
    a checkpoint stores. A `LossScaleOptimizer` forwards both to its inner optimizer, whose
    counter skips the steps with non-finite gradients, as a schedule inside it would.
    """
    optimizer.learning_rate = schedule(optimizer.iterations)


def learning_rate_variable_indices(optimizer: keras.optimizers.Optimizer) -> tuple[int, int]:
    """Where the learning rate and the step counter sit in `optimizer.variables`, for a
    stateless (JAX) step that sets the rate in the optimizer's state values."""
    identities = [id(variable) for variable in optimizer.variables]
    return identities.index(id(optimizer.learning_rate)), identities.index(id(optimizer.iterations))


def build_loss(
    config: TrainConfig, reduction: str | None = "sum_over_batch_size"
) -> keras.losses.Loss:
    """Cross-entropy on logits; labels arrive one-hot so that label smoothing is available
    (Keras' sparse cross-entropy has no `label_smoothing`). `reduction=None` gives the
    per-example losses that the training loop sums itself."""
    return keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=config.label_smoothing, reduction=reduction
    )


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate of the optimizer's next step (its learning-rate variable, or its schedule at its
    step counter)."""
    return float(ops.convert_to_numpy(optimizer.learning_rate))
