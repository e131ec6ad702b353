"""The pieces of a training run: learning-rate schedule, optimizer, checkpoints, history.

Small inline Keras models keep these fast; the end-to-end runs are in test_train_end_to_end.py.
"""

import json
import logging
import math
import os
import zipfile

import keras
import numpy as np
import pytest
from conftest import training_backends_only

from bnzoo.config import TrainConfig
from bnzoo.memory import activation_elements, check_input_batch_fits, check_training_step_fits
from bnzoo.optimization import (
    WarmupSchedule,
    build_optimizer,
    build_schedule,
    current_learning_rate,
)
from bnzoo.run_folder import (
    STATE_FORMAT,
    STATE_MEMBER,
    RunPaths,
    read_checkpoint_state,
    read_history_csv,
    read_resume_state,
    remove_run_artifacts,
    remove_temporary_files,
    repair_best_checkpoint,
    save_checkpoint,
    write_history_csv,
)
from bnzoo.training import build_model, resolve_image_size, warn_about_overlapping_splits


def value(variable):
    return keras.ops.convert_to_numpy(variable)


def reference_learning_rate(step, peak, warmup, total, decay, steps_per_epoch, rate):
    """The schedule written out in plain Python, from WarmupSchedule's docstring."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = step - warmup
    if decay == "constant":
        return peak
    if decay == "exponential":
        return peak * rate ** (t / steps_per_epoch)
    return 0.5 * peak * (1 + math.cos(math.pi * min(t, total - warmup) / (total - warmup)))


@pytest.mark.multi_backend
@pytest.mark.parametrize("decay", ["constant", "exponential", "cosine"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_its_formula(decay, warmup):
    schedule = WarmupSchedule(
        0.1, warmup_steps=warmup, total_steps=100, decay=decay, steps_per_epoch=20, decay_rate=0.5
    )
    for step in [0, 1, 5, 9, 10, 11, 40, 99, 100, 150]:
        expected = reference_learning_rate(step, 0.1, warmup, 100, decay, 20, 0.5)
        actual = float(keras.ops.convert_to_numpy(schedule(step)))
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-8), (step, decay)


@pytest.mark.multi_backend
def test_schedule_round_trips_through_its_config():
    schedule = WarmupSchedule(0.05, 3, 30, decay="exponential", steps_per_epoch=6, decay_rate=0.8)
    clone = WarmupSchedule.from_config(schedule.get_config())
    assert clone.get_config() == schedule.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert float(keras.ops.convert_to_numpy(restored(17))) == pytest.approx(
        0.05 * 0.8 ** ((17 - 3) / 6), rel=1e-6
    )


def test_schedule_in_epochs_from_config():
    config = TrainConfig(epochs=4, lr=0.2, warmup_epochs=0.5, lr_schedule="cosine")
    schedule = build_schedule(config, steps_per_epoch=10)
    assert (schedule.warmup_steps, schedule.total_steps, schedule.peak_learning_rate) == (
        5,
        40,
        0.2,
    )


def small_model(seed=0):
    import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5)(inputs)
    x = layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(3)(x)
    return keras.Model(inputs, outputs)


def test_weight_decay_shrinks_kernels_but_not_biases_or_batch_norm_parameters():
    """Decoupled decay: w <- w - lr * wd * w for kernels; gamma, beta and biases untouched."""
    model = small_model()
    config = TrainConfig(
        optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.01, warmup_epochs=0, epochs=2
    )
    optimizer = build_optimizer(config, model, steps_per_epoch=10)
    before = {v.path: value(v) for v in model.trainable_variables}
    # Non-trivial BN parameters, so that "unchanged" is not just "still ones and zeros".
    for variable in model.trainable_variables:
        if len(variable.shape) == 1:
            variable.assign(np.linspace(0.5, 1.5, variable.shape[0]).astype("float32"))
            before[variable.path] = value(variable)
    zeros = [keras.ops.zeros_like(v) for v in model.trainable_variables]
    optimizer.apply_gradients(zip(zeros, model.trainable_variables, strict=True))
    for variable in model.trainable_variables:
        expected = before[variable.path]
        if len(variable.shape) > 1:
            expected = expected * (1 - 0.1 * 0.01)
        np.testing.assert_allclose(value(variable), expected, rtol=1e-6, err_msg=variable.path)


@pytest.mark.parametrize(
    "name, expected_class", [("sgd", "SGD"), ("adam", "Adam"), ("adamw", "AdamW")]
)
def test_optimizer_choice(name, expected_class):
    config = TrainConfig(optimizer=name)
    optimizer = build_optimizer(config, small_model(), steps_per_epoch=5)
    assert type(optimizer).__name__ == expected_class
    # A plain rate, the schedule's at step 0 (the loop keeps it on the schedule).
    expected = float(value(build_schedule(config, steps_per_epoch=5)(0)))
    assert current_learning_rate(optimizer) == pytest.approx(expected)
    assert isinstance(optimizer.get_config()["learning_rate"], float)


@pytest.mark.parametrize(
    "image_shape, min_size, requested, expected",
    [
        ((28, 28, 1), 8, None, None),  # plain_cnn on Fashion-MNIST: no padding
        ((28, 28, 1), 32, None, (32, 32)),  # bn_inception: pad up to its minimum
        ((28, 28, 1), 8, (36, 36), (36, 36)),  # --image-size wins
        ((28, 28, 1), 8, (28, 28), None),  # asking for the dataset's size changes nothing
        ((None, None, 3), 8, (64, 48), (64, 48)),  # varying sizes need --image-size
    ],
)
def test_image_size_is_the_dataset_size_raised_to_the_model_minimum(
    image_shape, min_size, requested, expected
):
    config = TrainConfig(image_size=requested)
    assert resolve_image_size(config, image_shape, min_size) == expected


def test_varying_image_sizes_without_image_size_is_an_error():
    with pytest.raises(ValueError, match="vary in size; pass --image-size"):
        resolve_image_size(TrainConfig(dataset="image_folder:/x"), (None, None, 3), 8)


def compiled_small_model(seed=0):
    model = small_model(seed)
    config = TrainConfig(optimizer="sgd", lr=0.05, epochs=3, warmup_epochs=1)
    model.compile(
        optimizer=build_optimizer(config, model, steps_per_epoch=4),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model


def state_after(epochs):
    """A valid training state after `epochs` epochs."""
    history = [{"epoch": epoch, "loss": 1.0 / epoch} for epoch in range(1, epochs + 1)]
    return {"format": STATE_FORMAT, "epoch": epochs, "history": history, "best": None}


def fit_a_little(model):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_checkpoint_restores_weights_bn_statistics_and_optimizer_state(tmp_path):
    model = compiled_small_model()
    fit_a_little(model)
    path = str(tmp_path / "last.keras")
    state = {
        "format": STATE_FORMAT,
        "epoch": 1,
        "history": [{"epoch": 1, "loss": 1.0}],
        "best": None,
    }
    save_checkpoint(model, path, state)

    restored = compiled_small_model(seed=1)  # different initial weights
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(path)
    assert read_checkpoint_state(path) == state
    assert int(restored.optimizer.iterations) == 4
    for original, copy in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(value(original), value(copy), err_msg=original.path)
    moving_mean = [w for w in restored.weights if "moving_mean" in w.path]
    assert moving_mean and np.abs(value(moving_mean[0])).max() > 0  # statistics, not zeros
    for original, copy in zip(model.optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(value(original), value(copy), err_msg=original.path)


@pytest.mark.multi_backend
@training_backends_only
def test_the_loop_trains_every_step_at_the_schedules_rate_and_leaves_the_next_rate():
    """SGD without momentum: each step moves the kernel by -rate(step) x the mean
    cross-entropy's gradient, computed here in NumPy; the optimizer starts at a wrong rate, which
    the loop replaces from the step counter, and ends holding the next step's rate."""
    import tensorflow as tf

    from bnzoo.distribution import plan_distribution, start_distribution
    from bnzoo.training_loop import make_training_loop

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, 8)]
    schedule = WarmupSchedule(0.4, warmup_steps=2, total_steps=6, decay="cosine")
    rates = [float(value(schedule(step))) for step in range(7)]
    with start_distribution(plan_distribution("none")) as distribution:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(2, use_bias=False)(inputs))
        model.compile(optimizer=keras.optimizers.SGD(123.0))
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        loop = make_training_loop(
            model, distribution, loss, 4, num_classes=2, learning_rate_schedule=schedule
        )
        kernel = value(model.trainable_variables[0]).astype("float64")
        for epoch in range(3):
            loop.train_epoch(lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(4), 2)
            for step in range(2):
                images, labels = x[4 * step : 4 * step + 4], y[4 * step : 4 * step + 4]
                logits = images @ kernel
                probabilities = np.exp(logits - logits.max(1, keepdims=True))
                probabilities /= probabilities.sum(1, keepdims=True)
                kernel = kernel - rates[2 * epoch + step] * images.T @ (probabilities - labels) / 4
            np.testing.assert_allclose(
                value(model.trainable_variables[0]), kernel, rtol=1e-5, atol=1e-6
            )
            assert int(value(model.optimizer.iterations)) == 2 * epoch + 2
            assert current_learning_rate(model.optimizer) == pytest.approx(rates[2 * epoch + 2])


def test_checkpoint_is_still_a_plain_keras_file(tmp_path):
    model = compiled_small_model()
    fit_a_little(model)
    path = str(tmp_path / "last.keras")
    save_checkpoint(model, path, state_after(2))
    loaded = keras.models.load_model(path)
    x = np.ones((2, 6), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with zipfile.ZipFile(path) as archive:
        assert STATE_MEMBER in archive.namelist()


def test_a_crash_while_saving_keeps_the_previous_checkpoint_and_no_temporary_file(
    tmp_path, monkeypatch
):
    model = compiled_small_model()
    path = str(tmp_path / "last.keras")
    save_checkpoint(model, path, state_after(1))

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, state_after(2))
    monkeypatch.undo()
    assert read_checkpoint_state(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.keras"]


@pytest.mark.parametrize("signal_exception", [KeyboardInterrupt, SystemExit])
def test_a_signal_while_copying_best_leaves_no_temporary_file(
    tmp_path, monkeypatch, signal_exception
):
    """Ctrl-C and SIGTERM reach the writer as exceptions (the CLI turns SIGTERM into one): the
    half-written copy goes with them, only a SIGKILL can leave it for the next run to delete."""
    import bnzoo.atomic_files as atomic_files

    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    model = compiled_small_model()
    save_checkpoint(model, paths.last_checkpoint, state_after(1))

    def interrupted(path):
        raise signal_exception()

    monkeypatch.setattr(atomic_files, "fsync_file", interrupted)  # after the bytes are copied
    with pytest.raises(signal_exception):
        atomic_files.copy_file_atomically(paths.last_checkpoint, paths.best_checkpoint)
    assert os.listdir(paths.checkpoints) == ["last.keras"]


def test_what_a_sigkill_leaves_under_a_temporary_name_is_removed_by_the_next_run(tmp_path):
    """Exactly the temporaries of bnzoo's naming scheme made for the run's own files go; a
    user's file with `.tmp-` or `.old-` in its name stays."""
    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    save_checkpoint(compiled_small_model(), paths.last_checkpoint, state_after(1))
    left_by_a_kill = [
        "checkpoints/last.tmp-12345-0123456789ab.keras",
        "config.tmp-7-abcdef012345.yaml",
        "saved_model.old-7-abcdef012345",
        "saved_model.tmp-7-abcdef012345",
    ]
    users = [
        "checkpoints/last.tmp-12345.keras",  # not the scheme: no random part
        "notes.tmp-7-abcdef012345.txt",  # the scheme, but not for a file of the run
        "data.old-backup",
        "my.tmp-files",
    ]
    for name in left_by_a_kill + users:
        if "saved_model" in name:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(b"half a file")
    remove_temporary_files(paths)
    left = {
        os.path.relpath(os.path.join(root, name), tmp_path)
        for root, dirs, files in os.walk(tmp_path)
        for name in files + dirs
    }
    assert left == {"checkpoints", "checkpoints/last.keras", *users}


def test_unreadable_checkpoint_is_a_value_error(tmp_path):
    path = tmp_path / "last.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="last.keras is not a readable bnzoo checkpoint"):
        read_checkpoint_state(str(path))


def test_best_checkpoint_is_repaired_after_a_kill_between_last_and_best(tmp_path):
    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    model = compiled_small_model()
    save_checkpoint(model, paths.best_checkpoint, state_after(1))
    state = {**state_after(2), "best": {"monitor": "val_accuracy", "value": 0.9, "epoch": 2}}
    save_checkpoint(model, paths.last_checkpoint, state)  # the kill came before the copy
    repair_best_checkpoint(paths, state)
    assert read_checkpoint_state(paths.best_checkpoint) == state


def test_history_csv_has_one_row_per_epoch_with_an_epoch_column(tmp_path):
    path = str(tmp_path / "history.csv")
    rows = [
        {"epoch": 1, "loss": 0.5, "accuracy": 0.8, "learning_rate": 0.1},
        {"epoch": 2, "loss": 0.25, "accuracy": 0.9, "val_loss": 0.3, "learning_rate": 0.05},
    ]
    write_history_csv(path, rows)
    assert open(path).readline().startswith("epoch,loss,accuracy,")
    assert read_history_csv(path) == rows


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    for path in (paths.config, paths.history, paths.last_checkpoint, paths.metrics):
        open(path, "w").close()
    open(tmp_path / "my_notes.txt", "w").close()
    remove_run_artifacts(paths)
    assert os.listdir(tmp_path) == ["my_notes.txt"]


def test_overwrite_leaves_a_users_files_inside_the_runs_folders(tmp_path):
    """By name: TensorBoard's event files, the two checkpoints, what a SavedModel export
    writes; the folders go only when that empties them."""
    paths = RunPaths(str(tmp_path))
    bnzoo_files = [
        "checkpoints/best.keras",
        "logs/train/events.out.tfevents.1700000000.host.42.0.v2",
        "logs/validation/events.out.tfevents.1700000000.host.42.1.v2",
        "saved_model/saved_model.pb",
        "saved_model/fingerprint.pb",
        "saved_model/variables/variables.index",
        "saved_model/variables/variables.data-00000-of-00001",
        "saved_model/assets.extra/bnzoo.json",
    ]
    users = ["checkpoints/epoch3-for-paper.keras", "logs/train/notes.txt", "saved_model/README"]
    for name in bnzoo_files + users:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x")
    os.makedirs(tmp_path / "saved_model" / "assets")
    remove_run_artifacts(paths)
    left = {
        os.path.relpath(os.path.join(root, name), tmp_path)
        for root, _, files in os.walk(tmp_path)
        for name in files
    }
    assert left == set(users)
    assert not os.path.exists(tmp_path / "logs" / "validation")
    assert not os.path.exists(tmp_path / "saved_model" / "variables")


@pytest.mark.parametrize(
    "state, message",
    [
        ([1, 2], "the training state must be a JSON object, got a list"),
        ({"format": STATE_FORMAT, "history": [], "best": None}, "epoch is missing"),
        ({**state_after(2), "epoch": "2"}, "epoch must be a count of epochs, got '2'"),
        (
            {**state_after(2), "history": state_after(1)["history"]},
            "history must be a list of one row per epoch",
        ),
        (
            {**state_after(1), "history": [{"epoch": 1, "loss": "low"}]},
            "history row 1: 'loss': 'low' is not",
        ),
        (
            {**state_after(1), "history": [{"epoch": 2}]},
            "history row 1 must be a mapping with epoch: 1",
        ),
        (
            {**state_after(1), "best": {"monitor": "val_accuracy", "value": 0.5, "epoch": 3}},
            "best must be null or",
        ),
        ({**state_after(1), "best": 0.9}, "best must be null or"),
        ({**state_after(1), "format": 1}, "a checkpoint of an earlier bnzoo .format 1."),
    ],
)
def test_a_tampered_training_state_is_refused_naming_the_file_and_the_key(state, message, tmp_path):
    path = tmp_path / "last.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(STATE_MEMBER, json.dumps(state))
    with pytest.raises(ValueError, match=f"last.keras \\({STATE_MEMBER}\\): {message}"):
        read_checkpoint_state(str(path))


def test_a_damaged_last_checkpoint_offers_resuming_from_an_intact_best_not_overwrite(tmp_path):
    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    model = compiled_small_model()
    save_checkpoint(model, paths.best_checkpoint, state_after(2))
    with open(paths.last_checkpoint, "wb") as stream:
        stream.write(b"PK\x03\x04 damaged")
    with pytest.raises(ValueError) as raised:
        read_resume_state(paths)
    message = str(raised.value)
    assert "last.keras is not a readable bnzoo checkpoint" in message
    assert "best.keras is intact (epoch 2): rerun with --resume-from best" in message
    assert "--overwrite" not in message
    assert read_resume_state(paths, "best")["epoch"] == 2
    os.remove(paths.best_checkpoint)
    with pytest.raises(
        ValueError, match="no intact checkpoint is left to resume from: pass --overwrite"
    ):
        read_resume_state(paths)


@pytest.mark.parametrize("committed_before", [0, 1])
def test_a_full_disk_names_the_file_and_the_epoch_that_was_kept(
    committed_before, tmp_path, monkeypatch
):
    from bnzoo import callbacks

    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    model = compiled_small_model()
    state = state_after(committed_before)
    if committed_before:
        save_checkpoint(model, paths.last_checkpoint, state)
    checkpoint = callbacks.RunCheckpoint(paths, state, monitor="accuracy")
    checkpoint.set_model(model)

    def full(model, path):
        # What h5py raises: no errno, only the text.
        raise OSError(
            "Unable to synchronously write data (file write failed: errno = 28, error message = "
            "'No space left on device')"
        )

    monkeypatch.setattr(model, "save", lambda path: full(model, path))
    checkpoint.on_epoch_begin(committed_before)
    with pytest.raises(OSError) as raised:
        checkpoint.on_epoch_end(committed_before, {"loss": 0.5, "accuracy": 0.5})
    message = str(raised.value)
    assert f"no space left on device writing {paths.last_checkpoint}" in message
    if committed_before:
        assert f"epoch 2 was not saved; {paths.last_checkpoint} still holds epoch 1" in message
        assert "free some space, then rerun the same command to resume" in message
        assert read_checkpoint_state(paths.last_checkpoint)["epoch"] == 1
    else:
        assert "epoch 1 was not saved and no epoch was committed yet" in message
    assert os.listdir(paths.checkpoints) == (["last.keras"] if committed_before else [])


def test_bn_momentum_cumulative_builds_the_layers_cumulative_average():
    import layers

    config = TrainConfig(bn_momentum="cumulative", model_args={"widths": [4]}).validate()
    model = build_model(config, (8, 8, 1), 3)
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    assert norms and all(layer.momentum is None for layer in norms)
    config = TrainConfig(bn_momentum=0.9, model_args={"widths": [4]}).validate()
    model = build_model(config, (8, 8, 1), 3)
    assert {layer.momentum for layer in model.layers if hasattr(layer, "moving_mean")} == {0.9}


def test_the_activation_estimate_counts_every_layer_output_per_example():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)  # 8*8*4 = 256
    x = keras.layers.GlobalAveragePooling2D()(x)  # 4
    model = keras.Model(inputs, keras.layers.Dense(3)(x))  # 3
    assert activation_elements(model) == 64 + 256 + 4 + 3


def test_a_training_step_beyond_memory_is_refused_with_the_estimate(monkeypatch):
    from bnzoo import memory

    monkeypatch.setattr(memory, "host_memory", lambda: (2 * 1024**3, "available memory"))
    monkeypatch.setattr(memory, "gpu_memory", lambda: None)
    inputs = keras.Input((256, 256, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(16, 3, padding="same", name="c")(inputs))
    # Per image: (3 + 16) * 256 * 256 activations * 4 bytes = 4.75 MiB, plus the pipeline's
    # 3 * 256 * 256 * 64 bytes = 12 MiB; at 128 images 2.1 GiB > 2 GiB, at 64 images 1.05 GiB.
    with pytest.raises(ValueError, match=r"^--image-size 256x256: one training step .* 2\.1 GiB"):
        check_training_step_fits(model, 128, "--image-size 256x256")
    check_training_step_fits(model, 64, "--image-size 256x256")
    with pytest.raises(ValueError, match=r"input pipeline for batches of 200 images needs about"):
        check_input_batch_fits((256, 256, 3), 200, "--image-size 256x256")
    # With a GPU, the model's part is held against the GPU's memory.
    monkeypatch.setattr(memory, "gpu_memory", lambda: 256 * 1024**2)
    with pytest.raises(ValueError, match=r"more than this machine's 256\.0 MiB of GPU memory"):
        check_training_step_fits(model, 64, "--image-size 256x256")
    # Replicas on 4 GPUs train 16 images each (76 MiB); the host holds the pipeline's 64.
    check_training_step_fits(model, 64, "--image-size 256x256", device_batch_size=16)
    with pytest.raises(ValueError, match=r"on a GPU's 64 images needs at least about 304\.0 MiB"):
        check_training_step_fits(model, 256, "--image-size 256x256", device_batch_size=64)


def test_overlapping_validation_and_test_splits_get_a_warning(logged_lines):
    config = TrainConfig(train_split="train[:90%]", val_split="train[80%:]", test_split="test")
    warn_about_overlapping_splits(config)
    assert logged_lines(logging.WARNING) == [
        "--val-split train[80%:] overlaps --train-split train[:90%] (6000 examples in both): its "
        "accuracy will be optimistic"
    ]
    warn_about_overlapping_splits(TrainConfig())
    assert len(logged_lines()) == 1
