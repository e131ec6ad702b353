"""A compact CNN for 28×28 images: narrow at full resolution, its depth chosen per stage.

A 3×3 convolution's multiply-adds are `H·W·9·C_in·C_out`, so a channel costs 4× more at 28×28
than at 14×14 and 16× more than at 7×7. `plain_cnn` (widths 32-64-128) spends 7.4 M of its
29.1 M multiply-adds at full resolution. This family keeps the full-resolution stage narrow and
gives every stage its own width and depth, so that a compute budget can be spent where it buys
the most accuracy. The default (16-32-64, two blocks per stage: 7.3 M multiply-adds) is what
`train.py`'s default run trains: 13 epochs of it cost 15.4 T training multiply-adds, a third of
the earlier default's 47 T, for the same test accuracy (docs/training.md#the-default-recipe,
which also lists the other widths and depths tried).

Every convolution is conv-BN-ReLU with BN between the linear op and the nonlinearity and no
conv bias (Ioffe & Szegedy, 2015, §3.2); there are no skip connections or separable
convolutions, so the model exports to a SavedModel (conv-BN-ReLU fused, see
docs/performance.md) and TFLite like `plain_cnn`.

References: S. Ioffe and C. Szegedy, "Batch Normalization", ICML 2015; K. Simonyan and
A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
(stacked 3×3 convolutions, width doubled when the resolution halves).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from models.building_blocks import (
    classification_head,
    conv_norm_act,
    load_weights,
    model_input,
    resolve_input_shape,
    resolve_normalization,
    validate_activation,
    validate_head_arguments,
    validate_input_shape,
    validate_weights,
)
from models.registry import register_model

DEFAULT_INPUT_SHAPE = (28, 28, 1)
DEFAULT_WIDTHS = (16, 32, 64)


def compact_cnn(
    include_top: bool = True,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    pooling: str | None = None,
    classes: int = 10,
    classifier_activation: Any = "softmax",
    name: str = "compact_cnn",
    normalization: str | None = "batch_norm",
    bn_momentum: float = 0.99,
    bn_epsilon: float = 1e-3,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    depths: int | Sequence[int] = 2,
    activation: Any = "relu",
    dropout_rate: float = 0.1,
    kernel_initializer: Any = "he_normal",
) -> keras.Model:
    """A conv-BN-ReLU CNN whose stages each have their own width and depth.

    Stage 1 runs at the input's resolution; every later stage starts with a 2×2 max pooling
    and dropout. Each stage is `depths[i]` 3×3 conv-BN-ReLU blocks of `widths[i]` filters.
    Global average pooling, dropout and the classifier end it. The defaults (16-32-64, two
    blocks each) have 72,666 trainable parameters and 7.34 M multiply-adds on 28×28×1, a
    quarter of `plain_cnn`'s 29.1 M.

    Layers are named `stage{s}_conv{c}` (+ `_bn`, `_relu`), `stage{s}_pool` and
    `stage{s}_dropout`, with `s` and `c` counted from 1, as in `plain_cnn`.

    Args:
        include_top: end with global average pooling and the `classes`-way classifier.
        weights: None, or the path of a `.weights.h5` file saved from the same architecture.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: `(height, width, channels)`; default `(28, 28, 1)`. Height and width may
            be None (fully convolutional) and must be at least `2 ** (len(widths) - 1)`.
        pooling: with `include_top=False`, `None` (the last feature map), `"avg"` or `"max"`.
        classes: number of classes of the classifier.
        classifier_activation: activation of the classifier; `None` returns logits.
        name: the model's name.
        normalization: `"batch_norm"` (bnzoo's layer), `"keras"` (Keras' layer) or `None`
            (no BN; convolutions regain their bias).
        bn_momentum: momentum of BN's moving statistics.
        bn_epsilon: BN's epsilon.
        widths: filters of each stage; one stage per entry, the first at full resolution.
        depths: conv-BN-activation blocks per stage: one entry per stage, or one number for all.
        activation: the nonlinearity, any Keras activation name.
        dropout_rate: dropout after each stage's pooling and before the classifier; BN's
            regularizing effect lets it stay light (paper §3.4).
        kernel_initializer: the convolutions' initializer (He et al. 2015 for ReLU).

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    model = models.compact_cnn(input_shape=(28, 28, 1), classes=10)
    models.profile_model(model).multiply_adds  # 7,338,880
    deeper_at_7x7 = models.compact_cnn(depths=(1, 2, 3))
    ```
    """
    normalization = resolve_normalization(normalization)
    weights = validate_weights(weights)
    validate_head_arguments(
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        model_name=name,
    )
    widths = tuple(widths)
    if not widths or not all(_positive_int(width) for width in widths):
        raise ValueError(
            f"widths must be a non-empty sequence of positive integers, one per stage; "
            f"received widths={widths!r}."
        )
    depths = (depths,) * len(widths) if isinstance(depths, int) else tuple(depths)
    if len(depths) != len(widths) or not all(_positive_int(depth) for depth in depths):
        raise ValueError(
            f"depths must be a positive integer, or one per stage of widths={widths!r}; "
            f"received depths={depths!r}."
        )
    if activation is None:
        raise ValueError("compact_cnn needs an activation, e.g. activation='relu'.")
    validate_activation(activation, "activation")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); received dropout_rate={dropout_rate}.")

    input_shape = validate_input_shape(
        resolve_input_shape(input_tensor, input_shape),
        default_shape=DEFAULT_INPUT_SHAPE,
        min_size=min_input_size(widths),
        model_name=name,
    )
    image, inputs = model_input(input_tensor, input_shape)
    block = {
        "normalization": normalization,
        "bn_momentum": bn_momentum,
        "bn_epsilon": bn_epsilon,
        "activation": activation,
        "kernel_initializer": kernel_initializer,
    }
    x = image
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        if stage > 1:
            # "same" so that odd sizes (7×7 -> 4×4) keep their border row.
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"stage{stage - 1}_pool")(x)
            if dropout_rate:
                x = keras.layers.Dropout(dropout_rate, name=f"stage{stage - 1}_dropout")(x)
        for index in range(1, depth + 1):
            x = conv_norm_act(x, width, 3, name=f"stage{stage}_conv{index}", **block)

    x = classification_head(
        x,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        dropout_rate=dropout_rate,
    )
    model = keras.Model(inputs, x, name=name)
    load_weights(model, weights)
    return model


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def min_input_size(widths: Sequence[int]) -> int:
    """The smallest height/width for which every stage still sees at least one real pixel."""
    return 2 ** (len(widths) - 1)


register_model(
    "compact_cnn",
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=min_input_size(DEFAULT_WIDTHS),
    description="conv-BN-ReLU CNN for 28x28, 16-32-64 wide, depth per stage: 7.3 M multiply-adds",
)(compact_cnn)
