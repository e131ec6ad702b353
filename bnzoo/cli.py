"""Shared command-line plumbing for `train.py` and `evaluate.py`.

A user who mistypes a model name or points at a missing file should read one line that names the
bad value and the fix, not a 40-frame TensorFlow traceback. `run_cli` draws that line between
*user errors* (`ValueError`, `FileNotFoundError` and the other `OSError`s about paths, YAML syntax
errors, argument errors) and *bugs* (everything else), which keep their traceback. `--debug`
shows the traceback for user errors too.

Exit statuses, the same for every script:

- 0: success (including "this run is already complete").
- 2: the command line is wrong by itself: an unknown option, model or `--model-arg`, a value of
  the wrong type or outside its range, options that contradict each other, a `--config` file
  that is not valid YAML or sets an option twice. Nothing was written.
- 1: the command is well formed but fails when it runs: a dataset, split, file or folder that
  cannot be found or read, a run folder that holds another run, an input too large for memory,
  a run that diverged.
- 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM; the message says how to continue.

Progress is logging: bnzoo's modules log to `logging.getLogger(__name__)` (all under the
`bnzoo` logger) and configure nothing, so code that imports bnzoo decides what it sees;
`run_cli` shows the records as the scripts' lines on stdout (`progress_on_stdout`). Errors are
not logged: `run_cli` prints them, one line on stderr.

This module must stay importable without TensorFlow: argument errors are reported before the
scripts import anything heavy, so `train.py --batch-size 0` answers in well under a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from bnzoo.signals import Terminated, signals_raise_interruptions

# TensorFlow prints C++ start-up chatter (oneDNN, CUDA probing) on stderr when it is imported.
# The scripts import this module first, so setting the level here keeps stderr to the one line
# the user needs. An explicit setting by the user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Exit status for a bad command line or configuration (argparse's convention).
EXIT_USAGE = 2
#: Exit status for any other error the user can fix (missing data, a path that is not a model).
EXIT_USER_ERROR = 1
#: Exit status after Ctrl-C, as a shell reports a SIGINT-terminated process.
EXIT_INTERRUPTED = 130
#: Exit status after SIGTERM (128 + 15), as a shell reports a SIGTERM-terminated process.
EXIT_TERMINATED = 143

#: The exit-status rule in one paragraph, for the scripts' --help.
EXIT_STATUS_HELP = (
    "Exit status: 0 on success; 2 when the command line itself is wrong (unknown option, model "
    "or --model-arg, a value out of range, contradicting options, a bad --config file); 1 when "
    "a well-formed command fails at run time (missing or unreadable data, a folder holding "
    "another run, not enough memory, divergence); 130/143 after SIGINT/SIGTERM."
)


class UsageError(ValueError):
    """A bad command line or config file: argparse's error, raised instead of printed."""


#: An interruption with this attribute set to True ends the process right after its message,
#: without Python's exit handlers: for a process whose runtime cannot shut down cleanly once it
#: left its peers (a JAX multi-process run, `bnzoo.training.train`).
EXIT_AT_ONCE = "exit_at_once"


def interrupted_status(error: KeyboardInterrupt) -> int:
    """130 after SIGINT, 143 after SIGTERM."""
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


def check_output_file(path: str, flag: str) -> None:
    """Fail now, not after minutes of work, when `path` cannot be written.

    Raises:
        UsageError: the path is empty.
        FileNotFoundError: its folder does not exist.
        ValueError: it is a folder, or its folder is not writable.
    """
    if not path.strip():
        raise UsageError(f"{flag} must name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name inside it")
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{flag} {path}: folder {folder} does not exist; create it first or choose another path"
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: folder {folder} is not writable")


@contextlib.contextmanager
def silenced_native_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null while the block runs.

    For native code that logs on stderr where Python cannot intercept it: TensorFlow's start-up
    chatter, or libjpeg's "Premature end of JPEG data" when bnzoo decodes a suspect image only
    to learn whether it is broken. A Python exception raised inside still reaches the caller.
    """
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up logging silenced.

    TensorFlow 2.21's native libraries log through absl before absl is initialized, which
    ignores `TF_CPP_MIN_LOG_LEVEL` and prints "oneDNN custom operations are on" and CUDA-probe
    lines on stderr. Between them and a one-line error message, the user reads the wrong line.
    File descriptor 2 is pointed at /dev/null for the import only; a Python exception raised
    by the import still reaches the caller (and its message the terminal) after it is restored.
    """
    if "tensorflow" in sys.modules:
        return
    with silenced_native_stderr():
        import tensorflow

        # Listing the GPUs initializes the device platforms, which logs a CUDA-probe error on
        # machines with a CUDA build of TensorFlow but no GPU; train.py reports the device.
        tensorflow.config.list_physical_devices("GPU")
    # TFDS reports through absl's Python logger at WARNING, e.g. "Variant folder ... has no
    # dataset_info.json" while it probes a dataset that is not prepared yet; the CLI says what
    # matters itself, in one line.
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


#: The logger above every bnzoo module's own (`logging.getLogger(__name__)`).
LOGGER_NAME = "bnzoo"


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler that writes to `sys.stdout` as it is when a record comes, not as it was
    when the handler was made: a script's redirection, or pytest's capture, then holds it."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ sets it; stdout it stays


class _ProgressLines(logging.Formatter):
    """The message alone, as the scripts have always printed it; a warning says so first."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"warning: {line}" if record.levelno >= logging.WARNING else line


@contextlib.contextmanager
def progress_on_stdout() -> Iterator[None]:
    """bnzoo's log records at INFO and above as lines on stdout while the block runs.

    The scripts' progress lines (the run folder, one line per epoch, what was written) are
    records of bnzoo's loggers; this is how `run_cli` shows them: each record one line, the
    message alone (`warning: ` before a warning), flushed at once so that a pipe or a log file
    follows a run as it goes. The records stop there: a library that logs through the root
    logger's module functions (`logging.warning(...)`) gives the root a stderr handler, which
    would repeat every line on stderr, where the scripts write one error line. The handler,
    the level and the propagation are restored on exit.
    """
    logger = logging.getLogger(LOGGER_NAME)
    handler = _CurrentStdout()
    handler.setFormatter(_ProgressLines("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, OSError]
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - pyyaml is a hard dependency
        pass
    return tuple(types)


def one_line(error: BaseException) -> str:
    """`error`'s message on a single line (multi-line messages are joined with spaces)."""
    message = " ".join(str(error).split())
    if isinstance(error, OSError) and not message and error.filename:
        message = f"{error.strerror or 'cannot open'}: {error.filename}"
    return message or type(error).__name__


def run_cli(
    main: Callable[[Sequence[str] | None], int | None],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
) -> int:
    """Run `main(argv)` and turn user errors into one line on stderr and an exit status.

    Args:
        main: the script's entry point; it receives `argv` and returns an exit status (or None
            for success).
        argv: the arguments without the program name; `None` reads `sys.argv[1:]`.
        prog: the name in front of error messages; defaults to the script's file name.

    Returns:
        The exit status: `main`'s, 0 for `None`, `EXIT_USAGE` for argument errors,
        `EXIT_USER_ERROR` for other user errors, `EXIT_INTERRUPTED` after Ctrl-C and
        `EXIT_TERMINATED` after SIGTERM (see the module docstring). An interruption's message
        is the exception's, when `main` gave it one (train.py says how to resume).

    bnzoo's progress lines (its log records at INFO and above) go to stdout meanwhile
    (`progress_on_stdout`). A `--debug` anywhere in `argv` re-raises user errors with their
    traceback, for bug reports.

    Example:

    ```python
    # train.py
    import sys
    from bnzoo.cli import run_cli

    if __name__ == "__main__":
        sys.exit(run_cli(main))
    ```
    """
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0]) or "bnzoo"
    debug = "--debug" in args
    try:
        with signals_raise_interruptions(), progress_on_stdout():
            status = main(args)
    except KeyboardInterrupt as error:
        default = "terminated" if isinstance(error, Terminated) else "interrupted"
        print(f"{prog}: {one_line(error) if str(error) else default}", file=sys.stderr)
        if getattr(error, EXIT_AT_ONCE, False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(interrupted_status(error))
        return interrupted_status(error)
    except _user_error_types() as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_USER_ERROR
    return 0 if status is None else int(status)
