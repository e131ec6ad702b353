"""Batch Normalization (Ioffe & Szegedy, 2015) as a Keras 3 layer.

Reference: Sergey Ioffe and Christian Szegedy, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", ICML 2015, https://arxiv.org/abs/1502.03167.

`BatchNormalization` accepts every argument of `keras.layers.BatchNormalization` (Keras 3.15) with
the same name, default and meaning, creates the same weights in the same order, and adds what
tf-keras and PyTorch users miss: several normalization axes, ghost batches, the paper's unbiased
population variance, a cumulative average of the batch statistics, and TensorFlow's fused kernel.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers

from . import _fused, _statistics

_RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _clone_initializer(initializer: Any) -> Any:
    """A fresh copy of a seeded initializer, so two weights never share random values."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


# ---------------------------------------------------------------------------------------------
# Argument checks: each names the argument and the value it got, as Keras' own checks do, and
# says what is expected. Types are checked, not coerced: `bool("no")` is True and
# `float(True)` is 1.0, so coercion would turn a mistake into a silently different layer.


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name}={value!r} must be True or False.")


def _check_int(value: Any) -> int | None:
    """`value` as an int when it is a Python or NumPy integer (as Keras accepts), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_number(name: str, value: Any, expected: str) -> float:
    """A finite real number; `expected` completes "must be ..." in the message."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be {expected}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r} is not finite: it must be {expected}.")
    return number


def _check_axis(axis: Any) -> int | list[int]:
    if _check_int(axis) is not None:
        return _check_int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(_check_int(a) is not None for a in axis):
        return [_check_int(a) for a in axis]
    raise ValueError(
        f"axis={axis!r} must be an integer or a non-empty list of integers, e.g. -1 for "
        "channels-last inputs or 1 for channels-first."
    )


def _check_momentum(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    expected = "a float in [0, 1]" + (", or None for a cumulative average" if allow_none else "")
    number = _check_number(name, value, expected)
    if not 0.0 <= number <= 1.0:
        raise ValueError(
            f"{name}={value!r} is outside [0, 1]: it must be {expected} (Keras' default is 0.99)."
        )
    return number


def _check_epsilon(epsilon: Any) -> float:
    expected = "a finite float >= 0 (Keras' default is 1e-3)"
    number = _check_number("epsilon", epsilon, expected)
    if number < 0.0:
        raise ValueError(
            f"epsilon={epsilon!r} must be >= 0: it is added to the variance before the square "
            "root. Keras' default is 1e-3."
        )
    return number


def _check_virtual_batch_size(value: Any) -> int | None:
    if value is None:
        return None
    size = _check_int(value)
    if size is None or size <= 0:
        raise ValueError(
            f"virtual_batch_size={value!r} must be a positive integer that divides the batch "
            "size, or None to disable ghost batches."
        )
    return size


def _check_fused(fused: Any) -> bool | None:
    # Identity, not equality: 1 == True and 0.0 == False.
    if fused is None or fused is True or fused is False:
        return fused
    if isinstance(fused, np.bool_):
        return bool(fused)
    raise ValueError(f"fused={fused!r} must be None (auto), True or False.")


_KERAS_OBJECTS = {
    "initializer": (initializers, "'zeros', 'ones' or keras.initializers.Constant(0.5)"),
    "regularizer": (regularizers, "'l2' or keras.regularizers.L2(1e-4)"),
    "constraint": (constraints, "'non_neg' or keras.constraints.MaxNorm(3)"),
}


def _resolve(name: str, value: Any, kind: str) -> Any:
    """`keras.<kind>s.get(value)`, or a `ValueError` that names the argument: Keras' own
    message names only the value."""
    module, examples = _KERAS_OBJECTS[kind]
    if value is None and kind == "initializer":
        # Keras' add_weight would quietly fall back to glorot_uniform for a float weight.
        raise ValueError(f"{name}=None is not an initializer: pass one, e.g. {examples}.")
    try:
        return module.get(value)
    except (TypeError, ValueError):
        optional = "" if kind == "initializer" else ", or None"
        raise ValueError(
            f"{name}={value!r} is not a Keras {kind}: pass a name or an object, e.g. "
            f"{examples}{optional}."
        ) from None


def _check_renorm_clipping(renorm_clipping: Any) -> dict[str, float]:
    # The messages start with Keras' own wording, which Keras' tests (and users' code) match,
    # and then say what to do.
    if not isinstance(renorm_clipping, dict):
        raise ValueError(
            f"renorm_clipping={renorm_clipping!r} must be a dict with optional keys "
            f"{list(_RENORM_CLIPPING_KEYS)}, or None."
        )
    unknown = set(renorm_clipping) - set(_RENORM_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {sorted(map(str, unknown))} "
            f"in renorm_clipping={renorm_clipping!r}; the supported keys are "
            f"{list(_RENORM_CLIPPING_KEYS)}."
        )
    clipping = {}
    for key, bound in renorm_clipping.items():
        # inf is a meaningful bound (tf-keras' defaults for rmax and dmax); NaN never is.
        if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, numbers.Real):
            raise ValueError(f"renorm_clipping[{key!r}]={bound!r} must be a number.")
        if math.isnan(bound):
            raise ValueError(f"renorm_clipping[{key!r}]={bound!r} must be a number, not NaN.")
        clipping[key] = bound
    rmax = clipping.get("rmax")
    rmin = clipping.get("rmin")
    dmax = clipping.get("dmax")
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            f"rmax should be greater than or equal to rmin; renorm_clipping has "
            f"rmax={rmax} < rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"dmax should be non-negative; renorm_clipping has dmax={dmax}. It bounds |d|."
        )
    return clipping


@keras.saving.register_keras_serializable(package="bnzoo")
class BatchNormalization(keras.layers.Layer):
    """Batch Normalization: the paper's Algorithms 1 and 2, a drop-in for Keras' layer.

    In training (Algorithm 1) each channel is normalized with the mean and the *biased* variance
    of the mini-batch, computed over every axis except the channel axes:
    `y = gamma * (x - mean) / sqrt(variance + epsilon) + beta`. At every training step the moving
    statistics follow Keras' convention
    `moving = moving * momentum + batch_statistic * (1 - momentum)`. In inference the same
    transform uses the moving statistics instead, so the output of one example no longer
    depends on the rest of the batch; the moving averages stand in for the population
    statistics that the paper's Algorithm 2 uses there.

    The layer is a superset of `keras.layers.BatchNormalization` (Keras 3.15): same arguments,
    defaults and weights in the same order (gamma, beta, moving_mean, moving_variance, then the
    renorm weights), so `ours.set_weights(keras_bn.get_weights())` reproduces Keras' outputs,
    and Keras' own test file for its layer passes against this class (tests run it on
    TensorFlow, JAX and PyTorch). After training, `layers.recompute_population_statistics`
    replaces the moving statistics by the paper's population statistics (Algorithm 2).

    On the TensorFlow backend, training and inference run on TensorFlow's fused kernel
    (`FusedBatchNormV3`) whenever it computes exactly the same function: one channel axis that is
    first or last, float16/bfloat16/float32 inputs and no XLA; in training also no renorm, ghost
    batches, mask or cross-replica synchronization. Keras' own layer runs a dozen unfused ops
    there (Keras only gets fusion from XLA, which it turns off on CPU-only machines and under
    `tf.distribute`), so this one trains faster on CPU (docs/measurements.md, per CPU). The
    fused kernel reports a Bessel-corrected batch variance; it is converted back, so every path
    updates the moving statistics identically. Under XLA (`jit_compile=True`) the `keras.ops`
    path runs instead: XLA would replace the kernel by its own batch norm, whose
    E[x^2] - E[x]^2 variance turns into NaN for inputs with a large offset, and it fuses the
    `keras.ops` path as well as Keras' layer.

    Args:
        axis: Integer or list of integers: the channel axes, which keep their own statistics
            (`-1` for channels-last images, `1` for channels-first). Statistics are reduced over
            every other axis. A list normalizes per position-and-channel, e.g. `axis=[1, 2]` on
            `(batch, time, features)` gives each time step its own statistics, as tf-keras allowed.
        momentum: Momentum of the moving averages, in `[0, 1]`. `None` replaces the exponential
            average by a cumulative average of every batch statistic seen (PyTorch's
            `momentum=None`): after n training steps the moving statistics are the mean of the n
            batch statistics, the first replacing the initial values. The step counter
            `num_batches_tracked` (an extra int32 weight with one count per channel, appended
            after Keras' weights) counts, per channel, the steps that had data for it; set it
            to zeros to restart the average. To re-estimate the statistics of a trained model
            over a dataset, whatever its momentum, use `layers.recompute_population_statistics`.
        epsilon: Small float added to the variance so that the division is defined for a
            constant channel.
        center: If `True`, add the learned offset `beta`.
        scale: If `True`, multiply by the learned scale `gamma`. Disable it when the next layer
            is linear (e.g. a convolution followed by ReLU and then a convolution), which can
            absorb the scale.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        renorm: Whether to use Batch Renormalization (Ioffe, 2017,
            https://arxiv.org/abs/1702.03275), exactly as Keras implements it: training
            normalizes with the batch statistics corrected by `r` and `d`, computed from
            moving statistics updated with `renorm_momentum`. Inference is unchanged.
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"` that clip the renorm
            corrections `r` to `[rmin, rmax]` and `d` to `[-dmax, dmax]`.
        renorm_momentum: Momentum of the moving statistics that renorm uses during training.
        synchronized: TensorFlow backend only. If `True`, under a `tf.distribute` strategy with
            several replicas the batch statistics are computed over the global batch (all
            replicas), so training matches one device running the whole batch. Without a
            multi-replica strategy it changes nothing. Also a settable property of a built
            layer (see `layers.set_batch_norm_synchronized` to switch a whole model).
        virtual_batch_size: Ghost Batch Normalization (Hoffer et al., 2017), as tf-keras had
            it: in training the batch is split into `batch_size / virtual_batch_size` ghost
            batches of `virtual_batch_size` examples, each normalized with its own statistics,
            which regularizes large-batch training. As in tf-keras the batch is reshaped to
            `(virtual_batch_size, batch_size / virtual_batch_size, ...)`, so ghost batch `j`
            holds examples `j, j + G, j + 2G, ...` with `G` the number of ghost batches, and the
            moving statistics are updated once per step with the average of the ghost batches'
            statistics, each weighted by its number of unmasked values (a plain average without
            a mask; an all-masked ghost batch counts for nothing). Must divide the batch size.
        unbiased_moving_variance: If `True`, the moving variance accumulates `m / (m - 1)` times
            each batch variance, `m` being the number of values per channel: the unbiased
            population variance of the paper's Algorithm 2 (step 10). Training outputs are
            unchanged (they always use the biased batch variance). The default `False` is
            Keras' biased estimate.
        fused: `None` (default) uses TensorFlow's fused kernel whenever it computes the same
            function and the input is not so small (under 100,000 values, when the size is
            known while tracing) that the kernel's fixed cost makes training slower; in
            inference 4-D and 5-D inputs take it at any size, so that Grappler folds it into
            the preceding convolution. `True` demands it (a `ValueError` names the reason when
            it cannot be used), `False` always runs the backend-agnostic `keras.ops`
            implementation. A layer saved with `fused=True` loads on another backend with
            `fused=None`: the choice of kernel is TensorFlow's.
        **kwargs: Base layer keyword arguments, e.g. `name` and `dtype`.

    Call arguments:
        inputs: Input tensor of any rank; the channel axes must have the sizes the layer was
            built with.
        training: Python boolean. `True` normalizes with the batch statistics and updates the
            moving statistics; `False` normalizes with the moving statistics. Left out, it
            follows the enclosing call (e.g. `model(x, training=True)`, `fit()`), and defaults
            to inference. A layer with `trainable=False` always runs in inference mode and never
            updates its statistics (Keras' fine-tuning rule).
        mask: Optional boolean tensor. Keras' convention, as its layer reads it: a mask of
            rank `ndim - 1` has the input's shape without its last axis, whatever `axis` is
            (what `keras.layers.Masking` or an Embedding's `mask_zero` propagate: `(batch,
            time)` for `(batch, time, features)`). A mask of rank `ndim` broadcasts to the
            input; with several channel axes, a mask of rank `ndim - len(axis)` has the input's
            shape without them. Masked values are left out of the batch statistics in training
            (even NaN or inf ones); every position is normalized.

    Example:

    ```python
    import keras
    from layers import BatchNormalization

    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, use_bias=False),  # beta replaces the bias
        BatchNormalization(),
        keras.layers.ReLU(),
    ])
    # Swap in weights from a Keras model: same weights, same order.
    bn = BatchNormalization()
    bn.build((None, 64))
    keras_bn = keras.layers.BatchNormalization()
    keras_bn.build((None, 64))
    bn.set_weights(keras_bn.get_weights())
    ```
    """

    def __init__(
        self,
        axis: int | list[int] | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        virtual_batch_size: int | None = None,
        unbiased_moving_variance: bool = False,
        fused: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.axis = _check_axis(axis)
        self.momentum = _check_momentum("momentum", momentum, allow_none=True)
        self.epsilon = _check_epsilon(epsilon)
        self.center = _check_bool("center", center)
        self.scale = _check_bool("scale", scale)
        self.beta_initializer = _resolve("beta_initializer", beta_initializer, "initializer")
        self.gamma_initializer = _resolve("gamma_initializer", gamma_initializer, "initializer")
        self.moving_mean_initializer = _resolve(
            "moving_mean_initializer", moving_mean_initializer, "initializer"
        )
        self.moving_variance_initializer = _resolve(
            "moving_variance_initializer", moving_variance_initializer, "initializer"
        )
        self.beta_regularizer = _resolve("beta_regularizer", beta_regularizer, "regularizer")
        self.gamma_regularizer = _resolve("gamma_regularizer", gamma_regularizer, "regularizer")
        self.beta_constraint = _resolve("beta_constraint", beta_constraint, "constraint")
        self.gamma_constraint = _resolve("gamma_constraint", gamma_constraint, "constraint")
        self.renorm = _check_bool("renorm", renorm)
        if self.renorm or renorm_clipping is not None:
            renorm_clipping = _check_renorm_clipping(
                {} if renorm_clipping is None else renorm_clipping
            )
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = _check_momentum("renorm_momentum", renorm_momentum)
        self.virtual_batch_size = _check_virtual_batch_size(virtual_batch_size)
        self.unbiased_moving_variance = _check_bool(
            "unbiased_moving_variance", unbiased_moving_variance
        )
        self.fused = _check_fused(fused)
        self._synchronized = self._check_synchronized(synchronized)
        if self.fused:
            self._raise_if_fused_impossible()

        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches_tracked = None
        self._axes: list[int] = []
        self._param_shape: tuple[int, ...] = ()
        self._fused_layout: tuple[str, str | None] | None = None

    # ----------------------------------------------------------------------------------------
    # Argument validation

    @property
    def synchronized(self) -> bool:
        """Whether training batches are normalized with the statistics of the global batch.

        Settable on a built layer (TensorFlow only for `True`), e.g. to switch a trained model's
        BN layers to synchronized BN for multi-replica training, or back before saving it for
        other backends (see `layers.set_batch_norm_synchronized`). The layer reads it when its
        call is traced: a function that already traced the layer (`fit`'s train function, your
        own `tf.function`) keeps what it traced until it is traced again, e.g. after
        `model.compile(...)`.
        """
        return self._synchronized

    @synchronized.setter
    def synchronized(self, value: bool) -> None:
        value = self._check_synchronized(value)
        if value and self.fused:
            raise ValueError(
                "synchronized=True cannot be set on a layer with fused=True: TensorFlow's fused "
                "kernel computes one replica's statistics. Build the layer with fused=None."
            )
        self._synchronized = value

    def _check_synchronized(self, value: Any) -> bool:
        value = _check_bool("synchronized", value)
        if value and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "synchronized=True is only supported with the TensorFlow backend (it uses "
                f"tf.distribute); the backend is {keras.backend.backend()!r}. Use "
                "synchronized=False or KERAS_BACKEND=tensorflow."
            )
        if value and self.virtual_batch_size is not None:
            raise ValueError(
                "virtual_batch_size and synchronized=True cannot be combined: ghost batches "
                "are slices of one replica's batch, so there is nothing to synchronize. "
                "Drop one of them."
            )
        return value

    def _raise_if_fused_impossible(self) -> None:
        """The constructor-time reasons why `fused=True` cannot be honored."""
        reasons = []
        if keras.backend.backend() != "tensorflow":
            reasons.append(f"the backend is {keras.backend.backend()!r}, not 'tensorflow'")
        if not isinstance(self.axis, int) and len(self.axis) > 1:
            reasons.append(f"axis={self.axis} has several axes (the kernel has one channel axis)")
        if self.renorm:
            reasons.append("renorm=True")
        if self.virtual_batch_size is not None:
            reasons.append(f"virtual_batch_size={self.virtual_batch_size}")
        if self.synchronized:
            reasons.append("synchronized=True")
        if reasons:
            raise ValueError(
                "fused=True cannot use TensorFlow's fused batch-norm kernel because "
                + "; ".join(reasons)
                + ". Pass fused=None to use it only where possible."
            )

    # ----------------------------------------------------------------------------------------
    # Weights

    def build(self, input_shape: tuple) -> None:
        input_shape = tuple(input_shape)
        ndim = len(input_shape)
        axes = _statistics.channel_axes(self.axis, input_shape)
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(
                f"axis={self.axis} includes the batch axis 0, which virtual_batch_size splits "
                "into ghost batches; normalize over other axes or drop virtual_batch_size."
            )
        for a in axes:
            if input_shape[a] is None:
                raise ValueError(
                    f"The channel axis {a} of the input shape {input_shape} is undefined; "
                    "BatchNormalization needs a known size there to create its weights."
                )
        self._axes = axes
        self._param_shape = tuple(int(input_shape[a]) for a in axes)
        shape = self._param_shape

        # Same weights, names and order as keras.layers.BatchNormalization, so that
        # `set_weights(keras_bn.get_weights())` and Keras checkpoints line up. Moving statistics
        # are averaged across replicas when assigned under tf.distribute (the all-reduce makes
        # unsynchronized replicas agree; synchronized ones already hold equal values).
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        if self.renorm:
            # As in Keras: renorm tracks moving standard deviations, initialized to the square
            # root of the variance initializer.
            def moving_stddev_initializer(shape, dtype=None):
                cloned = _clone_initializer(self.moving_variance_initializer)
                return ops.sqrt(cloned(shape, dtype=dtype))

            self.moving_stddev = self.add_weight(
                shape=shape,
                name="moving_stddev",
                initializer=moving_stddev_initializer,
                trainable=False,
                autocast=False,
                aggregation="mean",
            )
            self.renorm_mean = self.add_weight(
                shape=shape,
                name="renorm_mean",
                initializer=_clone_initializer(self.moving_mean_initializer),
                trainable=False,
                autocast=False,
                aggregation="mean",
            )
            self.renorm_stddev = self.add_weight(
                shape=shape,
                name="renorm_stddev",
                initializer=moving_stddev_initializer,
                trainable=False,
                autocast=False,
                aggregation="mean",
            )
        if self.momentum is None:
            # Appended after Keras' weights so Keras weight lists still load positionally (see
            # `set_weights`). One count per channel: a channel with no data in a step (all
            # masked) must not count that step.
            self.num_batches_tracked = self.add_weight(
                shape=shape,
                name="num_batches_tracked",
                initializer="zeros",
                dtype="int32",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )

        self.input_spec = keras.layers.InputSpec(
            ndim=ndim, axes={a: int(input_shape[a]) for a in axes}
        )
        self._fused_layout = None
        if self.fused is not False and keras.backend.backend() == "tensorflow" and len(axes) == 1:
            self._fused_layout = _fused.kernel_layout(ndim, axes[0])
        if self.fused and self._fused_layout is None:
            raise ValueError(
                f"fused=True cannot use TensorFlow's fused kernel for inputs of rank {ndim} "
                f"normalized over axis={self.axis}: it needs the channel axis first (axis=1) or "
                "last (axis=-1) of inputs of rank >= 2 (rank >= 3 for axis=1). "
                "Pass fused=None to fall back automatically."
            )

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        _statistics.channel_axes(self.axis, tuple(input_shape))
        return tuple(input_shape)

    # ----------------------------------------------------------------------------------------
    # Forward pass

    def call(self, inputs, training=None, mask=None):
        # Keras' rule: a frozen BN layer runs in inference mode, so fine-tuning keeps the
        # statistics it was trained with.
        training = bool(training) and self.trainable
        if self._use_fused(inputs, training, mask):
            return self._fused_call(inputs, training)
        return self._keras_ops_call(inputs, training, mask)

    def _use_fused(self, inputs, training: bool, mask) -> bool:
        if self._fused_layout is None:
            return False
        reasons = []
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype not in _fused.INPUT_DTYPES:
            reasons.append(f"the input dtype is {dtype}, not one of {_fused.INPUT_DTYPES}")
        if _fused.in_xla_context():
            # XLA replaces the kernel by its own batch norm, whose variance is E[x^2] - E[x]^2:
            # NaN for inputs with a large offset. XLA fuses the keras.ops path just as well.
            reasons.append("the layer is compiled with XLA (jit_compile=True)")
        if training:
            # The kernel computes plain statistics over the whole batch: nothing else in
            # training (at inference all of these reduce to the moving statistics).
            if self.renorm:
                reasons.append("renorm=True")
            if self.virtual_batch_size is not None:
                reasons.append(f"virtual_batch_size={self.virtual_batch_size}")
            if mask is not None:
                reasons.append("a mask was passed")
            if self.synchronized and _statistics.multi_replica_context() is not None:
                reasons.append("synchronized=True under a multi-replica strategy")
        if reasons and self.fused:
            raise ValueError(
                f"fused=True cannot use TensorFlow's fused kernel in layer {self.name!r} "
                "because " + "; ".join(reasons) + ". Pass fused=None to fall back automatically."
            )
        if reasons:
            return False
        if self.fused is not None or not _fused.is_small(inputs.shape):
            return True
        # The size threshold is training's trade-off: the kernel's fixed cost against the
        # passes it saves forward and backward. In inference a 4-D or 5-D input that reaches
        # the kernel as it is (a convolution's output) takes the kernel whatever its size:
        # Grappler folds it and the next ReLU into the convolution (`_FusedConv2D`), where the
        # keras.ops path leaves a multiply, an add and a ReLU over every value.
        return not training and self._fused_layout[1] is None

    def _broadcast_shape(self, ndim: int, axes: list[int]) -> list[int]:
        shape = [1] * ndim
        for a, size in zip(axes, self._param_shape, strict=True):
            shape[a] = size
        return shape

    def _keras_ops_call(self, inputs, training: bool, mask):
        """Algorithms 1 and 2 in `keras.ops`: the reference path, used on every backend."""
        # 16-bit floats overflow in sums of squares: statistics and normalization run in float32
        # (float64 stays float64), and only the output is cast back to the compute dtype.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        ndim = len(x.shape)

        if not training:
            shape = self._broadcast_shape(ndim, self._axes)
            mean = ops.reshape(ops.cast(self.moving_mean, dtype), shape)
            variance = ops.reshape(ops.cast(self.moving_variance, dtype), shape)
            gamma, beta = self._affine(dtype, shape)
            outputs = self._normalize(x, mean, variance, gamma, beta, centered=True)
            return ops.cast(outputs, self.compute_dtype)

        x, valid, axes, reduction_axes = _statistics.layout(
            x, mask, self._axes, self.virtual_batch_size
        )
        ghost = self.virtual_batch_size is not None
        shape = self._broadcast_shape(len(x.shape), axes)
        replica_context = _statistics.multi_replica_context() if self.synchronized else None
        mean, variance, count = _statistics.moments(x, reduction_axes, valid, replica_context)

        variance_for_moving = variance
        if self.unbiased_moving_variance:
            variance_for_moving = variance * _statistics.bessel_factor(count)
        batch_mean = self._to_param_shape(mean, count, ghost)
        batch_variance = self._to_param_shape(variance, count, ghost)
        batch_variance_for_moving = self._to_param_shape(variance_for_moving, count, ghost)
        has_data = self._has_data(count, ghost)

        gamma, beta = self._affine(dtype, shape)
        if self.renorm:
            r, d = self._renorm_corrections(batch_mean, batch_variance)
            gamma, beta = _compose_renorm(ops.reshape(r, shape), ops.reshape(d, shape), gamma, beta)
            self._update_renorm_statistics(
                batch_mean, batch_variance, batch_variance_for_moving, has_data
            )
        else:
            self._update_moving_statistics(batch_mean, batch_variance_for_moving, has_data)

        outputs = self._normalize(x, mean, variance, gamma, beta, centered=False)
        if ghost:
            outputs = ops.reshape(outputs, ops.shape(inputs))
        return ops.cast(outputs, self.compute_dtype)

    def _affine(self, dtype, shape):
        gamma = ops.reshape(ops.cast(self.gamma, dtype), shape) if self.scale else None
        beta = ops.reshape(ops.cast(self.beta, dtype), shape) if self.center else None
        return gamma, beta

    def _normalize(self, x, mean, variance, gamma, beta, centered: bool):
        """gamma * (x - mean) / sqrt(variance + epsilon) + beta, with per-channel factors.

        `centered=True` computes `(x - mean) * a + beta`: exact to float32 rounding whatever
        the offset, like the fused kernel. `centered=False` folds the mean into the shift,
        `x * a + (beta - mean * a)`, as Keras' layer does: one multiply-add per value, but `x * a`
        and `mean * a` round at the scale of the offset, an absolute error of about
        `|mean| / sqrt(variance) * 6e-8` (7e-3 for inputs at 1e4 +- 1). Inference uses the
        centered form: its outputs are what a model serves, and under XLA it costs nothing
        measurable (0.97-1.04x the folded form's time, bench shapes). Training keeps the folded
        form, which XLA compiles 1.1-1.3x faster forward and backward; there the error only
        perturbs gradients, and stays below 1e-6 for offsets under 10 standard deviations.
        """
        multiplier = ops.rsqrt(variance + self.epsilon)
        if gamma is not None:
            multiplier = multiplier * gamma
        if centered:
            outputs = (x - mean) * multiplier
            return outputs + beta if beta is not None else outputs
        shift = -mean * multiplier
        if beta is not None:
            shift = shift + beta
        return x * multiplier + shift

    def _to_param_shape(self, statistic, count, ghost: bool):
        """A (ghost) batch statistic in the moving statistics' shape.

        Ghost batches average into one update per step, each weighted by its number of values:
        all equal without a mask (tf-keras' plain average), and a ghost batch whose values are
        all masked counts for nothing instead of pulling the statistics towards 0.
        """
        if ghost:
            if _statistics.is_tensor(count) and len(count.shape) > 0:
                weighted = ops.sum(statistic * count, axis=1, keepdims=True)
                total = ops.sum(count, axis=1, keepdims=True)
                statistic = weighted / ops.maximum(total, 1.0)
            else:
                statistic = ops.mean(statistic, axis=1, keepdims=True)
        return ops.reshape(statistic, self._param_shape)

    def _has_data(self, count, ghost: bool):
        """Whether the batch had values for each channel: `True`, `False` or a bool tensor.

        An empty batch (a replica left without examples) or an all-masked channel must not drag
        the moving statistics towards 0 or NaN.
        """
        if not _statistics.is_tensor(count):
            return count > 0
        if len(count.shape) == 0:
            return ops.greater(count, 0)
        if ghost:
            count = ops.sum(count, axis=1, keepdims=True)
        return ops.reshape(ops.greater(count, 0), self._param_shape)

    # ----------------------------------------------------------------------------------------
    # Moving statistics

    def _current_momentum(self):
        if self.momentum is not None:
            return self.momentum
        # Cumulative average: after n batches the (n+1)-th gets weight 1 / (n + 1), so the first
        # one replaces the initial value and the result is the plain mean of all batches. Each
        # channel counts its own batches, so a channel that had no data in some step (all
        # masked) still starts from its first real statistic.
        seen = ops.cast(self.num_batches_tracked, "float32")
        return seen / (seen + 1.0)

    def _assign_moving_average(self, variable, value, momentum, has_data):
        old = ops.cast(variable, value.dtype)
        momentum = ops.cast(momentum, value.dtype) if _statistics.is_tensor(momentum) else momentum
        new = old * momentum + value * (1.0 - momentum)
        if _statistics.is_tensor(has_data):
            new = ops.where(has_data, new, old)
        variable.assign(ops.cast(new, variable.dtype))
        return new

    def _count_batch(self, has_data) -> None:
        if self.momentum is None:
            increment = (
                ops.cast(has_data, "int32") if _statistics.is_tensor(has_data) else int(has_data)
            )
            self.num_batches_tracked.assign(self.num_batches_tracked + increment)

    def _update_moving_statistics(self, mean, variance, has_data) -> None:
        """Keras' exponential moving averages of the batch statistics, which stand in for
        Algorithm 2's population statistics until those are recomputed."""
        if has_data is False:
            return
        momentum = self._current_momentum()
        self._assign_moving_average(self.moving_mean, mean, momentum, has_data)
        self._assign_moving_average(self.moving_variance, variance, momentum, has_data)
        self._count_batch(has_data)

    def _renorm_corrections(self, mean, variance):
        """Batch Renormalization's r and d, computed exactly as keras.layers.BatchNormalization."""
        stddev = ops.sqrt(variance + self.epsilon)
        renorm_mean = ops.cast(self.renorm_mean, mean.dtype)
        # Keras keeps r and d finite early in training, while renorm_stddev is still tiny.
        renorm_stddev = ops.maximum(
            ops.cast(self.renorm_stddev, mean.dtype), ops.sqrt(ops.cast(self.epsilon, mean.dtype))
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        rmin = self.renorm_clipping.get("rmin")
        rmax = self.renorm_clipping.get("rmax")
        dmax = self.renorm_clipping.get("dmax")
        if rmin is not None:
            r = ops.maximum(r, rmin)
        if rmax is not None:
            r = ops.minimum(r, rmax)
        if dmax is not None:
            d = ops.clip(d, -dmax, dmax)
        # The paper treats r and d as constants in the backward pass.
        return ops.stop_gradient(r), ops.stop_gradient(d)

    def _update_renorm_statistics(self, mean, variance, variance_for_moving, has_data) -> None:
        if has_data is False:
            return
        stddev = ops.sqrt(variance + self.epsilon)
        self._assign_moving_average(self.renorm_mean, mean, self.renorm_momentum, has_data)
        self._assign_moving_average(self.renorm_stddev, stddev, self.renorm_momentum, has_data)
        momentum = self._current_momentum()
        self._assign_moving_average(self.moving_mean, mean, momentum, has_data)
        moving_stddev = self._assign_moving_average(
            self.moving_stddev, ops.sqrt(variance_for_moving + self.epsilon), momentum, has_data
        )
        # As Keras: the inference variance derives from the moving stddev; relu guards against
        # rounding below zero.
        moving_variance = ops.relu(moving_stddev * moving_stddev - self.epsilon)
        self.moving_variance.assign(ops.cast(moving_variance, self.moving_variance.dtype))
        self._count_batch(has_data)

    # ----------------------------------------------------------------------------------------
    # TensorFlow's fused kernel

    def _fused_call(self, inputs, training: bool):
        """FusedBatchNormV3: one kernel for the forward pass and one for the backward pass.

        Keras' layer runs about a dozen separate ops per direction on the TensorFlow backend; on
        CPU the fused kernel (oneDNN) makes training 2-4x faster. Same function, same statistics.
        """
        gamma = self.gamma if self.scale else None
        beta = self.beta if self.center else None
        if not training:
            outputs = _fused.inference(
                inputs,
                self._fused_layout,
                gamma,
                beta,
                self.moving_mean,
                self.moving_variance,
                self.epsilon,
            )
            return ops.cast(outputs, self.compute_dtype)
        outputs, mean, variance, count = _fused.training(
            inputs, self._fused_layout, gamma, beta, self.epsilon
        )
        if self.unbiased_moving_variance:
            variance = variance * _statistics.bessel_factor(count)
        self._update_moving_statistics(mean, variance, count > 0)
        return ops.cast(outputs, self.compute_dtype)

    # ----------------------------------------------------------------------------------------
    # Weights and serialization

    def set_weights(self, weights: list) -> None:
        """Sets the weights from NumPy arrays, in the order of `layer.weights`.

        With `momentum=None` the layer has one more weight than Keras' layer, the step counter
        `num_batches_tracked`, last; a Keras weight list (without it) is accepted too and leaves
        the counter as it is: at 0, the next training step replaces the loaded statistics, as
        the cumulative average of the batches seen since the counter was reset.
        """
        weights = list(weights)
        if self.momentum is None and self.built and len(weights) == len(self.weights) - 1:
            keras_weights = self.weights[:-1]
            for variable, array in zip(keras_weights, weights, strict=True):
                if tuple(variable.shape) != tuple(ops.shape(array)):
                    raise ValueError(
                        f"Layer {self.name!r}: weight {variable.name!r} has shape "
                        f"{tuple(variable.shape)}, the given array {tuple(ops.shape(array))}."
                    )
            for variable, array in zip(keras_weights, weights, strict=True):
                variable.assign(array)
            return
        super().set_weights(weights)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNormalization:
        # `fused` chooses a TensorFlow kernel, not the function computed: a layer saved with
        # fused=True on TensorFlow loads on another backend (JAX) with the automatic choice.
        if config.get("fused") and keras.backend.backend() != "tensorflow":
            config = {**config, "fused": None}
        return super().from_config(config)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping,
                "renorm_momentum": self.renorm_momentum,
                "synchronized": self.synchronized,
                "virtual_batch_size": self.virtual_batch_size,
                "unbiased_moving_variance": self.unbiased_moving_variance,
                "fused": self.fused,
            }
        )
        return config


# --------------------------------------------------------------------------------------------


def _compose_renorm(r, d, gamma, beta):
    """(x_hat * r + d) * gamma + beta == x_hat * (r * gamma) + (d * gamma + beta)."""
    shift = d if gamma is None else d * gamma
    return (r if gamma is None else r * gamma), (shift if beta is None else shift + beta)
