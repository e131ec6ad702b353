"""Every registered model builds, predicts, trains, saves and exports.

One parametrized test per behaviour, run over `models.list_models()`, so a newly registered
model is covered without writing a test (and `TINY` tells how to make it test-sized). Variants
whose test-sized arguments come out the same (ResNet's depths differ only in `blocks`, which
`TINY` sets) are the same network here, and run once.
"""

import inspect

import keras
import numpy as np
import pytest

import models

# Test-sized arguments per builder family; registry defaults (e.g. the slim module table) still
# apply underneath. Narrow widths keep the whole suite fast; the architectures are unchanged.
# BN-Inception's multiplier floors every convolution at 8 filters: few distinct weight shapes,
# so few initializer compilations on JAX.
TINY = {
    models.bn_inception: dict(input_shape=(32, 32, 3), width_multiplier=0.01, min_depth=8),
    models.inception_v1: dict(input_shape=(32, 32, 3), width_multiplier=0.01, min_depth=8),
    # Inception-v3's smallest input; its three valid convolutions need 75×75.
    models.inception_v3: dict(input_shape=(75, 75, 3), width_multiplier=0.01, min_depth=8),
    models.plain_cnn: dict(input_shape=(12, 12, 1), widths=(8, 16)),
    models.paper_mlp: dict(input_shape=(6, 6, 1), hidden_units=16),
    # ResNet's depths differ only in blocks per stage (tests/test_models_resnet.py builds them):
    # here one stage with an identity block and three with only their projection block.
    models.resnet: dict(
        input_shape=(32, 32, 3), width_multiplier=0.01, min_depth=8, blocks=(2, 1, 1, 1)
    ),
}
CLASSES = 5
BATCH = 8
ALL_MODELS = models.list_models()
# The JAX run (`make test`'s second pass) is a subset: JAX compiles every initializer shape and
# every train step with XLA, which for BN-Inception costs tens of seconds on a 2-core CPU. It
# builds and runs one model per builder family, and trains and saves the two small ones.
JAX_FORWARD_MODELS = ["bn_inception", "inception_v1", "paper_mlp", "plain_cnn", "resnet50"]
JAX_TRAINING_MODELS = ["paper_mlp", "plain_cnn"]
# XLA's CPU compile time grows with depth; the small models keep covering XLA.
XLA_TOO_SLOW = {"inception_v3"}
# GoogLeNet is published without BN (Table 1); its BN variant is `normalization="batch_norm"`.
WITHOUT_BN_BY_DEFAULT = {"inception_v1"}


def tiny_arguments(name):
    spec = models.get_model_spec(name)
    return {**spec.default_kwargs, **TINY.get(spec.builder, {})}


def distinct_networks():
    """One registered name per distinct (builder, test-sized arguments): the builder's own
    default (`resnet50` for `models.resnet`) where it is one of them."""
    networks = {}
    for name in ALL_MODELS:
        builder = models.get_model_spec(name).builder
        key = (builder, repr(sorted(tiny_arguments(name).items())))
        if key not in networks or name == inspect.signature(builder).parameters["name"].default:
            networks[key] = name
    return sorted(networks.values())


def with_jax_subset(subset):
    return [
        pytest.param(name, marks=pytest.mark.multi_backend) if name in subset else name
        for name in distinct_networks()
    ]


def build(name, **overrides):
    spec = models.get_model_spec(name)
    assert spec.builder in TINY, f"add test-sized arguments for {name!r} to TINY"
    return models.create_model(name, **{"classes": CLASSES, **TINY[spec.builder], **overrides})


def example_batch(model, seed=0):
    rng = np.random.default_rng(seed)
    shape = (BATCH, *model.inputs[0].shape[1:])
    images = rng.uniform(0.0, 1.0, size=shape).astype("float32")
    labels = rng.integers(0, CLASSES, size=(BATCH,))
    return images, labels


def infer(model, images):
    """Inference-mode outputs as NumPy.

    On JAX, `predict` compiles the whole model once; calling it eagerly instead compiles every
    primitive separately, which for BN-Inception takes minutes.
    """
    if keras.backend.backend() == "jax":
        return model.predict(images, batch_size=len(images), verbose=0)
    return keras.ops.convert_to_numpy(model(images, training=False))


def bn_layers(model):
    return [layer for layer in model.layers if hasattr(layer, "moving_variance")]


def randomize_bn_state(model, seed=1):
    """Give BN non-default statistics, so a save/load that lost them would show."""
    rng = np.random.default_rng(seed)
    for layer in bn_layers(model):
        channels = layer.moving_mean.shape
        layer.moving_mean.assign(rng.normal(0.0, 0.1, channels).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
        if layer.gamma is not None:  # Inception-v3's BN has no scale
            layer.gamma.assign(rng.uniform(0.8, 1.2, channels).astype("float32"))
        layer.beta.assign(rng.normal(0.0, 0.1, channels).astype("float32"))


def test_every_registered_model_has_test_sized_arguments():
    assert ALL_MODELS == sorted(
        [
            "bn_inception",
            "bn_inception_slim",
            "inception_v1",
            "inception_v3",
            "paper_mlp",
            "plain_cnn",
            "plain_cnn_small",
            "resnet101",
            "resnet152",
            "resnet50",
        ]
    )
    for name in ALL_MODELS:
        assert models.get_model_spec(name).builder in TINY


@pytest.mark.parametrize("name", with_jax_subset(JAX_FORWARD_MODELS))
def test_forward_pass_gives_class_probabilities(name):
    model = build(name)
    images, _ = example_batch(model)
    probabilities = infer(model, images)
    assert probabilities.shape == (BATCH, CLASSES)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", distinct_networks())
def test_classifier_activation_none_gives_the_logits_of_the_softmax_model(name):
    probabilities_model = build(name)
    logits_model = build(name, classifier_activation=None)
    logits_model.set_weights(probabilities_model.get_weights())
    images, _ = example_batch(probabilities_model)

    logits = keras.ops.convert_to_numpy(logits_model(images, training=False)).astype("float64")
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    probabilities = keras.ops.convert_to_numpy(probabilities_model(images, training=False))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", with_jax_subset(JAX_TRAINING_MODELS))
def test_training_step_updates_every_weight_and_the_moving_statistics(name):
    model = build(name, classifier_activation=None)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # XLA compiles a hundred-convolution train step for about a minute on this CPU.
        jit_compile=name not in XLA_TOO_SLOW,
    )
    images, labels = example_batch(model)
    trainable_before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    statistics = [(layer.moving_mean, layer.moving_variance) for layer in bn_layers(model)]
    assert bool(statistics) == (name not in WITHOUT_BN_BY_DEFAULT)
    statistics_before = [
        (keras.ops.convert_to_numpy(mean), keras.ops.convert_to_numpy(variance))
        for mean, variance in statistics
    ]

    loss = model.train_on_batch(images, labels)

    assert np.isfinite(loss)
    for weight, before in zip(model.trainable_weights, trainable_before, strict=True):
        assert not np.array_equal(keras.ops.convert_to_numpy(weight), before), weight.path
    for (mean, variance), (mean_before, variance_before) in zip(
        statistics, statistics_before, strict=True
    ):
        assert not np.array_equal(keras.ops.convert_to_numpy(mean), mean_before), mean.path
        assert not np.array_equal(keras.ops.convert_to_numpy(variance), variance_before)


@pytest.mark.parametrize("name", with_jax_subset(JAX_TRAINING_MODELS))
def test_keras_file_round_trip_gives_identical_outputs(name, tmp_path):
    model = build(name)
    randomize_bn_state(model)
    images, _ = example_batch(model)
    path = tmp_path / f"{name}.keras"

    model.save(path)
    restored = keras.models.load_model(path)

    assert restored.name == model.name
    assert [layer.name for layer in restored.layers] == [layer.name for layer in model.layers]
    np.testing.assert_array_equal(infer(restored, images), infer(model, images))


@pytest.mark.parametrize("name", distinct_networks())
def test_saved_model_export_gives_identical_outputs(name, tmp_path):
    import tensorflow as tf

    model = build(name)
    randomize_bn_state(model)
    images, _ = example_batch(model)
    path = tmp_path / name

    model.export(str(path), format="tf_saved_model", verbose=False)
    # Keep the loaded object alive: its variables die with it.
    reloaded = tf.saved_model.load(str(path))
    served = reloaded.serve(tf.constant(images))

    np.testing.assert_allclose(
        served.numpy(),
        keras.ops.convert_to_numpy(model(images, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
