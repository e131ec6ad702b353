"""A training run from a `TrainConfig`: build the model, train or resume it in its run folder,
and write the final artifacts.

The run folder, its checkpoints and crash safety are `bnzoo.run_folder`'s; the optimizer,
schedule, loss and metrics `bnzoo.optimization`'s; the per-epoch callbacks `bnzoo.callbacks`';
the devices and workers `bnzoo.distribution`'s; the training and evaluation steps
`bnzoo.training_loop`'s; the batches `bnzoo.training_data`'s.

Each epoch: train, recompute BN's population statistics (Algorithm 2; `--bn-statistics
population`), validate, then the chief commits (checkpoint, history, TensorBoard). Resuming
rebuilds the model and optimizer from the config exactly as a fresh run would (so settings that
Keras does not serialize, such as the weight-decay exclusions, are identical), then loads the
checkpoint's weights and optimizer variables into them and continues after the committed
epoch. The learning-rate schedule is a function of the optimizer's restored step counter, so it
continues where it stopped. Extending a run (`--epochs` raised) works the same way, with the
schedule of the new `--epochs` (see `bnzoo.run_folder.check_run_folder`).

A run that fails or is interrupted before its first epoch is committed leaves nothing behind
(`discard_unstarted_run`, by the chief, the only process that writes): there is nothing to
resume, and a leftover folder would only make the corrected command fail as "a different run".
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import keras

from bnzoo.atomic_files import copy_file_atomically, is_disk_full, save_model_atomically
from bnzoo.callbacks import EpochSummary, RunCheckpoint, TensorBoardScalars
from bnzoo.cli import EXIT_AT_ONCE, UsageError
from bnzoo.config import CUMULATIVE, TrainConfig, default_output_dir, load_config, save_config
from bnzoo.fine_tuning import (
    check_channels,
    check_weights_source,
    freeze,
    has_input_convention,
    include_preprocessing,
    initialize_from_source,
    load_source_model,
    raw_pixel_statistics,
    weights_source,
)
from bnzoo.memory import check_input_batch_fits, check_training_step_fits
from bnzoo.model_args import check_model_options
from bnzoo.optimization import (
    build_loss,
    build_optimizer,
    build_schedule,
    current_learning_rate,
)
from bnzoo.precision import has_gpu, resolve_policy
from bnzoo.run_folder import (
    RunPaths,
    check_run_folder,
    committed_epochs,
    discard_unstarted_run,
    is_complete,
    locked_run_folder,
    new_training_state,
    read_checkpoint_state,
    read_resume_state,
    remove_run_artifacts,
    remove_temporary_files,
    repair_best_checkpoint,
    write_history_csv,
)
from bnzoo.signals import Terminated
from bnzoo.training_compute import (
    TrainingCompute,
    statistics_batches_per_epoch,
    training_compute,
)

logger = logging.getLogger(__name__)


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


def model_arguments(config: TrainConfig, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The builder arguments of the run's model but its head's: `--model-arg`, the input
    shape and the normalization options."""
    kwargs = dict(config.model_args)
    kwargs.update(
        input_shape=tuple(input_shape),
        normalization=None if config.normalization == "none" else config.normalization,
    )
    if config.bn_momentum is not None:
        kwargs["bn_momentum"] = None if config.bn_momentum == CUMULATIVE else config.bn_momentum
    if config.bn_epsilon is not None:
        kwargs["bn_epsilon"] = config.bn_epsilon
    return kwargs


def _create_model(name: str, kwargs: dict[str, Any], include_preprocessing: bool | None):
    """`models.create_model`, starting with the weights' input convention when asked (True),
    or when these builder arguments have one (None)."""
    import inspect

    from bnzoo import models
    from bnzoo.models.preprocessing import NoInputConventionError

    builder = models.get_model_spec(name).builder
    if include_preprocessing is False or (
        include_preprocessing is None
        and "include_preprocessing" not in inspect.signature(builder).parameters
    ):
        return models.create_model(name, **kwargs)
    try:
        return models.create_model(name, **kwargs, include_preprocessing=True)
    except NoInputConventionError:
        if include_preprocessing:
            raise
        return models.create_model(name, **kwargs)


def build_model(
    config: TrainConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    process_batch_size: int | None = None,
    device_batch_size: int | None = None,
    include_preprocessing: bool | None = False,
) -> keras.Model:
    """`models.create_model` with the dataset's input shape and classes, returning logits.

    `--model-arg` keys and types are checked against the builder first (a typo would otherwise
    surface as a TypeError from deep inside it), and the input batch and the training step's
    activations against the machine's memory.

    Args:
        config: the run.
        input_shape: the model's input (H, W, C).
        num_classes: the classifier's outputs.
        process_batch_size: the examples of each global batch that this process feeds and
            trains on (its share under `--distribute multi_worker`); None: `--batch-size`.
        device_batch_size: the examples one device trains on per step (the per-replica batch);
            None: `process_batch_size`.
        include_preprocessing: start the model with its pretrained weights' input convention
            (True), not (False), or when the builder arguments are a weight set's (None); see
            `bnzoo.fine_tuning`.

    Raises:
        UsageError: a model option the builder rejects (its own ValueError, one line).
        ValueError: the input size cannot fit in memory at this batch size.
    """
    check_model_options(config)
    height, width, _ = input_shape
    size_text = (
        f"--image-size {height}x{width}"
        if config.image_size is not None
        else f"the input size {height}x{width} (the dataset's own; pass --image-size to shrink it)"
    )
    process_batch_size = process_batch_size or config.batch_size
    check_input_batch_fits(tuple(input_shape), process_batch_size, size_text)
    kwargs = model_arguments(config, input_shape)
    kwargs.update(classes=num_classes, classifier_activation=None)
    try:
        model = _create_model(config.model, kwargs, include_preprocessing)
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
    check_training_step_fits(
        model, process_batch_size, size_text, device_batch_size=device_batch_size
    )
    return model


def describe_evaluation_splits(config: TrainConfig) -> str:
    """`validating on X, testing on Y`, noting that an image folder's slices are stratified."""
    from bnzoo.data.image_folder import FILE_ORDER_SEED, PREFIX

    config = config.resolved()
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


def warn_about_overlapping_splits(config: TrainConfig) -> None:
    """A warning for each of the validation and test splits that shares examples with the
    training split: its accuracy would be measured partly on training data."""
    from bnzoo.data import overlapping_examples

    config = config.resolved()
    for flag, split in (("--val-split", config.val_split), ("--test-split", config.test_split)):
        if not split:
            continue
        shared = overlapping_examples(
            config.dataset, config.train_split, split, data_dir=config.data_dir
        )
        if shared:
            logger.warning(
                f"{flag} {split} overlaps --train-split {config.train_split} "
                f"({plural(shared, 'example')} in both): its accuracy will be optimistic"
            )


#: The Keras backends train.py trains on: those with a training loop in `bnzoo.training_loop`,
#: a way to run it on several devices (tf.distribute, keras.distribution) and a SavedModel
#: export. bnzoo's layers, models and `.keras` files work on every Keras backend.
TRAINING_BACKENDS = ("tensorflow", "jax")


def check_backend() -> None:
    """Refuses a Keras backend that train.py cannot train on, before any work is done.

    Raises:
        UsageError: the backend (`KERAS_BACKEND`) is not one of `TRAINING_BACKENDS`.
    """
    backend = keras.backend.backend()
    if backend not in TRAINING_BACKENDS:
        raise UsageError(
            f"train.py trains on the {' or '.join(TRAINING_BACKENDS)} Keras backend, not "
            f"{backend!r}: set KERAS_BACKEND=tensorflow (the default) or KERAS_BACKEND=jax "
            f"(bnzoo's layers and models themselves also work on {backend})"
        )


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled copy of `model` with the same weights, for `model.keras`: loading it needs
    bnzoo's layers but not the training code's optimizer and schedule.

    Built from the model's config rather than with `keras.models.clone_model`, which (Keras 3.15)
    also compiles the clone when the original is compiled, and would save its optimizer. BN's
    `synchronized` (set by `--sync-bn`) is a training-time setting that both Keras' layer and
    bnzoo's refuse on JAX; the copy drops it, so model.keras loads on any backend.
    """
    from bnzoo.layers import set_batch_norm_synchronized

    copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    set_batch_norm_synchronized(copy, False)
    return copy


def configure_runtime(config: TrainConfig) -> str:
    """Seeds, op determinism and the mixed-precision policy; returns the policy's name.

    The policy is `bnzoo.precision.resolve_policy`'s: by default mixed precision where the
    hardware computes it natively (mixed_float16 on a GPU, mixed_bfloat16 on a CPU with
    AVX512-BF16 or AMX), float32 elsewhere; variables (BN's moving statistics included) always
    stay float32.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = resolve_policy(config.mixed_precision)
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


@dataclasses.dataclass
class _FolderVerdict:
    """What the chief found in the run folder before training."""

    mode: str  # "new" or "resume"
    state: dict[str, Any] | None
    complete: bool = False


# What the chief tells the other workers before anything else (`share_from_chief`).
_GO, _COMPLETE, _FAILED = 0, 1, 2


def train(config: TrainConfig, *, progress_bar: bool | None = None) -> RunResult:
    """Run (or resume, extend, or finish) the training run described by `config`.

    Everything that can fail on bad user input (options, model, dataset, splits, input size,
    batch size, memory) is checked before the run folder is touched, and a run that fails or is
    interrupted before its first epoch is committed is removed again: a mistake never leaves a
    half-made run that the corrected command would refuse as "a different run".

    With `--distribute multi_worker` every worker calls this with the same config; worker 0
    (the chief) alone reads and writes the run folder and hands the run's state to the others.

    Args:
        config: the run; `config.output_dir` None means `runs/<date>-<model>-<dataset>`.
        progress_bar: a progress bar per step besides the line per epoch (True) or not
            (False); None shows it when stdout is a terminal.

    Progress (the run folder, a line per epoch, what was written) is logged at INFO and
    warnings at WARNING, by the `bnzoo` loggers: train.py prints them
    (`bnzoo.cli.progress_on_stdout`); other callers see them once they configure logging,
    e.g. `logging.basicConfig(level=logging.INFO, format="%(message)s")`.

    Returns:
        A `RunResult`; `metrics` holds the test split's metrics (also in metrics.json; None on
        workers other than the chief).

    Raises:
        UsageError (a ValueError): a bad option or model argument.
        ValueError / FileNotFoundError: bad data or run folder, not enough memory, divergence.
        ConnectionError: another worker of a multi-worker run stopped.
        KeyboardInterrupt: SIGINT or SIGTERM (`bnzoo.cli.Terminated`), re-raised with a message
            that says how to continue.
    """
    from bnzoo.distribution import plan_distribution, start_distribution

    check_backend()
    config.validate()
    check_model_options(config)
    if config.output_dir is None:
        config.output_dir = default_output_dir(config)
    # The derived options' values (learning rate, weight decay, splits), which the run reads
    # throughout; config.yaml still tells them from the chosen ones.
    config = config.resolved()
    paths = RunPaths(config.output_dir)
    plan = plan_distribution(config.distribute)

    verdict = folder_error = None
    if plan.is_chief:
        try:
            verdict = _inspect_run_folder(config, paths)
        except (ValueError, OSError) as error:
            if plan.num_workers == 1:
                raise
            # The other workers wait for the chief's word; it must still give it.
            folder_error = error
        if verdict is not None and verdict.complete and plan.num_workers == 1:
            return _report_complete(config, paths, verdict)
        if verdict is not None and verdict.mode == "new":
            check_weights_source(config)
        for warning in config.ignored_settings():
            logger.warning(warning)

    from bnzoo.data import naming_undecodable_images

    # Only the chief writes the run folder, so only the chief removes what a run that never
    # committed an epoch left there; and only once it has judged the folder to be this run's.
    owns_folder = verdict is not None
    existed = os.path.exists(paths.run_dir)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        with (
            naming_undecodable_images(),
            start_distribution(
                plan,
                collective_timeout=config.collective_timeout,
                # Workers started with other options would fail later as "another worker
                # stopped answering": they compare these first and say which option differs.
                identity=config.identity(),
            ) as cluster,
        ):
            return _run(config, paths, cluster, verdict, folder_error, progress_bar)
    except KeyboardInterrupt as interrupt:
        discarded = owns_folder and discard_unstarted_run(paths, remove_folder=not existed)
        stop = type(interrupt)(
            _interruption_message(interrupt, config, paths, plan, owns_folder, discarded)
        )
        # JAX's exit handler waits (5 minutes) at a shutdown barrier for the other processes,
        # which wait for this one in their next collective: both would hang, then abort. Ended
        # at once, this process is gone for the others as after kill -9 (docs/distributed.md).
        setattr(stop, EXIT_AT_ONCE, plan.backend == "jax" and plan.num_workers > 1)
        raise stop from None
    except BaseException as error:
        if owns_folder and discard_unstarted_run(paths, remove_folder=not existed):
            logger.info(f"removed {paths.run_dir}: the run stopped before finishing an epoch")
        if isinstance(error, Exception):
            _raise_if_worker_lost(error, plan)
        raise
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _inspect_run_folder(config: TrainConfig, paths: RunPaths) -> _FolderVerdict:
    mode = check_run_folder(paths.run_dir, config)
    state = read_resume_state(paths, config.resume_from) if mode == "resume" else None
    complete = is_complete(paths, config, state)
    if mode == "resume" and not complete:
        saved_epochs = load_config(paths.run_dir).epochs
        if saved_epochs != config.epochs:
            logger.info(
                f"{paths.run_dir}: --epochs {saved_epochs} -> {config.epochs}; the learning-rate "
                f"schedule from here on is the {config.epochs}-epoch one"
            )
    return _FolderVerdict(mode, state, complete)


def _report_complete(config: TrainConfig, paths: RunPaths, verdict: _FolderVerdict) -> RunResult:
    state = verdict.state
    metrics = _read_json(paths.metrics) if config.test_split else None
    summary = f"; test accuracy {metrics['accuracy']:.2%}" if metrics else ""
    logger.info(
        f"{paths.run_dir} is already complete ({plural(state['epoch'], 'epoch')}{summary}); "
        "raise --epochs to train it further, or pass --overwrite to train it again"
    )
    return RunResult(paths.run_dir, state["epoch"], state["epoch"], True, metrics)


def _interruption_message(
    interrupt: KeyboardInterrupt,
    config: TrainConfig,
    paths: RunPaths,
    plan,
    owns_folder: bool,
    discarded: bool,
) -> str:
    """What SIGINT/SIGTERM left and how to continue: the chief knows the run folder; another
    worker of a multi-worker run only knows that the chief keeps the committed epochs."""
    how = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
    rerun = (
        "rerunning the same command"
        if plan.num_workers == 1
        else ("restarting every worker with the same command")
    )
    if not owns_folder:
        if plan.is_chief:  # the chief had refused the folder: nothing of it was touched
            return f"{how} before the run started"
        return f"{how}; {rerun} resumes after the last epoch that worker 0 committed"
    try:
        epochs = 0 if discarded else committed_epochs(paths)
    except ValueError:
        epochs = 0
    if not epochs:
        return (
            f"{how} before the first epoch finished; nothing was kept, so {rerun} starts the "
            "run again"
        )
    return (
        f"{how}; {paths.run_dir} holds {epochs} of {plural(config.epochs, 'epoch')}: {rerun} "
        "resumes from there"
    )


def _raise_if_worker_lost(error: BaseException, plan) -> None:
    """Turn the runtime's report of a lost worker into one line (a ConnectionError)."""
    from bnzoo.distribution import describe_collective_failure

    if plan.num_workers == 1 or isinstance(error, (ValueError, OSError)):
        return
    message = describe_collective_failure(error, plan)
    if message is not None:
        raise ConnectionError(message) from error


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def _agree_with_chief(cluster, verdict, folder_error, config, paths) -> RunResult | None:
    """Multi-worker: the chief says whether to train, and the others follow. Returns a result
    when the run is already complete."""
    from bnzoo.distribution import share_from_chief

    if cluster.num_workers == 1:
        return None
    if cluster.is_chief:
        code = _FAILED if folder_error is not None else (_COMPLETE if verdict.complete else _GO)
        epoch = verdict.state["epoch"] if verdict is not None and verdict.state else 0
    else:
        code = epoch = 0
    code, epoch = (int(value) for value in share_from_chief(cluster, [code, epoch]))
    if folder_error is not None:
        raise folder_error
    if code == _FAILED:
        raise ValueError(
            f"worker 0 (the chief) could not start the run in {paths.run_dir}; its output says "
            "why: fix that and restart every worker"
        )
    if code == _COMPLETE:
        if cluster.is_chief:
            return _report_complete(config, paths, verdict)
        logger.info(
            f"{paths.run_dir} is already complete ({plural(epoch, 'epoch')}), says worker 0"
        )
        return RunResult(paths.run_dir, epoch, epoch, True, None)
    return None


def _run(
    config: TrainConfig,
    paths: RunPaths,
    cluster,
    verdict: _FolderVerdict | None,
    folder_error: BaseException | None,
    progress_bar: bool | None,
) -> RunResult:
    from bnzoo import models
    from bnzoo.data import load_dataset
    from bnzoo.distribution import broadcast_variables_from_chief, share_from_chief
    from bnzoo.layers import set_batch_norm_synchronized
    from bnzoo.training_data import RunInputs

    policy = configure_runtime(config)
    finished = _agree_with_chief(cluster, verdict, folder_error, config, paths)
    if finished is not None:
        return finished
    data_kwargs = {"data_dir": config.data_dir, "manual_dir": config.manual_dir}

    # 1. Everything a user can get wrong, before any file is written (on every worker).
    spec = models.get_model_spec(config.model)
    train_ds, train_info = load_dataset(config.dataset, split=config.train_split, **data_kwargs)
    check_training_data(config, train_info)
    val_ds = val_info = test_ds = test_info = None
    if config.val_split:
        val_ds, val_info = load_evaluation_split(config, "--val-split", config.val_split)
    if config.test_split:
        test_ds, test_info = load_evaluation_split(config, "--test-split", config.test_split)
    if cluster.is_chief:  # once per run, like the other warnings
        warn_about_overlapping_splits(config)
    per_replica_batch = cluster.per_replica_batch_size(config.batch_size)
    image_size = resolve_image_size(config, train_info.image_shape, spec.min_input_size)
    height, width = image_size or train_info.image_shape[:2]
    input_shape = (height, width, train_info.image_shape[2])
    # Full batches only: BN's statistics come from the mini-batch, and a ragged last batch of a
    # few examples would give noisy statistics and a noisy moving-average update.
    steps_per_epoch = train_info.num_examples // config.batch_size
    # --weights: read at a fresh start only (a resumed run's checkpoint has the trained weights),
    # by the chief, which hands them to the other workers with the rest of the run's state.
    source = weights_source(config)
    check_channels(config, source, input_shape[2])
    source_model = None
    fresh = source is not None and cluster.is_chief and verdict.mode == "new"
    if fresh:
        # Outside the strategy's scope, like the checkpoint below: these variables are
        # throwaway, and creating them is no collective the other workers would join.
        source_model = load_source_model(config, source, model_arguments(config, input_shape))
    with cluster.scope():
        model = build_model(
            config,
            input_shape,
            train_info.num_classes,
            process_batch_size=per_replica_batch * cluster.local_replicas,
            device_batch_size=per_replica_batch,
            include_preprocessing=include_preprocessing(source, paths.last_checkpoint),
        )
        if config.sync_bn and keras.backend.backend() == "tensorflow":
            set_batch_norm_synchronized(model, True)
    if fresh:
        initialize_from_source(model, source_model, config, source)
        del source_model
    with cluster.scope():
        # Before the optimizer, which is built for the trainable variables (also on resuming:
        # the checkpoint's optimizer holds variables for those alone).
        freeze(model, config)
        # Compiled for the optimizer alone (the loop computes the loss and metrics itself):
        # Keras then wraps it for loss scaling under mixed_float16 and saves it in checkpoints.
        model.compile(optimizer=build_optimizer(config, model, steps_per_epoch))
        # The optimizer's variables must exist before a checkpoint can fill them.
        model.optimizer.build(model.trainable_variables)
    if has_input_convention(model):
        # The model preprocesses RGB in [0, 255] itself: the pipeline (and every export, whose
        # metadata records these) feeds it raw pixel values instead of the dataset's statistics.
        mean, std = raw_pixel_statistics(input_shape[2])
        train_info = dataclasses.replace(train_info, mean=mean, std=std)
    inputs = RunInputs(config, cluster, train_ds, train_info, image_size)
    compute = training_compute(
        models.count_multiply_adds(model),  # static shapes: train.py's inputs have a known size
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.batch_size,
        statistics_batches=statistics_batches_per_epoch(config, steps_per_epoch),
        validation_examples=val_info.num_examples if val_info else 0,
        test_examples=test_info.num_examples if test_info else 0,
    )

    # 2. The run folder (the chief's alone), locked against a second train.py before anything in
    # it is touched.
    with contextlib.ExitStack() as folder_lock:

        def open_run_folder() -> dict[str, Any]:
            try:
                os.makedirs(paths.run_dir, exist_ok=True)
            except OSError as error:
                raise ValueError(
                    f"--output-dir {paths.run_dir}: cannot create it ({error.strerror}); choose "
                    "another folder"
                ) from None
            folder_lock.enter_context(locked_run_folder(paths))
            state = None
            if verdict.mode == "new":
                remove_run_artifacts(paths)
            else:
                remove_temporary_files(paths)
                if config.resume_from == "best":
                    best = read_resume_state(paths, "best")
                    logger.info(
                        f"resuming from {paths.best_checkpoint} (epoch {best['epoch']}), which "
                        f"replaces {paths.last_checkpoint}"
                    )
                    copy_file_atomically(paths.best_checkpoint, paths.last_checkpoint)
                # Read again under the lock: a process that held it may have committed since.
                state = read_checkpoint_state(paths.last_checkpoint)
            # config.yaml first: a kill right after it leaves a folder that resumes. A resumed
            # run rewrites it too, recording a raised --epochs and where the data is now.
            save_config(config, paths.run_dir, resumed=verdict.mode == "resume")
            os.makedirs(paths.checkpoints, exist_ok=True)
            if state is not None:
                # Outside the strategy's scope: loading creates throwaway Keras objects (an
                # optimizer), and under MultiWorkerMirroredStrategy creating a variable is a
                # collective that the other workers, which do not load, would never join.
                model.load_weights(paths.last_checkpoint)
                repair_best_checkpoint(paths, state)
            else:
                state = new_training_state()
            write_history_csv(paths.history, state["history"])
            return state

        state = _on_chief(cluster, open_run_folder)
        initial_epoch = state["epoch"] if state is not None else 0
        if cluster.num_workers > 1:
            # The others take the chief's weights, optimizer state and epoch: they need neither
            # the checkpoint nor a shared file system.
            (initial_epoch,) = (int(v) for v in share_from_chief(cluster, [initial_epoch]))
            broadcast_variables_from_chief(cluster, model.variables + model.optimizer.variables)

        shape_note = describe_image_shape(train_info.image_shape)
        if image_size:
            shape_note += f" -> {height}x{width}x{train_info.image_shape[2]}"
        if initial_epoch:
            logger.info(f"resuming {paths.run_dir} after epoch {initial_epoch} of {config.epochs}")
        elif cluster.is_chief:
            logger.info(f"run folder: {paths.run_dir}")
        device = "GPU" if has_gpu() else "CPU"
        logger.info(
            f"training {config.model} ({model.count_params():,} parameters, normalization "
            f"{config.normalization}, {policy}, {device}) on {config.dataset} {config.train_split} "
            f"({plural(train_info.num_examples, 'example')}, {shape_note}): "
            f"{plural(config.epochs, 'epoch')} of {plural(steps_per_epoch, 'step')}; "
            f"{describe_evaluation_splits(config)}; "
            f"{cluster.describe(config.batch_size, config.sync_bn)}"
        )

        # 3. Train the remaining epochs.
        if initial_epoch < config.epochs:
            if progress_bar is None:
                progress_bar = sys.stdout.isatty()
            state = _train_epochs(
                model,
                cluster,
                inputs,
                val_ds,
                val_info,
                state,
                initial_epoch,
                steps_per_epoch,
                paths,
                progress_bar,
                compute,
            )

        # 4. Final artifacts, each written atomically by the chief; rerunning redoes all of them.
        # The other workers wait for it, so that all of them end together (a worker that left
        # early would look like a crashed one to the chief's runtime).
        def write_artifacts():
            with cluster.host_local():
                try:
                    return write_final_artifacts(
                        model,
                        paths,
                        config,
                        train_info,
                        image_size,
                        test_ds,
                        state["history"],
                        compute=compute,
                    )
                except OSError as error:
                    if not is_disk_full(error):
                        raise
                    raise OSError(
                        errno.ENOSPC,
                        f"{error.strerror or error}: the {plural(config.epochs, 'epoch')} are "
                        f"committed in {paths.last_checkpoint}; free some space, then rerun the "
                        "same command to write the final files",
                    ) from None

        metrics = _on_chief(cluster, write_artifacts)
        return RunResult(paths.run_dir, config.epochs, initial_epoch, False, metrics)


def _on_chief(cluster, work: Callable[[], Any]) -> Any:
    """`work()` on the chief, then every worker learns whether it succeeded (a barrier).

    A failure on the chief alone (a locked run folder, a full disk, an export error) then stops
    every worker promptly with an error, instead of leaving them waiting in their next
    collective for a chief that is gone. Returns `work()`'s result on the chief, else None.
    """
    from bnzoo.distribution import share_from_chief

    result = error = None
    if cluster.is_chief:
        try:
            result = work()
        except BaseException as caught:  # re-raised below, after telling the others
            error = caught
    failed = error is not None
    if cluster.num_workers > 1:
        (failed,) = (bool(value) for value in share_from_chief(cluster, [error is not None]))
    if error is not None:
        raise error
    if failed:
        raise ValueError(
            "worker 0 (the chief) stopped with an error, which its output shows; fix it and "
            "restart every worker with the same command to resume after the last finished epoch"
        )
    return result


def _train_epochs(
    model: keras.Model,
    cluster,
    inputs,
    val_ds,
    val_info,
    state: dict[str, Any] | None,
    initial_epoch: int,
    steps_per_epoch: int,
    paths: RunPaths,
    progress_bar: bool,
    compute: TrainingCompute,
) -> dict[str, Any] | None:
    """Epochs `initial_epoch + 1 ... config.epochs`: train, recompute BN's population statistics,
    validate, then (the chief) commit. Returns the committed state (None on other workers)."""
    from bnzoo.distribution import average_replica_local_variables
    from bnzoo.training_loop import make_training_loop

    config = inputs.config
    loop = make_training_loop(
        model,
        cluster,
        build_loss(config, reduction=None),
        config.batch_size,
        num_classes=inputs.train_info.num_classes,
        learning_rate_schedule=build_schedule(config, steps_per_epoch),
    )
    make_val_batches = inputs.evaluation_batches(val_ds, val_info) if val_ds is not None else None
    # Only the chief writes: checkpoints (which commit first, so TensorBoard never shows an
    # epoch that a kill then made the rerun train again) and TensorBoard scalars. Every worker
    # prints its epoch lines.
    checkpoint = chief_callbacks = None
    if cluster.is_chief:
        checkpoint = RunCheckpoint(
            paths, state, monitor="val_accuracy" if val_ds is not None else "accuracy"
        )
        chief_callbacks = [checkpoint, TensorBoardScalars(paths.logs)]
    # The epoch line also follows a progress bar: it carries the validation numbers.
    worker_callbacks = [EpochSummary(config.epochs)]
    callbacks: list[keras.callbacks.Callback] = [*(chief_callbacks or []), *worker_callbacks]
    for callback in callbacks:
        callback.set_model(model)
    try:
        for epoch in range(initial_epoch, config.epochs):
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            on_step = _progress_bar(epoch, config.epochs, steps_per_epoch) if progress_bar else None
            logs = loop.train_epoch(
                inputs.training_batches(epoch, steps_per_epoch), steps_per_epoch, on_step
            )
            if not math.isfinite(logs["loss"]):
                # The `epoch` epochs before this one are committed; with none, the chief
                # removes the run folder again (`discard_unstarted_run`).
                raise ValueError(
                    f"training diverged: the loss was not finite in epoch {epoch + 1}; lower "
                    f"--lr (now {config.lr:g}) or add --warmup-epochs"
                    + (f". The run folder keeps the last finite epoch ({epoch})" if epoch else "")
                )
            average_replica_local_variables(cluster, model)
            if config.bn_statistics == "population":
                # Algorithm 2 before validating: the numbers that pick best.keras are those of
                # the statistics that every saved model carries.
                start = time.perf_counter()
                batches = inputs.statistics_batches(
                    epoch, min(config.bn_statistics_batches, steps_per_epoch)
                )
                with cluster.scope():
                    if _statistics_pass(cluster, model, batches, config, steps_per_epoch):
                        logs["bn_statistics_seconds"] = round(time.perf_counter() - start, 3)
            if make_val_batches is not None:
                for key, value in loop.evaluate(make_val_batches).items():
                    logs[f"val_{key}"] = value
            # Computed on every worker: on JAX the schedule's step is a multi-process array.
            logs["learning_rate"] = current_learning_rate(model.optimizer)
            logs["training_multiply_adds"] = compute.training_multiply_adds(epoch + 1)

            def commit(epoch=epoch, logs=logs):
                with cluster.host_local():
                    for callback in chief_callbacks:
                        callback.on_epoch_end(epoch, logs)
                return checkpoint.state

            committed = _on_chief(cluster, commit)
            if cluster.is_chief:
                state = committed
            for callback in worker_callbacks:
                callback.on_epoch_end(epoch, logs)
    finally:
        for callback in callbacks:
            callback.on_train_end()
    return state


def _statistics_pass(cluster, model: keras.Model, batches, config, steps_per_epoch: int) -> int:
    """`layers.recompute_population_statistics` as a wait for the other workers: the pass runs
    its batches inside one call, so each batch may wait --collective-timeout."""
    from bnzoo.layers import recompute_population_statistics

    count = min(config.bn_statistics_batches, steps_per_epoch)
    with cluster.waiting_for_workers("the BN statistics pass", cluster.collective_timeout * count):
        return recompute_population_statistics(model, batches)


def _progress_bar(epoch: int, epochs: int, steps: int):
    bar = keras.utils.Progbar(steps, stateful_metrics=["loss", "accuracy", "top5_accuracy"])
    # Keras' bar writes to the terminal itself, not through logging; its header goes with it.
    print(f"Epoch {epoch + 1}/{epochs}", flush=True)

    def update(step: int, logs: dict[str, float]) -> None:
        bar.update(step + 1, values=list(logs.items()))

    return update


def write_final_artifacts(
    model: keras.Model,
    paths: RunPaths,
    config: TrainConfig,
    train_info,
    image_size: tuple[int, int] | None,
    test_ds,
    history: list[dict[str, Any]],
    compute: TrainingCompute | None = None,
) -> dict[str, Any] | None:
    """model.keras, saved_model/, metrics.json (when there is a test split) and the curves.

    The test split is evaluated through the serving function that the SavedModel wraps, so
    metrics.json describes exactly what the export serves; with `compute`, it also records the
    run's multiply-adds (`training_compute`), which the last lines print. Returns the test
    metrics.
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
            logger.info(
                f"removed {path}, made from the previous model: rerun python -m bnzoo.export"
            )
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
                **({"training_compute": compute.as_dict()} if compute else {}),
            },
        )
        evaluation.save_metrics_json(metrics, paths.metrics)
        top5 = f", top-5 {metrics['top5_accuracy']:.2%}" if "top5_accuracy" in metrics else ""
        logger.info(
            f"test accuracy {metrics['accuracy']:.2%}{top5}, loss {metrics['loss']:.4f} on "
            f"{plural(metrics['num_examples'], 'example')} -> {paths.metrics}"
        )
    try:
        plotting.plot_training_curves(history, paths.curves)
    except ImportError as error:
        logger.info(f"skipping {paths.curves}: {error}")
    logger.info(f"saved {paths.model} and {paths.saved_model}")
    if compute is not None:
        logger.info(compute.describe())
    return metrics


def planned_training_compute(config: TrainConfig) -> TrainingCompute:
    """The compute of the run `config` describes, without training: the model is built (not
    trained) and the splits' sizes are read from the dataset's metadata.

    `train.py` prints the same figure at the end of the run; this answers before it, e.g. to
    check that a recipe stays within a budget.
    """
    from bnzoo import models
    from bnzoo.data import load_dataset

    config = config.resolved()
    data = {"data_dir": config.data_dir, "manual_dir": config.manual_dir}
    _, train_info = load_dataset(config.dataset, split=config.train_split, **data)
    sizes = {}
    for split in (config.val_split, config.test_split):
        if split:
            sizes[split] = load_dataset(config.dataset, split=split, **data)[1].num_examples
    image_size = resolve_image_size(
        config, train_info.image_shape, models.get_model_spec(config.model).min_input_size
    )
    height, width = image_size or train_info.image_shape[:2]
    model = build_model(config, (height, width, train_info.image_shape[2]), train_info.num_classes)
    steps_per_epoch = train_info.num_examples // config.batch_size
    return training_compute(
        models.count_multiply_adds(model),
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.batch_size,
        statistics_batches=statistics_batches_per_epoch(config, steps_per_epoch),
        validation_examples=sizes.get(config.val_split, 0),
        test_examples=sizes.get(config.test_split, 0),
    )
