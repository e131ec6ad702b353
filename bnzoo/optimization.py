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
    - cosine: `peak * (1 + cos(pi * min(t, T) / T)) / 2`, reaching 0 at `total_steps`.

    Args:
        peak_learning_rate: the rate at the end of the warmup.
        warmup_steps: number of warmup steps (0 for none).
        total_steps: all training steps; the cosine reaches 0 there.
        decay: "constant", "exponential" or "cosine".
        steps_per_epoch: steps per epoch, the unit of `decay_rate`.
        decay_rate: exponential decay factor per epoch.
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
        steps_per_epoch: int = 1,
        decay_rate: float = 0.9,
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
        self.total_steps = int(total_steps)
        self.decay = decay
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay_rate = float(decay_rate)
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
            decayed = peak * ops.power(
                ops.cast(self.decay_rate, "float32"), t / float(self.steps_per_epoch)
            )
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
            "name": self.name,
        }


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> WarmupSchedule:
    """The learning-rate schedule of `config`, in optimizer steps."""
    config = config.resolved()
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    return WarmupSchedule(
        config.lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=config.lr_schedule,
        steps_per_epoch=steps_per_epoch,
        decay_rate=config.lr_decay_rate,
    )


def build_optimizer(
    config: TrainConfig, model: keras.Model, steps_per_epoch: int
) -> keras.optimizers.Optimizer:
    """SGD with momentum, Adam or AdamW for `config`, with decoupled weight decay.

    The optimizer's learning rate is a variable holding the rate of `config`'s schedule
    (`build_schedule`) at step 0; a training loop keeps it on the schedule with
    `apply_learning_rate_schedule`.

    Keras applies `weight_decay` decoupled from the gradient for every optimizer
    (`w -= lr * weight_decay * w`), so `adam` with a weight decay behaves like `adamw`; the two
    names differ in their defaults only. Decay is applied to kernels, not to biases or to BN's
    gamma and beta: shrinking gamma only rescales a normalized activation, which the next layer
    undoes, so decaying it regularizes nothing and fights the normalization.
    """
    config = config.resolved()
    learning_rate = float(ops.convert_to_numpy(build_schedule(config, steps_per_epoch)(0)))
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=config.momentum, weight_decay=weight_decay
        )
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate, weight_decay=weight_decay)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"--optimizer must be sgd, adam or adamw, got {config.optimizer!r}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1]
        )
    return optimizer


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
