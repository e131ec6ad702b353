"""plain_cnn_small (train.py's default model) and plain_cnn's depth per stage."""

import keras
import numpy as np
import pytest

import models

# Building and shapes only: the same on every backend.
pytestmark = pytest.mark.multi_backend


def convolutions(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def test_default_model_spends_a_quarter_of_plain_cnns_multiply_adds():
    model = models.create_model("plain_cnn_small")
    assert tuple(model.input.shape) == (None, 28, 28, 1) and model.output.shape == (None, 10)
    convs = convolutions(model)
    assert [conv.filters for conv in convs] == [16, 16, 32, 32, 64, 64]
    assert all(conv.kernel_size == (3, 3) and not conv.use_bias for conv in convs)
    for conv in convs:  # BN between the convolution and the ReLU (paper section 3.2)
        bn, relu = model.get_layer(f"{conv.name}_bn"), model.get_layer(f"{conv.name}_relu")
        assert bn.input is conv.output and relu.input is bn.output
    assert tuple(model.get_layer("stage3_conv2_relu").output.shape) == (None, 7, 7, 64)

    weights = [(1, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)]
    sizes = [28, 28, 14, 14, 7, 7]
    multiply_adds = sum(
        size * size * 9 * cin * cout for size, (cin, cout) in zip(sizes, weights, strict=True)
    )
    assert models.count_multiply_adds(model) == multiply_adds + 64 * 10 == 7_338_880
    trainable = sum(9 * cin * cout + 2 * cout for cin, cout in weights) + 64 * 10 + 10
    assert models.count_parameters(model, trainable_only=True) == trainable == 72_666
    plain = models.count_multiply_adds(models.plain_cnn())
    assert 0.25 < models.count_multiply_adds(model) / plain < 0.26


def test_each_stage_takes_its_own_depth():
    model = models.plain_cnn(widths=(8, 16, 32), depth=(1, 2, 3))
    names = [conv.name for conv in convolutions(model)]
    assert names == [
        "stage1_conv1",
        "stage2_conv1",
        "stage2_conv2",
        "stage3_conv1",
        "stage3_conv2",
        "stage3_conv3",
    ]
    uniform = models.plain_cnn(widths=(8, 16), depth=3)
    assert len(convolutions(uniform)) == 6
    # A per-stage depth of twos is the uniform depth 2: the same layers and weight shapes.
    per_stage = models.plain_cnn(widths=(8, 16), depth=(2, 2))
    uniform_two = models.plain_cnn(widths=(8, 16), depth=2)
    assert [(w.path, tuple(w.shape)) for w in per_stage.weights] == [
        (w.path, tuple(w.shape)) for w in uniform_two.weights
    ]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"depth": (2, 2)},
            r"depth \(blocks per stage\) must be a positive integer, or one per stage",
        ),
        (
            {"depth": (2, 0, 2)},
            r"depth \(blocks per stage\) must be a positive integer, or one per stage",
        ),
        ({"widths": ()}, "widths must be a non-empty sequence"),
        ({"widths": (16, 32.5, 64)}, "widths must be a non-empty sequence"),
        ({"dropout_rate": 1.0}, "dropout_rate must be in"),
        ({"activation": None}, "needs an activation"),
        ({"input_shape": (2, 2, 1)}, "at least 4x4"),
    ],
)
def test_bad_arguments_name_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.plain_cnn(**kwargs)


def test_logits_without_bn_regain_the_convolution_bias():
    model = models.plain_cnn(normalization=None, classifier_activation=None, widths=(4, 8))
    assert all(conv.use_bias for conv in convolutions(model))
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype("float32")
    assert keras.ops.convert_to_numpy(model(images)).shape == (2, 10)
