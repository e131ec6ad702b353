"""layers.recompute_population_statistics: the paper's Algorithm 2, steps 8-11.

The expected statistics are computed independently in float64 NumPy: the same network run
forward batch by batch with every BN layer normalizing by its batch statistics (so an upstream
BN layer in training mode shapes what the next one sees), then the mean of the batch means and
m / (m - 1) times the mean of the batch variances.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND, value

from layers import BatchNormalization, recompute_population_statistics, set_batch_norm_synchronized

KINDS = {"ours": BatchNormalization, "keras": keras.layers.BatchNormalization}
EPSILON = 1e-3


def randomize_affine(model, rng):
    """gamma and beta away from 1 and 0, so each BN layer's output shapes the next input."""
    for layer in model._flatten_layers():
        if isinstance(layer, tuple(KINDS.values())):
            layer.gamma.assign(rng.uniform(0.5, 2.0, tuple(layer.gamma.shape)))
            layer.beta.assign(rng.normal(size=tuple(layer.beta.shape)))


def conv_mlp(kind, rng, **bn_kwargs):
    """1x1 conv -> BN -> ReLU -> Dropout -> Dense -> BN, nested in an outer model."""
    bn = KINDS[kind]
    inputs = keras.Input((4, 4, 2))
    hidden = keras.layers.Conv2D(3, 1, use_bias=False, name="conv")(inputs)
    hidden = bn(epsilon=EPSILON, name="bn_conv", **bn_kwargs)(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.Dropout(0.5, seed=1)(hidden)
    hidden = keras.layers.Flatten()(keras.layers.ReLU()(hidden))
    hidden = keras.layers.Dense(4, name="dense")(hidden)
    outputs = bn(epsilon=EPSILON, name="bn_dense", **bn_kwargs)(hidden)
    inner = keras.Model(inputs, outputs, name="inner")
    model = keras.Sequential([keras.Input((4, 4, 2)), inner, keras.layers.Dense(2)])
    randomize_affine(model, rng)
    return model, inner


def reference_conv_mlp(inner, batches):
    """Per BN layer, per batch: (mean, biased variance, m), in float64 NumPy.

    Dropout is absent: the pass runs every non-BN layer in inference mode.
    """

    def weights(name):
        return [value(w).astype(np.float64) for w in inner.get_layer(name).weights]

    (kernel,) = weights("conv")
    dense_kernel, dense_bias = weights("dense")
    gamma1, beta1 = weights("bn_conv")[:2]
    stats = {"bn_conv": [], "bn_dense": []}
    for x in batches:
        h = x.astype(np.float64) @ kernel[0, 0]  # a 1x1 convolution
        mean, variance = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
        stats["bn_conv"].append((mean, variance, h.size // h.shape[-1]))
        h = gamma1 * (h - mean) / np.sqrt(variance + EPSILON) + beta1
        h = np.maximum(h, 0.0).reshape(len(x), -1)
        d = h @ dense_kernel + dense_bias
        stats["bn_dense"].append((d.mean(0), d.var(0), len(x)))
    return stats


def algorithm_2(per_batch):
    """Population mean and variance from per-batch (mean, variance, m), pooled by size.

    With equal m: mean of the batch means and m / (m - 1) times the mean of the variances.
    """
    means, variances, counts = zip(*per_batch, strict=True)
    counts = np.asarray(counts, np.float64)[:, None]
    mean = np.sum(counts * np.asarray(means), 0) / counts.sum()
    variance = np.sum(counts * np.asarray(variances), 0) / np.sum(counts - 1.0)
    return mean, variance


@pytest.mark.multi_backend
@pytest.mark.parametrize("kind", ["ours", "keras"])
def test_statistics_are_algorithm_2_over_the_batches(kind):
    rng = np.random.default_rng(0)
    model, inner = conv_mlp(kind, rng)
    batches = [
        rng.normal(loc=2.0, scale=3.0, size=(8, 4, 4, 2)).astype("float32") for _ in range(3)
    ]

    used = recompute_population_statistics(model, [(x, np.zeros(8)) for x in batches])

    assert used == 3
    for name, per_batch in reference_conv_mlp(inner, batches).items():
        m = per_batch[0][2]
        mean = np.mean([b[0] for b in per_batch], 0)
        variance = m / (m - 1) * np.mean([b[1] for b in per_batch], 0)  # the paper's formula
        layer = inner.get_layer(name)
        np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)


@pytest.mark.multi_backend
@pytest.mark.parametrize("kind", ["ours", "keras"])
def test_batches_of_different_sizes_weigh_by_their_number_of_values(kind):
    rng = np.random.default_rng(1)
    model, inner = conv_mlp(kind, rng)
    x = rng.normal(size=(19, 4, 4, 2)).astype("float32")

    used = recompute_population_statistics(model, x, batch_size=8)  # 8, 8 and 3 examples

    assert used == 3
    reference = reference_conv_mlp(inner, [x[:8], x[8:16], x[16:]])
    for name, per_batch in reference.items():
        mean, variance = algorithm_2(per_batch)
        layer = inner.get_layer(name)
        np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)


@pytest.mark.multi_backend
def test_ghost_batches_are_the_batches_of_algorithm_2():
    rng = np.random.default_rng(2)
    inputs = keras.Input((3,))
    hidden = BatchNormalization(virtual_batch_size=4, epsilon=EPSILON)(inputs)
    outputs = BatchNormalization(virtual_batch_size=4)(keras.layers.Dense(2)(hidden))
    model = keras.Model(inputs, outputs)
    randomize_affine(model, rng)
    x = rng.normal(loc=1.0, size=(16, 3)).astype("float32")

    recompute_population_statistics(model, x, batch_size=8)

    first, dense, second = model.layers[1:]
    gamma, beta = value(first.gamma), value(first.beta)
    kernel, bias = (value(w).astype(np.float64) for w in dense.weights)
    ghosts1, ghosts2 = [], []
    for batch in (x[:8].astype(np.float64), x[8:].astype(np.float64)):
        # tf-keras' layout: with 2 ghost batches of 4, ghost j holds examples j, j + 2, ...
        for j in range(2):
            ghost = batch[j::2]
            ghosts1.append((ghost.mean(0), ghost.var(0), 4))
            normalized = gamma * (ghost - ghost.mean(0)) / np.sqrt(ghost.var(0) + EPSILON) + beta
            d = normalized @ kernel + bias
            ghosts2.append((d.mean(0), d.var(0), 4))
    for layer, per_ghost in ((first, ghosts1), (second, ghosts2)):
        mean, variance = algorithm_2(per_ghost)
        np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)


@pytest.mark.multi_backend
@pytest.mark.parametrize("kind", ["ours", "keras"])
def test_masked_time_steps_are_left_out(kind):
    rng = np.random.default_rng(3)
    inputs = keras.Input((5, 3))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    hidden = KINDS[kind](epsilon=EPSILON)(masked)
    outputs = KINDS[kind]()(keras.layers.Dense(2)(hidden))  # Dense passes the mask on
    model = keras.Model(inputs, outputs)
    randomize_affine(model, rng)
    batches = []
    for _ in range(2):
        x = rng.normal(loc=4.0, size=(6, 5, 3)).astype("float32")
        x[rng.uniform(size=(6, 5)) < 0.4] = 0.0  # padding
        batches.append(x)

    recompute_population_statistics(model, batches)

    first, dense, second = model.layers[2:]
    gamma, beta = value(first.gamma), value(first.beta)
    kernel, bias = (value(w).astype(np.float64) for w in dense.weights)
    stats1, stats2 = [], []
    for x in batches:
        valid = x[np.any(x != 0.0, axis=-1)].astype(np.float64)
        stats1.append((valid.mean(0), valid.var(0), len(valid)))
        normalized = gamma * (valid - valid.mean(0)) / np.sqrt(valid.var(0) + EPSILON) + beta
        d = normalized @ kernel + bias
        stats2.append((d.mean(0), d.var(0), len(valid)))
    for layer, per_batch in ((first, stats1), (second, stats2)):
        mean, variance = algorithm_2(per_batch)
        np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)


def model_state(model):
    return {id(v): value(v).copy() for v in model.variables}


@pytest.mark.multi_backend
def test_only_the_moving_statistics_change():
    rng = np.random.default_rng(4)
    model, inner = conv_mlp("ours", rng, renorm=True)
    frozen = inner.get_layer("bn_dense")
    frozen.trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    x = rng.normal(loc=3.0, size=(16, 4, 4, 2)).astype("float32")
    model.fit(x, np.zeros((16, 2)), batch_size=8, epochs=1, verbose=0)  # optimizer variables
    bn = inner.get_layer("bn_conv")
    changed = {id(bn.moving_mean), id(bn.moving_variance), id(bn.moving_stddev)}
    before = model_state(model)
    optimizer_before = [value(v).copy() for v in model.optimizer.variables]
    attributes_before = {
        id(layer): {k: v for k, v in vars(layer).items() if isinstance(v, (int, float, str))}
        for layer in model._flatten_layers()
    }

    recompute_population_statistics(model, x, batch_size=8)

    after = model_state(model)
    for variable in model.variables:
        if id(variable) not in changed:
            np.testing.assert_array_equal(after[id(variable)], before[id(variable)], variable.path)
    assert not np.allclose(value(bn.moving_mean), before[id(bn.moving_mean)])
    # Renorm derives its moving variance from moving_stddev: both agree.
    np.testing.assert_allclose(
        value(bn.moving_stddev), np.sqrt(value(bn.moving_variance) + EPSILON), rtol=1e-6
    )
    for got, expected in zip(model.optimizer.variables, optimizer_before, strict=True):
        np.testing.assert_array_equal(value(got), expected)
    for layer in model._flatten_layers():
        attributes = {k: v for k, v in vars(layer).items() if isinstance(v, (int, float, str))}
        assert attributes == attributes_before[id(layer)], layer.name
        assert "call" not in vars(layer), layer.name
    assert bn.momentum == 0.99 and frozen.trainable is False


@pytest.mark.multi_backend
def test_cumulative_mode_counts_the_batches_averaged():
    rng = np.random.default_rng(5)
    model = keras.Sequential([keras.Input((3,)), BatchNormalization(momentum=None)])
    batches = [rng.normal(loc=i, size=(4, 3)).astype("float32") for i in range(3)]
    assert recompute_population_statistics(model, batches, steps=2) == 2
    bn = model.layers[0]
    np.testing.assert_array_equal(value(bn.num_batches_tracked), [2, 2, 2])
    mean = np.mean([b.mean(0) for b in batches[:2]], 0)
    np.testing.assert_allclose(value(bn.moving_mean), mean, rtol=1e-5, atol=1e-6)
    # A further training step continues the same average: the third batch weighs 1/3.
    bn(batches[2], training=True)
    np.testing.assert_allclose(
        value(bn.moving_mean), (2 * mean + batches[2].mean(0)) / 3, rtol=1e-5, atol=1e-6
    )


@pytest.mark.multi_backend
def test_a_model_without_batch_normalization_reads_no_data():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    def no_data():
        raise AssertionError("data was read")
        yield

    assert recompute_population_statistics(model, no_data()) == 0


@pytest.mark.multi_backend
@pytest.mark.parametrize(
    "data,kwargs,message",
    [
        ([], {}, r"data yielded no batch, .* pass the training batches"),
        (np.zeros((8, 3), "float32"), {}, r"one array of shape \(8, 3\).* batch_size="),
        ([np.zeros((8, 3), "float32")], {"steps": 0}, r"steps=0 must be a positive number"),
        (iter([np.zeros((8, 3), "float32")]), {"batch_size": 8}, r"batch_size=8 splits arrays"),
        (np.zeros((8, 3), "float32"), {"batch_size": -1}, r"batch_size=-1 must be a positive"),
        (42, {}, r"data of type int is not iterable"),
    ],
)
def test_bad_data_raises_a_value_error_that_says_what_to_pass(data, kwargs, message):
    model = keras.Sequential([keras.Input((3,)), BatchNormalization()])
    with pytest.raises(ValueError, match=message):
        recompute_population_statistics(model, data, **kwargs)


@pytest.mark.multi_backend
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("kind", ["ours", "keras"])
def test_non_finite_images_are_refused_naming_the_layer_and_the_batch(kind, bad):
    """NaN or inf in one image would make the statistics NaN, and the model predict one class
    for everything, silently; refused instead, with nothing changed (issue 15)."""
    rng = np.random.default_rng(10)
    model, inner = conv_mlp(kind, rng)
    batches = [rng.normal(size=(8, 4, 4, 2)).astype("float32") for _ in range(3)]
    batches[1][5, 2, 3, 0] = bad
    before = model_state(model)
    with pytest.raises(
        ValueError,
        match=r"BN layer 'bn_conv' \(and 1 BN layers after it\) got "
        r"NaN or inf statistics from batch 2 of data",
    ):
        recompute_population_statistics(model, batches)
    after = model_state(model)
    assert all(np.array_equal(before[key], after[key], equal_nan=True) for key in before)


class _NanAtPadding(keras.layers.Layer):
    """Writes NaN into the masked time steps and passes the mask on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x, mask=None):
        return keras.ops.where(keras.ops.expand_dims(mask, -1), x, np.nan)


@pytest.mark.multi_backend
@pytest.mark.parametrize("kind", ["ours", "keras"])
def test_non_finite_values_at_masked_positions_are_not_refused(kind):
    inputs = keras.Input((4, 3))
    hidden = _NanAtPadding()(keras.layers.Masking(mask_value=0.0)(inputs))
    model = keras.Model(inputs, KINDS[kind]()(hidden))
    x = np.random.default_rng(11).normal(loc=2.0, size=(6, 4, 3)).astype("float32")
    x[:, 3, :] = 0.0  # the last step is padding, NaN after _NanAtPadding
    assert recompute_population_statistics(model, [x]) == 1
    valid = x[:, :3].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(value(model.layers[-1].moving_mean), valid.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        value(model.layers[-1].moving_variance), valid.var(0, ddof=1), rtol=1e-4
    )


@pytest.mark.multi_backend
def test_unbuilt_model_raises():
    model = keras.Sequential([BatchNormalization()])
    with pytest.raises(ValueError, match="is not built"):
        recompute_population_statistics(model, [np.zeros((2, 3), "float32")])


@pytest.mark.multi_backend
def test_tf_data_dataset_of_x_y_batches_and_steps():
    # On JAX and PyTorch too: read as NumPy, as Keras' fit reads a tf.data.Dataset there.
    import tensorflow as tf

    rng = np.random.default_rng(6)
    x = rng.normal(loc=2.0, size=(40, 3)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(40))).batch(10)
    model = keras.Sequential([keras.Input((3,)), BatchNormalization()])
    assert recompute_population_statistics(model, dataset, steps=3) == 3
    expected = np.mean([x[i : i + 10].mean(0) for i in (0, 10, 20)], 0)
    np.testing.assert_allclose(value(model.layers[0].moving_mean), expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"infinite tf.data.Dataset .* pass steps="):
        recompute_population_statistics(model, dataset.repeat())


@pytest.mark.multi_backend
def test_a_short_run_predicts_far_better_after_the_recompute():
    # Algorithm 2's raison d'etre: after 24 steps at momentum 0.99 the moving averages have
    # moved 21% of the way from (0, 1); inputs far from that make inference useless.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(7)
    centers = rng.normal(scale=2.0, size=(4, 8))
    labels = rng.integers(0, 4, size=1024)
    x = (10.0 + centers[labels] + rng.normal(size=(1024, 8))).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, use_bias=False),
            BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(4),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    train, test = slice(0, 768), slice(768, None)
    model.fit(x[train], labels[train], batch_size=32, epochs=1, shuffle=False, verbose=0)

    def accuracy():
        logits = value(model.predict(x[test], batch_size=256, verbose=0))
        return float(np.mean(np.argmax(logits, -1) == labels[test]))

    moving_averages = accuracy()
    recompute_population_statistics(model, x[train], batch_size=32)
    population = accuracy()
    # Measured: 49% (TensorFlow) and 51% (JAX) with the moving averages, 98.8% after.
    assert moving_averages < 0.6, moving_averages
    assert population > 0.95, population


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
@pytest.mark.parametrize("kind,as_dataset", [("ours", False), ("keras", True)])
def test_mirrored_strategy_pools_replicas_and_synchronized_layers_use_the_global_batch(
    mirrored_strategy, kind, as_dataset
):
    import tensorflow as tf

    rng = np.random.default_rng(8)
    with mirrored_strategy.scope():
        inputs = keras.Input((3,))
        hidden = KINDS[kind](epsilon=EPSILON)(inputs)  # per replica
        hidden = keras.layers.Dense(2)(hidden)
        outputs = KINDS[kind](synchronized=True)(hidden)
        model = keras.Model(inputs, outputs)
        randomize_affine(model, rng)
        x = rng.normal(loc=1.0, size=(16, 3)).astype("float32")
        x[4:8] += 5.0  # the second replica's half of the first batch has another mean

        if as_dataset:
            data = {"data": tf.data.Dataset.from_tensor_slices((x, np.zeros(16))).batch(8)}
        else:
            data = {"data": x, "batch_size": 8}
        assert recompute_population_statistics(model, **data) == 2

    local, dense, synchronized = model.layers[1:]
    gamma, beta = value(local.gamma), value(local.beta)
    kernel, bias = (value(w).astype(np.float64) for w in dense.weights)
    halves, global_batches = [], []
    for batch in (x[:8].astype(np.float64), x[8:].astype(np.float64)):
        normalized = []
        for half in (batch[:4], batch[4:]):  # replica 0 gets the first half of each batch
            halves.append((half.mean(0), half.var(0), 4))
            normalized.append(gamma * (half - half.mean(0)) / np.sqrt(half.var(0) + EPSILON) + beta)
        d = np.concatenate(normalized) @ kernel + bias
        global_batches.append((d.mean(0), d.var(0), 8))
    for layer, per_batch in ((local, halves), (synchronized, global_batches)):
        mean, variance = algorithm_2(per_batch)
        np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_switching_synchronized_in_place_retraces_the_pass(mirrored_strategy):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(8, 3)).astype("float32")
    x[4:] += 5.0  # the second replica's half has another mean
    halves = [(h.mean(0), h.var(0), 4) for h in (x[:4].astype(np.float64), x[4:])]
    with mirrored_strategy.scope():
        bn = BatchNormalization()
        model = keras.Sequential([keras.Input((3,)), bn])
        recompute_population_statistics(model, x, batch_size=8)
        np.testing.assert_allclose(value(bn.moving_variance), algorithm_2(halves)[1], rtol=1e-4)
        assert set_batch_norm_synchronized(model, True) == [bn]
        recompute_population_statistics(model, x, batch_size=8)
    np.testing.assert_allclose(value(bn.moving_variance), x.var(0, ddof=1), rtol=1e-4)


@pytest.mark.multi_backend
def test_repeated_calls_follow_the_current_weights():
    # The compiled pass is kept between calls: it must read the weights, not remember them.
    rng = np.random.default_rng(9)
    model, inner = conv_mlp("ours", rng)
    batches = [rng.normal(size=(8, 4, 4, 2)).astype("float32") for _ in range(2)]
    recompute_population_statistics(model, batches)
    randomize_affine(model, rng)  # bn_conv's new gamma and beta change what bn_dense sees
    inner.get_layer("dense").kernel.assign(rng.normal(size=(48, 4)))
    recompute_population_statistics(model, batches)
    mean, variance = algorithm_2(reference_conv_mlp(inner, batches)["bn_dense"])
    layer = inner.get_layer("bn_dense")
    np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)
