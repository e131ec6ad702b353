"""plain_cnn: the VGG-style default model and its options."""

import keras
import numpy as np
import pytest

import models


def layer_names(model):
    return [layer.name for layer in model.layers]


def test_default_architecture_is_three_stages_of_two_conv_bn_relu_blocks():
    model = models.plain_cnn()
    assert tuple(model.input.shape) == (None, 28, 28, 1)
    assert model.output.shape == (None, 10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [conv.filters for conv in convs] == [32, 32, 64, 64, 128, 128]
    assert all(conv.kernel_size == (3, 3) and not conv.use_bias for conv in convs)
    for conv in convs:
        bn = model.get_layer(f"{conv.name}_bn")
        relu = model.get_layer(f"{conv.name}_relu")
        assert bn.input is conv.output and relu.input is bn.output
    assert isinstance(model.get_layer("stage1_pool"), keras.layers.MaxPooling2D)
    assert tuple(model.get_layer("stage2_conv2_relu").output.shape) == (None, 14, 14, 64)
    # 28 → 14 → 7: the last stage works on 7×7 maps before global average pooling.
    assert tuple(model.get_layer("stage3_conv2_relu").output.shape) == (None, 7, 7, 128)
    assert model.get_layer("dropout").rate == pytest.approx(0.1)

    weights = [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    trainable = sum(9 * cin * cout + 2 * cout for cin, cout in weights) + 128 * 10 + 10
    assert models.count_parameters(model, trainable_only=True) == trainable == 288_170
    mults = sum(
        size * size * 9 * cin * cout
        for size, (cin, cout) in zip([28, 28, 14, 14, 7, 7], weights, strict=True)
    )
    assert models.count_multiply_adds(model) == mults + 128 * 10


def test_sigmoid_baseline_without_normalization_trains():
    model = models.plain_cnn(
        activation="sigmoid",
        normalization=None,
        widths=(8, 16),
        input_shape=(12, 12, 1),
        classifier_activation=None,
    )
    assert not [layer for layer in model.layers if hasattr(layer, "moving_mean")]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert all(conv.use_bias for conv in convs)
    assert model.get_layer("stage1_conv1_sigmoid").input is convs[0].output
    # Sigmoid networks get Glorot initialization, ReLU ones He's.
    assert isinstance(convs[0].kernel_initializer, keras.initializers.GlorotUniform)
    assert isinstance(
        models.plain_cnn(widths=(4,)).get_layer("stage1_conv1").kernel_initializer,
        keras.initializers.HeNormal,
    )

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(16, 12, 12, 1)).astype("float32")
    labels = (images.mean(axis=(1, 2, 3)) > 0.5).astype("int32")
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    first = model.train_on_batch(images, labels)
    for _ in range(10):
        last = model.train_on_batch(images, labels)
    assert last < first


def test_widths_depth_pooling_and_dropout_options():
    model = models.plain_cnn(
        widths=(8, 16, 24, 32),
        depth=3,
        stage_pooling="avg",
        dropout_rate=0.0,
        input_shape=(32, 32, 3),
        activation="tanh",
    )
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [conv.filters for conv in convs] == [8] * 3 + [16] * 3 + [24] * 3 + [32] * 3
    assert isinstance(model.get_layer("stage3_pool"), keras.layers.AveragePooling2D)
    assert tuple(model.get_layer("stage4_conv3_tanh").output.shape) == (None, 4, 4, 32)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert "stage1_dropout" in layer_names(models.plain_cnn(widths=(4, 8), dropout_rate=0.3))


def test_odd_sizes_keep_their_border_and_the_minimum_size_follows_the_stage_count():
    model = models.plain_cnn(widths=(4, 8, 16), input_shape=(7, 9, 1))
    assert tuple(model.get_layer("stage3_conv2_relu").output.shape) == (None, 2, 3, 16)
    with pytest.raises(ValueError, match="at least 4x4"):
        models.plain_cnn(widths=(4, 8, 16), input_shape=(3, 9, 1))
    models.plain_cnn(widths=(4, 8, 16, 32), input_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="at least 8x8"):
        models.plain_cnn(widths=(4, 8, 16, 32), input_shape=(7, 8, 1))


def test_invalid_options_name_the_bad_value():
    for arguments, message in [
        (dict(widths=()), "widths=()"),
        (dict(widths=(8, 0)), "widths=(8, 0)"),
        (dict(depth=0), "depth"),
        (dict(activation="sigmod"), "activation='sigmod'"),
        (dict(activation=None), "needs an activation"),
        (dict(stage_pooling="strided"), "stage_pooling='strided'"),
        (dict(dropout_rate=-0.1), "dropout_rate=-0.1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            models.plain_cnn(**arguments)
