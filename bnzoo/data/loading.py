"""`load_dataset` and `list_datasets`: any TFDS image-classification dataset or an image folder."""

from __future__ import annotations

import difflib
import glob
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import bnzoo.data.image_folder as image_folder
from bnzoo.data.idx import IDX_DATASETS, missing_idx_files
from bnzoo.data.info import DatasetInfo, horizontal_flip_default, normalization_for
from bnzoo.data.tfds_offline import prepare_tfds

DEFAULT_DATASET = "fashion_mnist"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_split_syntax(split: str) -> None:
    """Raises a ValueError naming `split` unless it is valid TFDS split syntax.

    Checked before anything is prepared or downloaded, so a typo fails in milliseconds.
    """
    if not isinstance(split, str) or not split.strip():
        raise ValueError(f"split {split!r} is empty; use e.g. 'train', 'train[:90%]' or 'test'.")
    try:
        tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as error:
        raise ValueError(
            f"malformed split {split!r}: {_first_line(error)}. Use TFDS split syntax: 'train', "
            "'test', 'train[:90%]', 'train[90%:]', 'train[:512]', 'train[:10%]+test'."
        ) from error


def _check_tfds_name(name: str) -> None:
    """ValueError with close matches when `name`'s dataset is not a registered TFDS builder."""
    base_name = name.split(":", 1)[0].split("/", 1)[0]
    known = tfds.list_builders(with_community_datasets=False)
    if base_name in known:
        return
    matches = difflib.get_close_matches(base_name, known, n=3, cutoff=0.6)
    suggestion = f"did you mean {', '.join(matches)}? " if matches else ""
    raise ValueError(
        f"unknown dataset {name!r}: {suggestion}Use a TFDS name (tfds.list_builders(); offline: "
        f"{', '.join(sorted(IDX_DATASETS))}) or image_folder:/path/to/images."
    )


def _check_image_classification(name: str, builder: tfds.core.DatasetBuilder):
    """(image feature, label feature) of `builder`, or a ValueError saying why it does not fit."""
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise ValueError(
            f"dataset {name!r} has no (image, label) supervised keys, so it is not an image "
            "classification dataset bnzoo can train on."
        )
    image_feature, label_feature = info.features[keys[0]], info.features[keys[1]]
    if not isinstance(image_feature, tfds.features.Image) or not isinstance(
        label_feature, tfds.features.ClassLabel
    ):
        raise ValueError(
            f"dataset {name!r} delivers ({type(image_feature).__name__}, "
            f"{type(label_feature).__name__}); bnzoo needs (Image, ClassLabel) for image "
            "classification."
        )
    if np.dtype(image_feature.np_dtype) != np.uint8:
        raise ValueError(
            f"dataset {name!r} has {np.dtype(image_feature.np_dtype)} images; bnzoo needs uint8."
        )
    return image_feature, label_feature


def _split_size(name: str, builder: tfds.core.DatasetBuilder, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as error:
        available = ", ".join(builder.info.splits.keys())
        raise ValueError(
            f"split {split!r} is not valid for {name}: {_first_line(error)} (its splits: "
            f"{available})."
        ) from error


def load_dataset(
    name: str = DEFAULT_DATASET,
    split: str = "train",
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> tuple[tf.data.Dataset, DatasetInfo]:
    """One split of a dataset as unbatched `(image uint8 [H, W, C], label int64)` examples.

    Args:
        name: A TFDS dataset name (`"fashion_mnist"`, `"cifar10"`, `"cifar10:3.0.2"`), or
            `"image_folder:/path"` for a folder with one sub-folder of images per class.
        split: TFDS split syntax: `"train"`, `"test"`, `"train[:90%]"`, `"train[90%:]"`,
            `"train[:512]"`, `"train[:10%]+test"`. Image folders have one split, `train`.
        data_dir: TFDS data folder; None uses TFDS's default (`$TFDS_DATA_DIR` or
            `~/tensorflow_datasets`).
        manual_dir: Folder with the IDX files of `fashion_mnist` / `mnist` (or the manually
            downloaded files of TFDS datasets that need them). Fashion-MNIST is also found in
            `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`).

    The first call prepares a TFDS dataset in `data_dir`: from local IDX files for
    Fashion-MNIST / MNIST (no network needed), else by TFDS download when the network answers.
    Later calls read the prepared files. Examples come in the dataset's stored order (no file
    shuffling) so a split is a fixed sequence; `make_pipeline` shuffles for training.

    Returns:
        `(dataset, info)`: `info.num_examples` counts this split's examples.

    Raises:
        ValueError: unknown dataset (with close matches), malformed or unknown split, a dataset
            that is not image classification, corrupt data files (naming the file).
        FileNotFoundError: data neither prepared, nor on disk, nor downloadable; the message
            says how to get it.

    Example:
    >>> ds, info = bnzoo.data.load_dataset("fashion_mnist", split="train[:90%]")
    >>> info.num_examples, info.image_shape, info.mean
    (54000, (28, 28, 1), (0.286,))
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"dataset name {name!r} is empty; e.g. fashion_mnist.")
    check_split_syntax(split)
    if name.startswith(image_folder.PREFIX):
        return image_folder.load_image_folder(name, split)
    _check_tfds_name(name)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # unknown config or version: TFDS raises several error types
        raise ValueError(f"cannot open dataset {name!r}: {_first_line(error)}") from error
    # Features are known before any data exists, so a dataset that cannot be used fails here,
    # before minutes of downloading.
    image_feature, label_feature = _check_image_classification(name, builder)
    builder = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir)
    num_examples = _split_size(name, builder, split)
    if num_examples == 0:
        raise ValueError(f"split {split!r} of {name} selects no examples; use a larger slice.")
    dataset = builder.as_dataset(
        split=split,
        as_supervised=True,
        shuffle_files=False,
        # make_pipeline decides about caching; TFDS's auto-cache would hold a second copy.
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    height, width, channels = image_feature.shape
    if channels is None:
        raise ValueError(
            f"dataset {name!r} does not declare its number of image channels; bnzoo needs it."
        )
    mean, std = normalization_for(name, channels)
    info = DatasetInfo(
        name=name,
        num_classes=int(label_feature.num_classes),
        image_shape=(height, width, channels),
        class_names=tuple(label_feature.names),
        num_examples=num_examples,
        mean=mean,
        std=std,
        split=split,
        horizontal_flip=horizontal_flip_default(name),
    )
    return dataset, info


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        elif start < stop:
            merged.append((start, stop))
    return merged


def _absolute_ranges(split: str, split_sizes: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
    """`{split name: merged [start, stop) index ranges}` that a split expression selects."""
    infos = {
        name: tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0)
        for name, size in split_sizes.items()
    }
    ranges: dict[str, list[tuple[int, int]]] = {}
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(infos):
        start, stop, _ = slice(part.from_, part.to).indices(split_sizes[part.splitname])
        ranges.setdefault(part.splitname, []).append((start, stop))
    return {name: _merged(parts) for name, parts in ranges.items()}


def overlapping_examples(name: str, split: str, other: str, data_dir: str | None = None) -> int:
    """How many examples the split expressions `split` and `other` of dataset `name` share.

    For warnings such as "the validation split lies inside the training split". Meant to be
    called after `load_dataset` has prepared both splits; returns 0 when the split sizes are not
    known (an unprepared dataset), since a warning is then better skipped than guessed.
    """
    if name.startswith(image_folder.PREFIX):
        _, paths, _ = image_folder.scan_image_folder(image_folder.folder_path(name))
        split_sizes = {image_folder.SPLIT_NAME: len(paths)}
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        split_sizes = {key: int(info.num_examples) for key, info in builder.info.splits.items()}
    try:
        first = _absolute_ranges(split, split_sizes)
        second = _absolute_ranges(other, split_sizes)
    except (ValueError, AssertionError, KeyError):
        return 0
    shared = 0
    for split_name, intervals in first.items():
        for start, stop in intervals:
            for other_start, other_stop in second.get(split_name, []):
                shared += max(0, min(stop, other_stop) - max(start, other_start))
    return shared


def _prepared_datasets(data_dir: str) -> set[str]:
    """Names of the datasets prepared in `data_dir`.

    TFDS keeps them as `<name>/<version>/dataset_info.json`, or
    `<name>/<config>/<version>/dataset_info.json` for datasets with configs; globbing just
    those depths avoids walking `downloads/`, which can hold many files.
    """
    names = set()
    for depth in (("*", "*"), ("*", "*", "*")):
        for info_file in glob.glob(
            os.path.join(glob.escape(data_dir), *depth, "dataset_info.json")
        ):
            name = os.path.relpath(info_file, data_dir).split(os.sep)[0]
            if name != "downloads":
                names.add(name)
    return names


def list_datasets(data_dir: str | None = None) -> list[str]:
    """Dataset names that load without network on this machine, sorted.

    These are the datasets already prepared in `data_dir` plus those bnzoo can prepare from
    local IDX files found in their default folder (Fashion-MNIST from Debian's
    `dataset-fashion-mnist`). Note that any TFDS dataset name works too when there is network
    (it is downloaded on first use), as does `image_folder:/path/to/images` for your own images,
    and `mnist` offline with `manual_dir` pointing at its IDX files.

    Args:
        data_dir: TFDS data folder; None uses TFDS's default.

    Example:
    >>> bnzoo.data.list_datasets()
    ['fashion_mnist']
    """
    data_dir = os.path.expanduser(
        data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    )
    names = _prepared_datasets(data_dir)
    for name, spec in IDX_DATASETS.items():
        if any(os.path.isdir(d) and not missing_idx_files(spec, d) for d in spec.default_dirs):
            names.add(name)
    return sorted(names)
