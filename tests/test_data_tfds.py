"""TFDS datasets offline: Fashion-MNIST prepared from the Debian IDX files, errors without data.

The full Fashion-MNIST preparation (all 70,000 examples, about 15 s on 2 CPU cores) runs once
per test session into a temporary data_dir; every test here reads that copy.
"""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bnzoo.data import idx, list_datasets, load_dataset, tfds_offline

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
pytestmark = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(FASHION_DIR, f)) for f in FASHION_FILES),
    reason="Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory):
    """A TFDS data_dir holding Fashion-MNIST prepared offline from the Debian IDX files."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    load_dataset("fashion_mnist", split="test", data_dir=data_dir)
    return data_dir


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine has: TFDS downloads must not even be attempted."""
    monkeypatch.setattr(tfds_offline, "network_available", lambda *args, **kwargs: False)


def _raw_idx(name):
    with gzip.open(os.path.join(FASHION_DIR, name), "rb") as f:
        data = f.read()
    header = 16 if "images" in name else 8
    array = np.frombuffer(data[header:], np.uint8)
    return array.reshape(-1, 28, 28) if "images" in name else array


def test_offline_preparation_produces_the_full_splits(fashion_data_dir):
    sizes = {
        split: load_dataset("fashion_mnist", split=split, data_dir=fashion_data_dir)[1].num_examples
        for split in ("train", "test", "train[:90%]", "train[90%:]", "train[:512]")
    }
    assert sizes == {
        "train": 60000,
        "test": 10000,
        "train[:90%]": 54000,
        "train[90%:]": 6000,
        "train[:512]": 512,
    }


def test_dataset_info_describes_fashion_mnist(fashion_data_dir):
    ds, info = load_dataset("fashion_mnist", split="train[:90%]", data_dir=fashion_data_dir)
    assert info.name == "fashion_mnist" and info.split == "train[:90%]"
    assert info.num_classes == 10 and info.image_shape == (28, 28, 1)
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert info.mean == (0.2860,) and info.std == (0.3530,)
    assert not info.horizontal_flip
    assert ds.element_spec == (
        tf.TensorSpec([28, 28, 1], tf.uint8),
        tf.TensorSpec([], tf.int64),
    )


def test_prepared_test_split_holds_exactly_the_idx_examples(fashion_data_dir):
    ds, _ = load_dataset("fashion_mnist", split="test", data_dir=fashion_data_dir)
    batch = next(iter(ds.batch(20000)))
    images, labels = batch[0].numpy()[..., 0], batch[1].numpy()
    raw_images, raw_labels = _raw_idx(FASHION_FILES[2]), _raw_idx(FASHION_FILES[3])

    # TFDS stores examples in its own (key-hashed) order: compare the multisets of
    # (image, label) pairs, each example turned into one byte string.
    def keyed(imgs, lbls):
        return sorted(i.tobytes() + bytes([int(lbl)]) for i, lbl in zip(imgs, lbls, strict=True))

    assert keyed(images, labels) == keyed(raw_images, raw_labels)


def test_plain_tfds_load_reads_the_prepared_dataset(fashion_data_dir):
    ds = tfds.load(
        "fashion_mnist",
        split="train[:512]",
        data_dir=fashion_data_dir,
        as_supervised=True,
        download=False,
    )
    labels = np.array([int(y) for _, y in ds])
    assert len(labels) == 512 and labels.min() >= 0 and labels.max() <= 9


def test_slices_are_consecutive_pieces_of_one_order(fashion_data_dir):
    def labels(split):
        ds, _ = load_dataset("fashion_mnist", split=split, data_dir=fashion_data_dir)
        return np.array([int(y) for _, y in ds])

    whole = labels("train[:2%]")
    np.testing.assert_array_equal(
        np.concatenate([labels("train[:1%]"), labels("train[1%:2%]")]), whole
    )
    np.testing.assert_array_equal(labels("train[:2%]"), whole)  # the same on every read


def test_prepared_dataset_is_reused_without_any_source_files(fashion_data_dir, offline):
    _, info = load_dataset(
        "fashion_mnist", split="test", data_dir=fashion_data_dir, manual_dir="/nonexistent"
    )
    assert info.num_examples == 10000
    assert "fashion_mnist" in list_datasets(fashion_data_dir)


def test_list_datasets_names_fashion_mnist_from_the_debian_files(tmp_path):
    assert list_datasets(str(tmp_path)) == ["fashion_mnist"]


def test_list_datasets_names_prepared_datasets_but_not_downloads(tmp_path):
    for folder in ("cifar10/3.0.2", "emnist/letters/3.1.0", "downloads/extracted/x"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "dataset_info.json").write_text("{}")
    assert list_datasets(str(tmp_path)) == ["cifar10", "emnist", "fashion_mnist"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("fashon_mnist", "unknown dataset 'fashon_mnist': did you mean fashion_mnist"),
        ("no_such_dataset_at_all", "unknown dataset 'no_such_dataset_at_all': Use a TFDS name"),
        ("imdb_reviews", "bnzoo needs \\(Image, ClassLabel\\)"),
        ("mnist:9.9.9", "cannot open dataset 'mnist:9.9.9'"),
        ("", "dataset name '' is empty"),
    ],
)
def test_unknown_or_unusable_datasets_raise_value_errors(tmp_path, offline, name, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(name, split="train", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "split, message",
    [
        ("train[:90%", "malformed split 'train\\[:90%'"),
        ("train[:200%]", "malformed split"),
        ("", "split '' is empty"),
        ("validation", "split 'validation' is not valid for fashion_mnist.*train, test"),
        ("train[:70000]", "split 'train\\[:70000\\]' is not valid"),
        ("test[50%:50%]", "selects no examples"),
    ],
)
def test_bad_splits_raise_value_errors(fashion_data_dir, split, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("fashion_mnist", split=split, data_dir=fashion_data_dir)


def test_missing_idx_files_say_how_to_get_them(tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks train-images-idx3-ubyte\.gz.*apt-get"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(empty))
    # MNIST has no default folder: offline and without --manual-dir there is nothing to use.
    with pytest.raises(FileNotFoundError, match="mnist is not prepared.*--manual-dir"):
        load_dataset("mnist", data_dir=str(tmp_path / "tfds"))


def test_other_datasets_fail_fast_offline_with_how_to_prepare_them(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared.*tfds build cifar10"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_network_probe_answers_false_for_an_unreachable_address():
    # Port 9 on localhost (discard) is closed here, like every address offline.
    assert not tfds_offline.network_available(("127.0.0.1", 9), timeout=1.0)


def test_corrupt_idx_file_is_named_and_nothing_is_prepared(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in FASHION_FILES:
        shutil.copy(os.path.join(FASHION_DIR, name), manual / name)
    truncated = manual / "t10k-images-idx3-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated"):
        load_dataset("fashion_mnist", data_dir=data_dir, manual_dir=str(manual))
    assert not tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared()


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_mnist_is_prepared_from_idx_files_in_manual_dir(tmp_path, monkeypatch, offline):
    # Real MNIST files are not on this machine: a miniature MNIST (same file names, format and
    # verification, 3 train and 1 test image per digit) exercises the same preparation path.
    counts = {"train": (3,) * 10, "test": (1,) * 10}
    mini = idx.IdxDatasetSpec(**{**idx.IDX_DATASETS["mnist"].__dict__, "class_counts": counts})
    monkeypatch.setitem(idx.IDX_DATASETS, "mnist", mini)
    manual = tmp_path / "mnist_files"
    manual.mkdir()
    for prefix, per_class in (("train", 3), ("t10k", 1)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = np.broadcast_to(labels[:, None, None] * 20, (len(labels), 28, 28))
        _write_idx(manual / f"{prefix}-images-idx3-ubyte.gz", np.ascontiguousarray(images))
        _write_idx(manual / f"{prefix}-labels-idx1-ubyte.gz", labels)
    data_dir = str(tmp_path / "tfds")
    ds, info = load_dataset("mnist", split="train", data_dir=data_dir, manual_dir=str(manual))
    assert info.num_examples == 30 and info.mean == (0.1307,)
    assert info.class_names == tuple(str(d) for d in range(10))
    for image, label in ds:
        assert np.all(image.numpy() == 20 * int(label))
    plain = tfds.load("mnist", split="test", data_dir=data_dir, as_supervised=True, download=False)
    assert sorted(int(y) for _, y in plain) == list(range(10))
