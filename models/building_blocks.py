"""The blocks bnzoo's networks are made of, with Batch Normalization where the paper puts it.

- the normalization switch (`"batch_norm"`, `"keras"` or `None`);
- the conv-BN-activation block, which places BN between the linear op and the nonlinearity and
  drops the linear op's bias, since BN's β takes its role (Ioffe & Szegedy, 2015, §3.2);
- TF-slim's channel thinning (`width_multiplier`), and the activation check.

What surrounds a network (input, preprocessing, head, weights, registration) is
`models.scaffold`'s.
"""

from __future__ import annotations

from typing import Any

import keras

from ._layers import layers

NORMALIZATIONS = ("batch_norm", "keras", None)


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
    return layers.BatchNormalization(momentum=momentum, epsilon=epsilon, scale=scale, name=name)


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
    conv_bias: bool = False,
    conv_name: str | None = None,
) -> Any:
    """Convolution, then Batch Normalization, then the nonlinearity (paper §3.2).

    BN normalizes `Wu`, the convolution's output, rather than its input `u`: that output is the
    more Gaussian-like, and normalizing it is what keeps the nonlinearity's input stable. The
    convolution has no bias when BN follows, because BN subtracts the mean and its learned `β`
    plays the bias' part. Without normalization the bias comes back.

    Layers are named `name` (the convolution, unless `conv_name`), `name + "_bn"` and
    `name + "_" + activation`.

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
        conv_bias: keep the convolution's bias although BN follows. It computes nothing BN
            does not undo (BN subtracts the mean right after), but networks trained with it
            (keras.applications' ResNet v1, Caffe models) have it in their weights files.
        conv_name: the convolution's name when it is not `name`, e.g. keras.applications'
            `conv1_conv` beside `conv1_bn` and `conv1_relu`.
    """
    normalization = resolve_normalization(normalization)
    use_bias = conv_bias or normalization is None
    conv_name = conv_name or name
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
            name=conv_name,
        )(x)
    else:
        x = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            name=conv_name,
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
