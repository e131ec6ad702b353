"""TensorFlow-only behaviour of layers.BatchNormalization: the fused kernel, XLA, tf.distribute.

The fused path must be taken exactly where FusedBatchNormV3 computes the same function, and
give the same outputs, gradients and moving statistics as the keras.ops path. Synchronized BN
over two logical CPU devices (created by conftest.py) must equal one device on the whole batch.
"""

import keras
import numpy as np
import pytest
from conftest import value

from layers import BatchNormalization, set_batch_norm_synchronized

# fused=None must reach the fused kernel on these small inputs (see conftest.fuse_small_tensors).
pytestmark = pytest.mark.usefixtures("fuse_small_tensors")

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf


def fused_ops(layer, shape, training, dtype="float32", with_mask=False, jit_compile=False):
    """The FusedBatchNormV3 ops in the graph of `layer(x, training)` for a traced input."""
    specs = [tf.TensorSpec(shape, dtype)]
    if with_mask:
        specs.append(tf.TensorSpec(shape[:-1], tf.bool))
        function = tf.function(
            lambda x, mask: layer(x, training=training, mask=mask), jit_compile=jit_compile
        )
    else:
        function = tf.function(lambda x: layer(x, training=training), jit_compile=jit_compile)
    graph = function.get_concrete_function(*specs).graph
    return [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]


@pytest.mark.parametrize(
    "shape,axis,data_format",
    [
        ((4, 3, 3, 5), -1, b"NHWC"),
        ((4, 5, 3, 3), 1, b"NCHW"),
        ((2, 3, 3, 3, 5), -1, b"NDHWC"),
        ((2, 5, 3, 3, 3), 1, b"NCDHW"),
        ((8, 5), -1, b"NHWC"),  # viewed as (8, 1, 1, 5)
        ((None, 3, 5), -1, b"NHWC"),  # viewed as (rows, 1, 1, 5)
        ((None, 5, 3), 1, b"NCHW"),  # viewed as (N, 5, 3, 1)
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_fused_kernel_runs_for_one_channel_axis_first_or_last(shape, axis, data_format, training):
    layer = BatchNormalization(axis=axis)
    layer.build(shape)
    (op,) = fused_ops(layer, shape, training)
    assert op.get_attr("data_format") == data_format
    assert op.get_attr("is_training") == training


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_fused_kernel_takes_16_bit_inputs_with_float32_statistics(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = BatchNormalization()
    layer.build((2, 3, 3, 4))
    (op,) = fused_ops(layer, (2, 3, 3, 4), True, dtype=layer.compute_dtype)
    assert op.get_attr("T") == tf.as_dtype(layer.compute_dtype)
    assert op.get_attr("U") == tf.float32


@pytest.mark.parametrize(
    "kwargs,training,dtype,with_mask",
    [
        ({"fused": False}, True, "float32", False),
        ({"axis": 2}, True, "float32", False),
        ({"axis": [1, 3]}, True, "float32", False),
        ({"renorm": True}, True, "float32", False),
        ({"virtual_batch_size": 2}, True, "float32", False),
        ({}, True, "float32", True),  # a mask changes the statistics
        ({"dtype": "float64"}, True, "float64", False),  # no float64 kernel
    ],
)
def test_keras_ops_path_runs_where_the_fused_kernel_would_differ(
    kwargs, training, dtype, with_mask
):
    layer = BatchNormalization(**kwargs)
    layer.build((4, 3, 3, 5))
    assert fused_ops(layer, (4, 3, 3, 5), training, dtype, with_mask) == []


@pytest.mark.parametrize("training", [True, False])
def test_xla_compiles_the_keras_ops_path_which_stays_exact_for_large_offsets(training):
    layer = BatchNormalization(momentum=0.0)
    layer.build((64, 4))
    # XLA lowers FusedBatchNormV3 to its own batch norm, whose E[x^2] - E[x]^2 variance gives
    # NaN here; the keras.ops path computes squared deviations from the mean.
    assert fused_ops(layer, (64, 4), training, jit_compile=True) == []
    x = (1e4 + np.random.default_rng(6).normal(size=(64, 4))).astype("float32")
    step = tf.function(lambda inputs: layer(inputs, training=True), jit_compile=True)
    y = value(step(x))
    exact = x.astype(np.float64)
    expected = (exact - exact.mean(0)) / np.sqrt(exact.var(0) + 1e-3)
    np.testing.assert_allclose(y, expected, atol=5e-3)
    np.testing.assert_allclose(value(layer.moving_variance), exact.var(0), rtol=1e-3)


def test_fused_true_under_xla_raises():
    layer = BatchNormalization(fused=True)
    layer.build((4, 3))
    with pytest.raises(ValueError, match=r"fused=True .* compiled with XLA"):
        fused_ops(layer, (4, 3), True, jit_compile=True)


@pytest.mark.parametrize("kwargs", [{"renorm": True}, {"virtual_batch_size": 2}, {}])
def test_inference_uses_the_fused_kernel_even_when_training_cannot(kwargs):
    layer = BatchNormalization(**kwargs)
    layer.build((4, 3, 3, 5))
    assert len(fused_ops(layer, (4, 3, 3, 5), False, with_mask=not kwargs)) == 1


def test_synchronized_bn_outside_a_strategy_keeps_the_fused_kernel():
    layer = BatchNormalization(synchronized=True)
    layer.build((4, 3, 3, 5))
    assert len(fused_ops(layer, (4, 3, 3, 5), True)) == 1  # one replica: nothing to synchronize


def test_fused_true_raises_when_the_input_rules_the_kernel_out():
    layer = BatchNormalization(fused=True, dtype="float64")
    with pytest.raises(ValueError, match=r"fused=True .* the input dtype is float64"):
        layer(np.zeros((2, 3), "float64"))
    layer = BatchNormalization(fused=True)
    with pytest.raises(ValueError, match=r"fused=True .* a mask was passed"):
        layer(np.zeros((2, 3, 4), "float32"), training=True, mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"fused=True .* axis=\[1, 2\] has several axes"):
        BatchNormalization(fused=True, axis=[1, 2])


@pytest.mark.parametrize("shape,axis", [((6, 3, 2, 4), -1), ((6, 4, 3, 2), 1), ((12, 4), -1)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_fused_unfused_and_xla_paths_agree(shape, axis, unbiased):
    rng = np.random.default_rng(0)
    kwargs = dict(axis=axis, momentum=0.7, unbiased_moving_variance=unbiased)
    layers = {
        "fused eager": BatchNormalization(**kwargs),
        "fused xla": BatchNormalization(**kwargs),
        "unfused eager": BatchNormalization(fused=False, **kwargs),
    }
    weights = [rng.uniform(0.5, 2.0, shape[axis]).astype("float32") for _ in range(4)]
    for layer in layers.values():
        layer.build(shape)
        layer.set_weights(weights)
    xla_step = tf.function(
        lambda x: layers["fused xla"](x, training=True), jit_compile=True, autograph=False
    )
    for _ in range(2):
        x = (rng.normal(size=shape) * 2.0 - 1.0).astype("float32")
        expected = value(layers["unfused eager"](x, training=True))
        np.testing.assert_allclose(
            value(layers["fused eager"](x, training=True)), expected, rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(value(xla_step(x)), expected, rtol=1e-4, atol=1e-5)
    for name in ("fused eager", "fused xla"):
        for mine, reference in zip(
            layers[name].weights, layers["unfused eager"].weights, strict=True
        ):
            np.testing.assert_allclose(value(mine), value(reference), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("epsilon", [1e-5, 1e-8])
def test_fused_kernel_uses_small_epsilons_as_given(epsilon):
    """Caffe's and PyTorch's 1e-5 (the default bn_inception) and below keep the kernel, exactly:
    cuDNN's old 1e-5 minimum is gone since cuDNN 7.5 and the CPU kernels never had one."""
    shape = (6, 3, 2, 4)
    fused = BatchNormalization(epsilon=epsilon, momentum=0.5, fused=True)  # no longer refused
    unfused = BatchNormalization(epsilon=epsilon, momentum=0.5, fused=False)
    for layer in (fused, unfused):
        layer.build(shape)
    assert len(fused_ops(fused, shape, True)) == len(fused_ops(fused, shape, False)) == 1
    rng = np.random.default_rng(0)
    # Channels whose variance is near epsilon, where a changed epsilon would show.
    x = tf.constant((rng.normal(size=shape) * np.array([1.0, 1e-2, 1e-3, 1e-4])).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    for training in (True, False):
        results = []
        for layer in (fused, unfused):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
            gradients = tape.gradient(y, [x, layer.gamma.value, layer.beta.value], dy)
            results.append([y, *gradients])
        for mine, reference in zip(*results, strict=True):
            np.testing.assert_allclose(value(mine), value(reference), rtol=1e-4, atol=1e-5)
    for mine, reference in zip(fused.weights, unfused.weights, strict=True):
        np.testing.assert_allclose(value(mine), value(reference), rtol=1e-5)


@pytest.mark.parametrize("shape,axis", [((None, 3, 2, 4), -1), ((None, 4), -1), ((None, 4, 3), 1)])
def test_fused_path_counts_values_of_a_batch_known_only_at_run_time(shape, axis):
    rng = np.random.default_rng(1)
    layer = BatchNormalization(axis=axis, momentum=0.0, unbiased_moving_variance=True)
    reference = BatchNormalization(
        axis=axis, momentum=0.0, unbiased_moving_variance=True, fused=False
    )
    step = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec(shape)])
    x = rng.normal(size=(5,) + shape[1:]).astype("float32")
    np.testing.assert_allclose(
        value(step(x)), value(reference(x, training=True)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        value(layer.moving_variance), value(reference.moving_variance), rtol=1e-5
    )


@pytest.mark.parametrize("fused", [None, False])
def test_input_gradient_matches_numerical_gradient(fused):
    rng = np.random.default_rng(2)
    # float64 for the keras.ops path; the fused kernel is float32 at best, so a looser check.
    dtype = "float32" if fused is None else "float64"
    layer = BatchNormalization(fused=fused, gamma_initializer="random_uniform", dtype=dtype)
    x = tf.constant(rng.normal(size=(4, 2, 2, 3)) * 2.0 + 1.0, dtype)
    theoretical, numerical = tf.test.compute_gradient(
        lambda inputs: layer(inputs, training=True), [x], delta=1e-2 if fused is None else 1e-5
    )
    tolerance = 2e-3 if fused is None else 1e-7
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=tolerance)


@pytest.fixture
def strategy(mirrored_strategy):
    return mirrored_strategy


def distributed(strategy, batches):
    """Per-replica values: replica i gets batches[i]."""
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(batches[context.replica_id_in_sync_group])
    )


@pytest.mark.parametrize("with_mask", [False, True])
def test_synchronized_bn_matches_one_device_on_the_concatenated_batch(strategy, with_mask):
    rng = np.random.default_rng(3)
    shape = (8, 3, 2, 4) if not with_mask else (8, 5, 4)
    with strategy.scope():
        synchronized = BatchNormalization(synchronized=True, momentum=0.5)
        synchronized.build(shape)
    single = BatchNormalization(momentum=0.5)
    single.build(shape)
    weights = [rng.uniform(0.5, 2.0, 4).astype("float32") for _ in range(4)]
    synchronized.set_weights(weights)
    single.set_weights(weights)

    @tf.function
    def replica_step(x, dy, mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = synchronized(x, training=True, mask=mask)
        dx, d_gamma = tape.gradient(y, [x, synchronized.gamma.value], output_gradients=dy)
        return y, dx, d_gamma

    for _ in range(2):
        # Replicas get different distributions, so local statistics would differ.
        halves = [rng.normal(loc=i * 3.0, size=shape).astype("float32") for i in range(2)]
        dys = [rng.normal(size=shape).astype("float32") for _ in range(2)]
        masks = [rng.uniform(size=shape[:-1]) > 0.3 for _ in range(2)] if with_mask else None
        results = strategy.run(
            replica_step,
            args=(
                distributed(strategy, halves),
                distributed(strategy, dys),
                distributed(strategy, masks) if with_mask else None,
            ),
        )
        y, dx, d_gamma = (strategy.experimental_local_results(r) for r in results)

        x_all = tf.constant(np.concatenate(halves))
        mask_all = np.concatenate(masks) if with_mask else None
        with tf.GradientTape() as tape:
            tape.watch(x_all)
            expected = single(x_all, training=True, mask=mask_all)
        expected_dx, expected_d_gamma = tape.gradient(
            expected, [x_all, single.gamma.value], output_gradients=np.concatenate(dys)
        )
        np.testing.assert_allclose(
            np.concatenate([value(t) for t in y]), value(expected), rtol=1e-4, atol=1e-5
        )
        # The global statistics' gradient reaches every replica through the all-reduce.
        np.testing.assert_allclose(
            np.concatenate([value(t) for t in dx]), value(expected_dx), rtol=1e-3, atol=1e-4
        )
        np.testing.assert_allclose(
            value(d_gamma[0]) + value(d_gamma[1]), value(expected_d_gamma), rtol=1e-4, atol=1e-4
        )
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            value(getattr(synchronized, name)),
            value(getattr(single, name)),
            rtol=1e-5,
            err_msg=name,
        )


def test_unsynchronized_replicas_average_their_local_statistics(strategy):
    rng = np.random.default_rng(4)
    with strategy.scope():
        layer = BatchNormalization(momentum=0.0)
        layer.build((6, 3))
    halves = [rng.normal(loc=i * 5.0, size=(6, 3)).astype("float32") for i in range(2)]
    outputs = strategy.run(
        tf.function(lambda x: layer(x, training=True)), args=(distributed(strategy, halves),)
    )
    for half, y in zip(halves, strategy.experimental_local_results(outputs), strict=True):
        local = (half - half.mean(0)) / np.sqrt(half.var(0) + 1e-3)
        np.testing.assert_allclose(value(y), local, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        value(layer.moving_mean), np.mean([h.mean(0) for h in halves], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        value(layer.moving_variance), np.mean([h.var(0) for h in halves], 0), rtol=1e-5
    )


def test_fit_under_mirrored_strategy_with_synchronized_bn_uses_the_global_batch(strategy):
    x = np.random.default_rng(5).normal(size=(16, 3)).astype("float32")
    x[8:] += 4.0  # the second replica's half has another mean
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((3,)), BatchNormalization(synchronized=True, momentum=0.0)]
        )
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, np.zeros_like(x), batch_size=16, epochs=1, shuffle=False, verbose=0)
    bn = model.layers[0]
    np.testing.assert_allclose(value(bn.moving_mean), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(value(bn.moving_variance), x.var(0), rtol=1e-5)


@pytest.mark.parametrize("kind", [BatchNormalization, keras.layers.BatchNormalization])
def test_synchronized_switched_in_place_takes_effect_when_fit_traces_again(strategy, kind):
    x = np.random.default_rng(6).normal(size=(16, 3)).astype("float32")
    x[8:] += 4.0  # per replica the variance is about 1, over the global batch about 5
    with strategy.scope():
        bn = kind(momentum=0.0)
        model = keras.Sequential([keras.Input((3,)), bn])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    weights = [w.copy() for w in model.get_weights()]

    def fit():
        model.fit(x, np.zeros_like(x), batch_size=16, epochs=1, shuffle=False, verbose=0)
        return value(bn.moving_variance)

    assert np.all(fit() < 0.5 * x.var(0))
    assert set_batch_norm_synchronized(model, True) == [bn] and bn.synchronized
    assert np.all(fit() < 0.5 * x.var(0))  # fit's function was traced unsynchronized
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    np.testing.assert_allclose(fit(), x.var(0), rtol=1e-5)
    assert set_batch_norm_synchronized(model, False) == [bn]
    config = model.get_config()["layers"][-1]["config"]
    assert config["synchronized"] is False
    for before, after in zip(weights[:2], model.get_weights()[:2], strict=True):
        np.testing.assert_array_equal(before, after)  # gamma and beta: the same model


def test_set_batch_norm_synchronized_changes_no_layer_when_one_cannot_be_synchronized():
    model = keras.Sequential(
        [keras.Input((3,)), BatchNormalization(name="a"), BatchNormalization(name="b", fused=True)]
    )
    with pytest.raises(ValueError, match=r"BN layer 'b': synchronized=True cannot be set.*fused"):
        set_batch_norm_synchronized(model, True)
    assert not any(layer.synchronized for layer in model.layers)
    ghost = BatchNormalization(virtual_batch_size=2)
    with pytest.raises(ValueError, match="virtual_batch_size and synchronized=True"):
        ghost.synchronized = True


@pytest.mark.parametrize(
    "shape,fused_ops_expected",
    [
        ((60, 100), 0),  # the paper's MLP: 6,000 values, the kernel's fixed cost dominates
        ((60, 8, 8, 16), 0),  # 61,440 values
        ((128, 4, 4, 64), 1),  # 131,072 values: the kernel wins
        ((None, 100), 1),  # size unknown while tracing: take the kernel
    ],
)
def test_fused_none_keeps_small_static_inputs_on_the_keras_ops_path(
    monkeypatch, shape, fused_ops_expected
):
    from layers import _fused

    monkeypatch.setattr(_fused, "MIN_VALUES", 100_000)
    layer = BatchNormalization()
    layer.build(shape)
    assert len(fused_ops(layer, shape, True)) == fused_ops_expected
    forced = BatchNormalization(fused=True)
    forced.build(shape)
    assert len(fused_ops(forced, shape, True)) == 1


@pytest.mark.parametrize(
    "shape,fused_ops_expected",
    [
        ((1, 3, 3, 64), 1),  # a convolution's output served one image at a time
        ((60, 8, 8, 16), 1),
        ((2, 2, 2, 2, 8), 1),  # a 3-D convolution's output
        ((60, 100), 0),  # an MLP's activations: nothing to fold the kernel into
        ((4, 10, 16), 0),  # viewed as (rows, 1, 1, 16) by a reshape
    ],
)
def test_fused_none_keeps_small_convolution_outputs_on_the_kernel_in_inference(
    monkeypatch, shape, fused_ops_expected
):
    """Grappler can fold an inference FusedBatchNormV3 into the convolution before it."""
    from layers import _fused

    monkeypatch.setattr(_fused, "MIN_VALUES", 100_000)
    layer = BatchNormalization()
    layer.build(shape)
    assert len(fused_ops(layer, shape, False)) == fused_ops_expected
    assert len(fused_ops(layer, shape, True)) == 0  # training keeps the size threshold
