"""BN-Inception is the network of the BN paper's Figure 5, checkably.

The expected numbers are recomputed here from the table itself (filter counts typed in from
Figure 5), not read from `models.bn_inception`'s own module table.
"""

import keras
import numpy as np
import pytest

import models

# Figure 5, one row per Inception module:
# (#1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, pool projection, stride);
# projection 0 = "pass through".
FIGURE_5 = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}
# Output sizes at 224×224×3: the Figure 5 column for 3a-4b and 5a-5b; 608/608/1056 for 4c, 4d
# and 4e, which is what the filter counts add up to (and what the Caffe release builds).
MODULE_OUTPUTS = {
    "3a": (28, 28, 256),
    "3b": (28, 28, 320),
    "3c": (14, 14, 576),
    "4a": (14, 14, 576),
    "4b": (14, 14, 576),
    "4c": (14, 14, 608),
    "4d": (14, 14, 608),
    "4e": (7, 7, 1056),
    "5a": (7, 7, 1024),
    "5b": (7, 7, 1024),
}


def figure_5_cost(
    rows=FIGURE_5, stem="conv", classes=1000, normalization=True, bn_scale=True, normalize_stem=True
):
    """(trainable parameters, all parameters, multiply-adds) of the table's network at 224."""
    # (kernel, input channels, output channels, output height)
    convs = [(1, 64, 64, 56), (3, 64, 192, 56)]
    channels, size = 192, 28
    for n1x1, n3r, n3, nd_r, nd, _, proj, stride in rows.values():
        out_size = size // stride
        if n1x1:
            convs.append((1, channels, n1x1, size))
        convs += [(1, channels, n3r, size), (3, n3r, n3, out_size)]
        convs += [(1, channels, nd_r, size), (3, nd_r, nd, size), (3, nd, nd, out_size)]
        if proj:
            convs.append((1, channels, proj, size))
        channels, size = n1x1 + n3 + nd + (proj or channels), out_size

    if stem == "conv":
        stem_weights = 7 * 7 * 3 * 64
        stem_mults = 112 * 112 * stem_weights
    else:  # depthwise 7×7 with 8 filters per input channel, then 1×1 from 24 to 64 channels
        stem_weights = 7 * 7 * 3 * 8 + 3 * 8 * 64
        stem_mults = 112 * 112 * stem_weights
    weights = stem_weights + sum(k * k * cin * cout for k, cin, cout, _ in convs)
    mults = stem_mults + sum(h * h * k * k * cin * cout for k, cin, cout, h in convs)
    normalized_channels = 64 + sum(cout for _, _, cout, _ in convs)
    classifier = channels * classes + classes
    if normalization:  # gamma and beta trainable, moving mean and variance not
        stem_bias = 0 if normalize_stem else 64  # TF-slim's stem: a bias, no BN
        normalized_channels -= stem_bias
        trainable = weights + (1 + bn_scale) * normalized_channels + stem_bias + classifier
        return trainable, trainable + 2 * normalized_channels, mults + channels * classes
    # Without BN every convolution has a bias.
    trainable = weights + normalized_channels + classifier
    return trainable, trainable, mults + channels * classes


SLIM_ROWS = dict(
    FIGURE_5,
    **{
        "4c": (160, 128, 160, 128, 160, "avg", 96, 1),
        "4d": (96, 128, 192, 160, 192, "avg", 96, 1),
    },
)


@pytest.fixture(scope="module")
def default_model():
    return models.bn_inception()


def conv_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_module_outputs_match_figure_5(default_model):
    for module, shape in MODULE_OUTPUTS.items():
        output = default_model.get_layer(f"inception_{module}_output").output
        assert tuple(output.shape) == (None, *shape), module
    assert default_model.output.shape == (None, 1000)


def test_stem_matches_figure_5(default_model):
    expected = {
        "conv1_7x7_s2_relu": (112, 112, 64),
        "pool1_3x3_s2": (56, 56, 64),
        "conv2_3x3_reduce_relu": (56, 56, 64),
        "conv2_3x3_relu": (56, 56, 192),
        "pool2_3x3_s2": (28, 28, 192),
    }
    for name, shape in expected.items():
        assert tuple(default_model.get_layer(name).output.shape) == (None, *shape), name
    assert default_model.get_layer("conv1_7x7_s2").kernel_size == (7, 7)
    assert default_model.get_layer("conv1_7x7_s2").strides == (2, 2)


def test_parameter_count_equals_the_one_computed_from_figure_5(default_model):
    trainable, total, _ = figure_5_cost()
    assert trainable == 11_285_224
    assert models.count_parameters(default_model, trainable_only=True) == trainable
    assert default_model.count_params() == total == 11_305_256


def test_multiply_adds_equal_the_ones_computed_from_figure_5(default_model):
    _, _, mults = figure_5_cost()
    assert models.profile_model(default_model).multiply_adds == mults == 2_032_600_064


def test_pooling_branches_follow_figure_5(default_model):
    for module, (n1x1, _, _, _, _, pool, proj, stride) in FIGURE_5.items():
        pool_layer = default_model.get_layer(f"inception_{module}_pool")
        expected_type = (
            keras.layers.MaxPooling2D if pool == "max" else keras.layers.AveragePooling2D
        )
        assert type(pool_layer) is expected_type, module
        assert pool_layer.strides == (stride, stride)
        names = {layer.name for layer in default_model.layers}
        # 3c and 4e: no 1×1 branch, and the max pool passes through unprojected.
        assert (f"inception_{module}_1x1" in names) == bool(n1x1), module
        assert (f"inception_{module}_pool_proj" in names) == bool(proj), module


def test_every_convolution_is_followed_by_bn_then_relu(default_model):
    convolutions = conv_layers(default_model)
    assert len(convolutions) == 3 + sum(
        5 + bool(row[0]) + bool(row[6]) for row in FIGURE_5.values()
    )
    for conv in convolutions:
        assert not conv.use_bias, conv.name
        bn = default_model.get_layer(f"{conv.name}_bn")
        relu = default_model.get_layer(f"{conv.name}_relu")
        assert bn.input is conv.output
        assert relu.input is bn.output
        assert relu.get_config()["activation"] == "relu"


def test_default_normalization_is_bnzoo_batch_normalization_with_caffes_epsilon(default_model):
    from layers import BatchNormalization

    assert isinstance(default_model.get_layer("inception_3a_1x1_bn"), BatchNormalization)
    assert default_model.get_layer("inception_3a_1x1_bn").momentum == pytest.approx(0.99)
    # The Caffe release's BN epsilon, part of the function its weights compute.
    assert default_model.get_layer("inception_3a_1x1_bn").epsilon == pytest.approx(1e-5)
    assert "dropout" not in {layer.name for layer in default_model.layers}
    narrow = dict(input_shape=(32, 32, 3), width_multiplier=0.1, min_depth=4)
    same = models.bn_inception(padding="same", **narrow)
    assert same.get_layer("inception_3a_1x1_bn").epsilon == pytest.approx(1e-3)
    explicit = models.bn_inception(bn_epsilon=1e-2, **narrow)
    assert explicit.get_layer("inception_3a_1x1_bn").epsilon == pytest.approx(1e-2)


def test_keras_normalization_has_the_default_parameter_count(default_model):
    model = models.bn_inception(normalization="keras", bn_momentum=0.9, bn_epsilon=1e-5)
    bn = model.get_layer("inception_3a_1x1_bn")
    assert type(bn) is keras.layers.BatchNormalization
    assert (bn.momentum, bn.epsilon) == (pytest.approx(0.9), pytest.approx(1e-5))
    assert model.count_params() == default_model.count_params()
    assert models.count_parameters(model, trainable_only=True) == models.count_parameters(
        default_model, trainable_only=True
    )


def test_without_normalization_there_is_no_bn_layer_and_convolutions_have_biases():
    model = models.bn_inception(normalization=None)
    assert not [layer for layer in model.layers if "normalization" in type(layer).__name__.lower()]
    assert not [layer for layer in model.layers if hasattr(layer, "moving_mean")]
    assert all(conv.use_bias for conv in conv_layers(model))
    trainable, total, _ = figure_5_cost(normalization=False)
    assert model.count_params() == trainable == total


def test_separable_stem_is_the_papers_depth_multiplier_8_convolution():
    model = models.bn_inception(stem="separable")
    stem = model.get_layer("conv1_7x7_s2")
    assert isinstance(stem, keras.layers.SeparableConv2D)
    assert stem.depth_multiplier == 8
    assert tuple(stem.depthwise_kernel.shape) == (7, 7, 3, 8)
    assert tuple(stem.pointwise_kernel.shape) == (1, 1, 24, 64)
    trainable, _, mults = figure_5_cost(stem="separable")
    assert models.count_parameters(model, trainable_only=True) == trainable
    assert models.count_multiply_adds(model) == mults


def test_slim_variant_is_tf_slims_inception_v2():
    model = models.create_model("bn_inception_slim")
    for module, shape in dict(
        MODULE_OUTPUTS, **{"4c": (14, 14, 576), "4d": (14, 14, 576), "4e": (7, 7, 1024)}
    ).items():
        assert tuple(model.get_layer(f"inception_{module}_output").output.shape) == (None, *shape)
    # Slim's arg scope gives BN to conv2d layers only: its separable stem has a bias and no
    # BN, and its BN has no gamma (batch_norm_scale=False).
    trainable, total, _ = figure_5_cost(
        SLIM_ROWS, stem="separable", bn_scale=False, normalize_stem=False
    )
    assert models.count_parameters(model, trainable_only=True) == trainable == 11_178_336
    assert model.count_params() == total
    stem = model.get_layer("conv1_7x7_s2")
    assert stem.use_bias and "conv1_7x7_s2_bn" not in {layer.name for layer in model.layers}
    assert model.get_layer("inception_3a_1x1_bn").gamma is None
    assert model.get_layer("inception_3a_1x1_bn").epsilon == pytest.approx(1e-3)
    # TensorFlow "same" padding: no explicit padding layers.
    assert not [layer for layer in model.layers if layer.name.endswith("_pad")]
    # TF-slim's inception_v2 keeps dropout (keep_prob 0.8) before its classifier.
    assert model.get_layer("dropout").rate == pytest.approx(0.2)


def test_width_multiplier_thins_every_convolution_like_slim_depth_multiplier(default_model):
    multiplier, min_depth = 0.3, 16
    model = models.bn_inception(width_multiplier=multiplier, min_depth=min_depth)
    for conv in conv_layers(default_model):
        expected = max(int(conv.filters * multiplier), min_depth)
        assert model.get_layer(conv.name).filters == expected, conv.name
    n1x1, _, n3, _, nd, _, proj, _ = FIGURE_5["3a"]
    channels = sum(max(int(f * multiplier), min_depth) for f in (n1x1, n3, nd, proj))
    assert model.get_layer("inception_3a_output").output.shape[-1] == channels


def test_builds_from_32_by_32_inputs_and_rejects_smaller_ones():
    model = models.bn_inception(input_shape=(32, 32, 3), width_multiplier=0.1, min_depth=4)
    assert tuple(model.get_layer("inception_5b_output").output.shape[1:3]) == (1, 1)
    assert models.get_model_spec("bn_inception").min_input_size == 32
    with pytest.raises(ValueError, match="at least 32x32"):
        models.bn_inception(input_shape=(31, 64, 3))


def test_unknown_spatial_size_gives_a_fully_convolutional_model():
    model = models.bn_inception(
        input_shape=(None, None, 3), width_multiplier=0.1, min_depth=4, classes=7
    )
    for height, width in [(32, 32), (64, 96)]:
        images = np.random.default_rng(0).uniform(size=(2, height, width, 3)).astype("float32")
        assert model(images, training=False).shape == (2, 7)


def test_module_outputs_can_be_tapped_by_name():
    model = models.bn_inception(
        include_top=False, input_shape=(64, 64, 3), width_multiplier=0.1, min_depth=4
    )
    tap = keras.Model(model.input, model.get_layer("inception_4e_output").output)
    images = np.zeros((1, 64, 64, 3), "float32")
    # 64 / 32 = 2 after five stride-2 stages; 4e passes 4d's channels through its max pool.
    expected_channels = (
        max(int(192 * 0.1), 4)
        + max(int(256 * 0.1), 4)
        + tap.get_layer("inception_4d_output").output.shape[-1]
    )
    assert tap(images).shape == (1, 2, 2, expected_channels)


def test_dropout_rate_adds_dropout_before_the_classifier():
    model = models.bn_inception(
        input_shape=(32, 32, 3), width_multiplier=0.1, min_depth=4, dropout_rate=0.4
    )
    dropout = model.get_layer("dropout")
    assert dropout.rate == pytest.approx(0.4)
    assert dropout.input is model.get_layer("avg_pool").output
    assert model.get_layer("predictions").input is dropout.output


def test_invalid_options_name_the_bad_value():
    for arguments, message in [
        (dict(stem="7x7"), "stem='7x7'"),
        (dict(module_table="paper"), "module_table='paper'"),
        (dict(width_multiplier=0), "width_multiplier=0"),
        (dict(min_depth=0), "min_depth=0"),
        (dict(dropout_rate=1.0), "dropout_rate=1.0"),
        (dict(normalization="layer_norm"), "normalization='layer_norm'"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.bn_inception(**arguments)


# ------------------------------------------------------------------------------------------
# Caffe's arithmetic (padding="caffe", the released network's).
# ------------------------------------------------------------------------------------------


def caffe_max_pool(x, size=3, stride=2):
    """Caffe's max pool without padding, ceil mode, for one (H, W, C) map (NumPy)."""
    height, width = x.shape[:2]
    out_h = -(-(height - size) // stride) + 1
    out_w = -(-(width - size) // stride) + 1
    out = np.empty((out_h, out_w, x.shape[2]), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            window = x[i * stride : i * stride + size, j * stride : j * stride + size]
            out[i, j] = window.max(axis=(0, 1))
    return out


@pytest.mark.parametrize("size", [7, 8, 14, 15])
def test_ceil_mode_max_pool_is_caffes_for_odd_and_even_sizes(size):
    from models.bn_inception import ceil_mode_max_pool

    inputs = keras.Input((size, size, 2))
    model = keras.Model(inputs, ceil_mode_max_pool(inputs, name="pool"))
    x = np.random.default_rng(size).uniform(0, 1, (1, size, size, 2)).astype("float32")
    expected = caffe_max_pool(x[0])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x))[0], expected)


def test_caffe_average_pool_divides_by_nine_at_the_border():
    model = models.bn_inception(
        include_top=False, input_shape=(32, 32, 3), width_multiplier=0.05, min_depth=2
    )
    pool = keras.Model(model.input, model.get_layer("inception_3a_pool").output)
    features = keras.Model(model.input, model.get_layer("pool2_3x3_s2").output)
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    before = keras.ops.convert_to_numpy(features(x))[0].astype("float64")
    padded = np.pad(before, ((1, 1), (1, 1), (0, 0)))
    expected = np.mean(
        [
            padded[i : i + before.shape[0], j : j + before.shape[1]]
            for i in range(3)
            for j in range(3)
        ],
        axis=0,
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pool(x))[0], expected, rtol=1e-5)


def test_caffe_strided_convolutions_pad_symmetrically():
    model = models.bn_inception(input_shape=(64, 64, 3), width_multiplier=0.05, min_depth=2)
    assert model.get_layer("conv1_7x7_s2_pad").padding == ((3, 3), (3, 3))
    assert model.get_layer("conv1_7x7_s2").padding == "valid"
    assert model.get_layer("inception_3c_3x3_pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("inception_4e_double_3x3_2").padding == "valid"
    assert model.get_layer("inception_3a_3x3").padding == "same"  # stride 1: symmetric anyway


def test_caffe_padding_refuses_sizes_whose_branches_would_differ():
    for size in (227, 256, 96, 32):
        models.bn_inception(input_shape=(size, size, 3), width_multiplier=0.05, min_depth=2)
    with pytest.raises(ValueError, match="cannot take 48-pixel inputs.*padding='same'"):
        models.bn_inception(input_shape=(48, 48, 3))
    model = models.bn_inception(input_shape=(48, 48, 3), padding="same", width_multiplier=0.05)
    assert model.output.shape == (None, 1000)
