"""paper_mlp: the BN paper's MNIST network (§4.1)."""

import keras
import numpy as np
import pytest

import models


def dense_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def test_architecture_is_three_hidden_layers_of_100_sigmoid_units_with_bn_before_the_sigmoid():
    model = models.paper_mlp()
    assert tuple(model.input.shape) == (None, 28, 28, 1)
    assert [layer.units for layer in dense_layers(model)] == [100, 100, 100, 10]
    for index in (1, 2, 3):
        dense = model.get_layer(f"hidden_{index}_dense")
        bn = model.get_layer(f"hidden_{index}_bn")
        preactivation = model.get_layer(f"hidden_{index}_preactivation")
        activation = model.get_layer(f"hidden_{index}_activation")
        assert not dense.use_bias
        assert bn.input is dense.output
        assert preactivation.input is bn.output
        assert activation.input is preactivation.output
        assert activation.get_config()["activation"] == "sigmoid"
    assert model.get_layer("predictions").input is model.get_layer("hidden_3_activation").output
    # 784·100 + 2·100·100 weights, BN's gamma and beta on 300 units, 100·10 + 10 classifier.
    assert models.count_parameters(model, trainable_only=True) == 98_400 + 600 + 1_010
    assert model.count_params() == 98_400 + 600 + 1_010 + 600


def test_without_normalization_hidden_layers_compute_sigmoid_of_wu_plus_b():
    model = models.paper_mlp(normalization=None)
    assert not [layer for layer in model.layers if hasattr(layer, "moving_mean")]
    assert all(layer.use_bias for layer in dense_layers(model))
    assert (
        model.get_layer("hidden_3_preactivation").input is model.get_layer("hidden_3_dense").output
    )
    assert model.count_params() == 78_500 + 2 * 10_100 + 1_010


def test_weights_start_from_a_gaussian_with_standard_deviation_0_1():
    kernel = keras.ops.convert_to_numpy(models.paper_mlp(seed=3).get_layer("hidden_1_dense").kernel)
    assert kernel.mean() == pytest.approx(0.0, abs=0.002)
    assert kernel.std() == pytest.approx(0.1, rel=0.02)
    # Untruncated: about 4.55 % of a Gaussian lies beyond two standard deviations.
    assert np.mean(np.abs(kernel) > 0.2) == pytest.approx(0.0455, abs=0.004)
    custom = models.paper_mlp(kernel_stddev=0.5, seed=3).get_layer("hidden_2_dense").kernel
    assert keras.ops.convert_to_numpy(custom).std() == pytest.approx(0.5, rel=0.05)


def test_the_same_seed_gives_the_same_initial_weights_with_and_without_bn():
    with_bn = models.paper_mlp(seed=7)
    without = models.paper_mlp(normalization=None, seed=7)
    for index in (1, 2, 3):
        np.testing.assert_array_equal(
            with_bn.get_layer(f"hidden_{index}_dense").kernel,
            without.get_layer(f"hidden_{index}_dense").kernel,
        )
    assert not np.array_equal(
        with_bn.get_layer("hidden_1_dense").kernel[:100],
        with_bn.get_layer("hidden_2_dense").kernel,
    )


@pytest.mark.multi_backend
def test_preactivation_tap_is_the_input_of_the_last_sigmoid():
    model = models.paper_mlp(seed=0)
    bn = model.get_layer("hidden_3_bn")
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(size=100).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=100).astype("float32"))
    names = ["hidden_2_activation", "hidden_3_preactivation", "hidden_3_activation"]
    tap = keras.Model(model.input, [model.get_layer(name).output for name in names])
    images = rng.uniform(size=(4, 28, 28, 1)).astype("float32")

    previous, preactivation, activation = (
        keras.ops.convert_to_numpy(t).astype("float64") for t in tap(images, training=False)
    )

    # Inference-mode BN of W·u, recomputed from the layer's variables (Algorithm 2).
    kernel, mean, variance, gamma, beta = (
        keras.ops.convert_to_numpy(v).astype("float64")
        for v in (model.get_layer("hidden_3_dense").kernel, *bn_variables(bn))
    )
    expected = gamma * (previous @ kernel - mean) / np.sqrt(variance + bn.epsilon) + beta
    np.testing.assert_allclose(preactivation, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(activation, 1 / (1 + np.exp(-preactivation)), rtol=1e-5)


def bn_variables(bn):
    return bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta


def test_flattens_any_fully_known_input_shape():
    assert models.paper_mlp(input_shape=(784,)).get_layer("hidden_1_dense").kernel.shape == (
        784,
        100,
    )
    assert models.paper_mlp(input_shape=(4, 4, 3)).get_layer("hidden_1_dense").kernel.shape == (
        48,
        100,
    )
    features = models.paper_mlp(include_top=False, hidden_units=20, hidden_layers=2)
    assert features.output.shape == (None, 20)
    assert features.layers[-1].name == "hidden_2_activation"


def test_invalid_options_name_the_bad_value():
    for arguments, message in [
        (dict(pooling="avg"), "pooling='avg'"),
        (dict(input_shape=(None, 28, 1)), "every dimension must be known"),
        (dict(hidden_units=0), "hidden_units"),
        (dict(hidden_layers=0), "hidden_layers"),
        (dict(kernel_stddev=0.0), "kernel_stddev"),
        (dict(activation="sigmoidd"), "activation='sigmoidd'"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.paper_mlp(**arguments)
