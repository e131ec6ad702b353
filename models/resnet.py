"""ResNet-50, -101 and -152, layer for layer `keras.applications.ResNet50` and its siblings.

Reference: K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016 (arXiv:1512.03385), Table 1 and Figure 5 (right).

The most used Batch Normalization network: "We adopt batch normalization (BN) right after each
convolution and before activation, following [Ioffe & Szegedy]" (§3.4). A 7×7/2 convolution and
a 3×3/2 max pool, then four stages (`conv2` to `conv5`, 256 to 2048 channels) of bottleneck
blocks: 1×1 (reduce), 3×3, 1×1 (expand 4×), each convolution followed by BN, ReLU after the
first two and after the residual sum; the first block of a stage projects its shortcut with a
1×1 convolution and BN. Global average pooling and the classifier end the network. The depths
differ only in the number of blocks per stage (Table 1), so they are rows of `BLOCKS`.

This is ResNet v1 as keras.applications builds it (the original release's layout): the first
1×1 convolution of a block carries the stride (v1.5, torchvision's, puts it on the 3×3), BN
epsilon 1.001e-5, and every convolution keeps a bias although BN follows and undoes it
(`conv_bias=True`), because keras.applications' weights have those biases. Layer names and
order are Keras' (`conv1_conv`, `conv2_block1_0_conv` for the projection, `conv2_block1_1_bn`,
`conv2_block1_add`, `conv2_block1_out`, ...), and bnzoo's `BatchNormalization` is a
`BatchNormalization`, so a weights file saved from `keras.applications.ResNet50` loads into
`models.resnet` and computes the same function; `weights="imagenet"` loads keras.applications'
own file.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import keras

from .preprocessing import InputConvention, register_convention
from .pretrained import keras_applications_weights
from .scaffold import Build, builder

DEFAULT_INPUT_SHAPE = (224, 224, 3)
# keras.applications' bound: five stride-2 stages take 32×32 to 1×1 at conv5.
MIN_INPUT_SIZE = 32
#: Bottleneck width of each stage (its blocks output 4 times as many channels).
STAGE_FILTERS = (64, 128, 256, 512)

#: Table 1: bottleneck blocks in stages conv2 to conv5, per depth.
BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
#: keras.applications' ImageNet weights: the md5 sums of its files (with, without the top) and
#: the top-1 / top-5 accuracy keras.io reports for them (%, at 224×224).
KERAS_MD5 = {
    "resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
}
KERAS_ACCURACY = {"resnet50": (74.9, 92.1), "resnet101": (76.4, 92.8), "resnet152": (76.6, 93.1)}

# keras.applications.resnet.preprocess_input (imagenet_utils' "caffe" mode), which the
# weights were trained with: BGR, minus the ImageNet mean, no scaling.
register_convention(
    "keras_caffe",
    InputConvention(
        "RGB in [0, 255] -> BGR minus the ImageNet mean (103.939, 116.779, 123.68)",
        reverse_channels=True,
        mean=(103.939, 116.779, 123.68),
    ),
)


def bottleneck_block(
    x: Any, filters: int, *, strides: int, project: bool, conv: Any, name: str
) -> Any:
    """Figure 5 (right): 1×1, 3×3, 1×1 (×4 channels) conv-BN blocks plus the shortcut, then
    ReLU. The first block of a stage projects its shortcut (`project`), 1×1 with `strides`."""
    if project:
        shortcut = conv(x, 4 * filters, 1, strides=strides, activation=None, name=f"{name}_0")
    else:
        shortcut = x
    x = conv(x, filters, 1, strides=strides, name=f"{name}_1")
    x = conv(x, filters, 3, padding="same", name=f"{name}_2")
    x = conv(x, 4 * filters, 1, activation=None, name=f"{name}_3")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def _check(arguments: dict[str, Any]) -> None:
    blocks = arguments["blocks"] = tuple(arguments["blocks"])
    if len(blocks) != 4 or not all(isinstance(n, int) and n >= 1 for n in blocks):
        raise ValueError(
            f"blocks must be four positive integers, the blocks of stages conv2 to conv5; "
            f"received blocks={blocks!r}. ResNet-50's are (3, 4, 6, 3)."
        )


def _feature_layers(arguments: Mapping[str, Any]) -> dict[int, str]:
    # Stage conv{s} ends at output stride 2**s (conv2 at 4 ... conv5 at 32).
    stages = {
        2**stage: f"conv{stage}_block{count}_out"
        for stage, count in enumerate(arguments["blocks"], start=2)
    }
    return {2: "conv1_relu", **stages}


@builder(
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=MIN_INPUT_SIZE,
    variants={
        name: dict(
            description=f"ResNet-{name[len('resnet') :]} v1, weight-compatible with "
            f"keras.applications.ResNet{name[len('resnet') :]}",
            blocks=blocks,
        )
        for name, blocks in BLOCKS.items()
    },
    feature_layers=_feature_layers,
    weights=[
        keras_applications_weights(
            name,
            folder="resnet",
            file_stem=name,
            md5=KERAS_MD5[name],
            top1=KERAS_ACCURACY[name][0],
            top5=KERAS_ACCURACY[name][1],
            input_size=224,
            preprocessing="keras_caffe",
            description=f"keras.applications ResNet{name[len('resnet') :]} ImageNet weights",
        )
        for name in BLOCKS
    ],
    architecture=("blocks", "width_multiplier", "conv_bias", "normalization", "bn_epsilon"),
    check=_check,
    bn_epsilon=1.001e-5,
)
def resnet(
    x: Any,
    build: Build,
    blocks: Sequence[int] = (3, 4, 6, 3),
    conv_bias: bool = True,
    width_multiplier: float = 1.0,
    min_depth: int = 8,
) -> Any:
    """ResNet v1 (He et al., 2016) as keras.applications builds it, with bnzoo's BN.

    Defaults give ResNet-50: 25,583,592 trainable parameters (25,636,712 with BN's moving
    statistics) and 3.86 G multiply-adds at 224×224, as `keras.applications.ResNet50`.
    `models.create_model("resnet101")` and `"resnet152"` are the deeper rows of Table 1.

    Args:
        bn_epsilon: BN's epsilon (keras.applications' 1.001e-5).
        blocks: bottleneck blocks in stages conv2 to conv5 (Table 1: (3, 4, 6, 3) for 50
            layers, (3, 4, 23, 3) for 101, (3, 8, 36, 3) for 152).
        conv_bias: keep keras.applications' convolution biases before BN, which its weights
            have; False drops them, as the BN paper does (§3.2: BN's β plays their part). The
            function is the same either way.
        width_multiplier: scales every convolution's filter count
            (`max(int(filters * width_multiplier), min_depth)`), for narrow test and CPU
            networks; the pretrained weights need 1.
        min_depth: the floor of that scaling.

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import keras
    import models

    reference = keras.applications.ResNet50(weights=None)
    reference.save_weights("resnet50.weights.h5")
    ours = models.resnet(weights="resnet50.weights.h5")  # the same function
    deeper = models.create_model("resnet101", include_top=False, pooling="avg")
    ```
    """
    conv = functools.partial(_conv, build, conv_bias=conv_bias)
    x = conv(x, build.depth(64), 7, strides=2, padding=3, name="conv1")
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (filters, count) in enumerate(zip(STAGE_FILTERS, blocks, strict=True), start=2):
        for block in range(1, count + 1):
            x = bottleneck_block(
                x,
                build.depth(filters),
                strides=2 if block == 1 and stage > 2 else 1,
                project=block == 1,
                conv=conv,
                name=f"conv{stage}_block{block}",
            )
    return x


def _conv(build: Build, x: Any, filters: int, kernel_size: int, *, name: str, **options: Any):
    # keras.applications' names: `NAME_conv`, `NAME_bn`, `NAME_relu`; its 1×1 convolutions
    # pad nothing ("valid", the same windows as "same" for a 1×1 kernel).
    padding = options.pop("padding", "valid")
    return build.conv(
        x, filters, kernel_size, padding=padding, name=name, conv_name=f"{name}_conv", **options
    )
