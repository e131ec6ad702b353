"""Batch Normalization's batch statistics, computed in one place for every path that needs them.

Reference: Sergey Ioffe and Christian Szegedy, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", ICML 2015, https://arxiv.org/abs/1502.03167.

What a BN layer normalizes a training batch with (Algorithm 1, steps 1-2: `moments`) and what
one call contributes to the population statistics (Algorithm 2, steps 8-11: `sums`, pooled over
batches by `layers.population_statistics`) are the same quantities in two forms; both are
computed here, over the same view of the input (`layout`: the channel axes, Keras' mask
convention, ghost batches) and, for synchronized BN, over the same replicas. TensorFlow's fused
kernel computes the plain case itself and reports it in the same convention (`layers._fused`).

Private to `layers`: the functions take backend tensors and work inside `tf.function`, under
XLA and `jax.jit`, and on every Keras backend.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def is_tensor(value: Any) -> bool:
    """Whether `value` is a tensor rather than a Python number known while tracing."""
    return not isinstance(value, (bool, int, float))


# ---------------------------------------------------------------------------------------------
# The input as the statistics see it


def channel_axes(axis: int | list[int], input_shape: tuple) -> list[int]:
    """`axis` (an int or a list of ints, negative ones counted from the end) as sorted,
    non-negative axes of inputs of shape `input_shape`; a `ValueError` says what does not fit."""
    ndim = len(input_shape)
    requested = [axis] if isinstance(axis, int) else axis
    axes = []
    for a in requested:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis={axis} is out of range for inputs of rank {ndim} "
                f"(shape {tuple(input_shape)}): each axis must be in [{-ndim}, {ndim - 1}]."
            )
        axes.append(a % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis={axis} names the same axis twice for inputs of rank {ndim}.")
    return sorted(axes)


def broadcast_mask(mask, x, axes: list[int]):
    """The mask as a boolean tensor of `x`'s shape: `True` where a value counts.

    Keras' convention first: a mask of rank `ndim - 1` has the input's shape without its
    last axis, whatever the channel axis (what `keras.layers.Masking` and Embedding's
    `mask_zero` propagate: `(batch, time)` for `(batch, time, features)`); it is the only rank
    `keras.layers.BatchNormalization` accepts. A mask of rank `ndim` broadcasts to the input;
    with several channel axes a mask of rank `ndim - len(axes)` is the input's shape without
    the channel axes.
    """
    mask = ops.convert_to_tensor(mask)
    ndim = len(x.shape)
    rank = len(mask.shape)
    if rank == ndim - 1:
        mask = ops.expand_dims(mask, -1)
    elif rank == ndim - len(axes) and rank != ndim:
        for a in axes:
            mask = ops.expand_dims(mask, a)
    elif rank != ndim:
        ranks = sorted({ndim - 1, ndim - len(axes), ndim})
        raise ValueError(
            f"The mask has shape {tuple(mask.shape)} but the inputs have shape "
            f"{tuple(x.shape)}: expected a mask of rank {ndim - 1} (Keras' convention: the "
            "input shape without its last axis) or of rank "
            + " or ".join(str(r) for r in ranks if r != ndim - 1)
            + " broadcastable to the inputs."
        )
    return ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(x))


def split_ghost_batches(x, valid, virtual_batch_size: int):
    """`x` (and `valid`) as tf-keras' ghost batches: `(virtual_batch_size, num_ghost, ...)`."""
    batch = x.shape[0]
    if batch is not None and batch % virtual_batch_size != 0:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} does not divide the batch size {batch}: "
            "ghost batches must split the batch evenly. Use a batch size that is a multiple of "
            f"{virtual_batch_size} (e.g. drop_remainder=True in tf.data) or another "
            "virtual_batch_size."
        )
    ghost_shape = (virtual_batch_size, -1) + tuple(ops.shape(x)[1:])
    x = ops.reshape(x, ghost_shape)
    if valid is not None:
        valid = ops.reshape(valid, ghost_shape)
    return x, valid


def layout(x, mask, axes: list[int], virtual_batch_size: int | None):
    """The input as the batch statistics see it: `(x, valid, axes, reduction_axes)`.

    `valid` is the mask broadcast to `x` (or `None`); with ghost batches both are reshaped to
    `(virtual_batch_size, num_ghost_batches, ...)` and axis 1, which indexes the ghost
    batches, keeps its own statistics like the channel axes (shifted by one).
    """
    valid = broadcast_mask(mask, x, axes) if mask is not None else None
    ghost = virtual_batch_size is not None
    if ghost:
        x, valid = split_ghost_batches(x, valid, virtual_batch_size)
        axes = [a + 1 for a in axes]
    ndim = len(x.shape)
    reduction_axes = [i for i in range(ndim) if i not in axes and not (ghost and i == 1)]
    return x, valid, axes, reduction_axes


# ---------------------------------------------------------------------------------------------
# The statistics


def value_count(x, reduction_axes: list[int]):
    """Values per channel: a Python float when the shape is static, else a scalar tensor."""
    shape = ops.shape(x)
    count = 1
    for a in reduction_axes:
        count = count * shape[a]
    if is_tensor(count):
        return ops.cast(count, x.dtype)
    return float(count)


def moments(x, reduction_axes: list[int], valid=None, replica_context=None):
    """Per-channel mean, biased variance and number of values (Algorithm 1, steps 1-2).

    `valid` is `None` or a boolean tensor of `x`'s shape; masked values are replaced by 0 with
    `where` (as Keras does), never multiplied by 0, so a NaN or inf at a masked position cannot
    reach the statistics. Under a multi-replica `replica_context` (synchronized BN) the
    statistics are global (see `sums`). Shapes keep the reduced axes (size 1).

    The variance is the mean of squared deviations from the mean (two passes), never
    E[x^2] - E[x]^2, which cancels catastrophically for inputs with a large offset: it stays
    accurate there and can never be negative. `count` is a Python float when it is known while
    tracing, else a tensor (per channel with a mask; an all-masked channel reads mean 0 and
    variance 0, and the layer keeps its moving statistics).
    """
    if valid is None and replica_context is None:
        count = value_count(x, reduction_axes)
        mean = ops.mean(x, axis=reduction_axes, keepdims=True)
        # The mean's own gradient through the variance is zero (deviations sum to zero), so
        # stopping it is exact and saves a reduction in the backward pass.
        deviation = x - ops.stop_gradient(mean)
        variance = ops.mean(ops.square(deviation), axis=reduction_axes, keepdims=True)
        return mean, variance, count
    total, squares, count, _ = sums(x, reduction_axes, valid, replica_context)
    divisor = ops.maximum(count, 1.0)
    return total / divisor, squares / divisor, count


def sums(x, reduction_axes: list[int], valid=None, replica_context=None):
    """`(sum, sum of squared deviations, count, count - 1)` per channel, as `moments` defines
    them: the moments in a form that pools by addition.

    Over ghost batches, batches and replicas the population statistics are `sum / count` and
    `squares / (count - 1)` of the summed sums: Algorithm 2's mean of the batch means and
    `m / (m - 1)` times the mean of the batch variances, each batch weighed by its values.
    Under a multi-replica `replica_context` two all-reduces make them global: the sum and count,
    then the squared deviations from the global mean, so the variance stays a sum of squares.
    All-reduce is differentiable: its gradient is the all-reduce of the replicas' gradients.
    """
    if valid is None:
        local_total = ops.sum(x, axis=reduction_axes, keepdims=True)
        local_count = ops.ones_like(local_total) * ops.cast(value_count(x, reduction_axes), x.dtype)
    else:
        local_total = ops.sum(ops.where(valid, x, 0.0), axis=reduction_axes, keepdims=True)
        local_count = ops.sum(ops.cast(valid, x.dtype), axis=reduction_axes, keepdims=True)
    if replica_context is None:
        total, count = local_total, local_count
    else:
        totals = all_reduce_sum(replica_context, ops.stack([local_total, local_count]))
        total, count = totals[0], totals[1]
    mean = total / ops.maximum(count, 1.0)
    squares = ops.square(x - ops.stop_gradient(mean))
    if valid is not None:
        squares = ops.where(valid, squares, 0.0)
    squares = ops.sum(squares, axis=reduction_axes, keepdims=True)
    if replica_context is not None:
        squares = all_reduce_sum(replica_context, squares)
    return total, squares, count, ops.maximum(count - 1.0, 0.0)


def bessel_factor(count):
    """m / (m - 1), Algorithm 2's correction; 1 for m <= 1, whose biased variance is 0."""
    if is_tensor(count):
        return count / ops.maximum(count - 1.0, 1.0)
    return count / (count - 1.0) if count > 1 else 1.0


def call_sums(layer: keras.layers.Layer, inputs, mask=None) -> tuple:
    """One call's contribution to Algorithm 2, per channel, for any BN layer of a model.

    Returns float32 `(total, squares, count, degrees_of_freedom)` of the moving statistics'
    shape: the sum of the values, the sum of their squared deviations from the mean of the
    (ghost) batch they are normalized with, the number of values and the sum over (ghost)
    batches of `m - 1` (see `sums`). Reads only what both `layers.BatchNormalization` and
    `keras.layers.BatchNormalization` expose: `axis`, `synchronized`, `moving_mean` and (ours)
    `virtual_batch_size`; Keras' layer has one channel axis and accepts only masks of Keras'
    convention, which `broadcast_mask` reads as it does.
    """
    x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
    virtual_batch_size = getattr(layer, "virtual_batch_size", None)
    axes = channel_axes(layer.axis, tuple(x.shape))
    x, valid, _, reduction_axes = layout(x, mask, axes, virtual_batch_size)
    context = multi_replica_context() if layer.synchronized else None
    per_call = sums(x, reduction_axes, valid, context)
    shape = tuple(layer.moving_mean.shape)
    if virtual_batch_size is not None:
        per_call = tuple(ops.sum(s, axis=1) for s in per_call)
    return tuple(ops.cast(ops.reshape(s, shape), "float32") for s in per_call)


# ---------------------------------------------------------------------------------------------
# Replicas (synchronized BN, TensorFlow only)


def multi_replica_context():
    """The tf.distribute replica context when running on one of several replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def all_reduce_sum(replica_context, value):
    import tensorflow as tf

    return replica_context.all_reduce(tf.distribute.ReduceOp.SUM, value)
