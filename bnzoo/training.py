"""Training runs that survive a kill: model/optimizer/schedule/loss from a `TrainConfig`, the run
folder, checkpoints, resume, and the final artifacts.

A run folder (`runs/<date>-<model>-<dataset>/` by default) holds::

    config.yaml            the resolved TrainConfig (bnzoo.config)
    history.csv            one row per finished epoch, `epoch` counted from 1
    logs/                  TensorBoard event files (train/ and validation/)
    checkpoints/last.keras the newest finished epoch: weights, BN moving statistics, optimizer
                           state and, inside the same archive, the epoch counter and history
    checkpoints/best.keras the epoch with the best validation accuracy so far
    model.keras            the trained model (inference copy, no optimizer)
    saved_model/           the serving SavedModel (bnzoo.export)
    metrics.json           the test split's metrics (bnzoo.evaluation's schema)
    training_curves.png    loss, accuracy and learning rate per epoch

Crash safety rests on one rule: every file is written under a temporary name and moved into
place with `os.replace`, which is atomic on POSIX. `checkpoints/last.keras` is the commit point
of an epoch; it carries its own epoch counter and history rows (an extra JSON member of the
`.keras` zip archive, which Keras ignores when loading), so weights and counter can never
disagree. `history.csv` is rewritten from the committed rows after each commit and on resume,
so a SIGKILL at any instant loses at most the epoch in progress and never duplicates a row.

Resuming rebuilds the model and optimizer from the config exactly as a fresh run would (so
settings that Keras does not serialize, such as the weight-decay exclusions, are identical),
then loads the checkpoint's weights and optimizer variables into them, and calls `fit` with
`initial_epoch`. The learning-rate schedule is a function of the optimizer's restored step
counter, so it continues where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import inspect
import io
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from bnzoo.config import (
    CONFIG_FILENAME,
    RESERVED_MODEL_ARGS,
    TrainConfig,
    atomic_write_text,
    check_run_folder,
    default_output_dir,
    save_config,
)

#: The member of a checkpoint's `.keras` archive that holds the training state.
STATE_MEMBER = "bnzoo_training_state.json"
STATE_FORMAT = 1

HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "top5_accuracy",
    "val_loss",
    "val_accuracy",
    "val_top5_accuracy",
    "learning_rate",
    "epoch_seconds",
)

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# --- The run folder ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives."""

    run_dir: str

    @property
    def config(self) -> str:
        return os.path.join(self.run_dir, CONFIG_FILENAME)

    @property
    def history(self) -> str:
        return os.path.join(self.run_dir, "history.csv")

    @property
    def logs(self) -> str:
        return os.path.join(self.run_dir, "logs")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    @property
    def last_checkpoint(self) -> str:
        return os.path.join(self.checkpoints, "last.keras")

    @property
    def best_checkpoint(self) -> str:
        return os.path.join(self.checkpoints, "best.keras")

    @property
    def model(self) -> str:
        return os.path.join(self.run_dir, "model.keras")

    @property
    def saved_model(self) -> str:
        return os.path.join(self.run_dir, "saved_model")

    @property
    def metrics(self) -> str:
        return os.path.join(self.run_dir, "metrics.json")

    @property
    def curves(self) -> str:
        return os.path.join(self.run_dir, "training_curves.png")

    @property
    def tflite_models(self) -> list[str]:
        """Written by `python -m bnzoo.export` from model.keras, not by `train`."""
        from bnzoo.export.tflite import FLOAT_FILENAME, INT8_FILENAME

        return [os.path.join(self.run_dir, name) for name in (FLOAT_FILENAME, INT8_FILENAME)]

    def artifacts(self) -> list[str]:
        """Everything `train` writes; `--overwrite` removes exactly these, nothing else."""
        return [
            self.config,
            self.history,
            self.logs,
            self.checkpoints,
            self.model,
            self.saved_model,
            self.metrics,
            self.curves,
            *self.tflite_models,
        ]

    def final_artifacts(self, config: TrainConfig) -> list[str]:
        """The artifacts whose presence (with all epochs checkpointed) marks a complete run."""
        paths = [self.history, self.model, os.path.join(self.saved_model, "saved_model.pb")]
        if config.test_split:
            paths.append(self.metrics)
        return paths


def _is_temporary(name: str) -> bool:
    return ".tmp-" in name or ".old-" in name


def remove_temporary_files(paths: RunPaths) -> None:
    """Delete what a killed process left half-written (never a committed artifact)."""
    for folder in (paths.run_dir, paths.checkpoints):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if _is_temporary(name):
                target = os.path.join(folder, name)
                if os.path.isdir(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    os.remove(target)


LOCK_FILENAME = ".lock"


@contextlib.contextmanager
def locked_run_folder(paths: RunPaths):
    """Hold an exclusive lock on the run folder while training in it.

    Two processes training into one folder would overwrite each other's checkpoints and delete
    each other's temporary files. `flock` locks belong to the open file, so the kernel releases
    them when the process dies, SIGKILL included: a killed run never leaves a stale lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield
        return
    with open(os.path.join(paths.run_dir, LOCK_FILENAME), "a") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{paths.run_dir} is in use by another train.py process; wait for it to finish "
                "or choose another --output-dir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(stream, fcntl.LOCK_UN)


def remove_run_artifacts(paths: RunPaths) -> None:
    """`--overwrite`: remove the previous run's artifacts, leaving any other file alone."""
    remove_temporary_files(paths)
    for path in paths.artifacts():
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _fsync_directory(path: str) -> None:
    # Makes the rename itself durable across a power cut; a SIGKILL does not need it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def save_model_atomically(model: keras.Model, path: str) -> None:
    """`model.save(path)`, through a temporary file and `os.replace`."""
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(path) or ".")


# --- Checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(model: keras.Model, path: str, state: dict[str, Any]) -> None:
    """Save the model with its optimizer and `state` (epoch, history, best) as one `.keras` file,
    atomically: a reader sees the previous checkpoint or this one, never a mix."""
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    with zipfile.ZipFile(tmp, "a") as archive:
        archive.writestr(STATE_MEMBER, json.dumps(state, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(path))


def read_checkpoint_state(path: str) -> dict[str, Any] | None:
    """The training state stored in checkpoint `path`, or None when there is no checkpoint."""
    if not os.path.exists(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            state = json.loads(archive.read(STATE_MEMBER))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable bnzoo checkpoint ({error}); pass --overwrite to start "
            "the run over"
        ) from None
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
    return state


def copy_file_atomically(source: str, destination: str) -> None:
    tmp = f"{destination}.tmp-{os.getpid()}"
    shutil.copyfile(source, tmp)
    _fsync_file(tmp)
    os.replace(tmp, destination)


def write_history_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """Rewrite `history.csv` with exactly `rows` (atomically), one per epoch."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in HISTORY_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def read_history_csv(path: str) -> list[dict[str, float]]:
    """`history.csv` as a list of rows with floats (`epoch` as int); empty cells are dropped."""
    with open(path, newline="", encoding="utf-8") as stream:
        rows = []
        for raw in csv.DictReader(stream):
            row: dict[str, float] = {}
            for key, value in raw.items():
                if value not in ("", None):
                    row[key] = int(value) if key == "epoch" else float(value)
            rows.append(row)
    return rows


# --- Model, optimizer, schedule, loss ------------------------------------------------------------


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
    schedule = bnzoo.training.WarmupSchedule(0.1, warmup_steps=400, total_steps=5000)
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
    """SGD with momentum, Adam or AdamW on `config`'s schedule, with decoupled weight decay.

    Keras applies `weight_decay` decoupled from the gradient for every optimizer
    (`w -= lr * weight_decay * w`), so `adam` with a weight decay behaves like `adamw`; the two
    names differ in their defaults only. Decay is applied to kernels, not to biases or to BN's
    gamma and beta: shrinking gamma only rescales a normalized activation, which the next layer
    undoes, so decaying it regularizes nothing and fights the normalization.
    """
    schedule = build_schedule(config, steps_per_epoch)
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            schedule, momentum=config.momentum, weight_decay=weight_decay
        )
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule, weight_decay=weight_decay)
    elif config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"--optimizer must be sgd, adam or adamw, got {config.optimizer!r}")
    if weight_decay:
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1]
        )
    return optimizer


def build_loss(config: TrainConfig) -> keras.losses.Loss:
    """Cross-entropy on logits; labels arrive one-hot so that label smoothing is available
    (Keras' sparse cross-entropy has no `label_smoothing`)."""
    return keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=config.label_smoothing
    )


def build_metrics() -> list[keras.metrics.Metric]:
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"),
    ]


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

    `--model-arg` keys are checked against the builder's signature first: a typo would
    otherwise surface as a TypeError from deep inside the builder.
    """
    import models

    spec = models.get_model_spec(config.model)
    parameters = inspect.signature(spec.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    options = sorted(name for name in parameters if name not in RESERVED_MODEL_ARGS)
    for key in config.model_args:
        if not takes_any and key not in parameters:
            close = difflib.get_close_matches(key, options, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"--model-arg {key}=...: {config.model} has no option {key!r}{hint} "
                f"(its options: {', '.join(options)})"
            )
    kwargs = dict(config.model_args)
    kwargs.update(
        input_shape=tuple(input_shape),
        classes=num_classes,
        classifier_activation=None,
        normalization=None if config.normalization == "none" else config.normalization,
    )
    if config.bn_momentum is not None:
        kwargs["bn_momentum"] = config.bn_momentum
    if config.bn_epsilon is not None:
        kwargs["bn_epsilon"] = config.bn_epsilon
    return models.create_model(config.model, **kwargs)


def inference_copy(model: keras.Model) -> keras.Model:
    """An uncompiled copy of `model` with the same weights, for `model.keras`: loading it needs
    bnzoo's layers but not the training code's optimizer and schedule."""
    copy = keras.models.clone_model(model)
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


# --- Callbacks -----------------------------------------------------------------------------------


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    return float(ops.convert_to_numpy(optimizer.learning_rate))


class RunCheckpoint(keras.callbacks.Callback):
    """Commits each finished epoch: `checkpoints/last.keras` (with the epoch counter and
    history inside), then `best.keras` when the monitored metric improved, then `history.csv`.

    The order matters for crash safety: last.keras is the commit; best.keras is a copy of it
    and is repaired on resume when a kill fell between the two (the state names the best
    epoch); history.csv is derived from the committed rows.

    An epoch whose loss is not finite is not committed: training stops and `diverged_epoch`
    says where, so the caller can report it instead of checkpointing NaN weights.
    """

    def __init__(self, paths: RunPaths, state: dict[str, Any], monitor: str):
        super().__init__()
        self.paths = paths
        self.state = state
        self.monitor = monitor
        self.diverged_epoch: int | None = None
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        loss = float(logs.get("loss", math.nan))
        if not math.isfinite(loss):
            self.diverged_epoch = epoch + 1
            self.model.stop_training = True
            return
        row: dict[str, Any] = {"epoch": epoch + 1}
        for key in HISTORY_COLUMNS[1:-2]:
            if key in logs:
                row[key] = float(logs[key])
        row["learning_rate"] = current_learning_rate(self.model.optimizer)
        row["epoch_seconds"] = round(time.perf_counter() - self._epoch_start, 3)

        best = self.state.get("best")
        value = row.get(self.monitor)
        improved = value is not None and (best is None or value > best["value"])
        if improved:
            best = {"monitor": self.monitor, "value": value, "epoch": epoch + 1}
        state = {
            "format": STATE_FORMAT,
            "epoch": epoch + 1,
            "history": [*self.state["history"], row],
            "best": best,
        }
        save_checkpoint(self.model, self.paths.last_checkpoint, state)
        self.state = state
        if improved:
            copy_file_atomically(self.paths.last_checkpoint, self.paths.best_checkpoint)
        write_history_csv(self.paths.history, state["history"])


class TensorBoardScalars(keras.callbacks.Callback):
    """Per-epoch metrics and learning rate as TensorBoard event files in `logs/train` and
    `logs/validation` (tags `epoch_loss`, `epoch_accuracy`, ...), step = epoch counted from 1.

    Keras' TensorBoard callback needs the `tensorboard` package for `tf.summary.scalar`; this
    writes the same scalar summaries through `tf.summary.write`, which is TensorFlow's own, so
    runs log on machines without it (viewing the logs still needs `pip install tensorboard`).
    """

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self._writers: dict[str, Any] = {}

    def _write(self, folder: str, tag: str, value: float, step: int) -> None:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        if folder not in self._writers:
            self._writers[folder] = tf.summary.create_file_writer(
                os.path.join(self.log_dir, folder)
            )
        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        with self._writers[folder].as_default():
            tf.summary.write(
                tag,
                tf.constant(value, tf.float32),
                step=step,
                metadata=metadata.SerializeToString(),
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            if key.startswith("val_"):
                self._write("validation", f"epoch_{key[4:]}", float(value), epoch + 1)
            else:
                self._write("train", f"epoch_{key}", float(value), epoch + 1)
        learning_rate = current_learning_rate(self.model.optimizer)
        self._write("train", "epoch_learning_rate", learning_rate, epoch + 1)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class EpochSummary(keras.callbacks.Callback):
    """One line per epoch, for logs and pipes where Keras' progress bar would be noise."""

    def __init__(self, epochs: int, log: Log = _print):
        super().__init__()
        self.epochs = epochs
        self.log = log
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        parts.append(f"lr {current_learning_rate(self.model.optimizer):.4g}")
        parts.append(f"{time.perf_counter() - self._start:.1f}s")
        self.log("  ".join(parts))


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


def _repair_best_checkpoint(paths: RunPaths, state: dict[str, Any]) -> None:
    """A kill between committing last.keras and copying it to best.keras leaves best.keras one
    improvement behind; the committed state knows, and last.keras holds the right weights."""
    best = state.get("best")
    if not best or best["epoch"] != state["epoch"]:
        return
    best_state = (
        read_checkpoint_state(paths.best_checkpoint)
        if os.path.exists(paths.best_checkpoint)
        else None
    )
    if best_state is None or best_state["epoch"] != best["epoch"]:
        copy_file_atomically(paths.last_checkpoint, paths.best_checkpoint)


def _is_complete(paths: RunPaths, config: TrainConfig, state: dict[str, Any] | None) -> bool:
    return (
        state is not None
        and state["epoch"] >= config.epochs
        and all(os.path.exists(path) for path in paths.final_artifacts(config))
    )


def train(config: TrainConfig, *, log: Log = _print, progress_bar: bool | None = None) -> RunResult:
    """Run (or resume, or finish) the training run described by `config`.

    Everything that can fail on bad user input (dataset, splits, model name, input size, batch
    size) is checked before the run folder is touched, so a typo never leaves a half-made run
    that the corrected command would refuse as "a different run".

    Args:
        config: the run; `config.output_dir` None means `runs/<date>-<model>-<dataset>`.
        log: where progress lines go.
        progress_bar: Keras' progress bar (True) or one line per epoch (False); None picks the
            bar when stdout is a terminal.

    Returns:
        A `RunResult`; `metrics` holds the test split's metrics (also in metrics.json).

    Raises:
        ValueError / FileNotFoundError: bad configuration, data or run folder.
    """
    config.validate()
    if config.output_dir is None:
        config.output_dir = default_output_dir(config)
    paths = RunPaths(config.output_dir)
    mode = check_run_folder(paths.run_dir, config)
    state = read_checkpoint_state(paths.last_checkpoint) if mode == "resume" else None
    if state is not None and state["epoch"] > config.epochs:
        raise ValueError(f"{paths.last_checkpoint} is past epoch {config.epochs}: not this run")
    if _is_complete(paths, config, state):
        metrics = _read_json(paths.metrics) if config.test_split else None
        summary = f"; test accuracy {metrics['accuracy']:.2%}" if metrics else ""
        log(
            f"{paths.run_dir} is already complete ({state['epoch']} "
            f"epoch{'' if state['epoch'] == 1 else 's'}{summary}); "
            "pass --overwrite to train it again"
        )
        return RunResult(paths.run_dir, state["epoch"], state["epoch"], True, metrics)

    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _run(config, paths, mode, state, log, progress_bar)
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
    val_ds = val_info = test_ds = None
    if config.val_split:
        val_ds, val_info = load_dataset(config.dataset, split=config.val_split, **data_kwargs)
    if config.test_split:
        test_ds, _ = load_dataset(config.dataset, split=config.test_split, **data_kwargs)
    if train_info.num_examples < config.batch_size:
        raise ValueError(
            f"--train-split {config.train_split} has {train_info.num_examples} examples, fewer "
            f"than --batch-size {config.batch_size}; lower --batch-size or use a larger split"
        )
    image_size = resolve_image_size(config, train_info.image_shape, spec.min_input_size)
    height, width = image_size or train_info.image_shape[:2]
    input_shape = (height, width, train_info.image_shape[2])
    model = build_model(config, input_shape, train_info.num_classes)

    # Full batches only: BN's statistics come from the mini-batch, and a ragged last batch of a
    # few examples would give noisy statistics and a noisy moving-average update.
    steps_per_epoch = train_info.num_examples // config.batch_size
    optimizer = build_optimizer(config, model, steps_per_epoch)
    model.compile(optimizer=optimizer, loss=build_loss(config), metrics=build_metrics())

    # 2. The run folder, locked against a second train.py before anything in it is touched.
    os.makedirs(paths.run_dir, exist_ok=True)
    with locked_run_folder(paths):
        if mode == "new":
            remove_run_artifacts(paths)
            # config.yaml first: a kill right after it leaves a folder that resumes.
            save_config(config, paths.run_dir)
        else:
            remove_temporary_files(paths)
            # Read again under the lock: a process that held it may have committed since.
            state = read_checkpoint_state(paths.last_checkpoint)
        os.makedirs(paths.checkpoints, exist_ok=True)

        initial_epoch = 0
        if state is not None:
            # The optimizer's variables must exist before load_weights can fill them.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(paths.last_checkpoint)
            initial_epoch = state["epoch"]
            _repair_best_checkpoint(paths, state)
        else:
            state = {"format": STATE_FORMAT, "epoch": 0, "history": [], "best": None}
        write_history_csv(paths.history, state["history"])

        shape_note = "x".join(map(str, train_info.image_shape))
        if image_size:
            shape_note += f" -> {height}x{width}"
        if initial_epoch:
            log(f"resuming {paths.run_dir} after epoch {initial_epoch} of {config.epochs}")
        else:
            log(f"run folder: {paths.run_dir}")
        device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        log(
            f"training {config.model} ({model.count_params():,} parameters, normalization "
            f"{config.normalization}, {policy}, {device}) on {config.dataset} {config.train_split} "
            f"({train_info.num_examples} examples, {shape_note}): {config.epochs} epochs of "
            f"{steps_per_epoch} steps"
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
                raise ValueError(
                    "training diverged: the loss was not finite in epoch "
                    f"{checkpoint.diverged_epoch}; lower --lr (now {config.lr}) or add "
                    "--warmup-epochs. The run folder keeps the last finite epoch "
                    f"({checkpoint.state['epoch']})"
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
        log(
            f"test accuracy {metrics['accuracy']:.2%}, top-5 {metrics['top5_accuracy']:.2%}, "
            f"loss {metrics['loss']:.4f} on {metrics['num_examples']} examples "
            f"-> {paths.metrics}"
        )
    try:
        plotting.plot_training_curves(history, paths.curves)
    except ImportError as error:
        log(f"skipping {paths.curves}: {error}")
    log(f"saved {paths.model} and {paths.saved_model}")
    return metrics
