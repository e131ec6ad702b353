"""The run folder: where each artifact lives, its lock, checkpoints with their training state,
`history.csv`, and whether a folder holds this run.

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
    model.tflite           float32 and int8 TFLite models, written on request by
    model_int8.tflite      `python -m bnzoo.export` (bnzoo.export.tflite)

Crash safety rests on one rule: every file is written under a temporary name and moved into
place with `os.replace` (`bnzoo.atomic_files`). `checkpoints/last.keras` is the commit point of an
epoch; it carries its own epoch counter and history rows (an extra JSON member of the `.keras`
zip archive, which Keras ignores when loading), so weights and counter can never disagree.
`history.csv` is rewritten from the committed rows after each commit and on resume, so a SIGKILL
at any instant loses at most the epoch in progress and never duplicates a row.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bnzoo.atomic_files import (
    atomic_write_text,
    copy_file_atomically,
    fsync_directory,
    fsync_file,
    removed_unless_renamed,
)
from bnzoo.config import CONFIG_FILENAME, TrainConfig, config_differences, load_config

if TYPE_CHECKING:
    import keras

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
    "bn_statistics_seconds",
    "training_multiply_adds",  # cumulative, forward + backward (bnzoo.training_compute)
)


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


# --- Checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(model: keras.Model, path: str, state: dict[str, Any]) -> None:
    """Save the model with its optimizer and `state` (epoch, history, best) as one `.keras` file,
    atomically: a reader sees the previous checkpoint or this one, never a mix."""
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    with removed_unless_renamed(tmp):
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(STATE_MEMBER, json.dumps(state, indent=1))
        fsync_file(tmp)
        os.replace(tmp, path)
    fsync_directory(os.path.dirname(path))


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


def repair_best_checkpoint(paths: RunPaths, state: dict[str, Any]) -> None:
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


def is_complete(paths: RunPaths, config: TrainConfig, state: dict[str, Any] | None) -> bool:
    return (
        state is not None
        and state["epoch"] >= config.epochs
        and all(os.path.exists(path) for path in paths.final_artifacts(config))
    )


def committed_epochs(paths: RunPaths) -> int:
    """Epochs committed in the run folder (0 without a checkpoint)."""
    state = read_checkpoint_state(paths.last_checkpoint)
    return 0 if state is None else int(state["epoch"])


def check_run_folder(
    run_dir: str | os.PathLike,
    config: TrainConfig,
    log: Callable[[str], None] | None = None,
) -> str:
    """Decide what to do with `run_dir` for `config`.

    - A missing or empty folder (or `config.overwrite`): a new run.
    - The same run: resume it. `--epochs` may differ: raising it extends a run, finished or
      not, and the remaining epochs follow the schedule of the new `--epochs` (a cosine schedule
      is stretched to end at the new last epoch, so the rate rises from where the shorter
      schedule ended and anneals to 0 again; constant and exponential schedules just go on).
      Lowering it below the epochs already trained is refused.
    - A different run that never finished an epoch (killed in its first): there is nothing to
      lose, so it is replaced, and `log` says so.

    Returns:
        "new" (the caller clears the folder's artifacts) or "resume".

    Raises:
        ValueError: the folder holds a different run with trained epochs, files that are not a
            bnzoo run, or more epochs than `config.epochs`, and `config.overwrite` is not set.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.exists(run_dir):
        _check_creatable(run_dir)
        return "new"
    if not os.path.isdir(run_dir):
        raise ValueError(f"--output-dir {run_dir} is a file, not a folder; choose another path")
    if config.overwrite:
        return "new"
    if not os.path.exists(os.path.join(run_dir, CONFIG_FILENAME)):
        # `.lock` is the lock file of `locked_run_folder`; alone, it means a run killed at birth.
        if [name for name in os.listdir(run_dir) if name != LOCK_FILENAME]:
            raise ValueError(
                f"--output-dir {run_dir} is not empty and holds no bnzoo run (no "
                f"{CONFIG_FILENAME}); choose another --output-dir or pass --overwrite"
            )
        return "new"
    saved = load_config(run_dir)
    epochs = committed_epochs(RunPaths(run_dir))
    differences = [
        difference
        for difference in config_differences(saved, config)
        if not difference.startswith("epochs:")
    ]
    if differences and epochs == 0:
        if log is not None:
            log(
                f"replacing {run_dir}: it holds a different run ({'; '.join(differences)}) "
                "that never finished an epoch"
            )
        return "new"
    if differences:
        raise ValueError(
            f"{run_dir} holds a different run ({'; '.join(differences)}); pass --overwrite to "
            "replace it or choose another --output-dir"
        )
    if config.epochs < epochs:
        raise ValueError(
            f"{run_dir} has already trained {epochs} epochs, more than --epochs "
            f"{config.epochs}; use --epochs {epochs} or more to keep them, or pass --overwrite "
            "to start over"
        )
    return "resume"


def _check_creatable(run_dir: str) -> None:
    """Refuse, before any data is loaded, a run folder that cannot be created: one inside a
    file, or under a folder this process cannot write to."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"--output-dir {run_dir}: {parent} is a file, not a folder; choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"--output-dir {run_dir}: cannot create it, {parent} is not writable; choose another "
            "path"
        )


def discard_unstarted_run(paths: RunPaths, remove_folder: bool) -> bool:
    """Remove what a run wrote if it never committed an epoch; returns whether it did.

    Called when a run fails or is interrupted: without a committed epoch there is nothing to
    resume, and the leftover config.yaml would make the corrected command fail as "a different
    run". Nothing happens while another process holds the folder's lock, or once an epoch is
    committed. `remove_folder` also removes the folder itself when it is then empty (the run
    created it).
    """
    if not os.path.isdir(paths.run_dir):
        return False
    try:
        with locked_run_folder(paths):
            try:
                if committed_epochs(paths) > 0:
                    return False
            except ValueError:  # an unreadable checkpoint is not ours to judge
                return False
            remove_run_artifacts(paths)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(paths.run_dir, LOCK_FILENAME))
    except ValueError:  # in use by another train.py
        return False
    if remove_folder:
        with contextlib.suppress(OSError):
            os.rmdir(paths.run_dir)
    return True
