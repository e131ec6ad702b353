"""The IDX decoder and verifier, checked against known facts of the Fashion-MNIST files.

Every expected value is computed here independently (raw bytes through `gzip` + `struct`, or
the published facts of the dataset), never by the code under test.
"""

import gzip
import os
import struct

import numpy as np
import pytest

from bnzoo.data import idx
from bnzoo.data.info import NORMALIZATION, normalization_for

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist",
)


def _raw(name: str) -> bytes:
    with gzip.open(os.path.join(FASHION_DIR, name), "rb") as f:
        return f.read()


def _write_idx(path, array: np.ndarray, compress: bool = True, magic: bytes | None = None):
    """An IDX file written by hand (uint8 only), optionally with a forged magic number."""
    header = magic or bytes([0, 0, 0x08, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


@pytest.fixture(scope="module")
def fashion_mnist():
    return idx.load_idx_dataset("fashion_mnist", FASHION_DIR)


@needs_fashion_mnist
def test_magic_numbers_and_header_match_the_idx_specification():
    # 0x00000803: unsigned bytes, 3 dims; 0x00000801: unsigned bytes, 1 dim.
    for prefix, count in (("train", 60000), ("t10k", 10000)):
        images = _raw(f"{prefix}-images-idx3-ubyte.gz")
        labels = _raw(f"{prefix}-labels-idx1-ubyte.gz")
        assert struct.unpack(">IIII", images[:16]) == (0x803, count, 28, 28)
        assert struct.unpack(">II", labels[:8]) == (0x801, count)
        assert idx.read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz")).shape == (
            count,
            28,
            28,
        )


@needs_fashion_mnist
def test_fashion_mnist_has_60000_train_and_10000_test_balanced_examples(fashion_mnist):
    train_images, train_labels = fashion_mnist["train"]
    test_images, test_labels = fashion_mnist["test"]
    assert train_images.shape == (60000, 28, 28, 1) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28, 1)
    assert train_labels.dtype == np.int64
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10


@needs_fashion_mnist
def test_decoded_pixels_equal_the_raw_bytes_after_the_header(fashion_mnist):
    raw = np.frombuffer(_raw("t10k-images-idx3-ubyte.gz")[16:], np.uint8).reshape(10000, 28, 28)
    raw_labels = np.frombuffer(_raw("t10k-labels-idx1-ubyte.gz")[8:], np.uint8)
    images, labels = fashion_mnist["test"]
    np.testing.assert_array_equal(images[..., 0], raw)
    np.testing.assert_array_equal(labels, raw_labels)
    # Facts of the test set, from the raw bytes: the first two labels are 9 (ankle boot) and
    # 2 (pullover); pixel values span the full 0..255 range.
    assert raw_labels[:2].tolist() == [9, 2]
    assert images.min() == 0 and images.max() == 255


@needs_fashion_mnist
def test_normalization_constants_are_the_train_pixel_statistics(fashion_mnist):
    # Mean and std over every pixel of the raw training bytes, from the histogram of the 256
    # possible values (exact, and much cheaper than 47M floats).
    counts = np.bincount(np.frombuffer(_raw("train-images-idx3-ubyte.gz")[16:], np.uint8))
    values = np.arange(len(counts)) / 255.0
    raw_mean = (counts * values).sum() / counts.sum()
    raw_std = np.sqrt((counts * (values - raw_mean) ** 2).sum() / counts.sum())
    (mean,), (std,) = NORMALIZATION["fashion_mnist"]
    assert mean == pytest.approx(raw_mean, abs=5e-5)
    assert std == pytest.approx(raw_std, abs=5e-5)
    # The decoded images give the same statistics as the raw bytes.
    assert fashion_mnist["train"][0].mean() / 255.0 == pytest.approx(raw_mean, rel=1e-9)


def test_unknown_datasets_fall_back_to_mean_and_std_one_half():
    assert normalization_for("cifar10", 3) == NORMALIZATION["cifar10"]
    assert normalization_for("cifar10:3.0.2", 3) == NORMALIZATION["cifar10"]
    assert normalization_for("tf_flowers", 3) == ((0.5,) * 3, (0.5,) * 3)
    assert normalization_for("image_folder:/x", 1) == ((0.5,), (0.5,))


def test_read_idx_accepts_uncompressed_files_and_other_element_types(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "plain", array, compress=False)
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "plain"), array)
    # A big-endian int32 file (type 0x0C) decodes to native int32 values.
    values = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "ints").write_bytes(
        bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.tobytes()
    )
    decoded = idx.read_idx(tmp_path / "ints")
    assert decoded.tolist() == [1, -2, 70000] and decoded.dtype == np.int32


def test_bad_magic_number_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(path, np.zeros((2, 28, 28), np.uint8), magic=b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not an IDX file"):
        idx.read_idx(path)


def test_truncated_gzip_is_rejected_naming_the_file(tmp_path):
    good = tmp_path / "good.gz"
    _write_idx(good, np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    truncated = tmp_path / "t10k-images-idx3-ubyte.gz"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        idx.read_idx(truncated)


def test_payload_shorter_or_longer_than_the_header_promises_is_rejected(tmp_path):
    header = bytes([0, 0, 8, 1]) + struct.pack(">I", 10)
    (tmp_path / "short").write_bytes(header + bytes(9))
    (tmp_path / "long").write_bytes(header + bytes(11))
    for name in ("short", "long"):
        with pytest.raises(ValueError, match=f"{name}: IDX header promises shape"):
            idx.read_idx(tmp_path / name)


def _small_spec(counts_train=(3, 2), counts_test=(1, 1), name="fashion_mnist"):
    return idx.IdxDatasetSpec(
        name=name,
        image_size=(4, 4),
        files=idx.IDX_DATASETS["fashion_mnist"].files,
        class_counts={"train": counts_train, "test": counts_test},
        hint="get them somewhere",
    )


def _write_split_files(directory, labels_by_split, image_size=(4, 4)):
    for split, labels in labels_by_split.items():
        prefix = "train" if split == "train" else "t10k"
        labels = np.asarray(labels, np.uint8)
        images = np.full((len(labels), *image_size), 7, np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_verification_accepts_files_with_the_expected_class_histogram(tmp_path):
    _write_split_files(tmp_path, {"train": [0, 1, 0, 1, 0], "test": [1, 0]})
    splits = idx.load_idx_dataset(_small_spec(), str(tmp_path))
    assert splits["train"][0].shape == (5, 4, 4, 1)
    assert splits["train"][1].tolist() == [0, 1, 0, 1, 0]


def test_unbalanced_labels_are_rejected_naming_the_labels_file(tmp_path):
    _write_split_files(tmp_path, {"train": [0, 0, 0, 0, 1], "test": [1, 0]})
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: examples per class"):
        idx.load_idx_dataset(_small_spec(), str(tmp_path))


def test_out_of_range_label_is_rejected(tmp_path):
    _write_split_files(tmp_path, {"train": [0, 1, 0, 1, 0], "test": [1, 5]})
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: label 5 is out of range"):
        idx.load_idx_dataset(_small_spec(), str(tmp_path))


def test_wrong_example_count_or_image_size_is_rejected(tmp_path):
    _write_split_files(tmp_path, {"train": [0, 1, 0, 1], "test": [1, 0]})
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: expected fashion_mnist"):
        idx.load_idx_dataset(_small_spec(), str(tmp_path))
    _write_split_files(tmp_path, {"train": [0, 1, 0, 1, 0], "test": [1, 0]}, image_size=(5, 4))
    with pytest.raises(ValueError, match=r"shape \(5, 4, 4\); found uint8 of shape \(5, 5, 4\)"):
        idx.load_idx_dataset(_small_spec(), str(tmp_path))


def test_mnist_labels_are_not_accepted_as_fashion_mnist():
    # MNIST's digit histogram (the mnist spec) differs from Fashion-MNIST's balanced one, so
    # the verifier tells the two datasets apart even though their files share names and shape.
    mnist = idx.IDX_DATASETS["mnist"]
    assert sum(mnist.class_counts["train"]) == 60000 and sum(mnist.class_counts["test"]) == 10000
    assert mnist.class_counts["train"] != idx.IDX_DATASETS["fashion_mnist"].class_counts["train"]


def test_missing_files_raise_file_not_found_with_how_to_get_them(tmp_path):
    _write_split_files(tmp_path, {"train": [0, 1, 0, 1, 0]})
    spec = idx.IDX_DATASETS["fashion_mnist"]
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-images-idx3-ubyte\.gz.*apt-get"):
        idx.locate_idx_dir(spec, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"does not exist.*dataset-fashion-mnist"):
        idx.locate_idx_dir(spec, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        idx.read_idx(tmp_path / "nowhere.gz")


def test_default_folder_is_searched_when_no_manual_dir_is_given(tmp_path):
    _write_split_files(tmp_path, {"train": [0, 1, 0, 1, 0], "test": [1, 0]})
    spec = idx.IdxDatasetSpec(**{**_small_spec().__dict__, "default_dirs": (str(tmp_path),)})
    assert idx.locate_idx_dir(spec, None) == str(tmp_path)
    empty = idx.IdxDatasetSpec(**{**spec.__dict__, "default_dirs": (str(tmp_path / "none"),)})
    with pytest.raises(FileNotFoundError, match="not found.*get them somewhere"):
        idx.locate_idx_dir(empty, None)
