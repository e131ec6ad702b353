"""Datasets for bnzoo: TFDS by name (offline Fashion-MNIST/MNIST from IDX files), image folders,
and the tf.data pipeline shared by training and the exported SavedModel.

    from bnzoo.data import load_dataset, make_pipeline

    ds, info = load_dataset("fashion_mnist", split="train[:90%]")
    train = make_pipeline(ds, info, batch_size=128, training=True, image_size=(32, 32))

See docs/data.md for the offline preparation, split syntax, normalization and augmentation.
"""

from bnzoo.data.image_folder import naming_undecodable_images
from bnzoo.data.info import DatasetInfo
from bnzoo.data.loading import (
    DEFAULT_DATASET,
    check_split_syntax,
    list_datasets,
    load_dataset,
    overlapping_examples,
)
from bnzoo.data.pipeline import make_pipeline, preprocess_images

__all__ = [
    "DEFAULT_DATASET",
    "DatasetInfo",
    "check_split_syntax",
    "list_datasets",
    "load_dataset",
    "make_pipeline",
    "naming_undecodable_images",
    "overlapping_examples",
    "preprocess_images",
]
