"""Files that a crash cannot leave half-written: write under a temporary name, then `os.replace`.

`os.replace` is atomic on POSIX, so a reader (or a resumed run) sees either the previous file or
the new one, never a mix. Temporary names contain `.tmp-<pid>`; `bnzoo.run_folder` deletes what a
killed process left behind.

No TensorFlow or Keras import here: `bnzoo.config` writes `config.yaml` with it, and the command
line is checked before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bnzoo.signals import interruptions_deferred

if TYPE_CHECKING:
    import keras


@contextlib.contextmanager
def removed_unless_renamed(tmp: str) -> Iterator[None]:
    """Delete `tmp` (a file or a folder) when the block does not finish.

    An exception, or a Ctrl-C or SIGTERM that the CLI turns into one, must not leave a
    `.tmp-<pid>` file beside the run's files; only a SIGKILL can, and the next run cleans that
    up."""
    try:
        with interruptions_deferred():  # a signal waits for the rename (bnzoo.signals)
            yield
    except BaseException:
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old file or the new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with removed_unless_renamed(tmp):
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)


def fsync_directory(path: str) -> None:
    """Make a rename in `path` durable across a power cut (a SIGKILL does not need it)."""
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


def fsync_file(path: str) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def save_model_atomically(model: keras.Model, path: str) -> None:
    """`model.save(path)`, through a temporary file and `os.replace`."""
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    with removed_unless_renamed(tmp):
        model.save(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    fsync_directory(os.path.dirname(path) or ".")


def copy_file_atomically(source: str, destination: str) -> None:
    tmp = f"{destination}.tmp-{os.getpid()}"
    with removed_unless_renamed(tmp):
        shutil.copyfile(source, tmp)
        fsync_file(tmp)
        os.replace(tmp, destination)
