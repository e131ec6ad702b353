"""Reading and verifying the IDX files of MNIST and Fashion-MNIST.

IDX (LeCun's format for MNIST) is a 4-byte magic number `00 00 TT NN` (TT: element type,
NN: number of dimensions), NN big-endian uint32 sizes, then the elements in C order, big-endian.
MNIST and Fashion-MNIST ship four gzip-compressed IDX files each.

Debian's `dataset-fashion-mnist` package recompresses those files, so their bytes (and TFDS's
registered checksums of the original archives) no longer match although the data is the same.
Instead of archive checksums, `load_idx_dataset` verifies the DECODED content against facts of
the datasets: magic numbers, 28x28 images, 60,000 train / 10,000 test examples, labels in 0-9
and the exact number of examples per class (Fashion-MNIST is balanced: 6,000 / 1,000 per class;
MNIST has its own well-known histogram). A file that passes all of these has the dataset's
structure and class distribution; a truncated download, a mix-up between MNIST and
Fashion-MNIST or a file from another dataset does not.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib

import numpy as np

# IDX element type codes (the third magic byte) and their big-endian NumPy types.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# How to get the files; used in every "missing files" error.
FASHION_MNIST_HINT = (
    "install Debian's package (sudo apt-get install dataset-fashion-mnist, which puts them in "
    "/usr/share/datasets/fashion-mnist) or download the four files from "
    "https://github.com/zalandoresearch/fashion-mnist and pass their folder as --manual-dir"
)
MNIST_HINT = (
    "download the four files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from a MNIST mirror such as "
    "https://storage.googleapis.com/cvdf-datasets/mnist/ and pass their folder as --manual-dir"
)


@dataclasses.dataclass(frozen=True)
class IdxDatasetSpec:
    """The verifiable facts of an IDX image-classification dataset.

    Args:
        name: TFDS name of the dataset the files are prepared into.
        image_size: `(rows, cols)` of every image.
        files: Split name -> (images file, labels file), without the `.gz` suffix; both the
            compressed and the uncompressed name are accepted.
        class_counts: Split name -> number of examples of each class, in label order. The
            split sizes and the label range follow from it.
        default_dirs: Folders searched when no manual_dir is given (e.g. Debian's install
            location).
        hint: How to get the files, for error messages.
    """

    name: str
    image_size: tuple[int, int]
    files: dict[str, tuple[str, str]]
    class_counts: dict[str, tuple[int, ...]]
    default_dirs: tuple[str, ...] = ()
    hint: str = ""

    @property
    def num_classes(self) -> int:
        return len(next(iter(self.class_counts.values())))

    def split_size(self, split: str) -> int:
        return sum(self.class_counts[split])


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IDX_DATASETS: dict[str, IdxDatasetSpec] = {
    "fashion_mnist": IdxDatasetSpec(
        name="fashion_mnist",
        image_size=(28, 28),
        files=_MNIST_FILES,
        class_counts={"train": (6000,) * 10, "test": (1000,) * 10},
        default_dirs=("/usr/share/datasets/fashion-mnist",),
        hint=FASHION_MNIST_HINT,
    ),
    "mnist": IdxDatasetSpec(
        name="mnist",
        image_size=(28, 28),
        files=_MNIST_FILES,
        # MNIST is not balanced; these are its published per-digit counts (digits 0-9).
        class_counts={
            "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
            "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        },
        hint=MNIST_HINT,
    ),
}


#: The largest IDX payload read: 1 GiB, twenty times MNIST's training images (47 MB). The
#: header is read first and its declared size checked against this (or the dataset's exact
#: size) before anything else is read: a gzip file of a few kilobytes can inflate to gigabytes.
MAX_IDX_BYTES = 2**30


def _open_idx(path: str):
    """`path` as a binary stream, gunzipped on the fly when it starts with the gzip magic."""
    stream = open(path, "rb")
    if stream.read(2) == _GZIP_MAGIC:
        stream.seek(0)
        return gzip.GzipFile(fileobj=stream, mode="rb"), stream
    stream.seek(0)
    return stream, stream


def _read_exactly(stream, count: int, path: str) -> bytes:
    try:
        return stream.read(count)
    except (EOFError, OSError, zlib.error) as error:
        # EOFError: truncated stream; BadGzipFile (an OSError) / zlib.error: corrupt stream.
        raise ValueError(
            f"{path}: corrupt or truncated gzip file ({error}); download it again."
        ) from error


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Decodes one IDX file (gzip-compressed or not) into a NumPy array.

    Every structural fact the header states is checked: the magic number, a known element type
    and that the payload holds exactly the number of elements the dimensions promise (a
    truncated or padded file is rejected rather than silently reshaped). The header is read
    first, and a payload larger than `max_bytes` is refused before it is read or inflated.

    Args:
        path: An IDX file, e.g. `train-images-idx3-ubyte.gz`.
        max_bytes: the largest payload accepted.

    Returns:
        An array of the header's shape, in native byte order (uint8 for MNIST files).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not a valid IDX file, or larger than `max_bytes`; the message
            names the file.

    Example:
    >>> images = bnzoo.data.idx.read_idx(
    ...     "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    >>> images.shape, images.dtype
    ((10000, 28, 28), dtype('uint8'))
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    stream, file = _open_idx(path)
    with file, stream:
        magic = _read_exactly(stream, 4, path)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
            raise ValueError(
                f"{path}: not an IDX file (magic number {magic.hex() or 'missing'}, expected "
                "00 00 <type> <ndim> with type one of "
                f"{', '.join(f'{code:02x}' for code in IDX_DTYPES)})."
            )
        dtype = IDX_DTYPES[magic[2]]
        ndim = magic[3]
        sizes = _read_exactly(stream, 4 * ndim, path)
        if len(sizes) < 4 * ndim:
            raise ValueError(
                f"{path}: corrupt or truncated IDX header (magic number {magic.hex()} declares "
                f"{ndim} dimensions, but the file holds only {4 + len(sizes)} bytes); download "
                "it again."
            )
        shape = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4"))
        expected = math.prod(shape) * dtype.itemsize
        if expected > max_bytes:
            raise ValueError(
                f"{path}: IDX header promises shape {shape} ({expected:,} bytes of data), more "
                f"than the {max_bytes:,} bytes expected here; not the dataset's file."
            )
        data = _read_exactly(stream, expected + 1, path)
    if len(data) != expected:
        held = f"{len(data):,} bytes" if len(data) <= expected else "more"
        raise ValueError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes of data) but the file "
            f"holds {held}; it is truncated or corrupt, download it again."
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def find_idx_file(directory: str, filename: str) -> str | None:
    """`directory/filename.gz` or `directory/filename`, whichever exists (gzip preferred)."""
    for candidate in (filename + ".gz", filename):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def missing_idx_files(spec: IdxDatasetSpec, directory: str) -> list[str]:
    """Names of the spec's files that `directory` lacks (empty when all four are there)."""
    return [
        name + ".gz"
        for pair in spec.files.values()
        for name in pair
        if find_idx_file(directory, name) is None
    ]


def locate_idx_dir(spec: IdxDatasetSpec, manual_dir: str | None) -> str:
    """The folder holding the spec's four IDX files.

    `manual_dir` when given (and then it must hold them: a folder the user names is never
    silently replaced by another), else the first of `spec.default_dirs` that holds them.

    Raises:
        FileNotFoundError: no such folder; the message lists what is missing and how to get it.
    """
    if manual_dir is not None:
        manual_dir = os.path.expanduser(os.fspath(manual_dir))
        if not os.path.isdir(manual_dir):
            raise FileNotFoundError(
                f"--manual-dir {manual_dir} does not exist; it should hold the IDX files of "
                f"{spec.name}: {spec.hint}."
            )
        missing = missing_idx_files(spec, manual_dir)
        if missing:
            raise FileNotFoundError(
                f"--manual-dir {manual_dir} lacks {', '.join(missing)} for {spec.name}: "
                f"{spec.hint}."
            )
        return manual_dir
    for directory in spec.default_dirs:
        if os.path.isdir(directory) and not missing_idx_files(spec, directory):
            return directory
    searched = ", ".join(spec.default_dirs) or "no default folder"
    raise FileNotFoundError(
        f"{spec.name} is not prepared and its IDX files were not found (searched: {searched}); "
        f"TFDS cannot download them without network. To get them, {spec.hint}."
    )


def load_idx_dataset(
    spec: IdxDatasetSpec | str, directory: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decodes and verifies a dataset's IDX files.

    Args:
        spec: An `IdxDatasetSpec` or the name of one in `IDX_DATASETS`
            (`"fashion_mnist"`, `"mnist"`).
        directory: Folder holding the four files (gzip-compressed or not).

    Returns:
        Split name -> `(images, labels)`: uint8 `[N, rows, cols, 1]` and int64 `[N]`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is corrupt or does not hold this dataset (wrong magic, shape, count,
            label range or class histogram); the message names the file.

    Example:
    >>> splits = bnzoo.data.idx.load_idx_dataset(
    ...     "fashion_mnist", "/usr/share/datasets/fashion-mnist")
    >>> splits["train"][0].shape
    (60000, 28, 28, 1)
    """
    if isinstance(spec, str):
        spec = IDX_DATASETS[spec]
    missing = missing_idx_files(spec, directory)
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks {', '.join(missing)} for {spec.name}: {spec.hint}."
        )
    result = {}
    for split, (images_name, labels_name) in spec.files.items():
        images_path = find_idx_file(directory, images_name)
        labels_path = find_idx_file(directory, labels_name)
        # The spec gives each file's size: nothing twice as large is read (within that, the
        # verification below says what the file holds instead).
        rows, cols = spec.image_size
        images = read_idx(images_path, max_bytes=2 * spec.split_size(split) * rows * cols)
        labels = read_idx(labels_path, max_bytes=2 * spec.split_size(split))
        _verify_split(spec, split, images, images_path, labels, labels_path)
        result[split] = (images[..., np.newaxis], labels.astype(np.int64))
    return result


def _verify_split(
    spec: IdxDatasetSpec,
    split: str,
    images: np.ndarray,
    images_path: str,
    labels: np.ndarray,
    labels_path: str,
) -> None:
    expected_count = spec.split_size(split)
    expected_image_shape = (expected_count, *spec.image_size)
    if images.dtype != np.uint8 or images.shape != expected_image_shape:
        raise ValueError(
            f"{images_path}: expected {spec.name} {split} images, uint8 of shape "
            f"{expected_image_shape}; found {images.dtype} of shape {images.shape}."
        )
    if labels.dtype != np.uint8 or labels.shape != (expected_count,):
        raise ValueError(
            f"{labels_path}: expected {spec.name} {split} labels, uint8 of shape "
            f"({expected_count},); found {labels.dtype} of shape {labels.shape}."
        )
    if labels.max() >= spec.num_classes:
        raise ValueError(
            f"{labels_path}: label {int(labels.max())} is out of range for {spec.name}'s "
            f"{spec.num_classes} classes."
        )
    counts = tuple(int(c) for c in np.bincount(labels, minlength=spec.num_classes))
    if counts != spec.class_counts[split]:
        raise ValueError(
            f"{labels_path}: examples per class {counts} differ from {spec.name}'s {split} "
            f"split {spec.class_counts[split]}; these are not {spec.name}'s labels."
        )
