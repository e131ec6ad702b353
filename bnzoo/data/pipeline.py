"""From uint8 examples to training batches: `preprocess_images` and `make_pipeline`.

`preprocess_images` is the single definition of what a model sees. The training pipeline calls
it on every batch and the exported SavedModel calls it inside its serving signature, so a
served image goes through exactly the operations a training image went through.

Fitting images to the model's input (`image_size`):
- Same size: unchanged.
- Target larger by at most a quarter of the image in each dimension (28 -> 32, 32 -> 40):
  centred padding with black (pixel value 0, i.e. `-mean/std` after normalization), the way
  LeNet-5 fed 28x28 MNIST digits to a 32x32 input. Padding keeps every pixel at its native
  resolution; black matches the background of MNIST-like data and is what a camera shows
  outside the frame.
- Anything else (shrinking, or growing by more than a quarter): bilinear resize with
  antialiasing, so shrinking averages pixels instead of aliasing.
The choice depends only on the two sizes, so training and serving always agree.

The pipeline (`make_pipeline`) caches the uint8 examples (4x smaller than float32) when they
fit in a quarter of the machine's memory, shuffles with a real buffer (training only,
reshuffled every epoch), batches, then preprocesses and augments whole batches with vectorized
ops (per-example `map` calls cost more than the arithmetic on 28x28 images), and prefetches.
Augmentation runs after the cache, so every epoch sees fresh random crops and flips.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import tensorflow as tf

from bnzoo.data.info import DatasetInfo

# Pad instead of resizing when the target exceeds the image by at most this fraction.
MAX_PAD_FRACTION = 0.25
# Memory caches are used while the uint8 data takes at most this fraction of physical memory.
CACHE_MEMORY_FRACTION = 0.25


def _pads(source: int, target: int) -> bool:
    """Whether `source` is fitted to `target` by padding (see the module docstring)."""
    return source <= target <= source + int(source * MAX_PAD_FRACTION)


def _check_image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        height, width = (int(s) for s in image_size)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"image_size {image_size!r} must be (height, width), e.g. (32, 32)."
        ) from error
    if height < 1 or width < 1:
        raise ValueError(f"image_size {image_size!r} must be positive, e.g. (32, 32).")
    return height, width


def preprocess_images(
    images: tf.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: Sequence[int] | None = None,
) -> tf.Tensor:
    """uint8 images as the dataset delivers them -> normalized float32 model inputs.

    `(images / 255 - mean) / std` per channel, then fitted to `image_size` by centred black
    padding (target at most 25% larger) or bilinear resizing (anything else). Pure TensorFlow
    ops: it runs eagerly, inside `tf.data`, inside `tf.function` and in a SavedModel, for any
    batch size and, when the input's height and width are unknown until run time, picks padding
    or resizing in the graph.

    Args:
        images: uint8 `[batch, height, width, channels]`. Other dtypes are rejected: a float
            image already in [0, 1] would otherwise be divided by 255 again without a sign.
        mean: Per-channel mean in [0, 1] pixel units (`DatasetInfo.mean`), one value per
            channel (or one value for all).
        std: Per-channel standard deviation in [0, 1] pixel units (`DatasetInfo.std`).
        image_size: `(height, width)` of the model's input; None keeps the images' size.

    Returns:
        float32 `[batch, image_size[0], image_size[1], channels]`.

    Raises:
        ValueError: wrong dtype or rank, or mean/std not matching the channels.

    Example:
    >>> images = tf.zeros([8, 28, 28, 1], tf.uint8)
    >>> bnzoo.data.preprocess_images(images, (0.286,), (0.353,), (32, 32)).shape
    TensorShape([8, 32, 32, 1])
    """
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        raise ValueError(
            f"preprocess_images expects uint8 images as the dataset delivers them, got "
            f"{images.dtype.name}; pass the raw pixels (0-255), not already scaled ones."
        )
    if images.shape.rank != 4:
        raise ValueError(
            f"preprocess_images expects [batch, height, width, channels], got shape "
            f"{images.shape}; add a batch axis with images[None] for a single image."
        )
    channels = images.shape[-1]
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if channels is not None and any(len(v) not in (1, channels) for v in (mean, std)):
        raise ValueError(
            f"mean {mean} and std {std} need 1 or {channels} values for {channels}-channel images."
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"std {std} must be positive.")
    image_size = _check_image_size(image_size)

    pixels = tf.cast(images, tf.float32) / 255.0
    if image_size is not None:
        pixels = _fit(pixels, image_size)
    mean_t = tf.constant(mean, tf.float32)
    std_t = tf.constant(std, tf.float32)
    # Normalizing after fitting makes padding black in pixel space; bilinear resizing commutes
    # with the per-channel affine map anyway (its weights sum to 1).
    return (pixels - mean_t) / std_t


def _fit(pixels: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Pads or resizes float [B, H, W, C] pixels in [0, 1] to `image_size`."""
    target_h, target_w = image_size
    height, width = pixels.shape[1], pixels.shape[2]

    def pad():
        return tf.image.pad_to_bounding_box(
            pixels,
            (target_h - tf.shape(pixels)[1]) // 2,
            (target_w - tf.shape(pixels)[2]) // 2,
            target_h,
            target_w,
        )

    def resize():
        return tf.image.resize(pixels, image_size, method="bilinear", antialias=True)

    if height is not None and width is not None:
        if (height, width) == (target_h, target_w):
            return pixels
        return pad() if _pads(height, target_h) and _pads(width, target_w) else resize()
    # Sizes known only at run time (a SavedModel accepting any size): decide in the graph.
    dynamic_h, dynamic_w = tf.shape(pixels)[1], tf.shape(pixels)[2]

    def pads(source, target):
        return tf.logical_and(
            source <= target,
            target <= source + tf.cast(tf.cast(source, tf.float32) * MAX_PAD_FRACTION, tf.int32),
        )

    fitted = tf.cond(
        tf.logical_and(pads(dynamic_h, target_h), pads(dynamic_w, target_w)), pad, resize
    )
    return tf.ensure_shape(fitted, [pixels.shape[0], target_h, target_w, pixels.shape[3]])


def random_crop_and_flip(
    images: tf.Tensor,
    seed: tf.Tensor,
    padding: int,
    fill: Sequence[float],
    horizontal_flip: bool,
) -> tf.Tensor:
    """Padded random crop (and optional horizontal flip) of a whole batch at once.

    Each image is padded by `padding` pixels of value `fill` on every side and a crop of its
    original size is taken at an independent random offset (shifts of up to `padding` pixels),
    then mirrored with probability 1/2 when `horizontal_flip`. Stateless random ops seeded by
    `seed` make the result a function of `seed`, so a seeded pipeline is reproducible.

    Args:
        images: float32 `[batch, height, width, channels]`, already normalized.
        seed: int `[2]` seed for the stateless random ops.
        padding: Pixels of padding per side (the maximum shift).
        fill: Per-channel value of the padding (normalized black: `-mean / std`).
        horizontal_flip: Whether to mirror half of the images.
    """
    batch = tf.shape(images)[0]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    fill = tf.constant(tuple(fill), images.dtype)
    if padding > 0:
        # tf.pad takes one scalar fill; shifting by `fill` pads with a per-channel value.
        paddings = [[0, 0], [padding, padding], [padding, padding], [0, 0]]
        padded = tf.pad(images - fill, paddings) + fill
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        offsets = tf.random.stateless_uniform(
            [batch, 2], crop_seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
        )
        rows = offsets[:, :1] + tf.range(height)[tf.newaxis, :]
        cols = offsets[:, 1:] + tf.range(width)[tf.newaxis, :]
        cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(cropped, cols, axis=2, batch_dims=1)
    else:
        flip_seed = seed
    if horizontal_flip:
        flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
        images = tf.where(flip[:, tf.newaxis, tf.newaxis, tf.newaxis], images[:, :, ::-1], images)
    return images


def crop_padding_for(image_size: Sequence[int]) -> int:
    """Shift range of the padded random crop: 1/8 of the smaller side (4 px at 32, 3 at 28)."""
    return max(1, min(image_size) // 8)


def physical_memory_bytes() -> int | None:
    """Total physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fits_in_memory(info: DatasetInfo, budget_fraction: float = CACHE_MEMORY_FRACTION) -> bool:
    """Whether caching `info`'s split as uint8 takes at most `budget_fraction` of memory.

    False for datasets of varying image size, whose decoded size cannot be known in advance.
    """
    if not info.has_fixed_shape:
        return False
    height, width, channels = info.image_shape
    needed = info.num_examples * height * width * channels
    memory = physical_memory_bytes()
    return memory is not None and needed <= memory * budget_fraction


def make_pipeline(
    ds: tf.data.Dataset,
    info: DatasetInfo,
    batch_size: int = 128,
    training: bool = True,
    image_size: Sequence[int] | None = None,
    augment: bool = False,
    shuffle_buffer: int = 10_000,
    cache: bool | str = True,
    seed: int | None = None,
    drop_remainder: bool = False,
    horizontal_flip: bool | None = None,
    select_batches: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
    augment_seed: int | None = None,
) -> tf.data.Dataset:
    """Batches of model inputs from the `(image uint8, label int64)` examples of `load_dataset`.

    Order of operations: cache (uint8) -> shuffle (training) -> batch -> `preprocess_images`
    -> augmentation (training and `augment`) -> prefetch. Datasets of varying image size are
    preprocessed (resized) one image at a time before batching instead.

    Args:
        ds: Unbatched `(image uint8 [H, W, C], label int64)` examples (`load_dataset`'s output).
        info: The split's `DatasetInfo` (normalization, shape, size).
        batch_size: Examples per batch (>= 1).
        training: Shuffle (reshuffled every epoch) and, with `augment`, augment. Evaluation
            pipelines keep the dataset's order.
        image_size: `(height, width)` of the model's input, reached by padding or resizing
            (see `preprocess_images`); None keeps the dataset's size, which then must be fixed.
        augment: Padded random crop (shifts of up to 1/8 of the image side) plus, when
            `horizontal_flip`, mirroring. Only applied when `training`.
        shuffle_buffer: Shuffle buffer size in examples; capped at the split size, where it is a
            full uniform shuffle.
        cache: True caches the uint8 examples in memory when they fit (see `fits_in_memory`);
            False never caches; a string caches to that file path (for data larger than memory).
        seed: Seed for shuffling and augmentation; None gives a different order every run.
        drop_remainder: Drop the last partial batch (useful when a static batch size matters).
        horizontal_flip: Override the dataset's flip policy (`info.horizontal_flip`); None uses
            it.
        select_batches: A function applied to the dataset of batches before preprocessing and
            augmentation, e.g. `bnzoo.distribution.keep_worker_share`, which keeps one worker's
            share of every global batch so that the worker preprocesses only its own images.
        augment_seed: Seed of the augmentation's random stream; None uses `seed`. Workers that
            share one shuffling order (one `seed`) pass different augmentation seeds.

    Returns:
        `tf.data.Dataset` of `(float32 [B, H', W', C], int32 [B])`.

    Raises:
        ValueError: non-positive batch size or buffer, or images of varying size without
            `image_size`.

    Example:
    >>> ds, info = bnzoo.data.load_dataset("fashion_mnist", split="train[:90%]")
    >>> train = bnzoo.data.make_pipeline(ds, info, batch_size=128, augment=True, seed=0)
    >>> model.fit(train, epochs=10)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} must be a positive integer, e.g. 128.")
    if training and (not isinstance(shuffle_buffer, int) or shuffle_buffer < 1):
        raise ValueError(f"shuffle_buffer {shuffle_buffer!r} must be a positive integer.")
    image_size = _check_image_size(image_size)
    if image_size is None:
        if not info.has_fixed_shape:
            raise ValueError(
                f"the images of {info.name} vary in size; pass image_size=(height, width) (the "
                "model's input size) so they can be resized to one size for batching."
            )
        image_size = (info.image_shape[0], info.image_shape[1])
    if horizontal_flip is None:
        horizontal_flip = info.horizontal_flip

    if isinstance(cache, str):
        ds = ds.cache(cache)
    elif cache and fits_in_memory(info):
        ds = ds.cache()
    if training:
        ds = ds.shuffle(
            min(shuffle_buffer, max(info.num_examples, 1)),
            seed=seed,
            reshuffle_each_iteration=True,
        )
    mean, std = info.mean, info.std

    def preprocess(images, labels):
        return preprocess_images(images, mean, std, image_size), tf.cast(labels, tf.int32)

    if info.has_fixed_shape:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if select_batches is not None:
            ds = select_batches(ds)
        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        # Images of different sizes cannot share a batch before they are fitted to one size.
        def preprocess_one(image, label):
            images, labels = preprocess(image[tf.newaxis], label[tf.newaxis])
            return images[0], labels[0]

        ds = ds.map(preprocess_one, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if select_batches is not None:
            ds = select_batches(ds)

    if training and augment:
        padding = crop_padding_for(image_size)
        fill = tuple(-m / s for m, s in zip(mean, std, strict=True))
        # One seed per batch from a seeded random stream that restarts differently every
        # epoch: reproducible with `seed`, yet new crops each epoch.
        seeds = tf.data.Dataset.random(
            seed=seed if augment_seed is None else augment_seed, rerandomize_each_iteration=True
        ).batch(2)

        def augment_batch(batch, batch_seed):
            images, labels = batch
            images = random_crop_and_flip(images, batch_seed, padding, fill, horizontal_flip)
            return images, labels

        ds = tf.data.Dataset.zip((ds, seeds)).map(
            augment_batch, num_parallel_calls=tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)
