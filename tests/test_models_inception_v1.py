"""GoogLeNet is Table 1 of Szegedy et al. (2014), checkably, and its LRN is Caffe's.

Expected numbers are recomputed here from Table 1's filter columns (typed in below), and
compared with the figures the table itself prints. Table 1 counts parameters in units of 1024
weights (biases left out) and operations in millions of multiply-adds; most rows match the
filter columns to within 2 %, and the test pins down the rows that do not.
"""

import keras
import numpy as np
import pytest

import models

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj; output (size, depth);
# printed params (K) and ops (M).
TABLE_1 = {
    "3a": ((64, 96, 128, 16, 32, 32), (28, 256), 159, 128),
    "3b": ((128, 128, 192, 32, 96, 64), (28, 480), 380, 304),
    "4a": ((192, 96, 208, 16, 48, 64), (14, 512), 364, 73),
    "4b": ((160, 112, 224, 24, 64, 64), (14, 512), 437, 88),
    "4c": ((128, 128, 256, 24, 64, 64), (14, 512), 463, 100),
    "4d": ((112, 144, 288, 32, 64, 64), (14, 528), 580, 119),
    "4e": ((256, 160, 320, 32, 128, 128), (14, 832), 840, 170),
    "5a": ((256, 160, 320, 32, 128, 128), (7, 832), 1072, 54),
    "5b": ((384, 192, 384, 48, 128, 128), (7, 1024), 1388, 71),
}
# Rows whose printed figures disagree with their own filter columns by more than 2 %.
TABLE_1_OFF = {("4c", "params"), ("5a", "params"), ("5a", "ops")}


def module_weights(filters, input_channels):
    n1, n3r, n3, n5r, n5, proj = filters
    cin = input_channels
    return cin * n1 + cin * n3r + 9 * n3r * n3 + cin * n5r + 25 * n5r * n5 + cin * proj


@pytest.fixture(scope="module")
def googlenet():
    return models.inception_v1()


def kernels(model, prefix):
    return sum(
        int(np.prod(layer.kernel.shape))
        for layer in model.layers
        if layer.name.startswith(prefix) and isinstance(layer, keras.layers.Conv2D)
    )


def test_every_module_has_table_1s_output_shape_and_parameters(googlenet):
    channels = 192
    for module, (filters, (size, depth), printed_k, printed_m) in TABLE_1.items():
        output = googlenet.get_layer(f"inception_{module}_output").output
        assert tuple(output.shape) == (None, size, size, depth), module
        weights = module_weights(filters, channels)
        assert kernels(googlenet, f"inception_{module}_") == weights, module
        params_off = abs(weights / 1024 - printed_k) / printed_k
        ops_off = abs(weights * size * size / 1e6 - printed_m) / printed_m
        assert (params_off > 0.02) == ((module, "params") in TABLE_1_OFF), (module, params_off)
        assert (ops_off > 0.02) == ((module, "ops") in TABLE_1_OFF), (module, ops_off)
        channels = depth
    # 4c: 509,440 weights = 497.5 K (printed 463 K), its ops (99.8 M) match the printed 100 M.
    # 5a: 1,042,432 weights = 1018 K, 51.1 M ops (printed 1072 K and 54 M).


def test_stem_and_classifier_against_table_1(googlenet):
    conv1 = kernels(googlenet, "conv1_7x7_s2")
    # Table 1 prints 2.7 K params and 34 M ops for the 7×7/2 convolution over RGB: its weights
    # are 7·7·3·64 = 9,408 (9.2 K) and its ops 112·112·9,408 = 118 M, 3.5 times more.
    assert conv1 == 7 * 7 * 3 * 64 == 9408
    conv2 = kernels(googlenet, "conv2_3x3")
    assert conv2 == 64 * 64 + 9 * 64 * 192 == 112 * 1024  # printed: 112 K, 360 M
    assert round(conv2 * 56 * 56 / 1e6) == 360
    assert googlenet.get_layer("predictions").kernel.shape == (1024, 1000)  # 1000 K, 1 M
    for name, size in [("pool1_3x3_s2", 56), ("pool2_3x3_s2", 28), ("pool3_3x3_s2", 14)]:
        assert googlenet.get_layer(name).output.shape[1] == size
    assert googlenet.get_layer("pool4_3x3_s2").output.shape[1:] == (7, 7, 832)
    assert googlenet.get_layer("dropout").rate == pytest.approx(0.4)


def test_published_network_has_biases_lrn_and_no_bn(googlenet):
    convolutions = [layer for layer in googlenet.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convolutions) == 3 + 6 * 9
    assert all(conv.use_bias for conv in convolutions)
    assert not [layer for layer in googlenet.layers if hasattr(layer, "moving_mean")]
    assert googlenet.get_layer("pool1_norm1").input is googlenet.get_layer("pool1_3x3_s2").output
    assert googlenet.get_layer("conv2_norm2").input is googlenet.get_layer("conv2_3x3_relu").output
    weights = sum(int(np.prod(conv.kernel.shape)) for conv in convolutions)
    biases = sum(conv.filters for conv in convolutions)
    assert googlenet.count_params() == weights + biases + 1024 * 1000 + 1000 == 6_998_552
    channels, module_mults = 192, 0
    for filters, (size, depth), _, _ in TABLE_1.values():
        module_mults += size * size * module_weights(filters, channels)
        channels = depth
    stem = 112 * 112 * 9408 + 56 * 56 * (64 * 64 + 9 * 64 * 192)
    expected = stem + module_mults + 1024 * 1000
    assert models.count_multiply_adds(googlenet) == expected == 1_582_671_872


def test_bn_variant_normalizes_every_convolution_and_drops_lrn():
    model = models.inception_v1(normalization="batch_norm")
    names = {layer.name for layer in model.layers}
    assert "pool1_norm1" not in names and "conv2_norm2" not in names
    for conv in [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]:
        assert not conv.use_bias
        assert (
            model.get_layer(f"{conv.name}_relu").input is model.get_layer(f"{conv.name}_bn").output
        )
    assert models.inception_v1(normalization="batch_norm", lrn=True).get_layer("conv2_norm2")


@pytest.mark.multi_backend
def test_local_response_normalization_is_caffes_formula():
    from models.inception_v1 import LocalResponseNormalization

    x = np.random.default_rng(0).normal(0, 30, (2, 3, 3, 7)).astype("float32")
    layer = LocalResponseNormalization(size=5, alpha=1e-4, beta=0.75, bias=1.0)
    squares = np.pad(x.astype("float64") ** 2, ((0, 0), (0, 0), (0, 0), (2, 2)))
    window = sum(squares[..., i : i + 7] for i in range(5))
    expected = x / (1.0 + 1e-4 / 5 * window) ** 0.75
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5)
    assert LocalResponseNormalization.from_config(layer.get_config()).get_config() == (
        layer.get_config()
    )


def test_local_response_normalization_equals_tensorflows_with_alpha_divided_by_size():
    import tensorflow as tf

    from models.inception_v1 import LocalResponseNormalization

    x = np.random.default_rng(1).normal(0, 30, (2, 4, 4, 9)).astype("float32")
    expected = tf.nn.local_response_normalization(
        x, depth_radius=2, bias=1.0, alpha=1e-4 / 5, beta=0.75
    )
    np.testing.assert_allclose(LocalResponseNormalization()(x).numpy(), expected.numpy(), rtol=1e-5)
