"""A run's cost in multiply-adds (issue 17): counted from the model profile and the examples each
kind of pass sees, printed at the end of train.py and recorded in metrics.json and history.csv;
the default recipe stays within its budget of 16 T training multiply-adds."""

import json

import pytest

import models
from bnzoo.config import TrainConfig
from bnzoo.run_folder import RunPaths, read_history_csv
from bnzoo.training import planned_training_compute
from bnzoo.training_compute import training_compute

#: `make train`'s budget (issue 17): a third of the 47 T of the earlier default (10 epochs of
#: 54,000 examples through plain_cnn's 29.1 M multiply-adds, forward and backward).
DEFAULT_RUN_BUDGET = 16e12

#: plain_cnn_small at its smallest: one 8-filter block at 28x28, one 16-filter block at 14x14, a
#: 16 -> 10 classifier.
TINY_MODEL = {"widths": [8, 16], "depth": [1, 1]}
# 3x3 convolutions: positions x 9 x input channels x filters; the classifier 16 x 10.
TINY_FORWARD = 28 * 28 * 9 * 1 * 8 + 14 * 14 * 9 * 8 * 16 + 16 * 10


def test_training_counts_forward_and_backward_of_every_example_stepped_on():
    compute = training_compute(
        1_000,
        epochs=2,
        steps_per_epoch=3,
        batch_size=4,
        statistics_batches=2,
        validation_examples=10,
        test_examples=7,
    )
    assert compute.training_multiply_adds() == 3 * 1_000 * 2 * 3 * 4
    assert compute.training_multiply_adds(1) == 3 * 1_000 * 3 * 4
    assert compute.statistics_multiply_adds == 1_000 * 2 * 2 * 4  # a forward pass each
    assert compute.evaluation_multiply_adds == 1_000 * (2 * 10 + 7)
    record = compute.as_dict()
    assert record["training_multiply_adds"] == 72_000
    assert record["examples_per_epoch"] == 12


def test_describe_names_the_scale_of_real_runs():
    compute = training_compute(
        9_071_424,
        epochs=10,
        steps_per_epoch=421,
        batch_size=128,
        statistics_batches=50,
        validation_examples=6_000,
        test_examples=10_000,
    )
    # 3 x 9,071,424 x 538,880 = 14.665e12; 9,071,424 x 64,000 = 0.581e12; x 70,000 = 0.63499968e12.
    assert compute.describe() == (
        "training compute 14.67 T multiply-adds (3 x 9.07 M x 538,880 examples); "
        "BN statistics 0.58 T, evaluation 0.63 T"
    )


def test_the_default_run_trains_within_a_third_of_the_earlier_default():
    """`python train.py` as configured, counted without training: the model's profile, the
    training split's size, the epochs and the batch size."""
    config = TrainConfig()
    compute = planned_training_compute(config)
    spec = models.get_model_spec(config.model)
    model = models.create_model(config.model, input_shape=spec.default_input_shape, classes=10)
    assert compute.forward_multiply_adds == models.count_multiply_adds(model)
    # Fashion-MNIST's train[:90%]: 54,000 examples, full batches only.
    assert compute.examples_per_epoch == 54_000 // config.batch_size * config.batch_size
    assert compute.epochs == config.epochs
    assert compute.training_multiply_adds() <= DEFAULT_RUN_BUDGET, compute.describe()


@pytest.mark.slow
def test_a_run_prints_and_records_its_compute(tmp_path, logged_lines):
    from bnzoo.training import train

    assert (
        models.count_multiply_adds(
            models.create_model(
                "plain_cnn_small", input_shape=(28, 28, 1), classes=10, **TINY_MODEL
            )
        )
        == TINY_FORWARD
    )
    config = TrainConfig(
        model="plain_cnn_small",
        model_args=TINY_MODEL,
        train_split="train[:512]",
        val_split="train[512:640]",
        test_split="test[:256]",
        epochs=2,
        batch_size=64,
        bn_statistics_batches=4,
        mixed_precision=False,
        output_dir=str(tmp_path / "run"),
    )
    train(config)

    training = 3 * TINY_FORWARD * 512 * 2  # 8 steps of 64 per epoch
    statistics = TINY_FORWARD * 4 * 64 * 2  # 4 batches of Algorithm 2 per epoch
    evaluation = TINY_FORWARD * (128 * 2 + 256)  # validation per epoch, test once
    paths = RunPaths(config.output_dir)
    with open(paths.metrics, encoding="utf-8") as stream:
        recorded = json.load(stream)["training_compute"]
    assert recorded["training_multiply_adds"] == training
    assert recorded["statistics_multiply_adds"] == statistics
    assert recorded["evaluation_multiply_adds"] == evaluation
    assert [row["training_multiply_adds"] for row in read_history_csv(paths.history)] == [
        training / 2,
        training,
    ]
    lines = logged_lines()
    assert (
        lines[-1]
        == training_compute(
            TINY_FORWARD,
            epochs=2,
            steps_per_epoch=8,
            batch_size=64,
            statistics_batches=4,
            validation_examples=128,
            test_examples=256,
        ).describe()
    )
    assert lines[-1].startswith(f"training compute {training / 1e9:.2f} G multiply-adds")
