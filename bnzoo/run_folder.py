"""The run folder: the name of every artifact, its lock, checkpoints with their training state,
`history.csv`, and whether a folder holds this run.

A run folder (`runs/<date>-<model>-<dataset>/` by default) holds::

    config.yaml            the chosen options and every value the run used (bnzoo.config)
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

`RunPaths` is the one place these names are spelled, so bnzoo knows exactly which files are its
own: `--overwrite` removes those and nothing else, and a folder that holds no bnzoo run is never
touched.

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
import fnmatch
import io
import json
import logging
import math
import os
import zipfile
from typing import TYPE_CHECKING, Any

from bnzoo.atomic_files import (
    atomic_write_text,
    copy_file_atomically,
    remove_entry,
    replaced_atomically,
    temporary_target,
)
from bnzoo.config import (
    CONFIG_FILENAME,
    MAX_EPOCHS,
    TrainConfig,
    config_differences,
    is_run_config,
    load_config,
)

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

#: The member of a checkpoint's `.keras` archive that holds the training state.
STATE_MEMBER = "bnzoo_training_state.json"
#: 2: the optimizer holds its learning rate as a plain variable, set from the schedule by the
#: training loop (format 1 serialized bnzoo's schedule inside the optimizer).
STATE_FORMAT = 2
#: A training state is ~200 bytes per epoch; a larger member is not one of ours.
MAX_STATE_BYTES = 64 * 1024 * 1024

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

LOCK_FILENAME = ".lock"
#: What TensorFlow's summary writer names its event files in logs/train and logs/validation.
EVENT_FILE_PATTERN = "events.out.tfevents.*"
#: What a SavedModel export writes (Keras' ExportArchive, then bnzoo's assets.extra/bnzoo.json).
SAVED_MODEL_FILES = ("saved_model.pb", "fingerprint.pb", "keras_metadata.pb")
SAVED_MODEL_VARIABLE_PATTERNS = ("variables.index", "variables.data-*-of-*")
SAVED_MODEL_METADATA = os.path.join("assets.extra", "bnzoo.json")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives: the one owner of the run folder's file names."""

    run_dir: str

    def _path(self, *names: str) -> str:
        return os.path.join(self.run_dir, *names)

    @property
    def config(self) -> str:
        return self._path(CONFIG_FILENAME)

    @property
    def history(self) -> str:
        return self._path("history.csv")

    @property
    def logs(self) -> str:
        return self._path("logs")

    @property
    def log_folders(self) -> list[str]:
        """The TensorBoard writers' folders under `logs`."""
        return [os.path.join(self.logs, name) for name in ("train", "validation")]

    @property
    def checkpoints(self) -> str:
        return self._path("checkpoints")

    @property
    def last_checkpoint(self) -> str:
        return os.path.join(self.checkpoints, "last.keras")

    @property
    def best_checkpoint(self) -> str:
        return os.path.join(self.checkpoints, "best.keras")

    def checkpoint(self, which: str) -> str:
        """`last` or `best` (`--resume-from`)."""
        return self.best_checkpoint if which == "best" else self.last_checkpoint

    @property
    def model(self) -> str:
        return self._path("model.keras")

    @property
    def saved_model(self) -> str:
        return self._path("saved_model")

    @property
    def metrics(self) -> str:
        return self._path("metrics.json")

    @property
    def curves(self) -> str:
        return self._path("training_curves.png")

    @property
    def tflite_model(self) -> str:
        """float32 TFLite model, written by `python -m bnzoo.export` from model.keras."""
        return self._path("model.tflite")

    @property
    def tflite_int8_model(self) -> str:
        """int8 TFLite model, written by `python -m bnzoo.export` from model.keras."""
        return self._path("model_int8.tflite")

    @property
    def tflite_models(self) -> list[str]:
        return [self.tflite_model, self.tflite_int8_model]

    @property
    def lock(self) -> str:
        return self._path(LOCK_FILENAME)

    def files(self) -> list[str]:
        """The run's files outside its folders (logs/, checkpoints/, saved_model/)."""
        return [
            self.config,
            self.history,
            self.model,
            self.metrics,
            self.curves,
            *self.tflite_models,
        ]

    def final_artifacts(self, config: TrainConfig) -> list[str]:
        """The artifacts whose presence (with all epochs checkpointed) marks a complete run."""
        paths = [self.history, self.model, os.path.join(self.saved_model, "saved_model.pb")]
        if config.resolved().test_split:
            paths.append(self.metrics)
        return paths

    def results(self) -> list[str]:
        """What a run that got somewhere leaves: committed epochs, history rows, a trained
        model or test metrics. A folder with any of these is never replaced without
        `--overwrite`."""
        found = [
            path
            for path in (self.last_checkpoint, self.best_checkpoint, self.model, self.metrics)
            if os.path.lexists(path)
        ]
        if _has_rows(self.history):
            found.append(self.history)
        return found


def _has_rows(path: str) -> bool:
    """Whether a history.csv has a row below its header (read only that far)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return bool(stream.readline(65536)) and bool(stream.readline(65536).strip())
    except OSError:
        return False


# --- Removing the run's own files -----------------------------------------------------------------


def _remove_matching(folder: str, patterns: tuple[str, ...]) -> None:
    """Remove `folder`'s entries named like `patterns`, then `folder` if that emptied it."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return
    for name in os.listdir(folder):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            remove_entry(os.path.join(folder, name))
    with contextlib.suppress(OSError):  # not empty: the user's files stay, and so does it
        os.rmdir(folder)


def remove_temporary_files(paths: RunPaths) -> None:
    """Delete what a killed bnzoo process left half-written: entries whose name follows
    `bnzoo.atomic_files`' temporary scheme *for one of the run's own artifacts* (never a
    committed artifact, never a user's file that merely contains `.tmp-`)."""
    own = {
        paths.run_dir: {os.path.basename(path) for path in [*paths.files(), paths.saved_model]},
        paths.checkpoints: {
            os.path.basename(paths.last_checkpoint),
            os.path.basename(paths.best_checkpoint),
        },
    }
    for folder, targets in own.items():
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        for name in os.listdir(folder):
            if temporary_target(name) in targets:
                remove_entry(os.path.join(folder, name))


def remove_run_artifacts(paths: RunPaths) -> None:
    """`--overwrite`, or a run that never finished an epoch: remove what a bnzoo run writes,
    by name, and the run's folders when that empties them; any other file stays."""
    remove_temporary_files(paths)
    for path in paths.files():
        with contextlib.suppress(FileNotFoundError):
            if not os.path.isdir(path) or os.path.islink(path):
                os.remove(path)
    _remove_matching(
        paths.checkpoints,
        (os.path.basename(paths.last_checkpoint), os.path.basename(paths.best_checkpoint)),
    )
    for folder in paths.log_folders:
        _remove_matching(folder, (EVENT_FILE_PATTERN,))
    _remove_matching(paths.logs, ())
    saved_model = paths.saved_model
    _remove_matching(os.path.join(saved_model, "variables"), SAVED_MODEL_VARIABLE_PATTERNS)
    _remove_matching(os.path.join(saved_model, os.path.dirname(SAVED_MODEL_METADATA)), ("*.json",))
    _remove_matching(os.path.join(saved_model, "assets"), ())
    _remove_matching(saved_model, SAVED_MODEL_FILES)


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
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(paths.lock, flags, 0o666)
    except OSError as error:
        raise ValueError(
            f"{paths.lock}: cannot open the run folder's lock file ({error.strerror}); "
            "choose another --output-dir"
        ) from None
    with open(fd, "a") as stream:
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


# --- Checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(model: keras.Model, path: str, state: dict[str, Any]) -> None:
    """Save the model with its optimizer and `state` (epoch, history, best) as one `.keras` file,
    atomically: a reader sees the previous checkpoint or this one, never a mix."""
    with replaced_atomically(path) as tmp:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(STATE_MEMBER, json.dumps(state, indent=1))


def new_training_state() -> dict[str, Any]:
    """The state of a run before its first epoch."""
    return {"format": STATE_FORMAT, "epoch": 0, "history": [], "best": None}


def read_checkpoint_state(path: str) -> dict[str, Any] | None:
    """The training state stored in checkpoint `path`, checked (`check_training_state`), or
    None when there is no checkpoint.

    Raises:
        ValueError: not a readable bnzoo checkpoint, or a state that is not one bnzoo wrote;
            one line naming the file and the key.
    """
    if not os.path.lexists(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo(STATE_MEMBER)
            if member.file_size > MAX_STATE_BYTES:
                raise ValueError(f"its {STATE_MEMBER} is {member.file_size:,} bytes")
            state = json.loads(archive.read(member))
    except KeyError:
        raise ValueError(f"{path} is not a readable bnzoo checkpoint (no {STATE_MEMBER})") from None
    except (
        zipfile.BadZipFile,
        ValueError,  # json's errors, UnicodeDecodeError, ours above
        OSError,
        EOFError,
        NotImplementedError,  # an unsupported compression method
        RecursionError,
    ) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ValueError(f"{path} is not a readable bnzoo checkpoint ({reason})") from None
    return check_training_state(state, f"{path} ({STATE_MEMBER})")


def _is_count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_EPOCHS


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training_state(state: Any, source: str) -> dict[str, Any]:
    """`state` if it is a training state as `bnzoo.callbacks.RunCheckpoint` writes it: `format`,
    `epoch` (committed epochs), `history` (one row per epoch, `epoch` 1, 2, ... and numbers) and
    `best` (null, or the monitored metric's best value and its epoch).

    Checked before any work starts: a state that fails only when the first epoch commits would
    lose that epoch's work.

    Raises:
        ValueError: `{source}: <key> ...`, naming the key.
    """

    def fail(message: str) -> None:
        raise ValueError(f"{source}: {message}; the checkpoint is damaged or not bnzoo's")

    if not isinstance(state, dict):
        fail(f"the training state must be a JSON object, got a {type(state).__name__}")
    if state.get("format") == 1:
        raise ValueError(
            f"{source}: a checkpoint of an earlier bnzoo (format 1) whose optimizer holds a "
            "learning-rate schedule this version does not restore; finish the run with the "
            "version that started it, or train it again in a new --output-dir"
        )
    if state.get("format") != STATE_FORMAT:
        fail(f"format must be {STATE_FORMAT}, got {state.get('format')!r}")
    for key in ("epoch", "history", "best"):
        if key not in state:
            fail(f"{key} is missing")
    epoch = state["epoch"]
    if not _is_count(epoch):
        fail(f"epoch must be a count of epochs, got {epoch!r}")
    history = state["history"]
    if not isinstance(history, list) or len(history) != epoch:
        fail(f"history must be a list of one row per epoch ({epoch}), got {_short(history)}")
    for number, row in enumerate(history, start=1):
        if not isinstance(row, dict) or row.get("epoch") != number:
            fail(f"history row {number} must be a mapping with epoch: {number}, got {_short(row)}")
        for key, value in row.items():
            if key not in HISTORY_COLUMNS or not (key == "epoch" or _is_finite(value)):
                fail(f"history row {number}: {key!r}: {_short(value)} is not a history value")
    best = state["best"]
    if best is not None and not (
        isinstance(best, dict)
        and isinstance(best.get("monitor"), str)
        and _is_finite(best.get("value"))
        and _is_count(best.get("epoch"), low=1)
        and best["epoch"] <= epoch
    ):
        fail(
            f"best must be null or {{monitor, value, epoch}} of a trained epoch, got {_short(best)}"
        )
    return state


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    try:
        best_state = read_checkpoint_state(paths.best_checkpoint)
    except ValueError:  # damaged: last.keras holds the best epoch, so the copy repairs it
        best_state = None
    if best_state is None or best_state["epoch"] != best["epoch"]:
        copy_file_atomically(paths.last_checkpoint, paths.best_checkpoint)


def is_complete(paths: RunPaths, config: TrainConfig, state: dict[str, Any] | None) -> bool:
    return (
        state is not None
        and state["epoch"] >= config.epochs
        and all(os.path.exists(path) for path in paths.final_artifacts(config))
    )


def committed_epochs(paths: RunPaths, which: str = "last") -> int:
    """Epochs committed in the run folder's `which` checkpoint (0 without one)."""
    state = read_checkpoint_state(paths.checkpoint(which))
    return 0 if state is None else int(state["epoch"])


def read_resume_state(paths: RunPaths, which: str = "last") -> dict[str, Any] | None:
    """The state of the checkpoint a run resumes from (`--resume-from`), or None without one.

    Raises:
        ValueError: the checkpoint is damaged (or, with `best`, missing). When last.keras is
            damaged but best.keras is intact, the message offers `--resume-from best` rather
            than `--overwrite`, which would delete best.keras too.
    """
    path = paths.checkpoint(which)
    if which == "best" and not os.path.lexists(path):
        raise ValueError(
            f"--resume-from best: {paths.run_dir} has no {path} to resume from; leave "
            "--resume-from out to resume from the last checkpoint"
        )
    try:
        return read_checkpoint_state(path)
    except ValueError as error:
        if which == "best":
            raise
        try:
            best = read_checkpoint_state(paths.best_checkpoint)
        except ValueError:
            best = None
        if best is not None:
            raise ValueError(
                f"{error}; {paths.best_checkpoint} is intact (epoch {best['epoch']}): rerun with "
                "--resume-from best to continue from it (the epochs after it are trained again)"
            ) from None
        raise ValueError(
            f"{error}; no intact checkpoint is left to resume from: pass --overwrite to start "
            "the run over"
        ) from None


def check_run_folder(
    run_dir: str | os.PathLike,
    config: TrainConfig,
) -> str:
    """Decide what to do with `run_dir` for `config`.

    - A missing or empty folder: a new run.
    - A folder that holds no bnzoo run (no config.yaml written by train.py): refused, with or
      without `--overwrite` (which only ever replaces a bnzoo run's own files).
    - A bnzoo run and `config.overwrite`: a new run (the caller removes the old run's files).
    - The same run: resume it. `--epochs` may differ: raising it extends a run, finished or
      not, and the remaining epochs follow the schedule of the new `--epochs` (a cosine schedule
      is stretched to end at the new last epoch, so the rate rises from where the shorter
      schedule ended and anneals to 0 again; constant and exponential schedules just go on).
      Lowering it below the epochs already trained is refused.
    - A different run that left no results (no checkpoint, history row, model.keras or
      metrics.json: it was killed in its first epoch): there is nothing to lose, so it is
      replaced, saying so (logged).

    "The same run" compares the values the runs use (`TrainConfig.identity`): the saved run's
    `resolved:` values with this config's, so a default derived differently (another
    optimizer's learning rate) makes a different run even when no option names it.

    Returns:
        "new" (the caller clears the folder's artifacts) or "resume".

    Raises:
        ValueError: the folder holds files that are not a bnzoo run, a different run with
            results, a run whose checkpoint is missing or damaged, or more epochs than
            `config.epochs`; one line that says what to do.
    """
    run_dir = os.fspath(run_dir)
    paths = RunPaths(run_dir)

    def new() -> str:
        if config.resume_from == "best":
            raise ValueError(
                f"--resume-from best: {run_dir} holds no run of these options to resume; drop "
                "--resume-from to start one"
            )
        return "new"

    if not os.path.lexists(run_dir):
        _check_creatable(run_dir)
        return new()
    if not os.path.isdir(run_dir):
        raise ValueError(f"--output-dir {run_dir} is a file, not a folder; choose another path")
    # `.lock` is the lock file of `locked_run_folder`; alone, it means a run killed at birth.
    if not [name for name in os.listdir(run_dir) if name != LOCK_FILENAME]:
        return new()
    if not is_run_config(paths.config):
        raise ValueError(
            f"--output-dir {run_dir} is not empty and holds no bnzoo run (no {CONFIG_FILENAME} "
            "written by train.py), so nothing in it is replaced, with --overwrite or without: "
            "choose another --output-dir"
        )
    if config.overwrite:
        return new()
    saved = load_config(run_dir)
    state = read_resume_state(paths, config.resume_from)
    epochs = 0 if state is None else int(state["epoch"])
    results = paths.results()
    differences = [
        difference
        for difference in config_differences(saved, config)
        if not difference.startswith("epochs:")
    ]
    if differences and not results:
        logger.info(
            f"replacing {run_dir}: it holds a different run ({'; '.join(differences)}) "
            "that never finished an epoch"
        )
        return new()
    if differences:
        raise ValueError(
            f"{run_dir} holds a different run ({'; '.join(differences)}); pass --overwrite to "
            "replace it or choose another --output-dir"
        )
    if state is None and results:
        lost = ", ".join(os.path.relpath(path, run_dir) for path in results)
        raise ValueError(
            f"{run_dir} holds this run's results ({lost}) but no checkpoint to resume from "
            f"({os.path.relpath(paths.last_checkpoint, run_dir)} is missing); pass --overwrite "
            "to train it again or choose another --output-dir"
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
    """Remove what a run wrote if it left no results; returns whether it did.

    Called when a run fails or is interrupted: without a committed epoch there is nothing to
    resume, and the leftover config.yaml would make the corrected command fail as "a different
    run". Nothing happens while another process holds the folder's lock, or once the folder
    holds results (`RunPaths.results`: a committed epoch, a history row, a model, metrics).
    `remove_folder` also removes the folder itself when it is then empty (the run created it).
    """
    if not os.path.isdir(paths.run_dir):
        return False
    try:
        with locked_run_folder(paths):
            if paths.results():
                return False
            remove_run_artifacts(paths)
            with contextlib.suppress(FileNotFoundError):
                os.remove(paths.lock)
    except ValueError:  # in use by another train.py
        return False
    if remove_folder:
        with contextlib.suppress(OSError):
            os.rmdir(paths.run_dir)
    return True
