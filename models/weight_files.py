"""What a weights file is, checked before h5py, Keras or TensorFlow read it.

A weights file may come from anyone. Without these checks a text file passed as
`weights="x.h5"` fails deep inside h5py with "Unable to synchronously open file (file signature
not found)", which names no file and reads like an architecture mismatch; and an HDF5 file of a
few kilobytes can declare a dataset of gigabytes (chunked, compressed, never written), which
Keras reads whole before it compares the shape with the variable's (measured: a 44 kB
`.weights.h5` declaring 1 GiB grew the process by 4 GiB; Keras' own guard starts at 4 GiB).

`check_weights_file` looks at the file's signature (HDF5, a PyTorch zip or pickle, a TensorFlow
checkpoint's table) and, for HDF5, at every dataset's declared size, in one `ValueError` that
names the file and says what it is instead.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
from typing import IO, Any

#: The 8 bytes an HDF5 file starts with, at offset 0 or, after a user block, at 512, 1024, ...
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The last 8 bytes of a TensorFlow checkpoint's table (`.index`, or a V1 `.ckpt`), little-endian
#: 0xdb4775248b80fb57 (LevelDB's table magic number).
TF_TABLE_MAGIC = bytes.fromhex("57fb808b247547db")
#: How far an HDF5 file's datasets may declare more bytes than the file holds: Keras writes
#: weights uncompressed (1x) and weights compress to ~0.9x, so 16x only refuses files whose
#: datasets are mostly fill value, a few kilobytes claiming gigabytes.
MAX_HDF5_EXPANSION = 16
#: Bytes an HDF5 file may declare whatever its size (small zero-filled variables).
HDF5_DECLARED_FLOOR_BYTES = 16 * 2**20

_PICKLE_PROTOCOLS = (2, 3, 4, 5)


def hdf5_signature_offset(file: IO[bytes], size: int) -> int | None:
    """Where the HDF5 signature is in `file` (0, 512, 1024, ...), or None: not an HDF5 file."""
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= size:
        file.seek(offset)
        if file.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


def _start(path: str, count: int = 16) -> str:
    with open(path, "rb") as stream:
        head = stream.read(count)
    return head.hex() if head else "nothing: the file is empty"


def check_regular_file(path: str, what: str) -> int:
    """The size of `path`, which must be a regular file (a FIFO would block the reader).

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: it is a folder, a FIFO, a device.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from None
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{what} {path!r} is not a regular file (a folder, FIFO or device)")
    return status.st_size


def check_hdf5_file(
    path: str, *, what: str = "weights file", file: IO[bytes] | None = None, size: int = 0
) -> None:
    """That `path` (or the open `file` of `size` bytes, e.g. a zip member) is an HDF5 file
    whose datasets declare no more than `MAX_HDF5_EXPANSION` times its size (beyond
    `HDF5_DECLARED_FLOOR_BYTES`), with no dataset stored in other files and no link to other
    files (an external dataset or link would make h5py read any file on the machine).

    Raises:
        ValueError: naming `path`, `what` it should be, and what is wrong.
    """
    if file is None:
        size = check_regular_file(path, what)
        with open(path, "rb") as stream:
            return check_hdf5_file(path, what=what, file=stream, size=size)
    if hdf5_signature_offset(file, size) is None:
        file.seek(0)
        head = file.read(16).hex() or "nothing: it is empty"
        raise ValueError(
            f"{what} {path!r} is not an HDF5 file (it starts with {head}); Keras' weights "
            "files (.weights.h5, .h5) are HDF5, written by model.save_weights()"
        )
    import h5py

    file.seek(0)
    declared = 0
    limit = max(HDF5_DECLARED_FLOOR_BYTES, MAX_HDF5_EXPANSION * size)
    problems: list[str] = []

    def visit(name: str, link: Any) -> None:
        nonlocal declared
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"{name!r} links to another file ({link.filename!r})")
            return
        target = group.get(name)
        if isinstance(target, h5py.Dataset):
            if target.external or target.is_virtual:
                problems.append(f"dataset {name!r} is stored in other files")
                return
            declared += math.prod(target.shape or ()) * target.dtype.itemsize

    try:
        with h5py.File(file, "r") as group:
            group.visititems_links(visit)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{what} {path!r} is a damaged HDF5 file ({reason})") from None
    if problems:
        raise ValueError(f"{what} {path!r}: {problems[0]}; refusing to read it")
    if declared > limit:
        raise ValueError(
            f"{what} {path!r} declares {declared:,} bytes of data in {size:,} bytes: a crafted "
            "or damaged file (Keras writes weights uncompressed), refused before reading it"
        )


def check_pytorch_file(path: str, what: str = "PyTorch file") -> None:
    """That `path` is in one of `torch.save`'s layouts: a zip archive, or a pickle."""
    check_regular_file(path, what)
    with open(path, "rb") as stream:
        head = stream.read(2)
    if zipfile.is_zipfile(path) or (
        len(head) == 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS
    ):
        return
    raise ValueError(
        f"{what} {path!r} is not a PyTorch file (neither a zip archive nor a pickle: it starts "
        f"with {_start(path)}); pass a state dict written by torch.save(model.state_dict())"
    )


def check_tf_checkpoint(prefix: str, what: str = "TensorFlow checkpoint") -> None:
    """That `prefix` names a TensorFlow checkpoint: its `.index` table (V2), or the single
    table file of a V1 checkpoint, ends with the table magic number."""
    table = prefix + ".index" if os.path.isfile(prefix + ".index") else prefix
    size = check_regular_file(table, what)
    with open(table, "rb") as stream:
        stream.seek(max(0, size - len(TF_TABLE_MAGIC)))
        tail = stream.read()
    if tail != TF_TABLE_MAGIC:
        raise ValueError(
            f"{what} {table!r} is not a TensorFlow checkpoint (no checkpoint table: it starts "
            f"with {_start(table)})"
        )


def check_weights_file(path: str, source_format: str, what: str = "") -> None:
    """That `path` is a file of `source_format` (`"keras"` and `"keras_h5"`: HDF5, `"pytorch"`,
    `"tf_checkpoint"`: a prefix), before a reader that would fail obscurely opens it. `what`
    names the file in messages (default: its kind).

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: it is not such a file, naming it and what it should be.
    """
    if source_format in ("keras", "keras_h5"):
        check_hdf5_file(path, what=what or "weights file")
    elif source_format == "pytorch":
        check_pytorch_file(path, what or "PyTorch file")
    elif source_format == "tf_checkpoint":
        check_tf_checkpoint(path, what or "TensorFlow checkpoint")
    else:
        raise ValueError(f"unknown weights format {source_format!r} for {path!r}")
