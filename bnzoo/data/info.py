"""What a model needs to know about a dataset: `DatasetInfo` and per-dataset constants.

The normalization constants are the per-channel mean and standard deviation of the training
split's pixels in [0, 1] units, computed over every pixel of every image (not the mean of
per-image standard deviations, a common mistake that gives CIFAR-10 a std of ~0.20 instead of
~0.25). Datasets without known constants get mean 0.5 / std 0.5, which maps [0, 1] to [-1, 1]:
centred and of unit range, so training is well conditioned even when the true statistics are
unknown, and BN layers after the first convolution absorb whatever offset remains.
"""

from __future__ import annotations

import dataclasses

# Training-split statistics in [0, 1] pixel units. fashion_mnist is checked against the IDX
# files by the tests; mnist and CIFAR are the widely used values computed the same way.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
FALLBACK_MEAN = 0.5
FALLBACK_STD = 0.5

# Datasets where a mirror image is a different (or impossible) example, so horizontal flips are
# not label-preserving augmentation: digits and characters change identity ("2" vs a mirrored
# "2"), and Fashion-MNIST's product photos are canonically aligned (every shoe points left), so
# flips only teach the model poses that never occur in its test set.
NO_FLIP_DATASETS = frozenset(
    {
        "mnist",
        "fashion_mnist",
        "kmnist",
        "emnist",
        "binarized_mnist",
        "mnist_corrupted",
        "svhn_cropped",
        "omniglot",
    }
)


def _base_name(name: str) -> str:
    """`cifar10:3.0.2` or `emnist/letters` -> `cifar10` / `emnist`: the dataset family."""
    return name.split(":", 1)[0].split("/", 1)[0]


def normalization_for(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] pixel units for dataset `name`.

    Known datasets get their training-split statistics; any other dataset (another TFDS dataset,
    an image folder) gets mean 0.5 and std 0.5 per channel, which maps pixels to [-1, 1].

    Args:
        name: Dataset name as given to `load_dataset` (version/config suffixes are ignored).
        channels: Number of image channels; the result has one value per channel.

    Returns:
        `(mean, std)`, two tuples of `channels` floats.

    Example:
    >>> bnzoo.data.info.normalization_for("fashion_mnist", 1)
    ((0.286,), (0.353,))
    """
    known = NORMALIZATION.get(_base_name(name))
    if known is not None and len(known[0]) == channels:
        return known
    return (FALLBACK_MEAN,) * channels, (FALLBACK_STD,) * channels


def horizontal_flip_default(name: str) -> bool:
    """Whether a horizontal flip is label-preserving augmentation for dataset `name`.

    False for digits, characters and Fashion-MNIST (see `NO_FLIP_DATASETS`) and for image
    folders, whose content bnzoo cannot know (text, X-rays with a side, ...): users turn flips on
    with `make_pipeline(..., horizontal_flip=True)`. True for every other dataset, since the TFDS
    image-classification datasets are mostly natural photos, where mirroring is the standard
    augmentation (CIFAR, ImageNet).
    """
    if name.startswith("image_folder:"):
        return False
    return _base_name(name) not in NO_FLIP_DATASETS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Everything the training, evaluation and export code needs to know about one split.

    Args:
        name: The dataset name as given to `load_dataset` (`"fashion_mnist"`,
            `"image_folder:/abs/path"`).
        num_classes: Number of classes; labels are integers in `[0, num_classes)`.
        image_shape: `(height, width, channels)` of the uint8 images the dataset delivers.
            Height and width are `None` when the images vary in size; the pipeline then needs an
            explicit `image_size`.
        class_names: One name per label index.
        num_examples: Number of examples in THIS split (after slicing, e.g. `train[:90%]`).
        mean: Per-channel mean in [0, 1] pixel units, used by `preprocess_images`.
        std: Per-channel standard deviation in [0, 1] pixel units.
        split: The split expression this info describes (e.g. `"train[:90%]"`).
        horizontal_flip: Whether mirroring is label-preserving augmentation for this dataset
            (see `horizontal_flip_default`).

    Example:
    >>> ds, info = bnzoo.data.load_dataset("fashion_mnist", split="test")
    >>> info.image_shape, info.num_examples, info.class_names[0]
    ((28, 28, 1), 10000, 'T-shirt/top')
    """

    name: str
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    class_names: tuple[str, ...]
    num_examples: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str = ""
    horizontal_flip: bool = False

    def __post_init__(self):
        channels = self.image_shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"DatasetInfo for {self.name!r}: mean {self.mean} and std {self.std} need one "
                f"value per channel ({channels} channels in image_shape {self.image_shape})."
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DatasetInfo for {self.name!r}: std {self.std} must be positive.")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DatasetInfo for {self.name!r}: {len(self.class_names)} class names for "
                f"{self.num_classes} classes."
            )

    @property
    def has_fixed_shape(self) -> bool:
        """True when every image has the same height and width (the usual case)."""
        return self.image_shape[0] is not None and self.image_shape[1] is not None
