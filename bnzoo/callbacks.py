"""Keras callbacks of a training run: the per-epoch commit, TensorBoard scalars, epoch lines."""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import keras

from bnzoo.atomic_files import copy_file_atomically, is_disk_full
from bnzoo.optimization import current_learning_rate
from bnzoo.run_folder import (
    HISTORY_COLUMNS,
    STATE_FORMAT,
    RunPaths,
    save_checkpoint,
    write_history_csv,
)
from bnzoo.signals import interruptions_deferred

logger = logging.getLogger(__name__)


def _learning_rate(model: keras.Model, logs: dict | None) -> float:
    """The epoch's final learning rate: from `logs` when the loop put it there (it must be
    computed on every worker of a multi-process JAX run), else from the optimizer."""
    if logs and "learning_rate" in logs:
        return float(logs["learning_rate"])
    return current_learning_rate(model.optimizer)


class RunCheckpoint(keras.callbacks.Callback):
    """Commits each finished epoch: `checkpoints/last.keras` (with the epoch counter and
    history inside), then `best.keras` when the monitored metric improved, then `history.csv`.

    The order matters for crash safety: last.keras is the commit; best.keras is a copy of it
    and is repaired on resume when a kill fell between the two (the state names the best
    epoch); history.csv is derived from the committed rows. The training loop never hands it an
    epoch whose loss is not finite (it stops the run first).

    A full disk is reported with the file that could not be written and the epoch the run
    folder still holds.
    """

    def __init__(self, paths: RunPaths, state: dict[str, Any], monitor: str):
        super().__init__()
        self.paths = paths
        self.state = state
        self.monitor = monitor
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        row: dict[str, Any] = {"epoch": epoch + 1}
        for key in HISTORY_COLUMNS[1:]:
            if key in logs:
                row[key] = float(logs[key])
        row["learning_rate"] = _learning_rate(self.model, logs)
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
        # One commit: a Ctrl-C or SIGTERM during it waits for best.keras and history.csv too.
        previous = self.state["epoch"]
        with interruptions_deferred():
            try:
                save_checkpoint(self.model, self.paths.last_checkpoint, state)
                self.state = state
                if improved:
                    copy_file_atomically(self.paths.last_checkpoint, self.paths.best_checkpoint)
                write_history_csv(self.paths.history, state["history"])
            except OSError as error:
                if not is_disk_full(error):
                    raise
                raise OSError(errno.ENOSPC, self._disk_full(error, epoch + 1, previous)) from None

    def _disk_full(self, error: OSError, epoch: int, previous: int) -> str:
        committed = self.state["epoch"] == epoch
        if committed:
            kept = f"epoch {epoch} is committed in {self.paths.last_checkpoint}"
        elif previous:
            kept = (
                f"epoch {epoch} was not saved; {self.paths.last_checkpoint} still holds epoch "
                f"{previous}"
            )
        else:
            kept = f"epoch {epoch} was not saved and no epoch was committed yet"
        resume = "; free some space, then rerun the same command to resume"
        return f"{error.strerror or error}: {kept}{resume if previous or committed else ''}"


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
            if key in ("learning_rate", "bn_statistics_seconds"):
                continue
            if key.startswith("val_"):
                self._write("validation", f"epoch_{key[4:]}", float(value), epoch + 1)
            else:
                self._write("train", f"epoch_{key}", float(value), epoch + 1)
        self._write("train", "epoch_learning_rate", _learning_rate(self.model, logs), epoch + 1)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class EpochSummary(keras.callbacks.Callback):
    """One line per epoch (logged at INFO), for logs and pipes where Keras' progress bar would
    be noise."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        parts.append(f"lr {_learning_rate(self.model, logs):.4g}")
        parts.append(f"{time.perf_counter() - self._start:.1f}s")
        logger.info("  ".join(parts))
