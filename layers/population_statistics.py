"""The paper's inference statistics (Algorithm 2, steps 8-11) for every BN layer of a model.

Reference: Sergey Ioffe and Christian Szegedy, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", ICML 2015, https://arxiv.org/abs/1502.03167,
Section 3.1 and Algorithm 2.

Keras' moving averages (momentum 0.99) trail the weights: after a short run they have moved only
part of the way from their initial values, and a model that trains well predicts at chance.
Algorithm 2 replaces them by population statistics estimated with the trained network frozen.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from . import _statistics
from .batch_normalization import BatchNormalization
from .model_batch_norm import batch_norm_layers

# The sums each BN call contributes (see `layers._statistics.call_sums`): the values' sum, their
# squared deviations from the (ghost) batch mean, their count and the sum of count - 1 over
# (ghost) batches.
_SUMS = 4


def recompute_population_statistics(
    model: keras.layers.Layer,
    data: Any,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
) -> int:
    """Replaces every BN layer's moving statistics by Algorithm 2's population statistics.

    With all weights frozen, the training mini-batches in `data` go through `model` with every
    BN layer normalizing by the statistics of the batch, as in training, so that each BN layer
    sees the input it sees in training (Algorithm 2, step 10, "process multiple training
    mini-batches B, each of size m"). Each BN layer's inference statistics become

        moving_mean     = E_B[mean_B]                       (mean of the batch means)
        moving_variance = m / (m - 1) * E_B[variance_B]     (unbiased: mean of batch variances)

    with `m` the number of values per channel in a batch: `batch * height * width` for
    convolutions (the paper's effective mini-batch, Section 3.2), the unmasked values with a
    mask, the ghost batch with `virtual_batch_size` (each ghost batch is a batch here). When the
    batches differ in size (a last, smaller batch; masks; replicas), each batch weighs by its
    number of values: the mean is the mean of all values, and the variance the pooled unbiased
    estimate `sum over B of m_B * variance_B / sum over B of (m_B - 1)`; with equal batches both
    are exactly the formulas above.

    This covers `layers.BatchNormalization` and `keras.layers.BatchNormalization`, at any depth
    (nested models and layers: `layers.batch_norm_layers`). Nothing else changes: trainable
    weights, optimizer variables, layer attributes, seed generators and renorm's
    `renorm_mean`/`renorm_stddev` (training state, like the optimizer's). Renorm layers also
    get `moving_stddev = sqrt(variance + epsilon)`, from which they derive their moving
    variance; with `momentum=None` the step counter `num_batches_tracked` becomes the number
    of batches averaged, so further training continues the same cumulative average. A BN
    layer with `trainable=False` keeps its statistics and, as in training, runs in inference
    mode (Keras' fine-tuning rule).

    Every layer other than BN runs in inference mode during the pass: Dropout is off and random
    augmentation layers are inactive. The statistics must describe the inputs the BN layers see
    in the network that is used, with dropout off; estimated with dropout on, the variance after
    a dropout layer would be larger than at inference ("variance shift", Li et al., 2019,
    https://arxiv.org/abs/1801.05134). For the same reason pass the training data preprocessed
    as for inference, without random augmentation.

    The forward pass is compiled (`tf.function` on TensorFlow, `jax.jit` on JAX; eager on
    PyTorch) and the sums are pooled in float64 on the host. On TensorFlow, called inside the
    `scope()` of a `tf.distribute` strategy with several replicas, the batches are distributed
    over the replicas (`experimental_distribute_dataset` and `strategy.run`): a per-replica BN layer
    pools its replicas' statistics, each replica's part of a batch being one batch of Algorithm
    2, and a `synchronized=True` layer uses the global batch statistics.

    Args:
        model: a built Keras model (or layer) containing BN layers.
        data: the training batches: a `tf.data.Dataset` (on every backend, as Keras' `fit`
            reads it) or any iterable of batches, each an
            array (or a structure of arrays for several inputs) or a tuple `(x, y)` or
            `(x, y, sample_weight)` whose `x` is used. With `batch_size`, arrays instead: `x`
            or a tuple `(x, y[, sample_weight])`, split into consecutive batches.
        steps: use at most this many batches (all of `data` when `None`; required for an
            infinite dataset).
        batch_size: the training batch size (Algorithm 2's `m` per channel is this times the
            spatial size), when `data` holds arrays rather than batches.

    Returns:
        The number of batches used; 0 when the model has no BN layer to recompute (no data is
        read then).

    Raises:
        ValueError: `data` has no batch, `steps` or `batch_size` is invalid, `data` is one
            array without `batch_size`, an infinite dataset without `steps`, the model is
            not built, or a batch made a layer's statistics NaN or inf (non-finite data or
            weights; the message names the layer and the batch, and no statistic changes).

    Example:

    ```python
    import keras
    import numpy as np
    from layers import BatchNormalization, recompute_population_statistics

    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, use_bias=False),
        BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    x_train = np.random.rand(1024, 28, 28, 1).astype("float32")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, np.zeros(1024), batch_size=128, epochs=1, verbose=0)
    # The moving averages have moved 8 steps of 1%; replace them by Algorithm 2's statistics:
    recompute_population_statistics(model, x_train, batch_size=128)  # -> 8 batches
    ```
    """
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(
            f"steps={steps!r} must be a positive number of batches, or None to use all of data."
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1
    ):
        raise ValueError(
            f"batch_size={batch_size!r} must be a positive integer (the training batch size) "
            "or None when data yields batches."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: build it (or call it on a batch) before "
            "recomputing its BN statistics."
        )
    bn_layers = [layer for layer in batch_norm_layers(model) if layer.trainable]
    if not bn_layers:
        return 0
    strategy = _multi_replica_strategy()
    compiled = _compiled_pass(model, bn_layers, strategy)
    pooled = _Pooled(bn_layers)
    with compiled.collector:
        if strategy is not None:
            batch_sums = compiled.run(_as_dataset(data, steps, batch_size))
        else:
            batch_sums = compiled.run(_batches(data, steps, batch_size))
        for sums in batch_sums:
            pooled.add(sums)
    if pooled.batches == 0:
        raise ValueError(
            "data yielded no batch, so there is nothing to estimate BN's population statistics "
            "from: pass the training batches, e.g. a tf.data.Dataset of (x, y) batches or "
            "`data=x_train, batch_size=128`."
        )
    pooled.assign()
    return pooled.batches


# ---------------------------------------------------------------------------------------------
# Collecting each BN call's statistics during a traced forward pass


class _Collector:
    """Makes the BN layers normalize with batch statistics and report their sums.

    While active, each BN layer's `call` is wrapped (an instance attribute that shadows the
    class's method; removed on exit): the layer runs in training mode whatever the enclosing
    call says, and its sums are recorded. Records are per thread, because
    `MirroredStrategy` traces each replica's function in its own thread.
    """

    def __init__(self, bn_layers: list[keras.layers.Layer]):
        self.layers = bn_layers
        self._local = threading.local()

    def __enter__(self) -> _Collector:
        for index, layer in enumerate(self.layers):
            object.__setattr__(layer, "call", self._wrapped_call(index, layer, layer.call))
        return self

    def __exit__(self, *exc_info) -> None:
        for layer in self.layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")

    def _wrapped_call(self, index: int, layer: keras.layers.Layer, call):
        def call_with_batch_statistics(inputs, training=None, mask=None, **kwargs):
            outputs = call(inputs, training=True, mask=mask, **kwargs)
            records = getattr(self._local, "records", None)
            if records is not None:
                records[index].append(_statistics.call_sums(layer, inputs, mask))
            return outputs

        return call_with_batch_statistics

    def forward(self, model: keras.layers.Layer, x, state_mapping=None) -> list[tuple]:
        """Runs `model` on `x`; returns each BN layer's summed sums (zeros if it was not called).

        Variable updates made by the call (the BN layers' own moving averages, seed
        generators) land in a `StatelessScope` and are dropped.
        """
        self._local.records = [[] for _ in self.layers]
        try:
            with keras.StatelessScope(state_mapping=state_mapping):
                model(x, training=False)
            records = self._local.records
        finally:
            self._local.records = None
        results = []
        for layer, calls in zip(self.layers, records, strict=True):
            if calls:
                results.append(
                    tuple(sum(values[1:], values[0]) for values in zip(*calls, strict=True))
                )
            else:
                zeros = ops.zeros(tuple(layer.moving_mean.shape), "float32")
                results.append((zeros,) * _SUMS)
        return results


# ---------------------------------------------------------------------------------------------
# Pooling over batches (host, float64)


class _Pooled:
    def __init__(self, bn_layers: list[keras.layers.Layer]):
        self.layers = bn_layers
        self.sums = [
            [np.zeros(tuple(layer.moving_mean.shape)) for _ in range(_SUMS)] for layer in bn_layers
        ]
        self.batches_with_data = [
            np.zeros(tuple(layer.moving_mean.shape), np.int64) for layer in bn_layers
        ]
        self.batches = 0

    def add(self, batch_sums: list[tuple]) -> None:
        """Adds one batch's sums; a `ValueError` when a layer's went NaN or inf.

        Checked batch by batch, before anything is assigned: one NaN or inf value in a batch
        (or a weight) makes every later statistic NaN, and a model whose BN layers hold NaN
        statistics predicts one class for every input, with no error anywhere.
        """
        values = [
            [np.asarray(ops.convert_to_numpy(s), np.float64) for s in sums] for sums in batch_sums
        ]
        broken = [
            layer
            for layer, sums in zip(self.layers, values, strict=True)
            if not all(np.isfinite(s).all() for s in sums)
        ]
        if broken:
            later = f" (and {len(broken) - 1} BN layers after it)" if len(broken) > 1 else ""
            raise ValueError(
                f"BN layer {broken[0].name!r}{later} got NaN or inf statistics from batch "
                f"{self.batches + 1} of data: that batch, or a weight before the layer, is not "
                "finite. No statistics were changed; check the data (e.g. "
                "np.isfinite(x).all()) and the model's weights."
            )
        for totals, with_data, sums in zip(self.sums, self.batches_with_data, values, strict=True):
            for total, value in zip(totals, sums, strict=True):
                total += value
            with_data += sums[2] > 0
        self.batches += 1

    def assign(self) -> None:
        for layer, (total, squares, count, dof), with_data in zip(
            self.layers, self.sums, self.batches_with_data, strict=True
        ):
            seen = count > 0
            old_mean = _numpy(layer.moving_mean)
            old_variance = _numpy(layer.moving_variance)
            mean = np.where(seen, total / np.maximum(count, 1.0), old_mean)
            # Only batches of one value per channel: the unbiased variance is undefined and the
            # biased one is 0 (as the layer's own m / (m - 1) factor treats m = 1).
            variance = np.where(dof > 0, squares / np.maximum(dof, 1.0), 0.0)
            variance = np.where(seen, variance, old_variance)
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
            if layer.renorm:
                # Renorm derives its moving variance from moving_stddev at each training step.
                stddev = np.sqrt(variance + layer.epsilon)
                stddev = np.where(seen, stddev, _numpy(layer.moving_stddev))
                layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))
            if isinstance(layer, BatchNormalization) and layer.momentum is None:
                counter = layer.num_batches_tracked
                batches = np.where(seen, with_data, _numpy(counter))
                counter.assign(batches.astype(counter.dtype))


def _numpy(variable) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(variable.value))


# ---------------------------------------------------------------------------------------------
# Data


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and len(value.shape) > 0


def _batches(data: Any, steps: int | None, batch_size: int | None) -> Iterator[Any]:
    """The `x` of each batch in `data`, at most `steps` of them."""
    if batch_size is not None:
        arrays = keras.utils.unpack_x_y_sample_weight(data)[0] if isinstance(data, tuple) else data
        if not all(_is_array(a) for a in keras.tree.flatten(arrays)):
            raise ValueError(
                f"batch_size={batch_size} splits arrays into batches, but data is "
                f"{type(data).__name__}: pass x (or (x, y)) as arrays with batch_size, or an "
                "iterable of batches without it."
            )
        batches = _split(arrays, batch_size)
    else:
        if _is_array(data):
            raise ValueError(
                f"data is one array of shape {tuple(data.shape)}; iterating it would give single "
                "examples. Pass batch_size=<the training batch size> to split it, or an "
                "iterable of batches (e.g. a batched tf.data.Dataset)."
            )
        _check_finite(data, steps)
        if not isinstance(data, Iterable):
            raise ValueError(
                f"data of type {type(data).__name__} is not iterable: pass a tf.data.Dataset, "
                "an iterable of batches, or arrays with batch_size."
            )
        if keras.backend.backend() != "tensorflow" and _is_tf_dataset(data):
            # As Keras' fit does on every backend: jax.jit and torch take NumPy arrays, not
            # TensorFlow tensors.
            data = data.as_numpy_iterator()
        batches = (keras.utils.unpack_x_y_sample_weight(batch)[0] for batch in data)
    for step, batch in enumerate(batches):
        if steps is not None and step >= steps:
            return
        yield batch


def _split(arrays: Any, batch_size: int) -> Iterator[Any]:
    size = int(keras.tree.flatten(arrays)[0].shape[0])
    for start in range(0, size, batch_size):
        yield keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], arrays)


def _is_tf_dataset(data: Any) -> bool:
    # Checked by module first: on JAX or PyTorch, TensorFlow is imported only if the data is
    # TensorFlow's.
    if not type(data).__module__.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)


def _check_finite(data: Any, steps: int | None) -> None:
    """An infinite tf.data.Dataset needs `steps`, or the pass would never end."""
    if steps is not None or not _is_tf_dataset(data):
        return
    import tensorflow as tf

    if data.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "data is an infinite tf.data.Dataset (repeat() without a count): pass steps=<number "
            "of batches> to recompute_population_statistics."
        )


# ---------------------------------------------------------------------------------------------
# The compiled passes, one per backend


# The compiled pass of each model, kept so that repeated calls (every epoch, every evaluation
# point of an experiment) trace once. Weak keys: the pass refers to its model only weakly, so a
# model that is no longer used is freed with its pass.
_PASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_pass(model, bn_layers: list, strategy) -> _CompiledPass:
    key = (
        tuple(id(layer) for layer in bn_layers),
        # The layers read `synchronized` while the pass is traced (set_batch_norm_synchronized).
        tuple(bool(layer.synchronized) for layer in bn_layers),
        tuple(id(variable) for variable in model.variables),
        id(strategy),
    )
    compiled = _PASSES.get(model)
    if compiled is None or compiled.key != key:
        compiled = _CompiledPass(model, bn_layers, strategy, key)
        _PASSES[model] = compiled
    return compiled


class _CompiledPass:
    """The compiled forward pass that returns each BN layer's sums for one batch.

    Backend-specific, one branch each: `tf.function` (with `strategy.run` under a multi-replica
    strategy), `jax.jit` with the variables as arguments (as Keras' own JAX trainer does, rather
    than baking them into the program as constants), eager elsewhere.
    """

    def __init__(self, model, bn_layers: list, strategy, key: tuple):
        self.key = key
        self.collector = _Collector(bn_layers)
        model_ref = weakref.ref(model)
        collector = self.collector
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            if strategy is None:
                self._forward = tf.function(
                    lambda x: collector.forward(model_ref(), x), reduce_retracing=True
                )
            else:

                def replica_forward(x):
                    return collector.forward(model_ref(), x)

                def distributed_forward(x):
                    per_replica = strategy.run(replica_forward, args=(x,))
                    return tf.nest.map_structure(
                        lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None),
                        per_replica,
                    )

                self._forward = tf.function(distributed_forward)
            self._strategy = strategy
        elif backend == "jax":
            import jax

            variables = list(model.variables)

            def stateless_forward(values, x):
                mapping = list(zip(variables, values, strict=True))
                return collector.forward(model_ref(), x, state_mapping=mapping)

            jitted = jax.jit(stateless_forward)
            self._forward = lambda x: jitted([v.value for v in variables], x)
        else:  # PyTorch, NumPy: eager
            self._forward = lambda x: collector.forward(model_ref(), x)

    def run(self, batches) -> Iterator[list]:
        """The sums of each batch (a tf.data.Dataset under a strategy, else an iterator)."""
        if getattr(self, "_strategy", None) is not None:
            batches = self._strategy.experimental_distribute_dataset(batches)
        for x in batches:
            yield self._forward(x)


def _multi_replica_strategy():
    """The active tf.distribute strategy when it has several replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync <= 1:
        return None
    if not tf.distribute.in_cross_replica_context():
        raise ValueError(
            "recompute_population_statistics was called inside a replica function "
            "(strategy.run); call it in the strategy's scope instead: it distributes the "
            "batches over the replicas itself."
        )
    return strategy


def _as_dataset(data: Any, steps: int | None, batch_size: int | None):
    """`data`'s batches (their `x`) as a tf.data.Dataset, for tf.distribute to split."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset) and batch_size is None:
        _check_finite(data, steps)
        dataset = data.map(lambda *batch: keras.utils.unpack_x_y_sample_weight(batch)[0])
    else:
        batches = _batches(data, None, batch_size)
        try:
            first = next(batches)
        except StopIteration:
            return tf.data.Dataset.from_tensors(0).take(0)

        def spec(array):
            array = np.asarray(array)
            return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))

        def generator():
            yield first
            yield from batches

        dataset = tf.data.Dataset.from_generator(
            generator, output_signature=tf.nest.map_structure(spec, first)
        )
    return dataset.take(steps) if steps is not None else dataset
