"""A training run from a `TrainConfig`: build the model, train or resume it in its run folder,
and write the final artifacts.

The run folder, its checkpoints and crash safety are `bnzoo.run_folder`'s; the optimizer,
schedule, loss and metrics `bnzoo.optimization`'s; the per-epoch callbacks `bnzoo.callbacks`'.

Resuming rebuilds the model and optimizer from the config exactly as a fresh run would (so
settings that Keras does not serialize, such as the weight-decay exclusions, are identical),
then loads the checkpoint's weights and optimizer variables into them, and calls `fit` with
`initial_epoch`. The learning-rate schedule is a function of the optimizer's restored step
counter, so it continues where it stopped. Extending a run (`--epochs` raised) works the same
way, with the schedule of the new `--epochs` (see `bnzoo.run_folder.check_run_folder`).

A run that fails or is interrupted before its first epoch is committed leaves nothing behind
(`discard_unstarted_run`): there is nothing to resume, and a leftover folder would only make the
corrected command fail as "a different run".
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import keras

from bnzoo.atomic_files import save_model_atomically
from bnzoo.callbacks import EpochSummary, RunCheckpoint, TensorBoardScalars
from bnzoo.cli import Terminated, UsageError
from bnzoo.config import CUMULATIVE, TrainConfig, default_output_dir, load_config, save_config
from bnzoo.memory import check_input_batch_fits, check_training_step_fits
from bnzoo.model_args import check_model_options
from bnzoo.optimization import build_loss, build_metrics, build_optimizer
from bnzoo.run_folder import (
    STATE_FORMAT,
    RunPaths,
    check_run_folder,
    committed_epochs,
    discard_unstarted_run,
    is_complete,
    locked_run_folder,
    read_checkpoint_state,
    remove_run_artifacts,
    remove_temporary_files,
    repair_best_checkpoint,
    write_history_csv,
)

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


def plural(count: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_image_shape(image_shape: tuple[int | None, int | None, int]) -> str:
    """`28x28x1`, or `varying sizes x3` for an image folder of mixed sizes."""
    height, width, channels = image_shape
    if height is None or width is None:
        return f"varying sizes x{channels}"
    return f"{height}x{width}x{channels}"


def resolve_image_size(
    config: TrainConfig, image_shape: tuple[int, int, int], min_input_size: int | None
) -> tuple[int, int] | None:
    """The model's input (H', W'): `--image-size`, else the dataset's size raised to the model's
    minimum. None when that is the dataset's own size (no padding or resizing)."""
    height, width = image_shape[0], image_shape[1]
    if config.image_size is not None:
        target = tuple(config.image_size)
    elif height is None or width is None:
        raise ValueError(
            f"the images of {config.dataset} vary in size; pass --image-size H,W to resize them "
            "to the model's input"
        )
    else:
        minimum = min_input_size or 0
        target = (max(height, minimum), max(width, minimum))
    return None if target == (height, width) else (int(target[0]), int(target[1]))


def build_model(
    config: TrainConfig, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """`models.create_model` with the dataset's input shape and classes, returning logits.

    `--model-arg` keys and types are checked against the builder first (a typo would otherwise
    surface as a TypeError from deep inside it), and the input batch and the training step's
    activations against the machine's memory.

    Raises:
        UsageError: a model option the builder rejects (its own ValueError, one line).
        ValueError: the input size cannot fit in memory at `config.batch_size`.
    """
    import models

    check_model_options(config)
    height, width, _ = input_shape
    size_text = (
        f"--image-size {height}x{width}"
        if config.image_size is not None
        else f"the input size {height}x{width} (the dataset's own; pass --image-size to shrink it)"
    )
    check_input_batch_fits(tuple(input_shape), config.batch_size, size_text)
    kwargs = dict(config.model_args)
    kwargs.update(
        input_shape=tuple(input_shape),
        classes=num_classes,
        classifier_activation=None,
        normalization=None if config.normalization == "none" else config.normalization,
    )
    if config.bn_momentum is not None:
        kwargs["bn_momentum"] = None if config.bn_momentum == CUMULATIVE else config.bn_momentum
    if config.bn_epsilon is not None:
        kwargs["bn_epsilon"] = config.bn_epsilon
    try:
        model = models.create_model(config.model, **kwargs)
    except (ValueError, TypeError) as error:
        if isinstance(error, TypeError) and not config.model_args:
            raise  # not the user's keywords: a bug
        arguments = " ".join(f"{key}={value!r}" for key, value in config.model_args.items())
        raise UsageError(
            f"{config.model} cannot be built"
            + (f" with --model-arg {arguments}" if arguments else "")
            + f" for {height}x{width} inputs: {' '.join(str(error).split())}"
        ) from None
    except MemoryError:
        raise ValueError(
            f"{size_text}: building {config.model} ran out of memory; use a smaller --image-size"
        ) from None
    check_training_step_fits(model, config.batch_size, size_text)
    return model


def describe_evaluation_splits(config: TrainConfig) -> str:
    """`validating on X, testing on Y`, noting that an image folder's slices are stratified."""
    from bnzoo.data.image_folder import FILE_ORDER_SEED, PREFIX

    text = (f"validating on {config.val_split}" if config.val_split else "no validation split") + (
        f", testing on {config.test_split}" if config.test_split else ", no test split"
    )
    if config.dataset.startswith(PREFIX):
        text += f" (image-folder slices are stratified by class, file order seed {FILE_ORDER_SEED})"
    return text


def check_training_data(config: TrainConfig, train_info) -> None:
    """What the training split must satisfy: at least two classes and a full batch.

    Raises:
        ValueError: one class, or fewer training examples than `--batch-size`.
    """
    if train_info.num_classes < 2:
        raise ValueError(
            f"{config.dataset} has {plural(train_info.num_classes, 'class')} "
            f"({', '.join(train_info.class_names)}); a classifier needs at least two, e.g. one "
            "sub-folder per class"
        )
    if train_info.num_examples < config.batch_size:
        raise ValueError(
            f"--train-split {config.train_split} has "
            f"{plural(train_info.num_examples, 'example')}, fewer than --batch-size "
            f"{config.batch_size}; lower --batch-size or use a larger split"
        )


def load_evaluation_split(config: TrainConfig, flag: str, split: str):
    """`load_dataset` for the validation or test split, its errors naming the flag (the split
    may be a default the user never typed)."""
    from bnzoo.data import load_dataset

    try:
        return load_dataset(
            config.dataset, split=split, data_dir=config.data_dir, manual_dir=config.manual_dir
        )
    except ValueError as error:
        reason = str(error).rstrip(". ")
        raise ValueError(f"{flag} {split}: {reason}; or pass {flag} none to go without") from None


def warn_about_overlapping_splits(config: TrainConfig, log: Log = _print) -> None:
    """A warning line for each of the validation and test splits that shares examples with the
    training split: its accuracy would be measured partly on training data."""
    from bnzoo.data import overlapping_examples

    for flag, split in (("--val-split", config.val_split), ("--test-split", config.test_split)):
        if not split:
            continue
        shared = overlapping_examples(
            config.dataset, config.train_split, split, data_dir=config.data_dir
        )
        if shared:
            log(
                f"warning: {flag} {split} overlaps --train-split {config.train_split} "
                f"({plural(shared, 'example')} in both): its accuracy will be optimistic"
            )


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled copy of `model` with the same weights, for `model.keras`: loading it needs
    bnzoo's layers but not the training code's optimizer and schedule.

    Built from the model's config rather than with `keras.models.clone_model`, which (Keras 3.15)
    also compiles the clone when the original is compiled, and would save its optimizer.
    """
    copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def configure_runtime(config: TrainConfig) -> str:
    """Seeds, op determinism and the mixed-precision policy; returns the policy's name.

    Mixed precision is mixed_float16 on a GPU (tensor cores, with Keras' automatic loss
    scaling) and mixed_bfloat16 on CPU, where float16 has no fast kernels and bfloat16 needs no
    loss scaling; in both, variables (BN's moving statistics included) stay float32.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = "float32"
    if config.mixed_precision:
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


# --- The run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What `train` did."""

    run_dir: str
    epochs_completed: int
    resumed_from_epoch: int
    already_complete: bool
    metrics: dict[str, Any] | None


def _one_hot(num_classes: int):
    import tensorflow as tf

    def convert(images, labels):
        return images, tf.one_hot(labels, num_classes)

    return convert


def train(config: TrainConfig, *, log: Log = _print, progress_bar: bool | None = None) -> RunResult:
    """Run (or resume, extend, or finish) the training run described by `config`.

    Everything that can fail on bad user input (options, model, dataset, splits, input size,
    batch size, memory) is checked before the run folder is touched, and a run that fails or is
    interrupted before its first epoch is committed is removed again: a mistake never leaves a
    half-made run that the corrected command would refuse as "a different run".

    Args:
        config: the run; `config.output_dir` None means `runs/<date>-<model>-<dataset>`.
        log: where progress lines go.
        progress_bar: Keras' progress bar (True) or one line per epoch (False); None picks the
            bar when stdout is a terminal.

    Returns:
        A `RunResult`; `metrics` holds the test split's metrics (also in metrics.json).

    Raises:
        UsageError (a ValueError): a bad option or model argument.
        ValueError / FileNotFoundError: bad data or run folder, not enough memory, divergence.
        KeyboardInterrupt: SIGINT or SIGTERM (`bnzoo.cli.Terminated`), re-raised with a message
            that says how to continue.
    """
    config.validate()
    check_model_options(config)
    if config.output_dir is None:
        config.output_dir = default_output_dir(config)
    paths = RunPaths(config.output_dir)
    mode = check_run_folder(paths.run_dir, config, log=log)
    state = read_checkpoint_state(paths.last_checkpoint) if mode == "resume" else None
    if is_complete(paths, config, state):
        metrics = _read_json(paths.metrics) if config.test_split else None
        summary = f"; test accuracy {metrics['accuracy']:.2%}" if metrics else ""
        log(
            f"{paths.run_dir} is already complete ({plural(state['epoch'], 'epoch')}{summary}); "
            "raise --epochs to train it further, or pass --overwrite to train it again"
        )
        return RunResult(paths.run_dir, state["epoch"], state["epoch"], True, metrics)
    if mode == "resume":
        saved_epochs = load_config(paths.run_dir).epochs
        if saved_epochs != config.epochs:
            log(
                f"{paths.run_dir}: --epochs {saved_epochs} -> {config.epochs}; the learning-rate "
                f"schedule from here on is the {config.epochs}-epoch one"
            )
    for warning in config.ignored_settings():
        log(f"warning: {warning}")

    from bnzoo.data import naming_undecodable_images

    existed = os.path.exists(paths.run_dir)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        with naming_undecodable_images():
            return _run(config, paths, mode, state, log, progress_bar)
    except KeyboardInterrupt as interrupt:
        discarded = discard_unstarted_run(paths, remove_folder=not existed)
        epochs = 0 if discarded else committed_epochs(paths)
        how = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
        if not epochs:
            message = (
                f"{how} before the first epoch finished; nothing was kept, so rerunning the "
                "same command starts the run again"
            )
        else:
            message = (
                f"{how}; {paths.run_dir} holds {epochs} of {plural(config.epochs, 'epoch')}: "
                "rerunning the same command resumes from there"
            )
        raise type(interrupt)(message) from None
    except BaseException:
        if discard_unstarted_run(paths, remove_folder=not existed):
            log(f"removed {paths.run_dir}: the run stopped before finishing an epoch")
        raise
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def _run(
    config: TrainConfig,
    paths: RunPaths,
    mode: str,
    state: dict[str, Any] | None,
    log: Log,
    progress_bar: bool | None,
) -> RunResult:
    import tensorflow as tf

    import models
    from bnzoo.data import load_dataset, make_pipeline

    policy = configure_runtime(config)
    data_kwargs = {"data_dir": config.data_dir, "manual_dir": config.manual_dir}

    # 1. Everything a user can get wrong, before any file is written.
    spec = models.get_model_spec(config.model)
    train_ds, train_info = load_dataset(config.dataset, split=config.train_split, **data_kwargs)
    check_training_data(config, train_info)
    val_ds = val_info = test_ds = None
    if config.val_split:
        val_ds, val_info = load_evaluation_split(config, "--val-split", config.val_split)
    if config.test_split:
        test_ds, _ = load_evaluation_split(config, "--test-split", config.test_split)
    warn_about_overlapping_splits(config, log)
    image_size = resolve_image_size(config, train_info.image_shape, spec.min_input_size)
    height, width = image_size or train_info.image_shape[:2]
    input_shape = (height, width, train_info.image_shape[2])
    model = build_model(config, input_shape, train_info.num_classes)

    # Full batches only: BN's statistics come from the mini-batch, and a ragged last batch of a
    # few examples would give noisy statistics and a noisy moving-average update.
    steps_per_epoch = train_info.num_examples // config.batch_size
    optimizer = build_optimizer(config, model, steps_per_epoch)
    model.compile(
        optimizer=optimizer, loss=build_loss(config), metrics=build_metrics(train_info.num_classes)
    )

    # 2. The run folder, locked against a second train.py before anything in it is touched.
    try:
        os.makedirs(paths.run_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"--output-dir {paths.run_dir}: cannot create it ({error.strerror}); choose another "
            "folder"
        ) from None
    with locked_run_folder(paths):
        if mode == "new":
            remove_run_artifacts(paths)
        else:
            remove_temporary_files(paths)
            # Read again under the lock: a process that held it may have committed since.
            state = read_checkpoint_state(paths.last_checkpoint)
        # config.yaml first: a kill right after it leaves a folder that resumes. A resumed run
        # rewrites it too, recording a raised --epochs and where the data is now.
        save_config(config, paths.run_dir)
        os.makedirs(paths.checkpoints, exist_ok=True)

        initial_epoch = 0
        if state is not None:
            # The optimizer's variables must exist before load_weights can fill them.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(paths.last_checkpoint)
            initial_epoch = state["epoch"]
            repair_best_checkpoint(paths, state)
        else:
            state = {"format": STATE_FORMAT, "epoch": 0, "history": [], "best": None}
        write_history_csv(paths.history, state["history"])

        shape_note = describe_image_shape(train_info.image_shape)
        if image_size:
            shape_note += f" -> {height}x{width}x{train_info.image_shape[2]}"
        if initial_epoch:
            log(f"resuming {paths.run_dir} after epoch {initial_epoch} of {config.epochs}")
        else:
            log(f"run folder: {paths.run_dir}")
        device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        log(
            f"training {config.model} ({model.count_params():,} parameters, normalization "
            f"{config.normalization}, {policy}, {device}) on {config.dataset} {config.train_split} "
            f"({plural(train_info.num_examples, 'example')}, {shape_note}): "
            f"{plural(config.epochs, 'epoch')} of {plural(steps_per_epoch, 'step')}; "
            f"{describe_evaluation_splits(config)}"
        )

        # 3. Train the remaining epochs.
        if initial_epoch < config.epochs:
            # Normalize every split with the training split's statistics.
            def same_normalization(info):
                return dataclasses.replace(info, mean=train_info.mean, std=train_info.std)

            train_batches = make_pipeline(
                train_ds,
                train_info,
                batch_size=config.batch_size,
                training=True,
                image_size=image_size,
                augment=config.augment,
                shuffle_buffer=config.shuffle_buffer,
                # A resumed run must not replay the first epochs' shuffling order.
                seed=config.seed + initial_epoch,
                drop_remainder=True,
            ).map(_one_hot(train_info.num_classes))
            val_batches = None
            if val_ds is not None:
                val_batches = make_pipeline(
                    val_ds,
                    same_normalization(val_info),
                    batch_size=config.batch_size,
                    training=False,
                    image_size=image_size,
                ).map(_one_hot(train_info.num_classes))
            checkpoint = RunCheckpoint(
                paths, state, monitor="val_accuracy" if val_batches is not None else "accuracy"
            )
            if progress_bar is None:
                progress_bar = sys.stdout.isatty()
            # The checkpoint commits first, so TensorBoard never shows an epoch that a kill then
            # made the rerun train again (a kill in between costs that epoch's TensorBoard point).
            callbacks: list[keras.callbacks.Callback] = [checkpoint, TensorBoardScalars(paths.logs)]
            if not progress_bar:
                callbacks.append(EpochSummary(config.epochs, log))
            model.fit(
                train_batches,
                validation_data=val_batches,
                epochs=config.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                callbacks=callbacks,
                verbose=1 if progress_bar else 0,
                shuffle=False,  # make_pipeline shuffles, with a real buffer
            )
            if checkpoint.diverged_epoch is not None:
                kept = checkpoint.state["epoch"]
                raise ValueError(
                    "training diverged: the loss was not finite in epoch "
                    f"{checkpoint.diverged_epoch}; lower --lr (now {config.lr:g}) or add "
                    "--warmup-epochs"
                    + (f". The run folder keeps the last finite epoch ({kept})" if kept else "")
                )
            state = checkpoint.state

        # 4. Final artifacts, each written atomically; rerunning redoes all of them.
        metrics = write_final_artifacts(
            model, paths, config, train_info, image_size, test_ds, state["history"], log
        )
        return RunResult(paths.run_dir, state["epoch"], initial_epoch, False, metrics)


def write_final_artifacts(
    model: keras.Model,
    paths: RunPaths,
    config: TrainConfig,
    train_info,
    image_size: tuple[int, int] | None,
    test_ds,
    history: list[dict[str, Any]],
    log: Log = _print,
) -> dict[str, Any] | None:
    """model.keras, saved_model/, metrics.json (when there is a test split) and the curves.

    The test split is evaluated through the serving function that the SavedModel wraps, so
    metrics.json describes exactly what the export serves. Returns the test metrics.
    """
    from bnzoo import evaluation, export, plotting

    serving_kwargs = {
        "image_shape": tuple(train_info.image_shape),
        "mean": tuple(train_info.mean),
        "std": tuple(train_info.std),
        "image_size": image_size,
    }
    final_model = inference_copy(model)
    for path in paths.tflite_models:  # converted from the model.keras about to be replaced
        if os.path.exists(path):
            os.remove(path)
            log(f"removed {path}, made from the previous model: rerun python -m bnzoo.export")
    save_model_atomically(final_model, paths.model)
    export.export_serving_model(
        final_model,
        paths.saved_model,
        **serving_kwargs,
        metadata={
            "dataset": config.dataset,
            "class_names": list(train_info.class_names),
            "test_split": config.test_split,
            "model": config.model,
        },
    )
    metrics = None
    if test_ds is not None:
        metrics = evaluation.evaluate_classifier(
            export.serving_function(final_model, **serving_kwargs),
            test_ds,
            class_names=train_info.class_names,
            batch_size=max(config.batch_size, 256),
            description={
                "model": paths.model,
                "dataset": config.dataset,
                "split": config.test_split,
            },
        )
        evaluation.save_metrics_json(metrics, paths.metrics)
        top5 = f", top-5 {metrics['top5_accuracy']:.2%}" if "top5_accuracy" in metrics else ""
        log(
            f"test accuracy {metrics['accuracy']:.2%}{top5}, loss {metrics['loss']:.4f} on "
            f"{plural(metrics['num_examples'], 'example')} -> {paths.metrics}"
        )
    try:
        plotting.plot_training_curves(history, paths.curves)
    except ImportError as error:
        log(f"skipping {paths.curves}: {error}")
    log(f"saved {paths.model} and {paths.saved_model}")
    return metrics
