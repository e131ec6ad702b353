"""What a training run feeds its model: training batches, evaluation batches and the batches that
Batch Normalization's population statistics are computed from, each this worker's share.

Every builder returns a function that makes a fresh `tf.data.Dataset` of `(images, one-hot
labels)` input batches (per replica on TensorFlow, per process on JAX), so that a
`tf.distribute` strategy can create it on each worker. Labels are one-hot so that label
smoothing is available; the padding that evaluation adds is labelled with an all-zero vector,
which gives it weight 0 (see `bnzoo.training_loop`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bnzoo.config import TrainConfig
from bnzoo.distribution import Distribution, keep_worker_share, pad_to_whole_global_batches

#: Added to the seed of each worker's augmentation stream (times the worker's index), so that
#: workers sharing one shuffling order crop and flip their images independently.
AUGMENT_SEED_STRIDE = 1_000_003


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """The splits of a run and how to turn them into model inputs.

    Attributes:
        config: the run's configuration.
        distribution: how the global batch is split.
        train_examples, train_info: the training split (`bnzoo.data.load_dataset`'s output).
        image_size: the model's input (H, W) when it differs from the dataset's, else None.
    """

    config: TrainConfig
    distribution: Distribution
    train_examples: Any
    train_info: Any
    image_size: tuple[int, int] | None

    @property
    def input_batch_size(self) -> int:
        return self.distribution.input_batch_size(self.config.batch_size)

    def _share(self, steps: int | None = None) -> Callable:
        distribution = self.distribution

        def select(batches):
            return keep_worker_share(
                batches,
                num_workers=distribution.num_workers,
                worker_index=distribution.worker_index,
                batches_per_worker=distribution.input_batches_per_worker,
                steps=steps,
            )

        return select

    def _one_hot(self, batches):
        import tensorflow as tf

        classes = self.train_info.num_classes
        return batches.map(lambda images, labels: (images, tf.one_hot(labels, classes)))

    def training_batches(self, epoch: int, steps: int) -> Callable:
        """An epoch's batches: shuffled with `seed + epoch` (a resumed run does not replay the
        first epochs' order), augmented if asked, full batches only."""
        from bnzoo.data import make_pipeline

        config = self.config

        def make():
            return self._one_hot(
                make_pipeline(
                    self.train_examples,
                    self.train_info,
                    batch_size=self.input_batch_size,
                    training=True,
                    image_size=self.image_size,
                    augment=config.augment,
                    horizontal_flip=config.horizontal_flip,
                    shuffle_buffer=config.shuffle_buffer,
                    seed=config.seed + epoch,
                    augment_seed=config.seed
                    + epoch
                    + AUGMENT_SEED_STRIDE * self.distribution.worker_index,
                    # BN's statistics come from the mini-batch: a ragged last batch of a few
                    # examples would give noisy statistics and a noisy moving-average update.
                    drop_remainder=True,
                    select_batches=self._share(steps),
                )
            )

        return make

    def statistics_batches(self, epoch: int, batches: int):
        """This run's batches for Algorithm 2 after epoch `epoch` (`statistics_batches` with the
        run's batch size, input size and shuffle buffer, shuffled with `seed + epoch`).

        Unlike the training batches these are whole global batches, the same on every worker:
        `layers.recompute_population_statistics` splits them among the replicas itself, and on
        JAX every process computes each batch's statistics over the whole global batch, as
        training under `DataParallel` normalizes it.
        """
        config = self.config
        return statistics_batches(
            self.train_examples,
            self.train_info,
            batch_size=config.batch_size,
            batches=batches,
            seed=config.seed + epoch,
            image_size=self.image_size,
            shuffle_buffer=config.shuffle_buffer,
        )

    def evaluation_batches(self, examples, info) -> Callable:
        """Every example of an evaluation split, in order, normalized with the training
        split's statistics; the last batch padded (weight 0) so that all replicas run the same
        steps."""
        from bnzoo.data import make_pipeline

        distribution = self.distribution
        info = dataclasses.replace(info, mean=self.train_info.mean, std=self.train_info.std)
        group = distribution.num_workers * distribution.input_batches_per_worker
        share = self._share()

        def select(batches):
            padded = pad_to_whole_global_batches(
                batches,
                batch_size=self.input_batch_size,
                num_examples=info.num_examples,
                group=group,
            )
            return share(padded)

        def make():
            return self._one_hot(
                make_pipeline(
                    examples,
                    info,
                    batch_size=self.input_batch_size,
                    training=False,
                    image_size=self.image_size,
                    select_batches=select,
                )
            )

        return make


def statistics_batches(
    examples: Any,
    info: Any,
    *,
    batch_size: int,
    batches: int,
    seed: int,
    image_size: tuple[int, int] | None = None,
    shuffle_buffer: int = 10_000,
):
    """The training images Algorithm 2's population statistics are computed from, for
    `layers.recompute_population_statistics`, on every backend (it reads a `tf.data.Dataset` as
    NumPy outside TensorFlow).

    `batches` full batches of `batch_size` images (the statistics' m is the training batch
    size), preprocessed with `info`'s normalization and resized to `image_size` as the model was
    trained, without augmentation (the statistics describe the inputs inference sees), from a
    shuffle seeded by `seed`, uncached (a few batches of a split that training may cache
    anyway). Under a `tf.distribute` strategy the recompute splits each batch among the
    replicas; the dataset says to shard by data (tf.distribute's default first tries to split
    files, which these images do not come from).

    Args:
        examples, info: a split as `bnzoo.data.load_dataset` returns it (`info` may carry
            another split's `mean` and `std`: those the model was trained with).
        batch_size: images per batch: the training batch size.
        batches: how many batches.
        seed: seed of the shuffle that picks the images.
        image_size: the model's input (H, W) when it differs from the dataset's, else None.
        shuffle_buffer: shuffle buffer in examples (capped at the split's size).
    """
    import tensorflow as tf

    from bnzoo.data import make_pipeline

    dataset = make_pipeline(
        examples,
        info,
        batch_size=batch_size,
        training=True,
        image_size=image_size,
        augment=False,
        shuffle_buffer=shuffle_buffer,
        cache=False,
        seed=seed,
        drop_remainder=True,
    ).take(batches)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
