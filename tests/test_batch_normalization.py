"""layers.BatchNormalization against an independent NumPy reference of the paper's algorithms.

The reference is written from Ioffe & Szegedy (2015): Algorithm 1 (training: normalize with the
mini-batch mean and biased variance, then scale and shift), the moving averages in Keras'
convention, Algorithm 2 (inference with the population statistics, optionally m/(m-1)
corrected) and the backward formulas of Section 3. Everything here also runs on JAX and PyTorch.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND, FUSED, value

from layers import BatchNormalization, batch_norm_layers, set_batch_norm_synchronized

# fused=None must reach the fused kernel on these small inputs (see conftest.fuse_small_tensors).
pytestmark = pytest.mark.usefixtures("fuse_small_tensors")


class ReferenceBatchNorm:
    """Algorithms 1 and 2 in float64 NumPy, with moving statistics in Keras' convention."""

    def __init__(self, input_shape, axes, momentum, epsilon, rng, center=True, scale=True):
        ndim = len(input_shape)
        self.axes = sorted(a % ndim for a in axes)
        self.reduce = tuple(i for i in range(ndim) if i not in self.axes)
        self.broadcast = [input_shape[i] if i in self.axes else 1 for i in range(ndim)]
        self.param_shape = tuple(input_shape[a] for a in self.axes)
        self.momentum, self.epsilon = momentum, epsilon
        self.center, self.scale = center, scale
        self.gamma = rng.uniform(0.5, 2.0, self.param_shape) if scale else np.ones(self.param_shape)
        self.beta = rng.normal(size=self.param_shape) if center else np.zeros(self.param_shape)
        self.moving_mean = rng.normal(size=self.param_shape)
        self.moving_variance = rng.uniform(0.5, 2.0, self.param_shape)

    def keras_weights(self):
        weights = [self.gamma] if self.scale else []
        weights += [self.beta] if self.center else []
        return [w.astype("float32") for w in weights + [self.moving_mean, self.moving_variance]]

    def _b(self, value):
        return np.reshape(value, self.broadcast)

    def train_step(self, x, unbiased=False):
        x = x.astype(np.float64)
        mean = x.mean(axis=self.reduce, keepdims=True)  # Algorithm 1, mini-batch mean
        variance = ((x - mean) ** 2).mean(axis=self.reduce, keepdims=True)  # biased variance
        x_hat = (x - mean) / np.sqrt(variance + self.epsilon)
        y = self._b(self.gamma) * x_hat + self._b(self.beta)
        m = x.size // mean.size
        population_variance = variance * m / (m - 1) if unbiased else variance
        self.moving_mean = self.moving_mean * self.momentum + mean.reshape(self.param_shape) * (
            1 - self.momentum
        )
        self.moving_variance = self.moving_variance * self.momentum + population_variance.reshape(
            self.param_shape
        ) * (1 - self.momentum)
        return y

    def infer(self, x):
        x = x.astype(np.float64)
        x_hat = (x - self._b(self.moving_mean)) / np.sqrt(
            self._b(self.moving_variance) + self.epsilon
        )
        return self._b(self.gamma) * x_hat + self._b(self.beta)


def reference_backward(x, dy, gamma, epsilon, axis):
    """The paper's Section 3 chain rule for one mini-batch, channel axis `axis`."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    gamma = np.reshape(gamma, shape)
    m = x.size // x.shape[axis]
    mu = x.mean(axis=reduce, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=reduce, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + epsilon)
    d_x_hat = dy * gamma
    d_var = np.sum(d_x_hat * (x - mu) * -0.5 * (var + epsilon) ** -1.5, axis=reduce, keepdims=True)
    d_mu = (
        np.sum(-d_x_hat / np.sqrt(var + epsilon), axis=reduce, keepdims=True)
        + d_var * np.sum(-2.0 * (x - mu), axis=reduce, keepdims=True) / m
    )
    dx = d_x_hat / np.sqrt(var + epsilon) + d_var * 2.0 * (x - mu) / m + d_mu / m
    d_gamma = np.sum(dy * x_hat, axis=reduce)
    d_beta = np.sum(dy, axis=reduce)
    return dx, d_gamma, d_beta


def gradients(layer, x, dy, training=True):
    """d(sum(dy * layer(x)))/d(x, gamma, beta) on the current backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
        grads = tape.gradient(y, [x, layer.gamma.value, layer.beta.value], output_gradients=dy)
        return [g.numpy() for g in grads]
    if BACKEND == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        y = layer(x, training=training)
        grads = torch.autograd.grad(
            y, [x, layer.gamma.value, layer.beta.value], grad_outputs=torch.tensor(dy)
        )
        return [g.detach().numpy() for g in grads]
    import jax

    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(trainable, inputs):
        outputs, _ = layer.stateless_call(trainable, non_trainable, inputs, training=training)
        return outputs

    trainable = [v.value for v in layer.trainable_variables]
    _, vjp = jax.vjp(forward, trainable, x)
    (d_gamma, d_beta), dx = vjp(dy)
    return [np.asarray(dx), np.asarray(d_gamma), np.asarray(d_beta)]


REFERENCE_CASES = [
    # input shape, axis, center, scale, momentum, epsilon
    ((16, 5), -1, True, True, 0.9, 1e-3),
    ((6, 7, 4), -1, True, True, 0.99, 1e-5),  # Caffe's and PyTorch's epsilon
    ((6, 4, 7), 1, False, True, 0.5, 1e-3),
    ((4, 5, 3, 6), -1, True, False, 0.8, 1e-2),
    ((4, 6, 5, 3), 1, False, False, 0.0, 1e-3),
    ((2, 3, 4, 5, 3), -1, True, True, 1.0, 1e-4),
    ((2, 3, 4, 2, 5), 1, True, True, 0.7, 1e-3),
    ((4, 5, 3, 6), [1, 3], True, True, 0.9, 1e-3),
    ((8, 3, 4), [-2, -1], True, True, 0.6, 1e-3),
    ((4, 5, 3, 6), 2, True, True, 0.9, 1e-3),
]


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("shape,axis,center,scale,momentum,epsilon", REFERENCE_CASES)
def test_training_and_inference_follow_algorithms_1_and_2(
    shape, axis, center, scale, momentum, epsilon, fused
):
    rng = np.random.default_rng(0)
    axes = [axis] if isinstance(axis, int) else axis
    reference = ReferenceBatchNorm(shape, axes, momentum, epsilon, rng, center, scale)
    layer = BatchNormalization(
        axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale, fused=fused
    )
    layer.build(shape)
    layer.set_weights(reference.keras_weights())

    for _ in range(2):
        x = (rng.normal(size=shape) * 2.0 + 3.0).astype("float32")
        y = layer(x, training=True)
        np.testing.assert_allclose(value(y), reference.train_step(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        value(layer.moving_mean), reference.moving_mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        value(layer.moving_variance), reference.moving_variance, rtol=1e-5, atol=1e-6
    )
    x = (rng.normal(size=shape) * 2.0 + 3.0).astype("float32")
    np.testing.assert_allclose(
        value(layer(x, training=False)), reference.infer(x), rtol=1e-4, atol=1e-5
    )


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
def test_inference_uses_moving_statistics_per_example(fused):
    layer = BatchNormalization(fused=fused)
    layer.build((None, 3))
    gamma, beta = np.array([1.0, 2.0, 0.5]), np.array([0.0, -1.0, 3.0])
    mean, variance = np.array([1.0, -2.0, 10.0]), np.array([4.0, 0.25, 9.0])
    layer.set_weights([w.astype("float32") for w in (gamma, beta, mean, variance)])
    x = np.array([[3.0, -2.0, 13.0], [1.0, 0.0, 4.0]], "float32")

    expected = gamma * (x - mean) / np.sqrt(variance + 1e-3) + beta
    np.testing.assert_allclose(value(layer(x)), expected, rtol=1e-6)
    # In inference an example's output does not depend on the rest of the batch.
    np.testing.assert_allclose(value(layer(x[:1])), expected[:1], rtol=1e-6)
    np.testing.assert_allclose(value(layer.moving_mean), mean)  # and nothing is updated


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("shape,axis", [((10, 4), -1), ((3, 4, 5, 2), -1), ((3, 2, 4, 5), 1)])
def test_unbiased_moving_variance_applies_bessel_correction(shape, axis, fused):
    rng = np.random.default_rng(1)
    reference = ReferenceBatchNorm(shape, [axis], 0.6, 1e-3, rng)
    layer = BatchNormalization(axis=axis, momentum=0.6, unbiased_moving_variance=True, fused=fused)
    layer.build(shape)
    layer.set_weights(reference.keras_weights())
    for _ in range(2):
        x = rng.normal(size=shape).astype("float32")
        # Training outputs keep the biased variance: only the population estimate changes.
        np.testing.assert_allclose(
            value(layer(x, training=True)),
            reference.train_step(x, unbiased=True),
            rtol=1e-4,
            atol=1e-5,
        )
    np.testing.assert_allclose(value(layer.moving_variance), reference.moving_variance, rtol=1e-5)


@pytest.mark.multi_backend
def test_unbiased_moving_variance_is_m_over_m_minus_1_times_batch_variance():
    x = np.array([[1.0], [2.0], [6.0]], "float32")  # m = 3, biased variance 14/3
    layer = BatchNormalization(momentum=0.0, unbiased_moving_variance=True)
    layer(x, training=True)
    np.testing.assert_allclose(value(layer.moving_variance), [7.0], rtol=1e-6)  # sum of squares / 2


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
def test_cumulative_mode_averages_every_batch_statistic(fused):
    rng = np.random.default_rng(2)
    batches = [rng.normal(loc=i, size=(6, 2, 2, 3)).astype("float32") for i in range(4)]
    layer = BatchNormalization(momentum=None, fused=fused)
    for x in batches:
        layer(x, training=True)
    means = [x.mean(axis=(0, 1, 2)) for x in batches]
    variances = [x.var(axis=(0, 1, 2)) for x in batches]
    np.testing.assert_allclose(
        value(layer.moving_mean), np.mean(means, axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(value(layer.moving_variance), np.mean(variances, axis=0), rtol=1e-5)
    # The step counter comes after Keras' four weights.
    assert [w.name for w in layer.weights] == [
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "num_batches_tracked",
    ]
    np.testing.assert_array_equal(value(layer.num_batches_tracked), [4, 4, 4])  # per channel


@pytest.mark.multi_backend
def test_resetting_the_step_counter_re_estimates_statistics_from_new_batches():
    rng = np.random.default_rng(12)
    layer = BatchNormalization(momentum=None)
    for _ in range(3):
        layer(rng.normal(loc=-5.0, size=(8, 2)).astype("float32"), training=True)
    layer.num_batches_tracked.assign(np.zeros(2, "int32"))
    new_batches = [rng.normal(loc=5.0, size=(8, 2)).astype("float32") for _ in range(2)]
    for x in new_batches:
        layer(x, training=True)
    expected = np.mean([x.mean(axis=0) for x in new_batches], axis=0)
    np.testing.assert_allclose(value(layer.moving_mean), expected, rtol=1e-5)


@pytest.mark.multi_backend
def test_ghost_batches_normalize_each_virtual_batch_as_tf_keras():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 3, 4)).astype("float32") * 3.0 + 1.0
    layer = BatchNormalization(virtual_batch_size=4, momentum=0.5, epsilon=1e-3)
    y = value(layer(x, training=True))

    # tf-keras reshapes the batch to (virtual_batch_size, batch / virtual_batch_size, ...): with
    # 3 ghost batches, ghost batch j holds examples j, j + 3, j + 6, j + 9.
    ghost_means, ghost_variances = [], []
    for j in range(3):
        ghost = x[j::3].astype(np.float64)
        mean, variance = ghost.mean(axis=(0, 1)), ghost.var(axis=(0, 1))
        np.testing.assert_allclose(
            y[j::3], (ghost - mean) / np.sqrt(variance + 1e-3), rtol=1e-4, atol=1e-5
        )
        ghost_means.append(mean)
        ghost_variances.append(variance)
    # One moving-average update per step, with the ghost batches' average statistics.
    np.testing.assert_allclose(value(layer.moving_mean), 0.5 * np.mean(ghost_means, 0), rtol=1e-5)
    np.testing.assert_allclose(
        value(layer.moving_variance), 0.5 + 0.5 * np.mean(ghost_variances, 0), rtol=1e-5
    )
    # Inference ignores ghost batches: any batch size works.
    assert value(layer(x[:5])).shape == (5, 3, 4)


@pytest.mark.multi_backend
@pytest.mark.parametrize("axis", [-1, 1])
def test_mask_excludes_masked_positions_from_statistics(axis):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5, 4) if axis == -1 else (3, 4, 5)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    layer = BatchNormalization(axis=axis, momentum=0.0, epsilon=1e-3)
    # Channels-first time steps are masked by a mask that broadcasts over the channel axis.
    y = value(layer(x, training=True, mask=mask if axis == -1 else mask[:, None, :]))

    channels_last = x if axis == -1 else np.moveaxis(x, 1, -1)
    valid = channels_last[mask].astype(np.float64)  # (number of unmasked steps, channels)
    mean, variance = valid.mean(axis=0), valid.var(axis=0)
    np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-5)
    # Every position, masked or not, is normalized with the unmasked statistics.
    expected = (channels_last - mean) / np.sqrt(variance + 1e-3)
    expected = expected if axis == -1 else np.moveaxis(expected, -1, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.multi_backend
@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 3, 5, 2)])
def test_mask_of_rank_n_minus_1_is_the_input_shape_without_its_last_axis(shape):
    # What keras.layers.Masking propagates, whatever the BN axis: Keras' layer reads it so.
    rng = np.random.default_rng(13)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=shape[:-1]) > 0.3
    ours = BatchNormalization(axis=1, momentum=0.0)
    theirs = keras.layers.BatchNormalization(axis=1, momentum=0.0)
    np.testing.assert_allclose(
        value(ours(x, training=True, mask=mask)),
        value(theirs(x, training=True, mask=mask)),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(value(ours.moving_mean), value(theirs.moving_mean), atol=1e-5)
    np.testing.assert_allclose(
        value(ours.moving_variance), value(theirs.moving_variance), rtol=1e-4
    )


@pytest.mark.multi_backend
def test_mask_without_the_channel_axes_for_several_channel_axes():
    x = np.random.default_rng(14).normal(size=(6, 3, 2)).astype("float32")
    mask = np.array([1, 1, 0, 1, 0, 1], bool)  # (batch,): the input shape without axes 1 and 2
    layer = BatchNormalization(axis=[1, 2], momentum=0.0)
    layer(x, training=True, mask=mask)
    np.testing.assert_allclose(value(layer.moving_mean), x[mask].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.multi_backend
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_nan_or_inf_at_a_masked_position_does_not_reach_the_statistics(poison):
    rng = np.random.default_rng(15)
    x = rng.normal(size=(3, 4, 2)).astype("float32")
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    x[0, 3] = poison  # masked: e.g. padding that was never written
    layer = BatchNormalization(momentum=0.0, epsilon=1e-3)
    y = value(layer(x, training=True, mask=mask))
    valid = x[mask].astype(np.float64)
    mean, variance = valid.mean(0), valid.var(0)
    np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-5)
    np.testing.assert_allclose(y[mask], (valid - mean) / np.sqrt(variance + 1e-3), rtol=1e-4)


@pytest.mark.multi_backend
def test_ghost_batch_without_unmasked_values_counts_for_nothing():
    rng = np.random.default_rng(16)
    x = rng.normal(loc=3.0, size=(4, 5, 2)).astype("float32")
    mask = np.ones((4, 5), bool)
    mask[1::2] = False  # ghost batch 1 of 2 (examples 1 and 3) is all masked
    layer = BatchNormalization(virtual_batch_size=2, momentum=0.0)
    layer(x, training=True, mask=mask)
    ghost = x[0::2].reshape(-1, 2).astype(np.float64)  # the only ghost batch with values
    np.testing.assert_allclose(value(layer.moving_mean), ghost.mean(0), rtol=1e-5)
    np.testing.assert_allclose(value(layer.moving_variance), ghost.var(0), rtol=1e-5)


@pytest.mark.multi_backend
def test_cumulative_mode_counts_batches_per_channel():
    # Channel 1 has no unmasked value in the first step: its average must start at the
    # second step's statistic, not blend it with the initial value.
    x1, x2 = np.array([[1.0, 50.0], [3.0, 70.0]], "float32"), np.array([[5.0, 8.0], [7.0, 4.0]])
    layer = BatchNormalization(momentum=None)
    layer(x1, training=True, mask=np.array([[True, False], [True, False]]))
    layer(x2.astype("float32"), training=True)
    np.testing.assert_allclose(value(layer.moving_mean), [(2.0 + 6.0) / 2, 6.0])
    np.testing.assert_allclose(value(layer.moving_variance), [1.0, 4.0])
    np.testing.assert_array_equal(value(layer.num_batches_tracked), [2, 1])


@pytest.mark.multi_backend
def test_keras_weight_list_loads_into_the_cumulative_mode():
    keras_bn = keras.layers.BatchNormalization()
    keras_bn.build((None, 3))
    weights = [np.full(3, v, "float32") for v in (2.0, 0.5, -1.0, 4.0)]
    keras_bn.set_weights(weights)
    ours = BatchNormalization(momentum=None)
    ours.build((None, 3))
    ours.set_weights(keras_bn.get_weights())  # 4 arrays into 5 weights
    for variable, expected in zip(ours.weights[:4], weights, strict=True):
        np.testing.assert_array_equal(value(variable), expected)
    np.testing.assert_array_equal(value(ours.num_batches_tracked), [0, 0, 0])
    x = np.array([[1.0, 2.0, 3.0]], "float32")
    np.testing.assert_allclose(value(ours(x)), value(keras_bn(x)), rtol=1e-6)
    with pytest.raises(ValueError, match="weight 'moving_mean' has shape"):
        ours.set_weights(weights[:2] + [np.zeros(2, "float32"), weights[3]])


@pytest.mark.multi_backend
def test_numpy_integer_axes_are_accepted_as_keras_does():
    layer = BatchNormalization(axis=np.int64(1))
    assert layer.axis == 1 and type(layer.axis) is int
    assert BatchNormalization(axis=[np.int32(1), np.int64(-1)]).axis == [1, -1]
    y = layer(np.ones((2, 3, 4), "float32"), training=True)
    assert tuple(y.shape) == (2, 3, 4) and tuple(layer.moving_mean.shape) == (3,)
    with pytest.raises(ValueError, match=r"axis=1.5"):
        BatchNormalization(axis=1.5)


@pytest.mark.multi_backend
def test_fully_masked_channel_leaves_moving_statistics_unchanged():
    x = np.ones((2, 3, 2), "float32")
    layer = BatchNormalization(momentum=0.5)
    y = layer(x, training=True, mask=np.zeros((2, 3), bool))
    assert np.all(np.isfinite(value(y)))
    np.testing.assert_allclose(value(layer.moving_mean), [0.0, 0.0])
    np.testing.assert_allclose(value(layer.moving_variance), [1.0, 1.0])


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize(
    "x",
    [
        pytest.param(np.array([[0.3, -7.0, 2.0]], "float32"), id="batch_of_one"),
        pytest.param(np.full((8, 2, 2, 3), 1234.5, "float32"), id="constant"),
    ],
)
def test_degenerate_batches_give_beta_and_finite_statistics(x, fused):
    layer = BatchNormalization(momentum=0.5, fused=fused, beta_initializer="ones")
    y = value(layer(x, training=True))
    # Zero variance: x - mean is 0, so the output is beta, not NaN.
    np.testing.assert_allclose(y, np.ones_like(x), atol=1e-3)
    moving_variance = value(layer.moving_variance)
    assert np.all(moving_variance >= 0.0) and np.all(np.isfinite(moving_variance))
    np.testing.assert_allclose(moving_variance, 0.5, atol=1e-4)  # 0.5 * 1 + 0.5 * 0


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
def test_large_offset_keeps_variance_and_outputs_exact(fused):
    rng = np.random.default_rng(5)
    x = (1e4 + rng.normal(size=(64, 4))).astype("float32")
    layer = BatchNormalization(momentum=0.0, fused=fused)
    y = value(layer(x, training=True))
    exact = x.astype(np.float64)
    variance = exact.var(axis=0)
    # E[x^2] - E[x]^2 would lose every digit here (x^2 ~ 1e8 has a float32 spacing of 8).
    np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-3)
    expected = (exact - exact.mean(axis=0)) / np.sqrt(variance + 1e-3)
    np.testing.assert_allclose(y, expected, atol=5e-3)


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
def test_inference_is_exact_for_inputs_with_a_large_offset(fused):
    # x * a + (beta - mean * a) would round x * a at the scale of 1e4: errors of 7e-3.
    rng = np.random.default_rng(17)
    layer = BatchNormalization(fused=fused, epsilon=1e-3)
    layer.build((None, 4))
    mean, variance = np.full(4, 1e4), np.array([1.0, 0.5, 2.0, 0.25])
    layer.set_weights([np.full(4, 1.5), np.full(4, 0.2), mean, variance])
    x = (1e4 + rng.normal(size=(64, 4))).astype("float32")
    expected = 1.5 * (x.astype(np.float64) - mean) / np.sqrt(variance + 1e-3) + 0.2
    np.testing.assert_allclose(value(layer(x)), expected, atol=2e-6)


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((3, 4, 2, 5), -1), ((3, 5, 4, 2), 1)])
def test_gradients_match_the_papers_backward_formulas(shape, axis, fused):
    rng = np.random.default_rng(6)
    x = (rng.normal(size=shape) * 2.0 + 1.0).astype("float32")
    dy = rng.normal(size=shape).astype("float32")
    layer = BatchNormalization(axis=axis, epsilon=1e-2, fused=fused)
    layer.build(shape)
    gamma = rng.uniform(0.5, 2.0, shape[axis]).astype("float32")
    beta = rng.normal(size=shape[axis]).astype("float32")
    layer.set_weights([gamma, beta, np.zeros_like(gamma), np.ones_like(gamma)])

    dx, d_gamma, d_beta = gradients(layer, x, dy)
    expected_dx, expected_d_gamma, expected_d_beta = reference_backward(x, dy, gamma, 1e-2, axis)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(d_gamma, expected_d_gamma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_beta, expected_d_beta, rtol=1e-5, atol=1e-5)


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
def test_inference_gradient_is_the_frozen_affine_map(fused):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 3, 3, 2)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    layer = BatchNormalization(fused=fused)
    layer.build(x.shape)
    gamma, beta = np.array([2.0, 0.5], "float32"), np.array([1.0, -1.0], "float32")
    mean, variance = np.array([0.5, -0.5], "float32"), np.array([4.0, 0.25], "float32")
    layer.set_weights([gamma, beta, mean, variance])
    dx, d_gamma, d_beta = gradients(layer, x, dy, training=False)
    inverse_std = 1.0 / np.sqrt(variance + 1e-3)
    np.testing.assert_allclose(dx, dy * gamma * inverse_std, rtol=1e-5)
    np.testing.assert_allclose(
        d_gamma, np.sum(dy * (x - mean) * inverse_std, axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(d_beta, dy.sum(axis=(0, 1, 2)), rtol=1e-5)


@pytest.mark.multi_backend
def test_training_none_follows_the_enclosing_call():
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(16, 3)) * 2.0 + 5.0).astype("float32")
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(3, kernel_initializer="identity")(inputs)
    outputs = BatchNormalization(momentum=0.0)(hidden)  # called without `training`
    model = keras.Model(inputs, outputs)
    bn = model.layers[-1]

    y = value(model(x, training=True))
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)  # batch statistics
    np.testing.assert_allclose(value(bn.moving_mean), x.mean(axis=0), rtol=1e-5)
    y = value(model(x + 1.0))  # default: inference
    np.testing.assert_allclose(y.mean(axis=0), 1.0 / np.sqrt(x.var(axis=0) + 1e-3), rtol=1e-4)
    np.testing.assert_allclose(value(bn.moving_mean), x.mean(axis=0), rtol=1e-5)  # not updated


@pytest.mark.multi_backend
@pytest.mark.parametrize("fused", FUSED)
def test_trainable_false_runs_inference_and_freezes_statistics(fused):
    x = np.random.default_rng(9).normal(size=(8, 2, 2, 3)).astype("float32") + 4.0
    layer = BatchNormalization(fused=fused)
    layer.build(x.shape)
    layer.trainable = False
    before = [value(w) for w in layer.weights]
    y = layer(x, training=True)
    np.testing.assert_allclose(value(y), x / np.sqrt(1.0 + 1e-3), rtol=1e-5)  # moving statistics
    for old, new in zip(before, layer.weights, strict=True):
        np.testing.assert_array_equal(old, value(new))
    assert layer.trainable_weights == []


@pytest.mark.multi_backend
def test_fit_updates_moving_statistics():
    x = np.random.default_rng(10).normal(loc=3.0, scale=2.0, size=(32, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), BatchNormalization(momentum=0.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, np.zeros_like(x), batch_size=32, epochs=1, shuffle=False, verbose=0)
    bn = model.layers[0]
    np.testing.assert_allclose(value(bn.moving_mean), x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(value(bn.moving_variance), x.var(axis=0), rtol=1e-5)
    # evaluate() runs in inference mode and leaves the statistics alone.
    model.evaluate(x + 10.0, np.zeros_like(x), batch_size=32, verbose=0)
    np.testing.assert_allclose(value(bn.moving_mean), x.mean(axis=0), rtol=1e-5)


@pytest.mark.multi_backend
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("fused", FUSED)
def test_mixed_precision_computes_statistics_in_float32(policy, fused):
    # Squares of values ~300 overflow float16 (max 65504): statistics must be float32.
    x32 = np.random.default_rng(11).normal(loc=300.0, scale=30.0, size=(16, 2, 2, 3))
    keras.mixed_precision.set_global_policy(policy)
    layer = BatchNormalization(momentum=0.0, fused=fused)
    x = keras.ops.cast(x32, layer.compute_dtype)
    y = layer(x, training=True)

    assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights)
    exact = value(keras.ops.cast(x, "float32")).astype(np.float64)
    mean, variance = exact.mean(axis=(0, 1, 2)), exact.var(axis=(0, 1, 2))
    np.testing.assert_allclose(value(layer.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(value(layer.moving_variance), variance, rtol=1e-4)
    expected = (exact - mean) / np.sqrt(variance + 1e-3)
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 2e-3
    y = value(keras.ops.cast(y, "float32"))
    np.testing.assert_allclose(y, expected, atol=tolerance * 4)
    inference = value(keras.ops.cast(layer(x), "float32"))
    np.testing.assert_allclose(inference, expected, atol=tolerance * 4)


BAD_CONSTRUCTOR_ARGUMENTS = [
    ({"momentum": 1.5}, "momentum=1.5"),
    ({"momentum": -0.1}, "momentum=-0.1"),
    ({"renorm_momentum": 2.0}, "renorm_momentum=2.0"),
    ({"axis": "channels"}, "axis='channels'"),
    ({"epsilon": -1.0}, "epsilon=-1.0"),
    ({"virtual_batch_size": 0}, "virtual_batch_size=0"),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "bad": 2}}, "Received invalid keys.*'bad'"),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, "rmax=1.0 < rmin=2.0"),
    ({"fused": "yes"}, "fused='yes'"),
    ({"fused": True, "renorm": True}, "renorm=True"),
    # Values that Python would coerce into a different layer (issue 15): refused, not coerced.
    ({"epsilon": float("inf")}, "epsilon=inf is not finite"),
    ({"epsilon": float("nan")}, "epsilon=nan is not finite"),
    ({"epsilon": "1e-3"}, "epsilon='1e-3' must be a finite float"),
    ({"epsilon": True}, "epsilon=True must be a finite float"),
    ({"momentum": True}, "momentum=True must be a float in [0, 1]"),
    ({"momentum": "0.9"}, "momentum='0.9' must be a float in [0, 1]"),
    ({"momentum": float("nan")}, "momentum=nan is not finite"),
    ({"renorm_momentum": None}, "renorm_momentum=None must be a float in [0, 1]"),
    ({"center": "no"}, "center='no' must be True or False"),
    ({"scale": 1}, "scale=1 must be True or False"),
    ({"renorm": "yes"}, "renorm='yes' must be True or False"),
    ({"synchronized": "yes"}, "synchronized='yes' must be True or False"),
    ({"unbiased_moving_variance": None}, "unbiased_moving_variance=None must be True or False"),
    ({"fused": 1}, "fused=1 must be None"),
    ({"axis": True}, "axis=True must be an integer"),
    ({"axis": []}, "axis=[] must be an integer or a non-empty list"),
    ({"axis": [1, 2.0]}, "axis=[1, 2.0] must be an integer"),
    ({"virtual_batch_size": 2.5}, "virtual_batch_size=2.5 must be a positive integer"),
    ({"virtual_batch_size": True}, "virtual_batch_size=True must be a positive integer"),
    ({"beta_initializer": "nope"}, "beta_initializer='nope' is not a Keras initializer"),
    ({"gamma_initializer": None}, "gamma_initializer=None is not an initializer"),
    ({"moving_variance_initializer": 3}, "moving_variance_initializer=3 is not a Keras init"),
    ({"gamma_regularizer": "nope"}, "gamma_regularizer='nope' is not a Keras regularizer"),
    ({"beta_constraint": 42}, "beta_constraint=42 is not a Keras constraint"),
    ({"renorm": True, "renorm_clipping": "rmax"}, "renorm_clipping='rmax' must be a dict"),
    ({"renorm": True, "renorm_clipping": {"rmax": float("nan")}}, "renorm_clipping['rmax']=nan"),
    ({"renorm": True, "renorm_clipping": {"dmax": True}}, "renorm_clipping['dmax']=True must"),
    ({"renorm_clipping": {"rmin": 2.0, "rmax": 1.0}}, "rmax=1.0 < rmin=2.0"),
]


@pytest.mark.multi_backend
@pytest.mark.parametrize("kwargs,message", BAD_CONSTRUCTOR_ARGUMENTS)
def test_bad_constructor_arguments_raise_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BatchNormalization(**kwargs)


@pytest.mark.multi_backend
def test_numpy_scalars_zero_epsilon_and_infinite_clipping_bounds_are_accepted():
    layer = BatchNormalization(
        momentum=np.float32(0.5),
        epsilon=0,
        center=np.bool_(False),
        renorm=True,
        renorm_clipping={"rmax": float("inf"), "rmin": 0.0, "dmax": np.float64(np.inf)},
        virtual_batch_size=np.int64(2),
        beta_regularizer="l2",
        gamma_constraint="non_neg",
    )
    assert layer.momentum == 0.5 and type(layer.momentum) is float
    assert layer.epsilon == 0.0 and layer.center is False and layer.virtual_batch_size == 2
    config = layer.get_config()
    restored = BatchNormalization.from_config(config)
    assert restored.get_config() == config
    # epsilon=0 is exact: a channel with variance normalizes to unit variance.
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    y = value(BatchNormalization(epsilon=0.0)(x, training=True))
    np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-5)


@pytest.mark.multi_backend
@pytest.mark.parametrize(
    "kwargs,shape,message",
    [
        ({"axis": 4}, (2, 3, 4, 5), r"axis=4 is out of range for inputs of rank 4"),
        ({"axis": -3}, (2, 3), r"axis=-3 is out of range for inputs of rank 2"),
        ({"axis": [1, -2]}, (2, 3, 4), "names the same axis twice"),
        ({"virtual_batch_size": 2, "axis": 0}, (4, 3), "includes the batch axis 0"),
        ({"fused": True, "axis": 2}, (2, 3, 4, 5), "channel axis first"),
    ],
)
def test_axis_that_does_not_fit_the_input_raises(kwargs, shape, message):
    if kwargs.get("fused") and BACKEND != "tensorflow":
        pytest.skip("fused=True is refused at construction outside TensorFlow")
    with pytest.raises(ValueError, match=message):
        BatchNormalization(**kwargs)(np.zeros(shape, "float32"))


@pytest.mark.multi_backend
def test_virtual_batch_size_that_does_not_divide_the_batch_raises():
    layer = BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide the batch size 6"):
        layer(np.zeros((6, 3), "float32"), training=True)


@pytest.mark.multi_backend
def test_input_with_another_channel_count_than_the_built_layer_raises():
    layer = BatchNormalization()
    layer(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match=r"expected axis 1 of input shape to have value 3"):
        layer(np.zeros((2, 5), "float32"))


@pytest.mark.multi_backend
def test_mask_of_wrong_rank_raises():
    layer = BatchNormalization()
    with pytest.raises(ValueError, match=r"expected a mask of rank 2"):
        layer(np.zeros((2, 3, 4), "float32"), training=True, mask=np.ones((2,), bool))


@pytest.mark.skipif(BACKEND == "tensorflow", reason="synchronized is TensorFlow-only")
@pytest.mark.multi_backend
def test_synchronized_outside_tensorflow_raises():
    with pytest.raises(ValueError, match="synchronized=True is only supported"):
        BatchNormalization(synchronized=True)
    layer = BatchNormalization()
    with pytest.raises(ValueError, match="synchronized=True is only supported"):
        layer.synchronized = True
    model = keras.Sequential([keras.Input((3,)), layer])
    with pytest.raises(ValueError, match="synchronized=True is only supported"):
        set_batch_norm_synchronized(model, True)
    assert set_batch_norm_synchronized(model, False) == [] and layer.synchronized is False


@pytest.mark.multi_backend
def test_synchronized_is_a_checked_setting_that_get_config_reports():
    layer = BatchNormalization()
    with pytest.raises(ValueError, match="synchronized='yes' must be True or False"):
        layer.synchronized = "yes"
    with pytest.raises(ValueError, match="synchronized=1 must be True or False"):
        set_batch_norm_synchronized(keras.Sequential([layer]), 1)
    layer.synchronized = False
    assert layer.synchronized is False and layer.get_config()["synchronized"] is False


class _BlockWithBatchNorm(keras.layers.Layer):
    """A custom layer that holds a BN layer as an attribute, outside any `model.layers`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)
        self.bn = keras.layers.BatchNormalization(name="block_bn")
        # What the old duck-typed checks took for a BN layer: not one.
        self.moving_variance = None

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


@pytest.mark.multi_backend
def test_batch_norm_layers_finds_ours_and_keras_at_any_depth_each_once():
    inner = keras.Sequential(
        [keras.Input((3,)), BatchNormalization(name="inner_bn"), keras.layers.LayerNormalization()],
        name="inner",
    )
    outer_bn = BatchNormalization(name="outer_bn")
    inputs = keras.Input((3,))
    hidden = inner(_BlockWithBatchNorm(name="block")(inner(inputs)))  # `inner` used twice
    model = keras.Model(inputs, keras.layers.Dense(2)(outer_bn(hidden)))
    found = batch_norm_layers(model)
    assert sorted(layer.name for layer in found) == ["block_bn", "inner_bn", "outer_bn"]
    assert {type(layer) for layer in found} == {BatchNormalization, keras.layers.BatchNormalization}
    assert batch_norm_layers(outer_bn) == [outer_bn]
    assert batch_norm_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])) == []
