"""`preprocess_images` and `make_pipeline` against NumPy references on small synthetic data."""

import numpy as np
import pytest
import tensorflow as tf

from bnzoo.data import DatasetInfo, make_pipeline, preprocess_images
from bnzoo.data.info import horizontal_flip_default
from bnzoo.data.pipeline import crop_padding_for, fits_in_memory

MEAN, STD = (0.2, 0.4, 0.6), (0.25, 0.5, 0.3)


def _random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _normalize(pixels_uint8_or_float, mean=MEAN, std=STD):
    pixels = np.asarray(pixels_uint8_or_float, np.float64)
    return (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)


def _bilinear_upscale(image, out_h, out_w):
    """Half-pixel-centre bilinear interpolation (TensorFlow 2's convention) in NumPy."""
    in_h, in_w = image.shape[:2]

    def weights(out_size, in_size):
        src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, src - low

    r0, r1, rw = weights(out_h, in_h)
    c0, c1, cw = weights(out_w, in_w)
    rows = image[r0] * (1 - rw)[:, None, None] + image[r1] * rw[:, None, None]
    return rows[:, c0] * (1 - cw)[None, :, None] + rows[:, c1] * cw[None, :, None]


def test_preprocess_normalizes_each_channel_like_numpy():
    images = _random_images((3, 5, 6, 3))
    out = preprocess_images(images, MEAN, STD)
    assert out.dtype == tf.float32 and out.shape == (3, 5, 6, 3)
    np.testing.assert_allclose(out.numpy(), _normalize(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [(32, 32), (31, 33)])
def test_slightly_larger_target_is_reached_by_centred_black_padding(target):
    images = _random_images((2, 28, 28, 3), seed=1)
    out = preprocess_images(images, MEAN, STD, image_size=target).numpy()
    top, left = (target[0] - 28) // 2, (target[1] - 28) // 2
    padded = np.zeros((2, *target, 3))  # black in pixel space
    padded[:, top : top + 28, left : left + 28] = images
    np.testing.assert_allclose(out, _normalize(padded), rtol=1e-5, atol=1e-5)
    # The frame is black after normalization: -mean / std per channel.
    np.testing.assert_allclose(out[:, 0, 0], np.tile(-np.array(MEAN) / STD, (2, 1)), rtol=1e-6)


def test_much_larger_target_is_reached_by_bilinear_resizing():
    images = _random_images((2, 7, 9, 3), seed=2)
    out = preprocess_images(images, MEAN, STD, image_size=(20, 25)).numpy()
    expected = np.stack([_normalize(_bilinear_upscale(image, 20, 25)) for image in images])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_shrinking_is_antialiased_and_keeps_the_mean_brightness():
    # One bright column in four: point-sampling bilinear resizing (no antialiasing) to a quarter
    # of the width would see only dark pixels; an antialiased resize averages them to 1/4.
    stripes = np.zeros((1, 16, 64, 1), np.uint8)
    stripes[:, :, ::4] = 255
    out = preprocess_images(stripes, (0.0,), (1.0,), image_size=(16, 16)).numpy()
    np.testing.assert_allclose(out[:, 4:-4, 4:-4], 0.25, atol=1e-3)


@pytest.mark.parametrize(
    "source, target",
    [((28, 28), (32, 32)), ((7, 9), (20, 25)), ((64, 64), (16, 16)), ((5, 5), (5, 5))],
)
def test_unknown_sizes_at_trace_time_give_the_same_result_as_known_sizes(source, target):
    images = _random_images((3, *source, 3), seed=3)
    dynamic = tf.function(
        lambda x: preprocess_images(x, MEAN, STD, image_size=target),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
    )
    expected = preprocess_images(images, MEAN, STD, image_size=target).numpy()
    np.testing.assert_allclose(dynamic(images).numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 5])
def test_any_batch_size_works_in_a_graph(batch):
    traced = tf.function(
        lambda x: preprocess_images(x, (0.5,), (0.5,), image_size=(32, 32)),
        input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8)],
    )
    assert traced(np.zeros((batch, 28, 28, 1), np.uint8)).shape == (batch, 32, 32, 1)


def test_wrong_dtype_rank_or_statistics_are_rejected():
    with pytest.raises(ValueError, match="expects uint8 images.*got float32"):
        preprocess_images(np.zeros((1, 4, 4, 1), np.float32), (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\], got shape"):
        preprocess_images(np.zeros((4, 4, 1), np.uint8), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="need 1 or 3 values"):
        preprocess_images(np.zeros((1, 4, 4, 3), np.uint8), (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="must be positive"):
        preprocess_images(np.zeros((1, 4, 4, 1), np.uint8), (0.5,), (0.0,))
    with pytest.raises(ValueError, match="image_size"):
        preprocess_images(np.zeros((1, 4, 4, 1), np.uint8), (0.5,), (0.5,), image_size=(0, 4))


# A small labelled dataset whose every image is unique, so batches can be traced to examples.
NUM_EXAMPLES, SIZE = 50, 16


def _dataset(channels=1):
    images = _random_images((NUM_EXAMPLES, SIZE, SIZE, channels), seed=4)
    labels = np.arange(NUM_EXAMPLES, dtype=np.int64)
    info = DatasetInfo(
        name="synthetic",
        num_classes=NUM_EXAMPLES,
        image_shape=(SIZE, SIZE, channels),
        class_names=tuple(str(i) for i in range(NUM_EXAMPLES)),
        num_examples=NUM_EXAMPLES,
        mean=(0.3,) * channels,
        std=(0.2,) * channels,
        horizontal_flip=True,
    )
    return tf.data.Dataset.from_tensor_slices((images, labels)), info, images


def _epoch(pipeline):
    batches = list(pipeline)
    return (
        np.concatenate([x.numpy() for x, _ in batches]),
        np.concatenate([y.numpy() for _, y in batches]),
        [int(x.shape[0]) for x, _ in batches],
    )


@pytest.mark.multi_backend
def test_evaluation_pipeline_keeps_order_and_preprocesses_every_example():
    ds, info, images = _dataset()
    pipeline = make_pipeline(ds, info, batch_size=16, training=False, augment=True)
    assert pipeline.element_spec[0].dtype == tf.float32
    assert pipeline.element_spec[1].dtype == tf.int32
    x, y, sizes = _epoch(pipeline)
    assert sizes == [16, 16, 16, 2]
    np.testing.assert_array_equal(y, np.arange(NUM_EXAMPLES))
    # No augmentation outside training, even with augment=True.
    np.testing.assert_allclose(x, _normalize(images, (0.3,), (0.2,)), rtol=1e-5, atol=1e-5)
    _, _, sizes = _epoch(
        make_pipeline(ds, info, batch_size=16, training=False, drop_remainder=True)
    )
    assert sizes == [16, 16, 16]


def test_training_pipeline_reshuffles_every_epoch_and_a_seed_repeats_the_order():
    ds, info, _ = _dataset()
    pipeline = make_pipeline(ds, info, batch_size=8, training=True, seed=7)
    first, second = _epoch(pipeline)[1], _epoch(pipeline)[1]
    # Each epoch is a permutation of all examples, and a different one.
    assert sorted(first) == sorted(second) == list(range(NUM_EXAMPLES))
    assert first.tolist() != second.tolist() and first.tolist() != list(range(NUM_EXAMPLES))
    again = make_pipeline(ds, info, batch_size=8, training=True, seed=7)
    assert _epoch(again)[1].tolist() == first.tolist()


def _find_crop(augmented, original_normalized, padding, fill):
    """(dy, dx, mirrored) such that `augmented` is that crop of the padded original, or None."""
    padded = np.pad(original_normalized - fill, [(padding, padding), (padding, padding), (0, 0)])
    padded += fill
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy : dy + SIZE, dx : dx + SIZE]
            for mirrored, candidate in ((False, crop), (True, crop[:, ::-1])):
                if np.allclose(augmented, candidate, atol=1e-5):
                    return dy, dx, mirrored
    return None


@pytest.mark.parametrize("horizontal_flip", [False, True])
def test_augmentation_is_a_padded_random_crop_with_optional_mirroring(horizontal_flip):
    ds, info, images = _dataset(channels=3)
    pipeline = make_pipeline(
        ds, info, batch_size=10, augment=True, seed=3, horizontal_flip=horizontal_flip
    )
    x, y, _ = _epoch(pipeline)
    padding = crop_padding_for((SIZE, SIZE))
    assert padding == 2
    fill = -np.array(info.mean) / np.array(info.std)
    crops = [
        _find_crop(augmented, _normalize(images[label], info.mean, info.std), padding, fill)
        for augmented, label in zip(x, y, strict=True)
    ]
    assert all(crop is not None for crop in crops)
    shifts = {(dy, dx) for dy, dx, _ in crops}
    mirrored = [m for _, _, m in crops]
    assert len(shifts) > 5  # independent random offsets per image
    if horizontal_flip:
        assert 10 < sum(mirrored) < 40  # about half of 50
    else:
        assert not any(mirrored)
    # A new epoch draws new crops; the same seed draws the same ones again.
    assert not np.array_equal(_epoch(pipeline)[0], x)
    repeat = make_pipeline(
        ds, info, batch_size=10, augment=True, seed=3, horizontal_flip=horizontal_flip
    )
    np.testing.assert_array_equal(_epoch(repeat)[0], x)


def test_pipeline_fits_images_to_the_model_input():
    ds, info, images = _dataset()
    x, _, _ = _epoch(make_pipeline(ds, info, batch_size=50, training=False, image_size=(20, 20)))
    assert x.shape == (NUM_EXAMPLES, 20, 20, 1)
    np.testing.assert_allclose(x[:, 2:18, 2:18], _normalize(images, (0.3,), (0.2,)), atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_bad_batch_sizes_are_rejected(bad):
    ds, info, _ = _dataset()
    with pytest.raises(ValueError, match=f"batch_size {bad!r} must be a positive integer"):
        make_pipeline(ds, info, batch_size=bad)


def test_bad_shuffle_buffer_is_rejected():
    ds, info, _ = _dataset()
    with pytest.raises(ValueError, match="shuffle_buffer 0"):
        make_pipeline(ds, info, shuffle_buffer=0)


def test_cache_to_a_file_and_memory_budget(tmp_path):
    ds, info, _ = _dataset()
    cache_file = str(tmp_path / "cache")
    first = _epoch(make_pipeline(ds, info, batch_size=25, training=False, cache=cache_file))[0]
    assert any(p.name.startswith("cache") for p in tmp_path.iterdir())
    second = _epoch(make_pipeline(ds, info, batch_size=25, training=False, cache=cache_file))[0]
    np.testing.assert_array_equal(first, second)
    assert fits_in_memory(info)
    huge = DatasetInfo(**{**info.__dict__, "num_examples": 10**13})
    assert not fits_in_memory(huge)
    varying = DatasetInfo(**{**info.__dict__, "image_shape": (None, None, 1)})
    assert not fits_in_memory(varying)


def test_flips_are_off_for_digits_fashion_and_image_folders_and_on_for_natural_images():
    assert not horizontal_flip_default("mnist")
    assert not horizontal_flip_default("fashion_mnist")
    assert not horizontal_flip_default("image_folder:/photos")
    assert horizontal_flip_default("cifar10")
    assert horizontal_flip_default("cifar100:3.0.2")


def test_dataset_info_rejects_statistics_that_do_not_match_the_channels():
    with pytest.raises(ValueError, match="one value per channel"):
        DatasetInfo("x", 2, (4, 4, 3), ("a", "b"), 10, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        DatasetInfo("x", 3, (4, 4, 1), ("a", "b"), 10, (0.5,), (0.5,))
