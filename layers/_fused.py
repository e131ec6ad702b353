"""TensorFlow's fused batch-norm kernel (FusedBatchNormV3) behind one small interface.

`layers.BatchNormalization` asks three things of it: can the kernel compute this input
(`kernel_layout`), is it worth it (`is_small`, `in_xla_context`), and the normalized output with
the batch statistics in the convention of `layers._statistics` (`training`) or with given
statistics (`inference`). Everything TensorFlow-specific about the kernel stays here; on other
backends the layer never calls it.
"""

from __future__ import annotations

# The kernel accepts these input dtypes, always with float32 scale, offset and statistics;
# float64 has no kernel.
INPUT_DTYPES = ("float16", "bfloat16", "float32")
# Any epsilon >= 0 is computed exactly: the CPU kernels use it as given, and cuDNN has accepted
# epsilons below 1e-5 since 7.5 (CUDNN_BN_MIN_EPSILON is 0; TensorFlow 2.21 builds against
# cuDNN 9). Only tf.compat.v1.nn.fused_batch_norm still raises them to 1.001e-5 for old cuDNNs;
# this module calls the op directly, so Caffe's and PyTorch's 1e-5 keep the kernel.
# Below this many values the kernel's fixed cost (about 0.3 ms per training step on the
# project's 2-core CPU, oneDNN) outweighs what it saves: measured fwd+bwd, (60, 100) takes
# 0.64 ms fused vs 0.34 ms unfused, (60, 8, 8, 16) 0.56 vs 0.44, while (128, 4, 4, 64) takes
# 0.63 vs 0.80 and (256, 1024) 0.98 vs 1.37. `fused=None` keeps such small tensors, when their
# size is known while tracing, on the keras.ops path in training (in inference only inputs the
# kernel sees reshaped; a convolution's output keeps the kernel so that Grappler folds it into
# the convolution); `fused=True` still forces the kernel.
MIN_VALUES = 100_000


def kernel_layout(ndim: int, axis: int) -> tuple[str, str | None] | None:
    """How to feed an input of rank `ndim` normalized over `axis` to FusedBatchNormV3.

    Returns `(data_format, reshape)` or `None` when the kernel cannot express the reduction.
    `reshape` is `"rows"` for channels-last inputs of rank 2, 3 or >= 6, viewed as
    `(rows, 1, 1, C)`; `"spatial"` for channels-first inputs of rank 3 or >= 6, viewed as
    `(N, C, rest, 1)`; `None` when the input already is 4-D or 5-D. Both views reduce over exactly
    the same elements as the original tensor, so statistics and gradients are unchanged.
    """
    if ndim < 2:
        return None
    if axis == ndim - 1:
        if ndim == 4:
            return "NHWC", None
        if ndim == 5:
            return "NDHWC", None
        return "NHWC", "rows"
    if axis == 1:
        if ndim == 4:
            return "NCHW", None
        if ndim == 5:
            return "NCDHW", None
        return "NCHW", "spatial"
    return None


def is_small(shape) -> bool:
    """Whether a statically known shape holds fewer values than the kernel pays off for."""
    if any(d is None for d in shape):
        return False
    size = 1
    for d in shape:
        size *= int(d)
    return size < MIN_VALUES


def in_xla_context() -> bool:
    """Whether the TensorFlow graph being traced will be compiled by XLA (jit_compile=True).

    XLA replaces the kernel by its own batch norm, whose E[x^2] - E[x]^2 variance turns into
    NaN for inputs with a large offset; the layer takes its keras.ops path there instead.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    try:
        # tf.function(jit_compile=True) traces inside an XLAControlFlowContext; TensorFlow has
        # no public accessor for it (tf-keras used the same internal module).
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a future TensorFlow; the XLA tests would fail.
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def training(x, kernel_layout: tuple[str, str | None], scale, offset, epsilon: float):
    """Normalizes `x` with its batch statistics: `(outputs, mean, variance, count)`.

    `scale` and `offset` are per-channel tensors or `None` (1 and 0). `outputs` has `x`'s
    shape and dtype; `mean` and `variance` are float32 of shape `(channels,)`, the variance
    biased like `layers._statistics.moments`'; `count` is the number of values per channel (a
    Python float when the shape is known while tracing).
    """
    import tensorflow as tf

    data_format, _ = kernel_layout
    view, channels = _view(x, kernel_layout)
    outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=view,
        scale=tf.ones([channels], tf.float32) if scale is None else tf.cast(scale, tf.float32),
        offset=tf.zeros([channels], tf.float32) if offset is None else tf.cast(offset, tf.float32),
        mean=tf.zeros([0], tf.float32),
        variance=tf.zeros([0], tf.float32),
        epsilon=epsilon,
        exponential_avg_factor=1.0,
        data_format=data_format,
        is_training=True,
    )
    count = _count(view, channels)
    # The kernel normalizes with the biased variance but returns m/(m-1) times it (on CPU, GPU
    # and XLA alike); undone here, so that every path feeds the moving statistics the same
    # biased batch variance (Keras' convention).
    variance = variance * _inverse_bessel_factor(count)
    return _restore(outputs, x, kernel_layout), mean, variance, count


def inference(x, kernel_layout: tuple[str, str | None], scale, offset, mean, variance, epsilon):
    """Normalizes `x` with the given per-channel `mean` and `variance` (cast to float32)."""
    import tensorflow as tf

    data_format, _ = kernel_layout
    view, channels = _view(x, kernel_layout)
    outputs = tf.raw_ops.FusedBatchNormV3(
        x=view,
        scale=tf.ones([channels], tf.float32) if scale is None else tf.cast(scale, tf.float32),
        offset=tf.zeros([channels], tf.float32) if offset is None else tf.cast(offset, tf.float32),
        mean=tf.cast(mean, tf.float32),
        variance=tf.cast(variance, tf.float32),
        epsilon=epsilon,
        data_format=data_format,
        is_training=False,
    )[0]
    return _restore(outputs, x, kernel_layout)


def _view(x, kernel_layout):
    """`x` as the 4-D/5-D tensor the kernel takes, and its number of channels."""
    import tensorflow as tf

    data_format, reshape = kernel_layout
    # The layer's input spec fixes the channel axis' size, so it is known while tracing.
    channels = int(x.shape[-1] if data_format.endswith("C") else x.shape[1])
    if reshape == "rows":
        x = tf.reshape(x, [-1, 1, 1, channels])
    elif reshape == "spatial":
        x = tf.reshape(x, [tf.shape(x)[0], channels, -1, 1])
    return x, channels


def _restore(outputs, x, kernel_layout):
    """The kernel's output in `x`'s shape."""
    import tensorflow as tf

    if kernel_layout[1] is not None:
        return tf.reshape(outputs, tf.shape(x))
    return outputs


def _count(x, channels: int):
    """Values per channel of the 4-D/5-D tensor fed to the kernel."""
    if all(d is not None for d in x.shape):
        size = 1
        for d in x.shape:
            size *= int(d)
        return float(size // channels)
    import tensorflow as tf

    return tf.cast(tf.size(x, out_type=tf.int64), tf.float32) / float(channels)


def _inverse_bessel_factor(count):
    """(m - 1) / m: turns the kernel's corrected variance back into the biased one."""
    if isinstance(count, float):
        return (count - 1.0) / count if count > 1 else 0.0
    import tensorflow as tf

    return tf.maximum(count - 1.0, 0.0) / tf.maximum(count, 1.0)
