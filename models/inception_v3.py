"""Inception-v3, layer for layer `keras.applications.InceptionV3`, with bnzoo's BN inside.

Reference: C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens and Z. Wojna, "Rethinking the
Inception Architecture for Computer Vision", CVPR 2016 (arXiv:1512.00567).

The network is Keras' (itself TF-slim's `inception_v3`): the same convolutions, in the same
order, with the same BN (`scale=False`, epsilon 1e-3) and the same head, so that a Keras weights
file saved from `keras.applications.InceptionV3` loads into it (Keras addresses a layer's weights
by its class and position, and `layers.BatchNormalization` is a `BatchNormalization`) and it
then computes the same function. `weights="imagenet"` loads the very file keras.applications
downloads (same URL, hash and cache entry).

Stem (299×299 → 35×35): 3×3/2 conv 32 (valid), 3×3 conv 32 (valid), 3×3 conv 64, 3×3/2 max pool,
1×1 conv 80, 3×3 conv 192 (valid), 3×3/2 max pool. Then `mixed0`-`mixed2` (35×35, the 5×5 and
double-3×3 branches), `mixed3` (→17×17), `mixed4`-`mixed7` (factorized 1×7/7×1 convolutions),
`mixed8` (→8×8), `mixed9`-`mixed10` (expanded 1×3/3×1 branches), global average pooling and
the classifier: 23,851,784 parameters with the top (21,802,784 without), 5.7 G multiply-adds.

Layer names: the stem follows TF-slim (`conv2d_1a_3x3`, `max_pool_3a_3x3`, ...), the module
outputs keep Keras' names (`mixed0` ... `mixed10`), and a module's convolutions are named after
the branch variables of Keras' source (`mixed4_branch7x7dbl_3`); each convolution `NAME` is
followed by `NAME_bn` and `NAME_relu`.
"""

from __future__ import annotations

import functools
from typing import Any

import keras

from .pretrained import keras_applications_weights
from .scaffold import Build, builder

DEFAULT_INPUT_SHAPE = (299, 299, 3)
# keras.applications' bound: three valid 3×3 convolutions and four stride-2 stages.
MIN_INPUT_SIZE = 75

FEATURE_LAYERS = {
    2: "conv2d_2b_3x3_relu",
    4: "conv2d_4a_3x3_relu",
    8: "mixed2",
    16: "mixed7",
    32: "mixed10",
}


def _mixed_35(x: Any, block: str, pool_filters: int, conv: Any, depth: Any) -> Any:
    """mixed0-2 (Figure 5 of the paper): 1×1, 5×5, double 3×3, avg pool + 1×1."""
    branch1x1 = conv(x, depth(64), 1, name=f"{block}_branch1x1")
    branch5x5 = conv(x, depth(48), 1, name=f"{block}_branch5x5_1")
    branch5x5 = conv(branch5x5, depth(64), 5, name=f"{block}_branch5x5_2")
    branch3x3dbl = conv(x, depth(64), 1, name=f"{block}_branch3x3dbl_1")
    branch3x3dbl = conv(branch3x3dbl, depth(96), 3, name=f"{block}_branch3x3dbl_2")
    branch3x3dbl = conv(branch3x3dbl, depth(96), 3, name=f"{block}_branch3x3dbl_3")
    branch_pool = _avg_pool(x, f"{block}_branch_pool")
    branch_pool = conv(branch_pool, depth(pool_filters), 1, name=f"{block}_branch_pool_1x1")
    return keras.layers.Concatenate(axis=-1, name=block)(
        [branch1x1, branch5x5, branch3x3dbl, branch_pool]
    )


def _mixed_17(x: Any, block: str, filters_7x7: int, conv: Any, depth: Any) -> Any:
    """mixed4-7 (the paper's Figure 6): 7×7 factorized into 1×7 and 7×1."""
    n = depth(filters_7x7)
    branch1x1 = conv(x, depth(192), 1, name=f"{block}_branch1x1")
    branch7x7 = conv(x, n, 1, name=f"{block}_branch7x7_1")
    branch7x7 = conv(branch7x7, n, (1, 7), name=f"{block}_branch7x7_2")
    branch7x7 = conv(branch7x7, depth(192), (7, 1), name=f"{block}_branch7x7_3")
    branch7x7dbl = conv(x, n, 1, name=f"{block}_branch7x7dbl_1")
    branch7x7dbl = conv(branch7x7dbl, n, (7, 1), name=f"{block}_branch7x7dbl_2")
    branch7x7dbl = conv(branch7x7dbl, n, (1, 7), name=f"{block}_branch7x7dbl_3")
    branch7x7dbl = conv(branch7x7dbl, n, (7, 1), name=f"{block}_branch7x7dbl_4")
    branch7x7dbl = conv(branch7x7dbl, depth(192), (1, 7), name=f"{block}_branch7x7dbl_5")
    branch_pool = _avg_pool(x, f"{block}_branch_pool")
    branch_pool = conv(branch_pool, depth(192), 1, name=f"{block}_branch_pool_1x1")
    return keras.layers.Concatenate(axis=-1, name=block)(
        [branch1x1, branch7x7, branch7x7dbl, branch_pool]
    )


def _mixed_8(x: Any, block: str, conv: Any, depth: Any) -> Any:
    """mixed9-10 (the paper's Figure 7): 3×3 branches expanded into 1×3 and 3×1."""
    branch1x1 = conv(x, depth(320), 1, name=f"{block}_branch1x1")
    branch3x3 = conv(x, depth(384), 1, name=f"{block}_branch3x3_1")
    branch3x3_a = conv(branch3x3, depth(384), (1, 3), name=f"{block}_branch3x3_2a")
    branch3x3_b = conv(branch3x3, depth(384), (3, 1), name=f"{block}_branch3x3_2b")
    branch3x3 = keras.layers.Concatenate(axis=-1, name=f"{block}_branch3x3")(
        [branch3x3_a, branch3x3_b]
    )
    branch3x3dbl = conv(x, depth(448), 1, name=f"{block}_branch3x3dbl_1")
    branch3x3dbl = conv(branch3x3dbl, depth(384), 3, name=f"{block}_branch3x3dbl_2")
    branch3x3dbl_a = conv(branch3x3dbl, depth(384), (1, 3), name=f"{block}_branch3x3dbl_3a")
    branch3x3dbl_b = conv(branch3x3dbl, depth(384), (3, 1), name=f"{block}_branch3x3dbl_3b")
    branch3x3dbl = keras.layers.Concatenate(axis=-1, name=f"{block}_branch3x3dbl")(
        [branch3x3dbl_a, branch3x3dbl_b]
    )
    branch_pool = _avg_pool(x, f"{block}_branch_pool")
    branch_pool = conv(branch_pool, depth(192), 1, name=f"{block}_branch_pool_1x1")
    return keras.layers.Concatenate(axis=-1, name=block)(
        [branch1x1, branch3x3, branch3x3dbl, branch_pool]
    )


def _avg_pool(x: Any, name: str) -> Any:
    return keras.layers.AveragePooling2D(3, strides=1, padding="same", name=name)(x)


@builder(
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=MIN_INPUT_SIZE,
    variants={
        "inception_v3": dict(
            description="Inception-v3, weight-compatible with keras.applications.InceptionV3"
        )
    },
    feature_layers=FEATURE_LAYERS,
    weights=[
        keras_applications_weights(
            "inception_v3",
            folder="inception_v3",
            file_stem="inception_v3",
            md5=("9a0d58056eeedaa3f26cb7ebd46da564", "bcbd6486424b2319ff4ef7d526e38f63"),
            top1=77.9,
            top5=93.7,
            input_size=299,
            preprocessing="inception",
            description=(
                "keras.applications InceptionV3 ImageNet weights (same file and cache entry)"
            ),
        )
    ],
    architecture=("width_multiplier", "normalization", "bn_epsilon"),
)
def inception_v3(
    x: Any,
    build: Build,
    width_multiplier: float = 1.0,
    min_depth: int = 16,
    dropout_rate: float = 0.0,
) -> Any:
    """Inception-v3 as `keras.applications.InceptionV3` builds it, with bnzoo's BN.

    Args:
        weights: None, `"imagenet"` (keras.applications' file, downloaded once into Keras'
            cache; the no-top file when `include_top=False`), or the path of a Keras weights
            file (`.weights.h5`, or a legacy `.h5` such as keras.applications'), e.g. saved
            from `keras.applications.InceptionV3`.
        input_shape: `(height, width, channels)`, at least 75×75; default `(299, 299, 3)`.
        classes: number of classes of the classifier (1000 with the ImageNet top).
        normalization: `"batch_norm"` (bnzoo's layer), `"keras"` (Keras' layer) or `None`.
            Like Keras', BN has no learned scale (`scale=False`): a ReLU follows every BN.
        bn_momentum: momentum of BN's moving statistics (Keras' 0.99).
        bn_epsilon: BN's epsilon (Keras' 1e-3).
        width_multiplier: scales every convolution's filter count like TF-slim's
            `depth_multiplier` (`max(int(filters * width_multiplier), min_depth)`), for narrow
            test and CPU networks; the pretrained weights need 1.
        min_depth: the floor of that scaling.
        dropout_rate: dropout before the classifier (0 in Keras; TF-slim trains with 0.2).
        include_preprocessing: start with `x / 127.5 - 1` (keras.applications'
            `inception_v3.preprocess_input`), so the model takes RGB values in [0, 255].

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import keras
    import models

    reference = keras.applications.InceptionV3(weights=None)
    reference.save_weights("inception_v3.weights.h5")
    ours = models.inception_v3(weights="inception_v3.weights.h5")  # the same function
    ```
    """
    depth = build.depth
    conv = functools.partial(
        build.conv,
        bn_scale=False,
        kernel_initializer="glorot_uniform",  # Keras' default, as keras.applications builds it
    )

    x = conv(x, depth(32), 3, strides=2, padding="valid", name="conv2d_1a_3x3")
    x = conv(x, depth(32), 3, padding="valid", name="conv2d_2a_3x3")
    x = conv(x, depth(64), 3, name="conv2d_2b_3x3")
    x = keras.layers.MaxPooling2D(3, strides=2, name="max_pool_3a_3x3")(x)
    x = conv(x, depth(80), 1, padding="valid", name="conv2d_3b_1x1")
    x = conv(x, depth(192), 3, padding="valid", name="conv2d_4a_3x3")
    x = keras.layers.MaxPooling2D(3, strides=2, name="max_pool_5a_3x3")(x)

    x = _mixed_35(x, "mixed0", 32, conv, depth)
    x = _mixed_35(x, "mixed1", 64, conv, depth)
    x = _mixed_35(x, "mixed2", 64, conv, depth)

    # mixed3: 35 → 17 with stride-2 valid convolutions beside a max pool.
    branch3x3 = conv(x, depth(384), 3, strides=2, padding="valid", name="mixed3_branch3x3")
    branch3x3dbl = conv(x, depth(64), 1, name="mixed3_branch3x3dbl_1")
    branch3x3dbl = conv(branch3x3dbl, depth(96), 3, name="mixed3_branch3x3dbl_2")
    branch3x3dbl = conv(
        branch3x3dbl, depth(96), 3, strides=2, padding="valid", name="mixed3_branch3x3dbl_3"
    )
    branch_pool = keras.layers.MaxPooling2D(3, strides=2, name="mixed3_branch_pool")(x)
    x = keras.layers.Concatenate(axis=-1, name="mixed3")([branch3x3, branch3x3dbl, branch_pool])

    x = _mixed_17(x, "mixed4", 128, conv, depth)
    x = _mixed_17(x, "mixed5", 160, conv, depth)
    x = _mixed_17(x, "mixed6", 160, conv, depth)
    x = _mixed_17(x, "mixed7", 192, conv, depth)

    # mixed8: 17 → 8.
    branch3x3 = conv(x, depth(192), 1, name="mixed8_branch3x3_1")
    branch3x3 = conv(
        branch3x3, depth(320), 3, strides=2, padding="valid", name="mixed8_branch3x3_2"
    )
    branch7x7x3 = conv(x, depth(192), 1, name="mixed8_branch7x7x3_1")
    branch7x7x3 = conv(branch7x7x3, depth(192), (1, 7), name="mixed8_branch7x7x3_2")
    branch7x7x3 = conv(branch7x7x3, depth(192), (7, 1), name="mixed8_branch7x7x3_3")
    branch7x7x3 = conv(
        branch7x7x3, depth(192), 3, strides=2, padding="valid", name="mixed8_branch7x7x3_4"
    )
    branch_pool = keras.layers.MaxPooling2D(3, strides=2, name="mixed8_branch_pool")(x)
    x = keras.layers.Concatenate(axis=-1, name="mixed8")([branch3x3, branch7x7x3, branch_pool])

    x = _mixed_8(x, "mixed9", conv, depth)
    return _mixed_8(x, "mixed10", conv, depth)
