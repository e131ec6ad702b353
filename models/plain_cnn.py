"""A plain, VGG-style CNN: the workhorse for small images and for BN on/off comparisons.

Stages of `depth[i]` conv-BN-activation blocks (3×3, "same" padding) with `widths[i]` filters,
a 2×2 pooling between stages, global average pooling and a softmax classifier. Everything the
BN paper varies is an argument: the normalization (on, Keras' layer, off), the nonlinearity
(ReLU, or the saturating sigmoid of §4.1), widths and depth.

Two variants. `plain_cnn` (widths 32-64-128) spends 7.4 M of its 29.1 M multiply-adds at full
resolution. `plain_cnn_small` (16-32-64) is `train.py`'s default: a 3×3 convolution costs
`H·W·9·C_in·C_out`, so halving every width quarters the compute (7.34 M multiply-adds), and 13
epochs of it reach the larger model's test accuracy on Fashion-MNIST with a third of its training
compute (docs/training.md#the-default-recipe lists the widths and depths tried).

References: K. Simonyan and A. Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015 (the stacked 3×3 convolutions); S. Ioffe and C. Szegedy, "Batch
Normalization", ICML 2015 (BN between the convolution and the nonlinearity, §3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from .building_blocks import validate_activation
from .scaffold import Build, builder, check_choice

DEFAULT_INPUT_SHAPE = (28, 28, 1)
STAGE_POOLINGS = {"max": "2x2 max pooling", "avg": "2x2 average pooling"}
# Initializers matched to the nonlinearity, so that `normalization=None` baselines start with
# well-scaled activations: He et al. (2015) for the ReLU family, Glorot & Bengio (2010) for
# symmetric saturating ones.
_RELU_LIKE = ("relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish", "mish")


def _default_initializer(activation: Any) -> str:
    return "he_normal" if activation in _RELU_LIKE else "glorot_uniform"


def min_input_size(widths: Sequence[int]) -> int:
    """The smallest height/width for which every stage still sees at least one real pixel."""
    return 2 ** (len(widths) - 1)


def _check(arguments: dict[str, Any]) -> None:
    widths = arguments["widths"] = tuple(arguments["widths"])
    if not widths or not all(isinstance(width, int) and width >= 1 for width in widths):
        raise ValueError(
            f"widths must be a non-empty sequence of positive integers, one per stage; "
            f"received widths={widths!r}."
        )
    depth = arguments["depth"]
    depths = (depth,) * len(widths) if isinstance(depth, int) else tuple(depth)
    if len(depths) != len(widths) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths
    ):
        raise ValueError(
            f"depth (blocks per stage) must be a positive integer, or one per stage of "
            f"widths={widths!r}; received depth={depth!r}."
        )
    arguments["depth"] = depth if isinstance(depth, int) else depths
    if arguments["activation"] is None:
        raise ValueError("plain_cnn needs an activation, e.g. activation='relu' or 'sigmoid'.")
    validate_activation(arguments["activation"], "activation")
    check_choice(arguments, "stage_pooling", STAGE_POOLINGS)


@builder(
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=lambda arguments: min_input_size(arguments["widths"]),
    variants={
        "plain_cnn": dict(
            description="VGG-style conv-BN-ReLU CNN, widths 32-64-128 x2, for 28x28/32x32 images"
        ),
        "plain_cnn_small": dict(
            widths=(16, 32, 64),
            description="plain_cnn at half the widths (16-32-64 x2): train.py's default",
        ),
    },
    check=_check,
    classes=10,
)
def plain_cnn(
    x: Any,
    build: Build,
    widths: Sequence[int] = (32, 64, 128),
    depth: int | Sequence[int] = 2,
    activation: Any = "relu",
    stage_pooling: str = "max",
    dropout_rate: float = 0.1,
    kernel_initializer: Any = None,
) -> Any:
    """A VGG-style CNN of conv-BN-activation blocks for small images (`plain_cnn_small`, its
    half-width variant, is `train.py`'s default).

    The defaults (widths 32-64-128, two 3×3 convolutions per stage, BN + ReLU, 2×2 max pooling,
    global average pooling, dropout 0.1) are sized for 28×28 and 32×32 images: 288,170
    trainable parameters (289,066 with BN's moving statistics) and 29.1 M multiply-adds on
    28×28×1, enough for over 90 % test accuracy on
    Fashion-MNIST within minutes of CPU training.

    Layers are named `stage{s}_conv{c}` (+ `_bn`, `_{activation}`), `stage{s}_pool` and
    `stage{s}_dropout`, with `s` and `c` counted from 1.

    Args:
        input_shape: `(height, width, channels)`; default `(28, 28, 1)`. Height and width may
            be None (fully convolutional) and must be at least `2 ** (len(widths) - 1)`.
        widths: filters of each stage; one stage per entry.
        depth: conv-BN-activation blocks per stage: one number for every stage, or one entry
            per stage.
        activation: the nonlinearity, any Keras activation name (`"relu"`, `"sigmoid"`,
            `"tanh"`, ...).
        stage_pooling: `"max"` or `"avg"`, the 2×2 pooling between stages.
        dropout_rate: dropout after each stage's pooling and before the classifier; BN's
            regularizing effect lets it stay light (paper §3.4).
        kernel_initializer: the convolutions' initializer; by default `"he_normal"` for the
            ReLU family and `"glorot_uniform"` for other activations, so that runs without BN
            start from well-scaled activations too.

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    baseline = models.plain_cnn(activation="sigmoid", normalization=None)
    with_bn = models.plain_cnn(activation="sigmoid")
    default = models.create_model("plain_cnn_small")  # 7.34 M multiply-adds
    deeper_at_7x7 = models.plain_cnn(widths=(16, 32, 64), depth=(1, 2, 3))
    ```
    """
    if kernel_initializer is None:
        kernel_initializer = _default_initializer(activation)
    pool_layer = (
        keras.layers.MaxPooling2D if stage_pooling == "max" else keras.layers.AveragePooling2D
    )
    depths = (depth,) * len(widths) if isinstance(depth, int) else depth
    for stage, (width, stage_depth) in enumerate(zip(widths, depths, strict=True), start=1):
        if stage > 1:
            # "same" so that odd sizes (7×7 after two poolings of 28×28) keep their border row.
            x = pool_layer(2, padding="same", name=f"stage{stage - 1}_pool")(x)
            if dropout_rate:
                x = keras.layers.Dropout(dropout_rate, name=f"stage{stage - 1}_dropout")(x)
        for block in range(1, stage_depth + 1):
            x = build.conv(
                x,
                width,
                3,
                name=f"stage{stage}_conv{block}",
                activation=activation,
                kernel_initializer=kernel_initializer,
            )
    return x
