"""A compact CNN for 28×28 images: narrow at full resolution, wide where positions are few.

A convolution's multiply-adds are `H·W·9·C_in·C_out`, so the same layer costs 4× more at 28×28
than at 14×14 and 16× more than at 7×7. `plain_cnn` spends a quarter of its 29.1 M multiply-adds
on one 32→32 convolution at full resolution. This network keeps a single narrow convolution
there (one input channel makes it nearly free), pools, and puts its width in the 14×14 and 7×7
stages, where a channel costs a quarter and a sixteenth as much: the default reaches
`plain_cnn`'s accuracy with about a fifth of its multiply-adds, which is what `train.py`'s
default run trains (docs/training.md#the-default-recipe).

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
    stem_width: int = 24,
    widths: Sequence[int] = (48, 96),
    depths: Sequence[int] = (2, 2),
    activation: Any = "relu",
    dropout_rate: float = 0.0,
    kernel_initializer: Any = "he_normal",
) -> keras.Model:
    """A conv-BN-ReLU CNN that spends its multiply-adds at low resolution.

    A 3×3 stem convolution at the input's resolution, then one stage per entry of `widths`:
    2×2 max pooling, then `depths[i]` 3×3 conv-BN-ReLU blocks of `widths[i]` filters. Global
    average pooling and the classifier end it. The defaults (stem 24, stages 48×2 at 14×14 and
    96×2 at 7×7) have 12.4 M multiply-adds on 28×28×1, against `plain_cnn`'s 29.1 M.

    Layers are named `stem_conv` (+ `_bn`, `_relu`), `stage{s}_pool` and `stage{s}_conv{c}`
    (+ `_bn`, `_relu`), with `s` and `c` counted from 1.

    Args:
        include_top: end with global average pooling and the `classes`-way classifier.
        weights: None, or the path of a `.weights.h5` file saved from the same architecture.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: `(height, width, channels)`; default `(28, 28, 1)`. Height and width may
            be None (fully convolutional) and must be at least `2 ** len(widths)`.
        pooling: with `include_top=False`, `None` (the last feature map), `"avg"` or `"max"`.
        classes: number of classes of the classifier.
        classifier_activation: activation of the classifier; `None` returns logits.
        name: the model's name.
        normalization: `"batch_norm"` (bnzoo's layer), `"keras"` (Keras' layer) or `None`
            (no BN; convolutions regain their bias).
        bn_momentum: momentum of BN's moving statistics.
        bn_epsilon: BN's epsilon.
        stem_width: filters of the full-resolution stem convolution.
        widths: filters of each stage; each stage first halves the resolution.
        depths: conv-BN-activation blocks per stage, one entry per stage.
        activation: the nonlinearity, any Keras activation name.
        dropout_rate: dropout before the classifier. BN regularizes (paper §3.4), and runs of a
            few epochs underfit rather than overfit, so the default is none.
        kernel_initializer: the convolutions' initializer (He et al. 2015 for ReLU).

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    model = models.compact_cnn(input_shape=(28, 28, 1), classes=10)
    models.profile_model(model).multiply_adds  # 12.4 M
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
    widths, depths = tuple(widths), tuple(depths)
    for argument, values in (("widths", widths), ("depths", depths)):
        if not values or not all(isinstance(v, int) and v >= 1 for v in values):
            raise ValueError(
                f"{argument} must be a non-empty sequence of positive integers, one per stage; "
                f"received {argument}={values!r}."
            )
    if len(depths) != len(widths):
        raise ValueError(
            f"depths needs one entry per stage of widths={widths!r}; received depths={depths!r}."
        )
    if not (isinstance(stem_width, int) and stem_width >= 1):
        raise ValueError(f"stem_width must be a positive integer; received {stem_width!r}.")
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
    x = conv_norm_act(image, stem_width, 3, name="stem_conv", **block)
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        # "same" so that odd sizes (7×7 -> 4×4) keep their border row.
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"stage{stage}_pool")(x)
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


def min_input_size(widths: Sequence[int]) -> int:
    """The smallest height/width for which every stage still sees at least one real pixel."""
    return 2 ** len(widths)


register_model(
    "compact_cnn",
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=min_input_size((48, 96)),
    description="conv-BN-ReLU CNN for 28x28: one 24-wide conv at full size, 48x2 at 14, 96x2 at 7",
)(compact_cnn)
