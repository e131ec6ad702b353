"""The shared pieces: normalization switch, conv-BN-activation block, argument checks, head,
weights loading and profiling."""

import keras
import numpy as np
import pytest

import models
from models import building_blocks


def test_normalization_switch_accepts_its_three_choices_and_the_string_none():
    for value, expected in [
        ("batch_norm", "batch_norm"),
        ("keras", "keras"),
        (None, None),
        ("none", None),
        ("None", None),
    ]:
        assert building_blocks.resolve_normalization(value) == expected


def test_unknown_normalization_names_the_value_and_the_choices():
    for value in ["bn", "layer_norm", "", True]:
        with pytest.raises(ValueError, match="normalization=.*'batch_norm'.*'keras'.*None"):
            building_blocks.resolve_normalization(value)


def test_normalization_layer_builds_the_requested_class():
    from layers import BatchNormalization

    ours = models.normalization_layer("batch_norm", momentum=0.9, epsilon=1e-5, name="bn")
    theirs = models.normalization_layer("keras", momentum=0.9, epsilon=1e-5, name="bn")
    assert isinstance(ours, BatchNormalization)
    assert type(theirs) is keras.layers.BatchNormalization
    for layer in (ours, theirs):
        assert (layer.momentum, layer.epsilon) == (pytest.approx(0.9), pytest.approx(1e-5))
    assert models.normalization_layer(None) is None


@pytest.mark.parametrize("normalization", ["batch_norm", "keras", None])
def test_conv_block_normalizes_the_linear_output_before_the_activation(normalization):
    inputs = keras.Input((6, 6, 2))
    outputs = building_blocks.conv_norm_act(
        inputs, 4, 3, name="block", normalization=normalization, activation="sigmoid"
    )
    model = keras.Model(inputs, outputs)
    conv = model.get_layer("block")
    activation = model.get_layer("block_sigmoid")
    # Paper §3.2: BN's beta replaces the bias, which comes back when there is no BN.
    assert conv.use_bias == (normalization is None)
    if normalization is None:
        assert activation.input is conv.output
        assert "block_bn" not in {layer.name for layer in model.layers}
    else:
        bn = model.get_layer("block_bn")
        assert bn.input is conv.output
        assert activation.input is bn.output

    # Inference: sigmoid(gamma * (conv(x) - mean) / sqrt(var + eps) + beta), recomputed here.
    images = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype("float32")
    linear = keras.ops.convert_to_numpy(conv(images)).astype("float64")
    if normalization is not None:
        bn = model.get_layer("block_bn")
        rng = np.random.default_rng(1)
        bn.moving_mean.assign(rng.normal(size=4).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=4).astype("float32"))
        bn.gamma.assign(rng.uniform(0.5, 1.5, size=4).astype("float32"))
        bn.beta.assign(rng.normal(size=4).astype("float32"))
        mean, variance, gamma, beta = (
            keras.ops.convert_to_numpy(v).astype("float64")
            for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)
        )
        linear = gamma * (linear - mean) / np.sqrt(variance + bn.epsilon) + beta
    expected = 1.0 / (1.0 + np.exp(-linear))
    np.testing.assert_allclose(model(images, training=False), expected, rtol=1e-5, atol=1e-6)


def test_multiply_adds_match_a_hand_count_for_every_counted_layer_type():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same")(inputs)  # 4×4×6
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)  # 4×4×12
    x = keras.layers.SeparableConv2D(8, 3, depth_multiplier=1, padding="valid")(x)  # 2×2×8
    x = keras.layers.Conv2D(4, 1, groups=2)(x)  # 2×2×4
    x = keras.layers.Conv2DTranspose(3, 2, strides=2)(x)  # 4×4×3
    x = keras.layers.BatchNormalization()(x)
    inner_inputs = keras.Input((4, 4, 3))
    inner = keras.Model(inner_inputs, keras.layers.Dense(5)(inner_inputs))  # per position
    x = inner(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(7)(x)
    model = keras.Model(inputs, outputs)

    expected = (
        4 * 4 * 3 * 3 * 4 * 6  # conv: output positions × window × in × out
        + 4 * 4 * 3 * 3 * 6 * 2  # depthwise
        + 2 * 2 * (3 * 3 * 12 + 12 * 8)  # separable: depthwise then pointwise
        + 2 * 2 * 1 * (8 // 2) * 4  # grouped 1×1
        + 2 * 2 * 2 * 2 * 4 * 3  # transposed: every input position scatters a window
        + 4 * 4 * 3 * 5  # dense on a 4×4×3 map, inside a nested model
        + 4 * 4 * 5 * 7  # final dense
    )
    assert models.count_multiply_adds(model) == expected


def test_multiply_adds_need_static_shapes():
    model = models.plain_cnn(input_shape=(None, None, 1), widths=(4,))
    with pytest.raises(ValueError, match="static input_shape"):
        models.count_multiply_adds(model)


def test_profile_reports_all_and_trainable_parameters():
    model = models.plain_cnn(widths=(4, 8), depth=1, classes=3, input_shape=(8, 8, 1))
    profile = models.profile_model(model)
    # conv 3·3·1·4 + BN(4); conv 3·3·4·8 + BN(8); dense 8·3 + 3.
    trainable = 36 + 2 * 4 + 288 + 2 * 8 + 27
    assert profile.trainable_parameters == trainable
    assert profile.parameters == trainable + 2 * 4 + 2 * 8 == model.count_params()
    assert profile.multiply_adds == 8 * 8 * 36 + 4 * 4 * 288 + 8 * 3
    assert profile.input_shape == (8, 8, 1)
    assert profile.name == "plain_cnn"


def test_input_shape_is_validated_like_keras_applications():
    for input_shape, message in [
        ((28, 28), "three entries"),
        ((28, 28, 1, 1), "three entries"),
        ((28, 28, None), "number of channels"),
        ((28, 2, 1), "at least 4x4"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.plain_cnn(input_shape=input_shape)


def test_channels_first_configuration_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(keras.config, "image_data_format", lambda: "channels_first")
    with pytest.raises(ValueError, match="set_image_data_format\\('channels_last'\\)"):
        models.plain_cnn()


def test_input_tensor_builds_the_model_on_an_existing_graph():
    raw = keras.Input((12, 12, 1), name="raw_pixels")
    scaled = keras.layers.Rescaling(1 / 255)(raw)
    model = models.plain_cnn(input_tensor=scaled, widths=(4, 8), classes=3)
    assert model.inputs[0] is raw
    assert model.output.shape == (None, 3)
    with pytest.raises(ValueError, match="input_tensor must be a Keras tensor"):
        models.plain_cnn(input_tensor=np.zeros((2, 12, 12, 1), "float32"))


def test_feature_extraction_without_top():
    for pooling, shape in [(None, (None, 6, 6, 8)), ("avg", (None, 8)), ("max", (None, 8))]:
        model = models.plain_cnn(
            include_top=False, pooling=pooling, widths=(4, 8), input_shape=(12, 12, 1)
        )
        assert tuple(model.output.shape) == shape
        assert "predictions" not in {layer.name for layer in model.layers}


def test_max_pooled_features_are_the_maximum_of_the_feature_map():
    kwargs = dict(include_top=False, widths=(4, 8), input_shape=(12, 12, 1))
    feature_map = models.plain_cnn(**kwargs)
    pooled = models.plain_cnn(pooling="max", **kwargs)
    pooled.set_weights(feature_map.get_weights())
    images = np.random.default_rng(0).uniform(size=(2, 12, 12, 1)).astype("float32")
    maps = keras.ops.convert_to_numpy(feature_map(images, training=False))
    np.testing.assert_allclose(pooled(images, training=False), maps.max(axis=(1, 2)), rtol=1e-6)


def test_head_and_weights_arguments_are_checked_with_the_fix():
    for arguments, error, message in [
        (dict(pooling="sum", include_top=False), ValueError, "pooling='sum'"),
        (dict(classes=0), ValueError, "classes"),
        (dict(classifier_activation="softmaxx"), ValueError, "classifier_activation='softmaxx'"),
        (dict(weights="imagenet"), ValueError, "no pretrained weights"),
        (dict(weights="model.h5"), ValueError, "'.weights.h5'"),
        (dict(weights="/nonexistent/model.weights.h5"), FileNotFoundError, "does not exist"),
    ]:
        with pytest.raises(error, match=message):
            models.plain_cnn(**arguments)


def test_weights_file_of_the_same_architecture_loads_and_of_another_is_refused(tmp_path):
    kwargs = dict(widths=(4, 8), input_shape=(12, 12, 1), classes=3)
    model = models.plain_cnn(**kwargs)
    bn = model.get_layer("stage1_conv1_bn")
    bn.moving_variance.assign(np.full(4, 2.5, "float32"))
    path = tmp_path / "plain.weights.h5"
    model.save_weights(path)

    rebuilt = models.plain_cnn(weights=str(path), **kwargs)
    images = np.random.default_rng(0).uniform(size=(2, 12, 12, 1)).astype("float32")
    np.testing.assert_array_equal(rebuilt(images, training=False), model(images, training=False))

    with pytest.raises(ValueError, match="does not match the architecture"):
        models.plain_cnn(weights=str(path), widths=(4, 16), input_shape=(12, 12, 1), classes=3)


def test_classifier_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = models.plain_cnn(widths=(4, 8), input_shape=(12, 12, 1), classifier_activation=None)
    assert model.get_layer("stage1_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.output.dtype == "float32"
