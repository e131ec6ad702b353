"""Users' own images as a dataset: one sub-folder per class.

    my_images/
      cat/  001.jpg 002.png ...
      dog/  a.bmp b.gif ...

Class names are the sorted sub-folder names (label i is the i-th name). Images are found
recursively inside each class folder by extension (.jpg, .jpeg, .png, .bmp, .gif, any case);
other files are ignored. The folder is one split, `train`, sliced with TFDS split syntax
(`train[:90%]`, `train[90%:]`, `train[:512]`, `train[:10%]+train[-10%:]`). Slices are taken from
one fixed, class-stratified order (`stratified_order`, seeded with `FILE_ORDER_SEED`), so the
same expression selects the same files on every machine: `train[:80%]`, `train[80%:90%]` and
`train[90%:]` (train.py's defaults for image folders) are a stratified train/validation/test
partition, each class within one image of its 80/10/10 % share, and any other slice mixes the
classes in roughly their shares.

Sizes and channels are read from each file's header, and the end of each file is checked for
its format's end marker (a few bytes each, no decoding), when the dataset is loaded: a
non-image, a broken header or a truncated file surfaces at once, naming the file, not in the
middle of training. The folder may come from anyone: only regular files are opened (a FIFO
named `x.png` would block forever, a link to `/dev/zero` read forever), and files larger than
`MAX_IMAGE_FILE_BYTES` or declaring more than `MAX_IMAGE_PIXELS` are refused before TensorFlow
reads or decodes them. Damaged pixel data inside a complete file fails only when TensorFlow
decodes it; `naming_undecodable_images` then finds the file and names it.

- Channels: 1 when every image is grayscale (with or without alpha), else 3 (RGB; alpha is
  dropped, grayscale images are expanded).
- Size: when every image has the same height and width, `DatasetInfo.image_shape` is that
  size. When sizes differ it is `(None, None, C)`; the images are delivered at their own sizes
  and `make_pipeline` then needs `image_size=(H, W)` to resize them (it says so otherwise).
Decoding uses `tf.io.decode_image`; GIFs contribute their first frame.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bnzoo.data.info import DatasetInfo, horizontal_flip_default, normalization_for

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
#: The largest file read as one image: 256 MiB. TensorFlow reads a whole file into memory to
#: decode it, several at once in the input pipeline; 256 MiB is ten times a 50-megapixel
#: photo's JPEG or PNG and holds a 9,000 x 9,000 uncompressed RGB BMP. A larger file named
#: like an image is not one to train on, and reading it would cost that memory first.
MAX_IMAGE_FILE_BYTES = 256 * 2**20
#: The most pixels an image may declare: Pillow's decompression-bomb limit (where
#: `PIL.Image.open` raises), 13,377 x 13,377. A PNG of a few hundred bytes can declare
#: 100,000 x 100,000 pixels, which TensorFlow would try to decode into 10 GB (gray) to 30 GB.
MAX_IMAGE_PIXELS = 2 * (2**30 // 4 // 3)
FILE_ORDER_SEED = 1337
PREFIX = "image_folder:"
SPLIT_NAME = "train"

# JPEG start-of-frame markers (the ones holding the image size): C0-CF except DHT (C4),
# JPG (C8) and DAC (CC).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Channels `tf.io.decode_image(channels=0)` yields per PNG color type.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The last 12 bytes of every complete PNG: the empty IEND chunk and its CRC.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_GIF_TRAILER = b"\x3b"

#: Folders loaded in this process, most recent last (a dict as an ordered set), for
#: `naming_undecodable_images`.
_LOADED_FOLDERS: dict[str, None] = {}


def inspect_image_file(path: str) -> tuple[int, int, int, bool]:
    """`(height, width, channels)` of a PNG, JPEG, BMP or GIF file (detected by content, not by
    extension), read from its header without decoding, plus whether the file ends like a
    complete file of its format (PNG: the IEND chunk; JPEG: the end-of-image marker; GIF: the
    trailer; BMP: header size plus pixel rows). A False is a suspicion, not a verdict: some
    writers append data after the end marker, which decoders ignore.

    `channels` is what `tf.io.decode_image(..., channels=0)` returns for the file (e.g. 2 for
    a gray+alpha PNG, 3 for any GIF, 3 for a CMYK JPEG), so it predicts the decoded tensor.

    Example:
    >>> bnzoo.data.image_folder.inspect_image_file("cat/001.png")
    (64, 48, 3, True)

    Raises:
        ValueError: the file is not a regular file (a FIFO, a device, a broken link), is larger
            than `MAX_IMAGE_FILE_BYTES`, is not a PNG, JPEG, BMP or GIF, its header is corrupt
            or it declares more than `MAX_IMAGE_PIXELS`.
    """
    with _open_image_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(64)
        f.seek(max(0, size - len(_PNG_END)))
        tail = f.read(len(_PNG_END))
        height, width, channels, complete = _parse_image(f, path, head, tail, size)
    if height * abs(width) > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{path}: declares {abs(width)} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
            "bnzoo decodes (Pillow's decompression-bomb limit); a crafted or damaged file, or "
            "an image to downscale before training"
        )
    return height, width, channels, complete


def _describe_file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular_file(path: str, mode: int, size: int) -> None:
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{path}: {_describe_file_type(mode)}, not an image file; an image folder holds "
            "regular files only: remove it"
        )
    if size > MAX_IMAGE_FILE_BYTES:
        raise ValueError(
            f"{path}: {size:,} bytes, more than the {MAX_IMAGE_FILE_BYTES // 2**20} MiB bnzoo "
            "reads as one image; remove it or shrink it"
        )


def _open_image_file(path: str):
    """`path` opened for reading, if it is a regular file of at most `MAX_IMAGE_FILE_BYTES`.

    Checked before opening (opening a device can have effects of its own) and again on the
    open file (the path might have been replaced in between): non-blocking, so that a FIFO
    put there meanwhile cannot block the open.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: a broken symbolic link or a vanished file; remove it") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror})") from None
    _check_regular_file(path, status.st_mode, status.st_size)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as error:
        raise ValueError(f"{path}: cannot open it ({error.strerror})") from None
    status = os.fstat(descriptor)
    try:
        _check_regular_file(path, status.st_mode, status.st_size)
    except ValueError:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb")


def _parse_image(f, path: str, head: bytes, tail: bytes, size: int) -> tuple[int, int, int, bool]:
    """`inspect_image_file`'s answer from the open file `f`, its first 64 and last 12 bytes."""
    try:
        if head.startswith(_PNG_SIGNATURE):
            if len(head) < 26:
                raise ValueError("a PNG signature, then the file ends (truncated)")
            if head[12:16] != b"IHDR":
                raise ValueError("a PNG signature but no IHDR header chunk after it")
            width, height = struct.unpack(">II", head[16:24])
            color_type = head[25]
            if color_type not in _PNG_CHANNELS:
                raise ValueError(f"unknown PNG color type {color_type}")
            return height, width, _PNG_CHANNELS[color_type], tail.endswith(_PNG_END)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", head[6:10])
            return height, width, 3, tail.endswith(_GIF_TRAILER)
        if head.startswith(b"BM"):
            height, width, channels, complete = _read_bmp_header(head, size)
            return height, width, channels, complete
        if head.startswith(b"\xff\xd8"):
            f.seek(2)
            height, width, channels = _read_jpeg_sof(f)
            return height, width, channels, tail.endswith(_JPEG_END)
    except struct.error as error:
        raise ValueError(f"{path}: truncated image header ({error}).") from error
    except ValueError as error:
        raise ValueError(f"{path}: cannot read the image ({error}).") from error
    if not head:
        raise ValueError(f"{path}: empty file; remove it from the image folder.")
    raise ValueError(
        f"{path}: not a PNG, JPEG, BMP or GIF image (starts with {head[:8].hex()}); remove it "
        "from the image folder or convert it."
    )


def _read_bmp_header(head: bytes, size: int) -> tuple[int, int, int, bool]:
    (pixel_offset,) = struct.unpack("<I", head[10:14])
    (header_size,) = struct.unpack("<I", head[14:18])
    compression = 0
    if header_size == 12:  # BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bits = struct.unpack("<HHHH", head[18:26])
    else:
        width, height, _, bits, compression = struct.unpack("<iiHHI", head[18:34])
    if bits not in (8, 24, 32):
        raise ValueError(f"{bits}-bit BMP (TensorFlow decodes 8, 24 and 32 bits)")
    row_bytes = (bits * abs(width) + 31) // 32 * 4
    # Uncompressed pixel rows (BI_RGB, or BI_BITFIELDS' masks in the header) have a known size.
    complete = compression in (0, 3) and size == pixel_offset + row_bytes * abs(height)
    return abs(height), width, bits // 8, complete


#: Bytes outside marker segments that the start-of-frame search reads one at a time before it
#: gives up: a valid JPEG has none (segments follow each other), so this only bounds the time a
#: crafted file of junk can take.
_JPEG_MAX_STRAY_BYTES = 2**20


def _read_jpeg_sof(f) -> tuple[int, int, int]:
    """Walks JPEG marker segments up to the start-of-frame, which holds size and components."""
    stray = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("no start-of-frame marker before the end of the file")
        if byte != b"\xff":
            stray += 1
            if stray > _JPEG_MAX_STRAY_BYTES:
                raise ValueError("no JPEG marker in the first megabyte after the header")
            continue
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
        if not marker:
            raise ValueError("truncated JPEG marker")
        code = marker[0]
        if code in (0x01, *range(0xD0, 0xD8)):  # standalone markers carry no length
            continue
        if code == 0xDA:  # start of scan: image data follows, the frame header was missing
            raise ValueError("no start-of-frame marker before the image data")
        (length,) = struct.unpack(">H", f.read(2))
        if code in _JPEG_SOF_MARKERS:
            _, height, width, components = struct.unpack(">BHHB", f.read(6))
            # TensorFlow decodes 4-component (CMYK) JPEGs to RGB.
            return height, width, 1 if components == 1 else 3
        f.seek(length - 2, os.SEEK_CUR)


def _decode_error_reason(message: str) -> str:
    """TensorFlow's decode error without its function-node prefix and op suffix."""
    message = re.sub(r"\{\{[^}]*\}\}", "", " ".join(message.split()))
    message = re.sub(r"\[\[.*?\]\]|\[Op:\w+\]( name:.*)?", "", message)
    message = message.split("transformation with iterator:")[-1]
    return re.sub(r"^\s*Iterator::[\w:]+:\s*", "", message).strip(" .")


def decode_error(path: str) -> str | None:
    """Why TensorFlow cannot decode the image at `path`, or None when it can."""
    from bnzoo.cli import silenced_native_stderr

    with silenced_native_stderr():  # libjpeg logs "Premature end of JPEG data" on stderr
        try:
            tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except tf.errors.OpError as error:
            return _decode_error_reason(error.message) or type(error).__name__
    return None


def undecodable_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """`(path, reason)` of each image among `paths` that TensorFlow cannot decode, in order.

    Decodes every file (in parallel), so it costs about one epoch's decoding: it is for
    explaining a failure, not for every load.
    """
    from bnzoo.cli import silenced_native_stderr

    def decodes(path):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        return path, tf.shape(image)

    dataset = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(decodes, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors()
    )
    with silenced_native_stderr():
        decoded = {path.decode() for path, _ in dataset.as_numpy_iterator()}
    return [(path, decode_error(path) or "") for path in paths if path not in decoded]


@contextlib.contextmanager
def naming_undecodable_images() -> Iterator[None]:
    """Turn TensorFlow's "Invalid PNG data" from inside a tf.data pipeline into a ValueError
    that names the file.

    A decode error raised by a pipeline carries no file name. This finds the image(s) that do
    not decode among the image folders loaded in this process, most recently loaded first (in
    a notebook or a test session, an earlier folder with a broken file is not the one that
    failed now), and raises a ValueError naming the first one. Errors that are not image
    decoding pass through unchanged.
    """
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        if "DecodeImage" not in error.message and "decode_image" not in error.message:
            raise
        broken: list[tuple[str, str]] = []
        for directory in reversed(list(_LOADED_FOLDERS)):
            try:
                _, paths, _ = scan_image_folder(directory)
            except (OSError, ValueError):
                continue
            broken = undecodable_images(paths)
            if broken:
                break
        if not broken:
            raise
        path, reason = broken[0]
        others = f" ({len(broken) - 1} more such files)" if len(broken) > 1 else ""
        raise ValueError(
            f"{path}: TensorFlow cannot decode this image ({reason or 'damaged data'}){others}; "
            "remove or replace it, then rerun"
        ) from None


def check_images_complete(paths: Sequence[str], complete: Sequence[bool]) -> None:
    """Decode the files whose end looked wrong (`inspect_image_file`); raise for the first one
    TensorFlow cannot decode. A truncated download is caught here, by name, in milliseconds."""
    for path, ok in zip(paths, complete, strict=True):
        if not ok:
            reason = decode_error(path)
            if reason is not None:
                raise ValueError(
                    f"{path}: truncated or damaged image, TensorFlow cannot decode it ({reason}); "
                    "remove or replace it"
                )


#: Where the default splits (`train[:80%]`, `train[80%:90%]`, `train[90%:]`) cut the order: the
#: order is built so that these three parts are exactly stratified.
STRATIFIED_CUTS_PERCENT = (80, 90)


def _interleave(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Concatenate per-class index arrays so that every class is spread evenly: the j-th of a
    class's n members gets the position (j + u) / n, u uniform in [0, 1), and positions are
    sorted. Any run of the result then holds each class roughly in its share."""
    indices = np.concatenate(members) if members else np.zeros([0], np.int64)
    positions = np.concatenate(
        [(np.arange(len(m)) + rng.uniform(size=len(m))) / max(len(m), 1) for m in members]
        or [np.zeros([0])]
    )
    return indices[np.argsort(positions, kind="stable")]


def stratified_order(labels: Sequence[int], seed: int = FILE_ORDER_SEED) -> np.ndarray:
    """A seeded order of the examples that makes the default splits a stratified partition.

    The order is cut where `train[:80%]` and `train[90%:]` cut it (TFDS's rounding). Each part
    gets from every class its share of what is left, rounded by largest remainder, so each
    class's count in `train[:80%]`, `train[80%:90%]` and `train[90%:]` is within one image of
    80/10/10 % of the class (sklearn's `stratify`, as slices). Within each part the classes are
    shuffled and interleaved in proportion, so other slices (`train[:50%]`, `train[:512]`) mix
    the classes in roughly their shares too.
    """
    labels = np.asarray(labels)
    total = len(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    remaining = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    cuts = [len(select_split(total, f"train[:{p}%]")) for p in STRATIFIED_CUTS_PERCENT]
    sizes = np.diff([0, *cuts, total])
    parts = []
    for size in sizes[:-1]:
        left = sum(len(members) for members in remaining.values())
        ideal = np.array([len(remaining[c]) * size / max(left, 1) for c in classes])
        counts = np.floor(ideal).astype(int)
        # Largest remainder; random among equal remainders, so no class is always favoured.
        ranking = np.lexsort((rng.uniform(size=len(classes)), -(ideal - counts)))
        counts[ranking[: size - counts.sum()]] += 1
        members = []
        for c, count in zip(classes, counts, strict=True):
            members.append(np.array(remaining[c][:count], np.int64))
            remaining[c] = remaining[c][count:]
        parts.append(_interleave(members, rng))
    parts.append(_interleave([np.array(remaining[c], np.int64) for c in classes], rng))
    return np.concatenate(parts)


def folder_path(name: str) -> str:
    """The folder of an `image_folder:PATH` dataset name, absolute and user-expanded."""
    path = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not path:
        raise ValueError(
            "image_folder: needs a folder, e.g. --dataset image_folder:/path/to/images "
            "(one sub-folder per class)."
        )
    return os.path.abspath(os.path.expanduser(path))


def scan_image_folder(directory: str) -> tuple[tuple[str, ...], list[str], list[int]]:
    """Class names, image paths and labels of a folder with one sub-folder per class.

    Paths are sorted (class, then path within the class), so the result does not depend on the
    order the file system lists entries in.

    Raises:
        FileNotFoundError: `directory` does not exist.
        ValueError: it has no class sub-folders, or a class sub-folder has no images.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"image folder {directory} is a file, not a folder; pass a folder with one "
            "sub-folder of images per class."
        )
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"image folder {directory} does not exist; pass a folder with one sub-folder of "
            "images per class."
        )
    class_names = tuple(
        sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".")
        )
    )
    if not class_names:
        raise ValueError(
            f"image folder {directory} has no class sub-folders; put the images of each class "
            "in a sub-folder named after the class (e.g. cat/, dog/)."
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, class_name in enumerate(class_names):
        class_paths = []
        for root, dirs, files in os.walk(os.path.join(directory, class_name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            class_paths.extend(
                os.path.join(root, file)
                for file in files
                if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith(".")
            )
        if not class_paths:
            raise ValueError(
                f"class folder {os.path.join(directory, class_name)} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder."
            )
        class_paths.sort()
        paths.extend(class_paths)
        labels.extend([label] * len(class_paths))
    return class_names, paths, labels


def select_split(num_examples: int, split: str, dataset: str = "image_folder") -> np.ndarray:
    """Indices of the examples a TFDS split expression selects from a single `train` split.

    Uses TFDS's own parser and rounding, so `train[:90%]` and `train[90%:]` partition the
    data exactly as they would a TFDS dataset.

    Raises:
        ValueError: malformed expression, a split other than `train`, or an out-of-range slice.
    """
    try:
        instruction = tfds.core.ReadInstruction.from_spec(split)
        split_info = tfds.core.SplitInfo(name=SPLIT_NAME, shard_lengths=[num_examples], num_bytes=0)
        absolute = instruction.to_absolute({SPLIT_NAME: split_info})
    except (ValueError, AssertionError) as error:
        raise ValueError(
            f"split {split!r} is not valid for {dataset}: {_first_line(error)}. An image folder "
            "is one split, 'train'; slice it like 'train[:90%]', 'train[90%:]' or 'train[:512]'."
        ) from error
    ranges = [np.arange(num_examples)[part.from_ : part.to] for part in absolute]
    return np.concatenate(ranges) if ranges else np.zeros([0], np.int64)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_image_folder(name: str, split: str = SPLIT_NAME) -> tuple[tf.data.Dataset, DatasetInfo]:
    """An image folder as `(image uint8 [H, W, C], label int64)` examples and its `DatasetInfo`.

    Args:
        name: `"image_folder:/path/to/dir"` (or just the path).
        split: TFDS split syntax over the single split `train`.

    Returns:
        The unbatched dataset (in the deterministic shuffled file order, sliced by `split`) and
        its info (mean/std 0.5: image folders have no known statistics).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: bad layout, unreadable image, malformed split or empty selection.

    Example:
    >>> ds, info = bnzoo.data.image_folder.load_image_folder(
    ...     "image_folder:my_images", split="train[:90%]")
    >>> info.class_names
    ('cat', 'dog')
    """
    directory = folder_path(name)
    class_names, paths, labels = scan_image_folder(directory)
    order = stratified_order(labels)
    selected = order[select_split(len(paths), split, dataset=f"{PREFIX}{directory}")]
    if len(selected) == 0:
        raise ValueError(
            f"split {split!r} selects no images of {directory} ({len(paths)} images); use a "
            "larger slice."
        )
    # Headers of every image in the folder, not only the selection: the channel count must not
    # depend on the split, or train and test would be decoded differently.
    headers = [inspect_image_file(path) for path in paths]
    check_images_complete(paths, [complete for *_, complete in headers])
    _LOADED_FOLDERS.pop(directory, None)
    _LOADED_FOLDERS[directory] = None
    channels = 1 if all(c in (1, 2) for _, _, c, _ in headers) else 3
    sizes = {(h, w) for h, w, _, _ in headers}
    height, width = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    mean, std = normalization_for(PREFIX, channels)

    selected_paths = [paths[i] for i in selected]
    selected_labels = np.asarray([labels[i] for i in selected], np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((selected_paths, selected_labels))

    def decode(path, label):
        data = tf.io.read_file(path)
        if channels == 3:
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
        else:
            # Gray (1 channel) or gray+alpha (2): keep the gray channel. Not channels=1, which
            # TensorFlow's BMP and GIF decoders reject.
            image = tf.io.decode_image(data, channels=0, expand_animations=False)[..., :1]
        image.set_shape([height, width, channels])
        return image, label

    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    info = DatasetInfo(
        name=f"{PREFIX}{directory}",
        num_classes=len(class_names),
        image_shape=(height, width, channels),
        class_names=class_names,
        num_examples=len(selected),
        mean=mean,
        std=std,
        split=split,
        horizontal_flip=horizontal_flip_default(PREFIX),
    )
    return dataset, info
