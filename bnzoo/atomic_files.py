"""Files that a crash cannot leave half-written and that a planted link cannot redirect.

Every file and folder bnzoo writes goes through `replaced_atomically`: the content is written
under a fresh temporary name beside the target, then moved over it with `os.replace`, which is
atomic on POSIX, so a reader (or a resumed run) sees either the previous file or the new one,
never a mix.

The temporary is *created* here, exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`, or `mkdir` for a
folder), under a name with a random part: in a shared or world-writable folder, a symlink planted
at a predictable name such as `metrics.json.tmp-<pid>` would otherwise make bnzoo write through
it into any file the user can write. The writer then fills the file that already exists.

Temporary names follow one scheme, `<stem>.tmp-<pid>-<12 hex digits><suffixes>` beside the
target `<stem><suffixes>` (the suffixes are kept, because Keras and matplotlib pick the format
from them: `last.tmp-4242-0123456789ab.keras`), and `<stem>.old-<pid>-<hex><suffixes>` for a
folder moved aside while its replacement moves in. `temporary_target` recognizes exactly that
scheme, so a run folder's clean-up (`bnzoo.run_folder`) deletes only what a killed bnzoo process
left, never a user's file that merely has `.tmp-` in its name.

No TensorFlow or Keras import here: `bnzoo.config` writes `config.yaml` with it, and the command
line is checked before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bnzoo.signals import interruptions_deferred

if TYPE_CHECKING:
    import keras

_TOKEN_HEX_DIGITS = 12
_TEMPORARY_NAME = re.compile(
    rf"^(?P<stem>\.?[^.]+)\.(?:tmp|old)-[0-9]+-[0-9a-f]{{{_TOKEN_HEX_DIGITS}}}(?P<suffixes>\..+)?$"
)
# Where the platform has it, a temporary's name never resolves through a symlink.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _split_name(name: str) -> tuple[str, str]:
    """`last.keras` -> (`last`, `.keras`); `x.weights.h5` -> (`x`, `.weights.h5`); a leading dot
    belongs to the stem."""
    dot = name.find(".", 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot:])


def temporary_target(name: str) -> str | None:
    """The file name a bnzoo temporary named `name` was made for, or None when `name` does not
    follow the scheme (see the module docstring)."""
    match = _TEMPORARY_NAME.match(name)
    if match is None:
        return None
    return match["stem"] + (match["suffixes"] or "")


def _new_name(path: str, kind: str) -> str:
    folder, name = os.path.split(path)
    stem, suffixes = _split_name(name)
    token = secrets.token_hex(_TOKEN_HEX_DIGITS // 2)
    return os.path.join(folder, f"{stem}.{kind}-{os.getpid()}-{token}{suffixes}")


def _create_exclusively(path: str, kind: str, folder: bool) -> str:
    """A new, empty file or folder beside `path` under a fresh temporary name; never an existing
    entry, never through a link."""
    for _ in range(100):
        candidate = _new_name(path, kind)
        try:
            if folder:
                os.mkdir(candidate, 0o777)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
                os.close(os.open(candidate, flags, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"cannot create a temporary file beside {path}")  # pragma: no cover


def remove_entry(path: str) -> None:
    """Remove the file, link or folder (with what it holds) at `path`; a missing one is fine."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike, *, folder: bool = False) -> Iterator[str]:
    """Yield a new, empty temporary file (or, with `folder`, folder) beside `path` for the block
    to write; when the block finishes, the temporary replaces `path` in one rename.

    The block fills the temporary by its name (`model.save(tmp)`, `figure.savefig(tmp)`). If the
    block fails, or a Ctrl-C or SIGTERM arrives, the temporary is deleted and `path` is left as
    it was; a signal waits for the rename (`bnzoo.signals.interruptions_deferred`), so that a
    library writing the file never reports it as its own error. Only a SIGKILL can leave a
    temporary behind, which `temporary_target` recognizes.

    A folder replaces a previous folder at `path` by moving it aside first (`<stem>.old-...`):
    a kill between the two renames leaves no `path`, which the run folder treats as "export
    again", never a half-written folder.

    Raises:
        FileExistsError: with `folder`, `path` exists and is not a folder.
    """
    path = os.fspath(path)
    if folder and (os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path))):
        raise FileExistsError(
            f"{path} exists and is not a folder; remove it or choose another path"
        )
    tmp = _create_exclusively(path, "tmp", folder)
    try:
        with interruptions_deferred():  # a signal waits for the rename (bnzoo.signals)
            yield tmp
            if folder:
                _fsync_tree(tmp)
                _replace_folder(tmp, path)
            else:
                fsync_file(tmp)
                os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # the error that stopped the write is the one to see
            remove_entry(tmp)
        if isinstance(error, OSError) and is_disk_full(error):
            raise OSError(errno.ENOSPC, f"no space left on device writing {path}") from None
        raise
    fsync_directory(os.path.dirname(path) or os.curdir)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk is full (h5py's own errors carry no errno, only the text)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def _replace_folder(tmp: str, path: str) -> None:
    old = None
    try:
        if os.path.lexists(path):
            # Renamed over an empty folder made exclusively: no name is ever reused.
            old = _create_exclusively(path, "old", folder=True)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:  # a failure between the renames: put the previous folder back
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    with replaced_atomically(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC)
        with open(fd, "wb") as stream:
            stream.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that a crash leaves either the old file or the new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def copy_file_atomically(source: str, destination: str) -> None:
    """Copy `source` over `destination` so that a crash leaves either file whole."""
    with replaced_atomically(destination) as tmp:
        shutil.copyfile(source, tmp)


def save_model_atomically(model: keras.Model, path: str) -> None:
    """`model.save(path)`, through a temporary file and `os.replace`."""
    with replaced_atomically(path) as tmp:
        model.save(tmp)


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
    """Flush `path`'s content to the disk."""
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_directory(root)
