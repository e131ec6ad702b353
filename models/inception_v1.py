"""GoogLeNet (Inception-v1), the network the BN paper's Inception family starts from.

Reference: C. Szegedy et al., "Going Deeper with Convolutions", CVPR 2015 (arXiv:1409.4842),
Table 1 and Figure 3.

Table 1, top to bottom: a 7×7/2 convolution, a 3×3/2 max pool, a 1×1 and a 3×3 convolution, a
3×3/2 max pool, Inception 3a and 3b, a 3×3/2 max pool, 4a to 4e, a 3×3/2 max pool, 5a and 5b,
7×7 average pooling, 40 % dropout, a linear layer and the softmax. Each Inception module
concatenates four branches: a 1×1 convolution, a 1×1 reduction then 3×3, a 1×1 reduction then
5×5, and a 3×3/1 max pool then a 1×1 projection. Every convolution, reductions and projections
included, is followed by a ReLU.

As published the network has no Batch Normalization (this builder's default,
`normalization=None`): it is the "Inception" baseline the BN paper improves on. It has Local
Response Normalization after the first pool and after the second convolution (Figure 3, and
the Caffe reference model bvlc_googlenet); Table 1 omits it because it has no parameters. We
judge it part of the architecture and keep it by default, but only without BN: the BN paper
removes it from BN networks (§4.2.1, "Remove Local Response Normalization ... with Batch
Normalization it is not necessary"). So `normalization="batch_norm"` gives the BN variant:
conv → BN → ReLU everywhere (the convolutions lose their bias), no LRN. `lrn=True/False`
overrides either choice.

Not built: the two auxiliary classifiers of Figure 3, which only add training losses and are
discarded at inference (Table 1 does not list them).

Padding is TensorFlow's "same" (output sizes as in Table 1's column: 112, 56, 28, 14, 7 at
224×224) and the final 7×7 average pool is a global average pool, so other input sizes work.
Layer names follow bvlc_googlenet with `/` replaced by `_`: `conv1_7x7_s2`, `pool1_norm1`,
`inception_3a_5x5_reduce`, `inception_3a_output`, `pool3_3x3_s2`, ...
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from .scaffold import Build, builder

DEFAULT_INPUT_SHAPE = (224, 224, 3)
# Five stride-2 stages take 32×32 to 1×1 at 5b, as in BN-Inception.
MIN_INPUT_SIZE = 32

FEATURE_LAYERS = {
    2: "conv1_7x7_s2_relu",
    4: ("conv2_norm2", "conv2_3x3_relu"),
    8: "inception_3b_output",
    16: "inception_4e_output",
    32: "inception_5b_output",
}


@dataclasses.dataclass(frozen=True)
class GoogLeNetModule:
    """One Inception row of Table 1 (filter counts per branch)."""

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n5x5_reduce: int
    n5x5: int
    pool_proj: int

    def output_channels(self) -> int:
        return self.n1x1 + self.n3x3 + self.n5x5 + self.pool_proj


# Table 1. A 3×3/2 max pool precedes 4a and 5a.
TABLE_1 = (
    GoogLeNetModule("3a", 64, 96, 128, 16, 32, 32),
    GoogLeNetModule("3b", 128, 128, 192, 32, 96, 64),
    GoogLeNetModule("4a", 192, 96, 208, 16, 48, 64),
    GoogLeNetModule("4b", 160, 112, 224, 24, 64, 64),
    GoogLeNetModule("4c", 128, 128, 256, 24, 64, 64),
    GoogLeNetModule("4d", 112, 144, 288, 32, 64, 64),
    GoogLeNetModule("4e", 256, 160, 320, 32, 128, 128),
    GoogLeNetModule("5a", 256, 160, 320, 32, 128, 128),
    GoogLeNetModule("5b", 384, 192, 384, 48, 128, 128),
)
POOL_BEFORE = {"4a": "pool3_3x3_s2", "5a": "pool4_3x3_s2"}


@keras.saving.register_keras_serializable(package="bnzoo")
class LocalResponseNormalization(keras.layers.Layer):
    """Local Response Normalization across channels, as Caffe computes it.

    `y_c = x_c / (bias + alpha / size * sum_{c' in window(c)} x_{c'}^2) ** beta`, the window
    being `size` channels centered on `c` (cut at the first and last channel). Krizhevsky et al.
    (2012) introduced it; GoogLeNet uses it with Caffe's `local_size=5, alpha=1e-4, beta=0.75`.
    Caffe divides `alpha` by `size`; `tf.nn.local_response_normalization` does not (its
    `alpha` is this layer's `alpha / size`, its `depth_radius` is `size // 2`).

    Args:
        size: channels in the window (odd).
        alpha: scale of the sum of squares (Caffe's convention, divided by `size`).
        beta: exponent.
        bias: added before the exponent (Caffe's `k`).
        **kwargs: base layer arguments.

    Example:

    ```python
    y = models.inception_v1.LocalResponseNormalization()(x)  # channels last
    ```
    """

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        bias: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (isinstance(size, int) and size >= 1 and size % 2 == 1):
            raise ValueError(f"size must be a positive odd integer; received size={size!r}.")
        self.size = size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.bias = float(bias)

    def call(self, inputs):
        squares = keras.ops.square(inputs)
        radius = self.size // 2
        padded = keras.ops.pad(squares, [[0, 0]] * (len(inputs.shape) - 1) + [[radius, radius]])
        channels = inputs.shape[-1]
        window_sum = padded[..., 0:channels]
        for offset in range(1, self.size):
            window_sum = window_sum + padded[..., offset : offset + channels]
        scale = self.bias + (self.alpha / self.size) * window_sum
        return inputs * keras.ops.power(scale, -self.beta)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "size": self.size,
            "alpha": self.alpha,
            "beta": self.beta,
            "bias": self.bias,
        }


def googlenet_module(x: Any, module: GoogLeNetModule, depth: Any, conv: Any) -> Any:
    """Figure 2(b): 1×1, 1×1→3×3, 1×1→5×5 and 3×3 max pool→1×1, concatenated."""
    prefix = f"inception_{module.name}"
    branch_1x1 = conv(x, depth(module.n1x1), 1, name=f"{prefix}_1x1")
    branch_3x3 = conv(x, depth(module.n3x3_reduce), 1, name=f"{prefix}_3x3_reduce")
    branch_3x3 = conv(branch_3x3, depth(module.n3x3), 3, name=f"{prefix}_3x3")
    branch_5x5 = conv(x, depth(module.n5x5_reduce), 1, name=f"{prefix}_5x5_reduce")
    branch_5x5 = conv(branch_5x5, depth(module.n5x5), 5, name=f"{prefix}_5x5")
    branch_pool = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{prefix}_pool")(x)
    branch_pool = conv(branch_pool, depth(module.pool_proj), 1, name=f"{prefix}_pool_proj")
    return keras.layers.Concatenate(axis=-1, name=f"{prefix}_output")(
        [branch_1x1, branch_3x3, branch_5x5, branch_pool]
    )


def _check(arguments: dict[str, Any]) -> None:
    if arguments["lrn"] not in (None, True, False):
        raise ValueError(
            f"lrn must be None (automatic), True or False; received lrn={arguments['lrn']!r}."
        )


@builder(
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=MIN_INPUT_SIZE,
    variants={
        "inception_v1": dict(
            description="GoogLeNet, Table 1 (Szegedy et al. 2014): no BN, LRN, dropout 0.4"
        )
    },
    feature_layers=FEATURE_LAYERS,
    check=_check,
    normalization=None,
)
def inception_v1(
    x: Any,
    build: Build,
    lrn: bool | None = None,
    width_multiplier: float = 1.0,
    min_depth: int = 16,
    dropout_rate: float = 0.4,
) -> Any:
    """GoogLeNet, Table 1 of Szegedy et al. (2014); with BN if asked.

    Defaults give the published network: no BN (biases in every convolution), LRN after pool1
    and conv2, 40 % dropout before the classifier: 6,998,552 parameters at 1000 classes and
    1.59 G multiply-adds at 224×224 (see docs/models.md for the comparison with Table 1).

    Args:
        input_shape: `(height, width, channels)`, at least 32×32; default `(224, 224, 3)`.
        normalization: `None` (as published), `"batch_norm"` (bnzoo's layer after every
            convolution) or `"keras"` (Keras' layer).
        lrn: Local Response Normalization after pool1 and conv2; None: only without BN (see
            the module docstring).
        width_multiplier: scales every convolution's filter count like TF-slim's
            `depth_multiplier`: `max(int(filters * width_multiplier), min_depth)`.
        min_depth: the floor of that scaling.
        dropout_rate: dropout before the classifier (Table 1: 40 %).

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    baseline = models.inception_v1()                        # GoogLeNet as published
    with_bn = models.inception_v1(normalization="batch_norm")  # conv-BN-ReLU, no LRN
    ```
    """
    use_lrn = build.normalization is None if lrn is None else lrn
    depth, conv = build.depth, build.conv  # conv-BN-ReLU, He-initialized: conv_norm_act's defaults
    x = conv(x, depth(64), 7, strides=2, name="conv1_7x7_s2")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_3x3_s2")(x)
    if use_lrn:
        x = LocalResponseNormalization(name="pool1_norm1")(x)
    x = conv(x, depth(64), 1, name="conv2_3x3_reduce")
    x = conv(x, depth(192), 3, name="conv2_3x3")
    if use_lrn:
        x = LocalResponseNormalization(name="conv2_norm2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2_3x3_s2")(x)
    for module in TABLE_1:
        if module.name in POOL_BEFORE:
            x = keras.layers.MaxPooling2D(
                3, strides=2, padding="same", name=POOL_BEFORE[module.name]
            )(x)
        x = googlenet_module(x, module, depth, conv)
    return x
