"""`models.inception_v3` is `keras.applications.InceptionV3`: same parameters, and weights saved
from Keras' model load into ours and compute the same function."""

import dataclasses

import keras
import numpy as np
import pytest

import models
from models import pretrained

SMALL = (75, 75, 3)  # keras.applications' minimum input: full width, cheap forward passes


def test_parameter_counts_are_keras_applications(tmp_path):
    assert models.inception_v3().count_params() == 23_851_784
    assert models.inception_v3(include_top=False).count_params() == 21_802_784


@pytest.fixture(scope="module")
def keras_reference():
    reference = keras.applications.InceptionV3(weights=None, input_shape=SMALL)
    rng = np.random.default_rng(0)
    for layer in reference.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            layer.beta.assign(rng.normal(0, 0.2, channels))
    images = rng.uniform(-1, 1, (2, *SMALL)).astype("float32")
    return reference, images


def features(model, images):
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    return keras.ops.convert_to_numpy(pooled(images, training=False))


@pytest.mark.parametrize("normalization", ["batch_norm", "keras"])
def test_weights_saved_from_keras_applications_compute_the_same_function(
    keras_reference, tmp_path, normalization
):
    reference, images = keras_reference
    path = str(tmp_path / "inception_v3.weights.h5")
    reference.save_weights(path)
    ours = models.inception_v3(input_shape=SMALL, weights=path, normalization=normalization)
    np.testing.assert_allclose(features(ours, images), features(reference, images), atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(images, training=False)),
        keras.ops.convert_to_numpy(reference(images, training=False)),
        atol=1e-7,
    )


def write_legacy_h5(model, path):
    """The layout of keras.applications' published files (Keras 2's HDF5 weights format)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)


def test_imagenet_loads_keras_files_from_keras_cache(keras_reference, tmp_path, monkeypatch):
    reference, images = keras_reference
    weight_set = pretrained.get_weights("inception_v3")
    cache = tmp_path / "models"
    cache.mkdir()
    write_legacy_h5(reference, cache / weight_set.file_name)
    notop = keras.Model(reference.input, reference.get_layer("mixed10").output)
    write_legacy_h5(notop, cache / weight_set.notop_file_name)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    # The real files' md5 sums belong to the real files; these stand-ins have other ones.
    stand_in = dataclasses.replace(weight_set, file_hash=None, notop_file_hash=None)
    monkeypatch.setattr(pretrained, "_WEIGHTS", [stand_in])

    ours = models.inception_v3(weights="imagenet", input_shape=SMALL)
    np.testing.assert_allclose(features(ours, images), features(reference, images), atol=1e-5)
    backbone = models.inception_v3(
        weights="imagenet", input_shape=SMALL, include_top=False, pooling="avg"
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(backbone(images, training=False)),
        features(reference, images),
        atol=1e-5,
    )


def test_imagenet_offline_is_one_line_saying_how_to_pass_a_local_file(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    weight_set = pretrained.get_weights("inception_v3")
    unreachable = dataclasses.replace(weight_set, url="http://127.0.0.1:9/weights.h5")
    monkeypatch.setattr(pretrained, "_WEIGHTS", [unreachable])
    with pytest.raises(OSError) as caught:
        models.inception_v3(weights="imagenet", input_shape=SMALL)
    message = str(caught.value)
    assert "\n" not in message and "cannot download" in message
    assert f"weights='/path/to/{weight_set.file_name}'" in message
    assert not list((tmp_path / "models").glob("*.h5"))  # no partial download left behind


def test_include_preprocessing_is_keras_preprocess_input(keras_reference):
    reference, _ = keras_reference
    images = np.random.default_rng(1).integers(0, 256, (2, *SMALL)).astype("float32")
    ours = models.inception_v3(input_shape=SMALL, include_preprocessing=True)
    ours_plain = models.inception_v3(input_shape=SMALL)
    ours_plain.set_weights(ours.get_weights())
    expected = keras.applications.inception_v3.preprocess_input(images.copy())
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(ours.get_layer("preprocessing")(images)), expected
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(images, training=False)),
        keras.ops.convert_to_numpy(ours_plain(expected, training=False)),
        atol=1e-7,
    )


def test_imagenet_needs_the_full_width_and_1000_classes():
    with pytest.raises(ValueError, match="width_multiplier=0.5 \\(the weights need 1.0\\)"):
        models.inception_v3(weights="imagenet", width_multiplier=0.5)
    with pytest.raises(ValueError, match="received classes=5"):
        models.inception_v3(weights="imagenet", classes=5)
