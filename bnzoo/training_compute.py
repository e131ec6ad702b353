"""What a training run costs in multiply-adds: time-to-accuracy that holds on every CPU.

Wall time depends on the machine (the same run took 7 minutes on one 2-core CPU and 85 on
another); the arithmetic does not. A run's cost is counted here from the model's forward
multiply-adds per example (`models.profile_model`, the convention of architecture papers:
convolutions and dense layers) and the number of examples each kind of pass sees:

- training: every example the optimizer steps on costs a forward pass and a backward pass, and
  the backward pass costs about two forward passes (the gradient with respect to the layer's
  input and the one with respect to its weights are each a product of the same size as the
  forward one), so `3 x forward x examples`;
- BN's population statistics (the paper's Algorithm 2, `--bn-statistics population`): one
  forward pass per example, after every epoch;
- evaluation: one forward pass per validation example after every epoch and per test example
  once, at the end.

Only the first is the training compute that `make train`'s goal bounds; the other two are
reported beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Forward plus backward, in forward passes: backward computes two products of the forward's size.
TRAINING_PASSES = 3


@dataclasses.dataclass(frozen=True)
class TrainingCompute:
    """The multiply-adds of a training run, by kind of pass.

    Attributes:
        forward_multiply_adds: one example's forward pass (`models.profile_model`).
        examples_per_epoch: examples the optimizer steps on per epoch (steps x global batch:
            the last partial batch is dropped).
        epochs: epochs of the run.
        statistics_examples_per_epoch: Algorithm 2's examples after each epoch (0 without it).
        validation_examples: examples validated after each epoch.
        test_examples: examples tested once at the end.
    """

    forward_multiply_adds: int
    examples_per_epoch: int
    epochs: int
    statistics_examples_per_epoch: int = 0
    validation_examples: int = 0
    test_examples: int = 0

    def training_multiply_adds(self, epochs: int | None = None) -> int:
        """Forward and backward passes of the training steps after `epochs` (default: all)."""
        epochs = self.epochs if epochs is None else epochs
        return TRAINING_PASSES * self.forward_multiply_adds * self.examples_per_epoch * epochs

    @property
    def statistics_multiply_adds(self) -> int:
        """Algorithm 2's forward passes over the whole run."""
        return self.forward_multiply_adds * self.statistics_examples_per_epoch * self.epochs

    @property
    def evaluation_multiply_adds(self) -> int:
        """Validation after every epoch and the test split once."""
        examples = self.validation_examples * self.epochs + self.test_examples
        return self.forward_multiply_adds * examples

    def as_dict(self) -> dict[str, Any]:
        """The counts and the totals, for metrics.json."""
        return {
            **dataclasses.asdict(self),
            "training_multiply_adds": self.training_multiply_adds(),
            "statistics_multiply_adds": self.statistics_multiply_adds,
            "evaluation_multiply_adds": self.evaluation_multiply_adds,
        }

    def describe(self) -> str:
        """One line: `training compute 14.67 T multiply-adds (3 x 9.07 M x 538,880 examples);
        BN statistics 0.58 T, evaluation 0.64 T` (in G for smoke runs under a T)."""
        training = self.training_multiply_adds()
        scale, unit = (1e12, "T") if training >= 1e12 else (1e9, "G")
        examples = self.examples_per_epoch * self.epochs
        text = (
            f"training compute {training / scale:.2f} {unit} multiply-adds "
            f"({TRAINING_PASSES} x {self.forward_multiply_adds / 1e6:.2f} M x {examples:,} "
            "examples)"
        )
        extras = [
            f"{name} {value / scale:.2f} {unit}"
            for name, value in (
                ("BN statistics", self.statistics_multiply_adds),
                ("evaluation", self.evaluation_multiply_adds),
            )
            if value
        ]
        return text + (f"; {', '.join(extras)}" if extras else "")


def training_compute(
    forward_multiply_adds: int,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    statistics_batches: int = 0,
    validation_examples: int = 0,
    test_examples: int = 0,
) -> TrainingCompute:
    """The multiply-adds of a run of `epochs` x `steps_per_epoch` steps of `batch_size` examples.

    Args:
        forward_multiply_adds: one example's forward pass, `models.profile_model(m).multiply_adds`.
        epochs: epochs of the run.
        steps_per_epoch: optimizer steps per epoch.
        batch_size: the global batch (all replicas and workers together).
        statistics_batches: batches of `batch_size` that Algorithm 2 runs after each epoch.
        validation_examples: examples validated after each epoch.
        test_examples: examples tested at the end.
    """
    return TrainingCompute(
        forward_multiply_adds=int(forward_multiply_adds),
        examples_per_epoch=int(steps_per_epoch) * int(batch_size),
        epochs=int(epochs),
        statistics_examples_per_epoch=int(statistics_batches) * int(batch_size),
        validation_examples=int(validation_examples),
        test_examples=int(test_examples),
    )


def statistics_batches_per_epoch(config, steps_per_epoch: int) -> int:
    """Batches of Algorithm 2 after each epoch of the run `config` describes (0: none)."""
    if config.bn_statistics != "population" or config.normalization == "none":
        return 0
    return min(config.bn_statistics_batches, steps_per_epoch)
