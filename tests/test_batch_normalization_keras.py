"""layers.BatchNormalization as a drop-in for keras.layers.BatchNormalization, and serialization.

Keras' own layer is the reference: same weights in the same order, so after `set_weights` both
layers must produce the same outputs and moving statistics, in training and inference, on the
fused and the unfused path, with and without renorm.
"""

import inspect

import keras
import numpy as np
import pytest
from conftest import BACKEND, FUSED, value

from layers import BatchNormalization

# fused=None must reach the fused kernel on these small inputs (see conftest.fuse_small_tensors).
pytestmark = pytest.mark.usefixtures("fuse_small_tensors")


def random_weights(layer, rng):
    """Random gamma, beta and statistics (standard deviations > 0) in the layer's order."""
    return [rng.uniform(0.5, 2.0, tuple(w.shape)).astype("float32") for w in layer.weights]


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize(
    "shape,axis",
    [((4, 5, 3, 6), -1), ((4, 6, 5, 3), 1), ((16, 5), -1), ((2, 3, 4, 5, 3), -1), ((4, 6, 5), 1)],
)
def test_matches_keras_layer_after_set_weights(shape, axis, renorm, fused):
    rng = np.random.default_rng(0)
    kwargs = dict(axis=axis, momentum=0.8, epsilon=1e-3, renorm=renorm)
    if renorm:
        kwargs.update(renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, renorm_momentum=0.9)
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    ours = BatchNormalization(fused=fused, **kwargs)
    keras_bn.build(shape)
    ours.build(shape)
    weights = random_weights(keras_bn, rng)
    keras_bn.set_weights(weights)
    ours.set_weights(weights)

    for _ in range(2):
        x = (rng.normal(size=shape) * 3.0 + 2.0).astype("float32")
        np.testing.assert_allclose(
            value(ours(x, training=True)),
            value(keras_bn(x, training=True)),
            rtol=1e-4,
            atol=2e-5,
        )
    np.testing.assert_allclose(value(ours(x)), value(keras_bn(x)), rtol=1e-4, atol=2e-5)
    for theirs, mine in zip(keras_bn.weights, ours.weights, strict=True):
        assert theirs.name == mine.name
        np.testing.assert_allclose(value(mine), value(theirs), rtol=1e-5, atol=1e-6)


@pytest.mark.multi_backend
def test_masked_statistics_match_keras():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    mask = rng.uniform(size=(3, 5)) > 0.4
    keras_bn = keras.layers.BatchNormalization(momentum=0.5)
    ours = BatchNormalization(momentum=0.5)
    np.testing.assert_allclose(
        value(ours(x, training=True, mask=mask)),
        value(keras_bn(x, training=True, mask=mask)),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(value(ours.moving_mean), value(keras_bn.moving_mean), rtol=1e-5)
    np.testing.assert_allclose(
        value(ours.moving_variance), value(keras_bn.moving_variance), rtol=1e-5
    )


@pytest.mark.multi_backend
@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({}, ["gamma", "beta", "moving_mean", "moving_variance"]),
        ({"center": False}, ["gamma", "moving_mean", "moving_variance"]),
        ({"scale": False}, ["beta", "moving_mean", "moving_variance"]),
        (
            {"renorm": True},
            ["gamma", "beta", "moving_mean", "moving_variance"]
            + ["moving_stddev", "renorm_mean", "renorm_stddev"],
        ),
    ],
)
def test_weights_have_keras_names_order_and_trainability(kwargs, names):
    keras_bn = keras.layers.BatchNormalization(**kwargs)
    ours = BatchNormalization(**kwargs)
    keras_bn.build((None, 7))
    ours.build((None, 7))
    assert [w.name for w in ours.weights] == [w.name for w in keras_bn.weights] == names
    assert [w.name for w in ours.trainable_weights] == [w.name for w in keras_bn.trainable_weights]
    for theirs, mine in zip(keras_bn.weights, ours.weights, strict=True):
        np.testing.assert_array_equal(value(mine), value(theirs))  # same initial values


@pytest.mark.multi_backend
def test_keras_models_bn_layers_can_be_swapped_for_ours():
    rng = np.random.default_rng(2)
    inputs = keras.Input((6, 6, 2))
    hidden = keras.layers.Dense(4, use_bias=False)(inputs)  # a 1x1 convolution, cheaper on JAX
    hidden = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.Flatten()(hidden)
    outputs = keras.layers.BatchNormalization(center=False)(keras.layers.Dense(3)(hidden))
    model = keras.Model(inputs, outputs)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in model.get_weights()])

    def to_ours(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            # Keras' config has a subset of our arguments, with the same meaning.
            return BatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    swapped = keras.models.clone_model(model, clone_function=to_ours)
    swapped.set_weights(model.get_weights())
    assert sum(isinstance(layer, BatchNormalization) for layer in swapped.layers) == 2
    x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(value(swapped(x)), value(model(x)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        value(swapped(x, training=True)), value(model(x, training=True)), rtol=1e-4, atol=1e-4
    )


NON_DEFAULT_ARGUMENTS = dict(
    axis=[1, -1],
    momentum=0.9,
    epsilon=1e-4,
    center=False,
    scale=True,
    beta_initializer="random_normal",
    gamma_initializer=keras.initializers.Constant(2.0),
    moving_mean_initializer="ones",
    moving_variance_initializer="zeros",
    beta_regularizer="l2",
    gamma_regularizer=keras.regularizers.L1(0.01),
    beta_constraint="non_neg",
    gamma_constraint=keras.constraints.MaxNorm(3.0),
    renorm=True,
    renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
    renorm_momentum=0.5,
    synchronized=False,
    virtual_batch_size=4,
    unbiased_moving_variance=True,
    fused=False,
    name="bn",
    dtype="float64",
)


@pytest.mark.multi_backend
def test_get_config_round_trips_every_argument():
    layer = BatchNormalization(**NON_DEFAULT_ARGUMENTS)
    config = layer.get_config()
    parameters = set(inspect.signature(BatchNormalization.__init__).parameters) - {"self", "kwargs"}
    assert parameters <= set(config)
    restored = BatchNormalization.from_config(config)
    assert restored.get_config() == config
    assert config["axis"] == [1, -1] and config["momentum"] == 0.9
    assert config["renorm_clipping"] == {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}
    assert isinstance(restored.gamma_regularizer, keras.regularizers.L1)
    assert (
        BatchNormalization.from_config(BatchNormalization(momentum=None).get_config()).momentum
        is None
    )


@pytest.mark.multi_backend
def test_keras_file_round_trip_keeps_outputs_and_statistics(tmp_path):
    rng = np.random.default_rng(3)
    inputs = keras.Input((3, 4))
    hidden = BatchNormalization(momentum=None, unbiased_moving_variance=True)(inputs)
    hidden = BatchNormalization(axis=[1, 2], virtual_batch_size=2, gamma_regularizer="l2")(hidden)
    outputs = BatchNormalization(axis=1, renorm=True, renorm_clipping={"rmax": 2.0})(hidden)
    model = keras.Model(inputs, outputs)
    for _ in range(2):  # move every statistic away from its initial value
        model(rng.normal(size=(8, 3, 4)).astype("float32") + 1.0, training=True)

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert [type(layer) for layer in restored.layers[1:]] == [BatchNormalization] * 3
    for mine, theirs in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(value(theirs), value(mine))
    x = rng.normal(size=(4, 3, 4)).astype("float32")
    np.testing.assert_array_equal(value(restored(x)), value(model(x)))
    np.testing.assert_allclose(
        value(restored(x, training=True)), value(model(x, training=True)), rtol=1e-6
    )
    assert restored.layers[1].get_config() == model.layers[1].get_config()


@pytest.mark.multi_backend
def test_fused_true_config_loads_on_every_backend():
    config = BatchNormalization(fused=True if BACKEND == "tensorflow" else None).get_config()
    config["fused"] = True  # as written by TensorFlow
    restored = BatchNormalization.from_config(config)
    # fused picks a TensorFlow kernel: elsewhere it falls back to the automatic choice.
    assert restored.fused is (True if BACKEND == "tensorflow" else None)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="saves on TensorFlow, loads on JAX")
def test_keras_file_with_fused_true_saved_on_tensorflow_loads_on_jax(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(5)
    model = keras.Sequential([keras.Input((4, 4, 3)), BatchNormalization(fused=True)])
    model(rng.normal(loc=2.0, size=(8, 4, 4, 3)).astype("float32"), training=True)
    model.save(tmp_path / "model.keras")
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, keras, layers\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "model.keras", "x.npy", "y.npy"],
        cwd=tmp_path,
        env={
            **os.environ,
            "KERAS_BACKEND": "jax",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), value(model(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="SavedModel export is TensorFlow-only")
def test_savedmodel_export_serves_identical_outputs(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(4)
    inputs = keras.Input((5, 5, 3))
    hidden = keras.layers.Conv2D(4, 3)(inputs)
    hidden = BatchNormalization()(hidden)  # fused kernel
    hidden = keras.layers.Flatten()(hidden)
    outputs = BatchNormalization(fused=False, momentum=None)(keras.layers.Dense(2)(hidden))
    model = keras.Model(inputs, outputs)
    model(rng.normal(size=(8, 5, 5, 3)).astype("float32"), training=True)

    model.export(str(tmp_path / "saved"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "saved"))
    x = rng.normal(size=(6, 5, 5, 3)).astype("float32")
    np.testing.assert_allclose(served.serve(x).numpy(), value(model(x)), rtol=1e-6, atol=1e-6)
