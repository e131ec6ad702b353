"""Shared command-line plumbing for `train.py` and `evaluate.py`.

A user who mistypes a model name or points at a missing file should read one line that names the
bad value and the fix, not a 40-frame TensorFlow traceback. `run_cli` draws that line between
*user errors* (`ValueError`, `FileNotFoundError` and the other `OSError`s about paths, YAML syntax
errors, argument errors) and *bugs* (everything else), which keep their traceback. `--debug`
shows the traceback for user errors too.

This module must stay importable without TensorFlow: argument errors are reported before the
scripts import anything heavy, so `train.py --batch-size 0` answers in well under a second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

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


class UsageError(ValueError):
    """A bad command line or config file: argparse's error, raised instead of printed."""


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
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow

        # Listing the GPUs initializes the device platforms, which logs a CUDA-probe error on
        # machines with a CUDA build of TensorFlow but no GPU; train.py reports the device.
        tensorflow.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(devnull)
    # TFDS reports through absl's Python logger at WARNING, e.g. "Variant folder ... has no
    # dataset_info.json" while it probes a dataset that is not prepared yet; the CLI says what
    # matters itself, in one line.
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


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
        `EXIT_USER_ERROR` for other user errors, `EXIT_INTERRUPTED` after Ctrl-C.

    A `--debug` anywhere in `argv` re-raises user errors with their traceback, for bug reports.

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
        status = main(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_error_types() as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_USER_ERROR
    return 0 if status is None else int(status)
