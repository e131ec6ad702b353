"""Pieces every bnzoo builder shares.

- the normalization switch (`"batch_norm"`, `"keras"` or `None`) and the conv-BN-activation block
  that places Batch Normalization between the linear op and the nonlinearity, dropping the linear
  op's bias when BN follows (Ioffe & Szegedy, 2015, §3.2: BN's β takes the bias' role);
- keras.applications-style argument checks (`input_shape`, `input_tensor`, `weights`, `pooling`,
  `classifier_activation`) with errors that name the bad value and the fix;
- the `include_top` / `pooling` / classifier head;
- model profiling: parameters and multiply-adds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import keras

from layers import BatchNormalization

NORMALIZATIONS = ("batch_norm", "keras", None)
POOLINGS = (None, "avg", "max")


# --------------------------------------------------------------------------------------------
# The normalization switch.
# --------------------------------------------------------------------------------------------


def resolve_normalization(normalization: str | None) -> str | None:
    """Canonical form of a `normalization` argument: `"batch_norm"`, `"keras"` or `None`.

    The string `"none"` (any case) means `None`, so the choice can come straight from a command
    line or a YAML config.
    """
    if normalization is None:
        return None
    if isinstance(normalization, str):
        lowered = normalization.strip().lower()
        if lowered == "none":
            return None
        if lowered in ("batch_norm", "keras"):
            return lowered
    raise ValueError(
        f"Unknown normalization={normalization!r}. Use 'batch_norm' (bnzoo's "
        "layers.BatchNormalization), 'keras' (keras.layers.BatchNormalization) or None / 'none' "
        "(no normalization, the paper's baseline)."
    )


def normalization_layer(
    normalization: str | None,
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    scale: bool = True,
    name: str | None = None,
) -> keras.layers.Layer | None:
    """A Batch Normalization layer over the last axis, or `None` when normalization is off.

    Args:
        normalization: `"batch_norm"`, `"keras"`, `None` or `"none"`; see `resolve_normalization`.
        momentum: moving-average momentum of the inference statistics.
        epsilon: added to the mini-batch variance before the square root (paper, Algorithm 1).
        scale: learn the scale `gamma`. Inception-v3 (Keras, TF-slim) and TF-slim's
            inception_v2 train without it: the ReLU that follows is scale-invariant up to the
            next convolution, which can absorb it.
        name: layer name.
    """
    normalization = resolve_normalization(normalization)
    if normalization is None:
        return None
    if normalization == "keras":
        return keras.layers.BatchNormalization(
            momentum=momentum, epsilon=epsilon, scale=scale, name=name
        )
    return BatchNormalization(momentum=momentum, epsilon=epsilon, scale=scale, name=name)


def conv_norm_act(
    x: Any,
    filters: int,
    kernel_size: int | tuple[int, int],
    *,
    name: str,
    strides: int | tuple[int, int] = 1,
    padding: str | int = "same",
    normalization: str | None = "batch_norm",
    bn_momentum: float = 0.99,
    bn_epsilon: float = 1e-3,
    bn_scale: bool = True,
    activation: str | None = "relu",
    kernel_initializer: Any = "he_normal",
    separable_depth_multiplier: int | None = None,
) -> Any:
    """Convolution, then Batch Normalization, then the nonlinearity (paper §3.2).

    BN normalizes `Wu`, the convolution's output, rather than its input `u`: that output is the
    more Gaussian-like, and normalizing it is what keeps the nonlinearity's input stable. The
    convolution has no bias when BN follows, because BN subtracts the mean and its learned `β`
    plays the bias' part. Without normalization the bias comes back.

    Layers are named `name` (the convolution), `name + "_bn"` and `name + "_" + activation`.

    Args:
        x: input tensor, channels last.
        filters: output channels.
        kernel_size: convolution window.
        name: name of the convolution and prefix of the BN and activation layers.
        strides: convolution stride.
        padding: `"same"` (TensorFlow's: an `s`-strided block maps `H` to `ceil(H / s)`, and
            when the padding is odd the extra row goes at the bottom), `"valid"`, or an integer
            `p`: `p` zero rows and columns on every side (a `ZeroPadding2D` layer named
            `name + "_pad"`), then a valid convolution. The integer form is Caffe's and
            PyTorch's padding, which differs from `"same"` for strided convolutions: a 3x3/2
            convolution with padding 1 starts its windows one pixel earlier.
        normalization: `"batch_norm"`, `"keras"` or `None`.
        bn_momentum: BN moving-average momentum.
        bn_epsilon: BN epsilon.
        bn_scale: whether BN learns the scale `gamma`.
        activation: any Keras activation identifier, or `None` for a linear block.
        kernel_initializer: initializer of the convolution kernel(s).
        separable_depth_multiplier: when set, a depthwise-separable convolution with this many
            depthwise filters per input channel (the BN paper's stem, Appendix).
    """
    normalization = resolve_normalization(normalization)
    use_bias = normalization is None
    if isinstance(padding, int) and not isinstance(padding, bool):
        if padding:
            x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
        padding = "valid"
    if separable_depth_multiplier:
        x = keras.layers.SeparableConv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            depth_multiplier=separable_depth_multiplier,
            use_bias=use_bias,
            depthwise_initializer=kernel_initializer,
            pointwise_initializer=kernel_initializer,
            name=name,
        )(x)
    else:
        x = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            name=name,
        )(x)
    bn = normalization_layer(
        normalization, momentum=bn_momentum, epsilon=bn_epsilon, scale=bn_scale, name=f"{name}_bn"
    )
    if bn is not None:
        x = bn(x)
    if activation is not None:
        x = keras.layers.Activation(activation, name=f"{name}_{_activation_name(activation)}")(x)
    return x


def _activation_name(activation: Any) -> str:
    return activation if isinstance(activation, str) else getattr(activation, "__name__", "act")


def scaled_depth(depth: int, multiplier: float, min_depth: int) -> int:
    """TF-slim's channel thinning: `max(int(depth * multiplier), min_depth)`.

    Truncation (not rounding) and the floor at `min_depth` are slim's `depth_multiplier`
    semantics, so a bnzoo model with `width_multiplier=m` has the same widths as slim's
    `inception_v2(depth_multiplier=m)`.
    """
    return max(int(depth * multiplier), min_depth)


def validate_activation(activation: Any, argument: str) -> None:
    """Raise a ValueError naming `argument` if Keras does not know the activation."""
    if activation is None or callable(activation):
        return
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Unknown {argument}={activation!r}. Use a Keras activation name such as 'relu', "
            "'sigmoid', 'tanh', 'softmax', or None."
        ) from error


# --------------------------------------------------------------------------------------------
# keras.applications-style argument handling.
# --------------------------------------------------------------------------------------------


def validate_input_shape(
    input_shape: Sequence[int | None] | None,
    *,
    default_shape: tuple[int, int, int],
    min_size: int,
    model_name: str,
    require_static: bool = False,
) -> tuple[int | None, int | None, int]:
    """Check `input_shape` like keras.applications does and fill in the default.

    Args:
        input_shape: `(height, width, channels)`, or `None` for `default_shape`. Height and
            width may be `None` (any size) unless `require_static`.
        default_shape: the builder's default `(height, width, channels)`.
        min_size: the smallest height/width the architecture accepts.
        model_name: used in error messages.
        require_static: height and width must be known (a model that flattens its input).

    Returns:
        The validated shape as a tuple.
    """
    if keras.config.image_data_format() != "channels_last":
        raise ValueError(
            f"{model_name} is built channels-last, but keras.config.image_data_format() is "
            f"{keras.config.image_data_format()!r}. Call "
            "keras.config.set_image_data_format('channels_last') first."
        )
    if input_shape is None:
        return tuple(default_shape)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"{model_name} needs input_shape=(height, width, channels), three entries; "
            f"received input_shape={input_shape} with {len(input_shape)}. For a batch of "
            "grayscale images add the channel axis, e.g. (28, 28, 1)."
        )
    height, width, channels = input_shape
    if channels is None or not isinstance(channels, int) or channels < 1:
        raise ValueError(
            f"{model_name} needs a known, positive number of channels as the last entry of "
            f"input_shape; received input_shape={input_shape}."
        )
    for size in (height, width):
        if size is None:
            if require_static:
                raise ValueError(
                    f"{model_name} flattens its input, so height and width must be known; "
                    f"received input_shape={input_shape}. Pass e.g. {tuple(default_shape)}."
                )
            continue
        if not isinstance(size, int) or size < min_size:
            raise ValueError(
                f"{model_name} accepts inputs of at least {min_size}x{min_size}; received "
                f"input_shape={input_shape}. Resize or pad the images to {min_size} or more."
            )
    return input_shape


def model_input(
    input_tensor: Any, input_shape: tuple[int | None, ...], name: str = "input_layer"
) -> tuple[Any, Any]:
    """The tensor a builder starts from and the inputs its `keras.Model` is made of.

    As in keras.applications: with `input_tensor=None` a new `keras.Input`; with a Keras tensor,
    the model is built on top of it and its inputs are the tensor's source inputs, so the zoo
    model can be the tail of a larger graph.
    """
    if input_tensor is None:
        image = keras.Input(shape=input_shape, name=name)
        return image, image
    if not keras.backend.is_keras_tensor(input_tensor):
        # Keras 3 builds functional models on symbolic tensors only; a concrete array here is
        # almost always data passed where the model's input was meant.
        raise ValueError(
            f"input_tensor must be a Keras tensor (keras.Input(...) or a layer's output); "
            f"received a {type(input_tensor).__name__}. To run the model on data, build it "
            "first and call model(data) or model.predict(data)."
        )
    return input_tensor, keras.utils.get_source_inputs(input_tensor)


def resolve_input_shape(
    input_tensor: Any, input_shape: Sequence[int | None] | None
) -> Sequence[int | None] | None:
    """`input_shape`, or `input_tensor`'s shape without the batch axis when only it is given."""
    if input_shape is None and input_tensor is not None:
        shape = tuple(input_tensor.shape)
        return shape[1:]
    return input_shape


def validate_weights(weights: str | os.PathLike | None) -> str | None:
    """`weights` must be None or the path of an existing `.weights.h5` file.

    For builders without pretrained weights (`models.pretrained` handles those that have some).
    """
    if weights is None:
        return None
    path = os.fspath(weights)
    if path == "imagenet":
        raise ValueError(
            "weights='imagenet' is not available for this model: it has no pretrained weights "
            "(`python -m models` lists the models that do). Pass weights=None, or the path of a "
            "'.weights.h5' file saved with model.save_weights() from the same architecture."
        )
    if not path.endswith(".weights.h5"):
        raise ValueError(
            f"weights={path!r} is not a '.weights.h5' file. Pass the path of a file saved with "
            "model.save_weights('name.weights.h5') from the same architecture, or None."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist. Check the path, or pass weights=None for a "
            "randomly initialized model."
        )
    return path


def load_weights(model: keras.Model, weights: str | None) -> None:
    """Load a `.weights.h5` file into `model`, explaining an architecture mismatch."""
    if weights is None:
        return
    try:
        model.load_weights(weights)
    except ValueError as error:
        raise ValueError(
            f"weights file {weights!r} does not match the architecture of {model.name!r} "
            f"({error}). Build the model with the same arguments (classes, widths, "
            "normalization, ...) as the model that saved the file."
        ) from error


def preprocessing_layer(
    builder: Any, architecture: dict[str, Any], model_name: str
) -> keras.layers.Layer:
    """The `ImagePreprocessing` layer of the weights `architecture` builds.

    What `include_preprocessing=True` puts at the start of a model.

    Raises:
        NoInputConventionError (a ValueError): when no pretrained weights have this
            architecture, so no preprocessing convention applies.
    """
    from models import pretrained
    from models.preprocessing import ImagePreprocessing, NoInputConventionError

    # The input convention does not depend on the width: narrow copies of a pretrained
    # architecture (tests, distillation) take the same inputs.
    matches = pretrained.matching_weights(builder, architecture, ignore=("width_multiplier",))
    if not matches:
        raise NoInputConventionError(
            f"include_preprocessing=True: no pretrained weights of {model_name} were trained "
            "with these arguments, so there is no input convention to include. Build with a "
            "weight set's arguments (`python -m models` lists them), or preprocess the inputs "
            "yourself and pass include_preprocessing=False."
        )
    return ImagePreprocessing(matches[0].preprocessing, name="preprocessing")


def validate_head_arguments(
    *,
    include_top: bool,
    pooling: str | None,
    classes: int,
    classifier_activation: Any,
    model_name: str,
) -> None:
    """Check `pooling`, `classes` and `classifier_activation` before any layer is built."""
    if pooling not in POOLINGS:
        raise ValueError(
            f"Unknown pooling={pooling!r} for {model_name}. Use None (the 4D feature map), "
            "'avg' (global average pooling) or 'max' (global max pooling)."
        )
    if include_top and (not isinstance(classes, int) or classes < 1):
        raise ValueError(
            f"{model_name} with include_top=True needs classes to be a positive integer; "
            f"received classes={classes!r}."
        )
    validate_activation(classifier_activation, "classifier_activation")


def classification_head(
    x: Any,
    *,
    include_top: bool,
    pooling: str | None,
    classes: int,
    classifier_activation: Any = "softmax",
    dropout_rate: float = 0.0,
) -> Any:
    """keras.applications' top: the classifier, or the (optionally pooled) features.

    With `include_top=True`: global average pooling (`avg_pool`), dropout when
    `dropout_rate > 0`, and the `predictions` Dense layer. `classifier_activation=None` gives
    logits, which is what a loss with `from_logits=True` wants.

    With `include_top=False`: the feature map itself (`pooling=None`), or its global average
    (`"avg"`) or maximum (`"max"`), for feature extraction.
    """
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate:
            x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
        # float32 whatever the global policy: under mixed precision the softmax (or the
        # logits fed to a cross-entropy) is where float16's range and precision hurt most.
        return keras.layers.Dense(
            classes, activation=classifier_activation, dtype="float32", name="predictions"
        )(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


# --------------------------------------------------------------------------------------------
# Profiling: parameters and multiply-adds.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """What a model costs.

    Attributes:
        name: the model's name.
        parameters: every weight, trainable or not (BN's moving statistics included), as
            `model.count_params()` counts them.
        trainable_parameters: the weights the optimizer updates.
        multiply_adds: multiply-accumulate operations of one forward pass on one example, in
            convolutions and dense layers (normalization, pooling and activations are
            elementwise and left out, the usual convention of architecture papers).
        input_shape: the input shape the figures were measured at, without the batch axis.
    """

    name: str
    parameters: int
    trainable_parameters: int
    multiply_adds: int
    input_shape: tuple[int | None, ...]


def count_parameters(model: keras.Model, trainable_only: bool = False) -> int:
    """Number of scalar weights in `model` (only the trainable ones if `trainable_only`)."""
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(math.prod(weight.shape) for weight in weights))


def count_multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one forward pass on one example, from the layers' static shapes.

    Convolutions (plain, depthwise, separable, transposed) and dense layers are counted; nested
    models are walked. A convolution producing an `H×W×C_out` map with a `k×k` window over
    `C_in` channels costs `H·W·k·k·C_in·C_out` (divided by `groups`).

    Raises:
        ValueError: if a counted layer's spatial shape is unknown (a model built with
            `input_shape=(None, None, C)`); rebuild it with a static input shape.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_multiply_adds(layer)
        else:
            total += _layer_multiply_adds(layer)
    return total


def _static(shape: Sequence[int | None], layer: keras.layers.Layer) -> tuple[int, ...]:
    if any(size is None for size in shape):
        raise ValueError(
            f"Cannot count the multiply-adds of layer {layer.name!r}: its shape {tuple(shape)} is "
            "not fully known. Build the model with a static input_shape, e.g. (224, 224, 3)."
        )
    return tuple(int(size) for size in shape)


def _layer_multiply_adds(layer: keras.layers.Layer) -> int:
    conv_types = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    separable_types = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
    depthwise_types = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    transpose_types = (
        keras.layers.Conv1DTranspose,
        keras.layers.Conv2DTranspose,
        keras.layers.Conv3DTranspose,
    )
    if isinstance(layer, keras.layers.Dense):
        in_shape = _static(layer.input.shape[1:], layer)
        return math.prod(in_shape) * layer.units
    if not isinstance(layer, conv_types + separable_types + depthwise_types + transpose_types):
        return 0
    in_shape = _static(layer.input.shape[1:], layer)
    out_shape = _static(layer.output.shape[1:], layer)
    in_channels = in_shape[-1]
    window = math.prod(layer.kernel_size)
    if isinstance(layer, separable_types):
        positions = math.prod(out_shape[:-1])
        depthwise_channels = in_channels * layer.depth_multiplier
        return positions * (window * depthwise_channels + depthwise_channels * layer.filters)
    if isinstance(layer, depthwise_types):
        return math.prod(out_shape[:-1]) * window * in_channels * layer.depth_multiplier
    if isinstance(layer, transpose_types):
        # Every input position scatters a full window into the output.
        return math.prod(in_shape[:-1]) * window * in_channels * layer.filters
    groups = getattr(layer, "groups", 1)
    return math.prod(out_shape[:-1]) * window * (in_channels // groups) * layer.filters


def profile_model(model: keras.Model) -> ModelProfile:
    """Parameters and multiply-adds of `model` (see `ModelProfile`)."""
    input_shape = tuple(model.inputs[0].shape[1:]) if model.inputs else ()
    return ModelProfile(
        name=model.name,
        parameters=count_parameters(model),
        trainable_parameters=count_parameters(model, trainable_only=True),
        multiply_adds=count_multiply_adds(model),
        input_shape=input_shape,
    )
