"""`models.resnet` is `keras.applications.ResNet50`: the same layers and parameters, and weights
saved from Keras' model load through bnzoo's weights path and compute the same function.

Keras' own model, run in float64 with the same weights, is the exact reference: the float32
error Keras' model makes against it is what float32 arithmetic costs on this machine, and ours
(the same convolutions and BN in another summation order) must stay within a small multiple of
it. A wrong epsilon, a lost bias or a misplaced stride would be orders of magnitude larger.
"""

import dataclasses

import keras
import numpy as np
import pytest

import models
from layers import BatchNormalization
from models import pretrained

SMALL = (64, 64, 3)  # conv5 still sees a 2×2 map; a forward pass takes milliseconds
# Ours and Keras' model make the same sums in other orders, so ours errs against the float64
# result by about as much as Keras' float32 result does. Four times that leaves room for the
# output where ours rounds less luckily, and stays orders of magnitude below what a wrong
# epsilon, a lost bias or a misplaced stride gives.
FLOAT32_MARGIN = 4.0
#: What the reference's variables are drawn from, by name (kernels keep Keras' initialization).
RANDOMIZED = {
    "moving_mean": lambda rng, shape: rng.normal(0, 0.5, shape),
    "moving_variance": lambda rng, shape: rng.uniform(0.5, 2.0, shape),
    "gamma": lambda rng, shape: rng.uniform(0.5, 1.5, shape),
    "beta": lambda rng, shape: rng.normal(0, 0.2, shape),
    "bias": lambda rng, shape: rng.normal(0, 0.2, shape),  # the convolutions' and classifier's
}


@pytest.fixture(scope="module")
def keras_reference():
    """keras.applications' ResNet-50 with every statistic, scale, shift and bias randomized
    (Keras initializes biases to 0 and BN to the identity, which would hide a lost one), its
    float64 twin, and images."""
    reference = keras.applications.ResNet50(weights=None, input_shape=SMALL)
    rng = np.random.default_rng(0)
    for variable in reference.weights:
        if variable.name in RANDOMIZED:
            variable.assign(RANDOMIZED[variable.name](rng, variable.shape))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        exact = keras.applications.ResNet50(weights=None, input_shape=SMALL)
    finally:
        keras.config.set_dtype_policy(previous)
    exact.set_weights([w.astype("float64") for w in reference.get_weights()])
    images = rng.normal(0, 50, (2, *SMALL)).astype("float32")
    return reference, exact, images


@pytest.fixture(scope="module")
def keras_weights(keras_reference, tmp_path_factory):
    """The reference's weights, saved by Keras (`model.save_weights`)."""
    path = str(tmp_path_factory.mktemp("keras") / "resnet50.weights.h5")
    keras_reference[0].save_weights(path)
    return path


@pytest.fixture(scope="module")
def ours(keras_weights):
    return models.resnet(input_shape=SMALL, weights=keras_weights)


def predictions(model, images):
    images = images.astype(model.input.dtype)
    return keras.ops.convert_to_numpy(model(images, training=False)).astype("float64")


def features(model, images):
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)
    images = images.astype(model.input.dtype)
    return keras.ops.convert_to_numpy(pooled(images, training=False)).astype("float64")


def test_layers_and_parameters_are_keras_applications_layer_for_layer(keras_reference, ours):
    reference, _, _ = keras_reference

    def layout(model):
        # keras.applications names its input by Keras' global counter ("input_layer",
        # "input_layer_1", ... depending on what the process built before): not compared.
        return [
            (
                None if isinstance(layer, keras.layers.InputLayer) else layer.name,
                type(layer).__name__,
                [tuple(w.shape) for w in layer.weights],
            )
            for layer in model.layers
        ]

    assert layout(ours) == layout(reference)
    # keras.applications.ResNet50's count (the input size changes no weight's shape).
    assert ours.count_params() == 25_636_712
    assert all(
        isinstance(layer, BatchNormalization)
        for layer in ours.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def assert_float32_close(ours, reference, exact):
    """`ours` is the float64 result `exact` up to FLOAT32_MARGIN times the float32 error of
    `reference` (Keras' model): the same function, to the precision of the arithmetic."""
    ours, reference = (np.asarray(x, "float64") for x in (ours, reference))
    # Where float32 happens to round every output exactly, its resolution is the error.
    resolution = np.finfo("float32").eps * np.abs(exact).max()
    float32_error = max(np.abs(reference - exact).max(), resolution)
    assert float32_error < 1e-3 * np.abs(exact).max()  # rounding, not a bug in the reference
    deviation = np.abs(ours - exact).max()
    assert deviation <= FLOAT32_MARGIN * float32_error, (deviation, float32_error)


def test_weights_saved_from_keras_applications_compute_the_same_function(keras_reference, ours):
    # (With normalization="keras" too: tests/test_models_inception_v3.py.)
    reference, exact, images = keras_reference
    assert_float32_close(
        features(ours, images), features(reference, images), features(exact, images)
    )
    assert_float32_close(
        predictions(ours, images), predictions(reference, images), predictions(exact, images)
    )


def write_legacy_h5(model, path):
    """The layout of keras.applications' published files (Keras 2's HDF5 weights format)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)


def test_imagenet_loads_keras_applications_file_from_keras_cache(
    keras_reference, tmp_path, monkeypatch
):
    reference, _, _ = keras_reference
    weight_set = pretrained.get_weights("resnet50")
    assert weight_set.file_name == "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    cache = tmp_path / "models"
    cache.mkdir()
    write_legacy_h5(reference, cache / weight_set.file_name)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    # The real file's md5 sum belongs to the real file; this stand-in has another one. (The
    # no-top file is fetched the same way: tests/test_models_inception_v3.py.)
    stand_in = dataclasses.replace(weight_set, file_hash=None)
    monkeypatch.setattr(pretrained, "_WEIGHTS", [stand_in])

    ours = models.resnet(weights="imagenet", input_shape=SMALL)
    for loaded, published in zip(ours.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(loaded, published, err_msg=loaded.path)


def test_imagenet_needs_keras_applications_architecture():
    with pytest.raises(ValueError, match="conv_bias=False \\(the weights need True\\)"):
        models.resnet(weights="imagenet", conv_bias=False)
    # Each depth's weights are its variant's: blocks of no variant fit none of them.
    with pytest.raises(ValueError, match="blocks=\\(2, 2, 2, 2\\) \\(the weights need"):
        models.resnet(weights="imagenet", blocks=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="received classes=10"):
        models.create_model("resnet101", weights="imagenet", classes=10)


def test_include_preprocessing_is_keras_preprocess_input():
    images = np.random.default_rng(1).integers(0, 256, (2, *SMALL)).astype("float32")
    model = models.resnet(input_shape=SMALL, include_preprocessing=True, width_multiplier=0.1)
    expected = keras.applications.resnet50.preprocess_input(images.copy())
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("preprocessing")(images)), expected
    )
    np.testing.assert_array_equal(models.preprocess_input(images, "keras_caffe"), expected)


def test_depths_are_table_1_rows_and_name_their_stage_outputs():
    table_1 = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
    assert models.list_models("resnet*") == sorted(table_1)
    for name, blocks in table_1.items():
        spec = models.get_model_spec(name)
        assert spec.default_kwargs["blocks"] == blocks
        assert spec.feature_layers[32] == f"conv5_block{blocks[-1]}_out"
    model = models.create_model("resnet101", input_shape=(32, 32, 3), width_multiplier=0.05)
    names = {layer.name for layer in model.layers}
    for stage, count in enumerate(table_1["resnet101"], start=2):
        assert f"conv{stage}_block{count}_out" in names
        assert f"conv{stage}_block{count + 1}_out" not in names
    # Only the first block of a stage projects its shortcut.
    assert sum(name.endswith("_0_conv") for name in names) == 4


def test_feature_extractor_returns_each_stage_at_its_stride():
    extractor = models.create_feature_extractor(
        "resnet50", strides=(2, 4, 8, 16, 32), input_shape=SMALL, width_multiplier=0.125
    )
    shapes = {key: tuple(value.shape[1:]) for key, value in extractor.output.items()}
    assert shapes == {
        "stride_2": (32, 32, 8),
        "stride_4": (16, 16, 32),
        "stride_8": (8, 8, 64),
        "stride_16": (4, 4, 128),
        "stride_32": (2, 2, 256),
    }


def test_conv_bias_false_drops_only_the_biases_bn_undoes():
    with_bias = models.resnet(input_shape=SMALL, width_multiplier=0.1)
    without = models.resnet(input_shape=SMALL, width_multiplier=0.1, conv_bias=False)
    biases = sum(
        layer.bias.shape[0]
        for layer in with_bias.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias
    )
    assert without.count_params() == with_bias.count_params() - biases
    assert not any(
        layer.use_bias for layer in without.layers if isinstance(layer, keras.layers.Conv2D)
    )


def test_invalid_blocks_name_the_value():
    with pytest.raises(ValueError, match="blocks=\\(3, 4, 6\\)"):
        models.resnet(blocks=(3, 4, 6))
    with pytest.raises(ValueError, match="blocks=\\(3, 0, 6, 3\\)"):
        models.resnet(blocks=(3, 0, 6, 3))
