"""BN-Inception (Inception-v2): the ImageNet network of the Batch Normalization paper.

Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015 (arXiv:1502.03167), Appendix, Figure 5.

GoogLeNet with three changes the Appendix lists: each 5×5 convolution becomes two stacked 3×3
convolutions (the "double 3×3" branch), there are three 28×28 Inception modules instead of two,
and there is no pooling layer between modules: modules 3c and 4e downsample with stride-2
convolutions and a stride-2 max pool whose output passes through unprojected. Every convolution
is followed by Batch Normalization and ReLU; the network ends with global average pooling and a
softmax classifier, without dropout (paper §4.2.1).

Figure 5's filter counts are read two ways, and both are here (`module_table`):

- `"caffe"` (default), as the BN-Inception model released in Caffe reads them: the columns add
  up to 608 output channels in 4c and 4d and 1056 in 4e;
- `"slim"`, as TF-slim's `inception_v2` reads them: the pool projections of 4c and 4d have 96
  filters, so those modules output the 576 channels of Figure 5's output-size column and 4e
  outputs 1024.

Layer names follow the Caffe release with `/` replaced by `_` (Keras 3 forbids `/` in layer
names): `conv1_7x7_s2`, `inception_3a_1x1`, `inception_3a_double_3x3_reduce`,
`inception_3a_pool_proj`, ..., and each module's concatenated output is `inception_3a_output`:

```python
model = models.bn_inception(include_top=False, input_shape=(224, 224, 3))
features = keras.Model(model.input, model.get_layer("inception_4e_output").output)
```
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import keras

from models.building_blocks import (
    classification_head,
    conv_norm_act,
    load_weights,
    model_input,
    resolve_input_shape,
    resolve_normalization,
    scaled_depth,
    validate_head_arguments,
    validate_input_shape,
    validate_weights,
)
from models.registry import register_model

DEFAULT_INPUT_SHAPE = (224, 224, 3)
# Five stride-2 stages (stem conv, two stem pools, 3c, 4e) take 32×32 to 1×1 at 5b; smaller
# inputs reach 1×1 before 4e, whose stride-2 branches would then see mostly padding. TF-slim's
# inception_v2 states the same bound.
MIN_INPUT_SIZE = 32


@dataclasses.dataclass(frozen=True)
class InceptionModule:
    """One row of Figure 5.

    Attributes:
        name: the module's name in the paper, e.g. `"3a"`.
        stride: 2 for the downsampling modules 3c and 4e, else 1.
        n1x1: filters of the 1×1 branch (0: no such branch, as in 3c and 4e).
        n3x3_reduce: filters of the 1×1 convolution before the 3×3 branch.
        n3x3: filters of the 3×3 branch.
        n_double_3x3_reduce: filters of the 1×1 convolution before the double 3×3 branch.
        n_double_3x3: filters of each of the two stacked 3×3 convolutions.
        pool: `"avg"` or `"max"`, the pooling branch.
        pool_proj: filters of the 1×1 projection after the pooling (0: the pooled input passes
            through, as in 3c and 4e).
    """

    name: str
    stride: int
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n_double_3x3_reduce: int
    n_double_3x3: int
    pool: str
    pool_proj: int

    def output_channels(self, input_channels: int) -> int:
        passed_through = self.pool_proj or input_channels
        return self.n1x1 + self.n3x3 + self.n_double_3x3 + passed_through


# Figure 5, as read by the released Caffe BN-Inception.
CAFFE_MODULES = (
    InceptionModule("3a", 1, 64, 64, 64, 64, 96, "avg", 32),
    InceptionModule("3b", 1, 64, 64, 96, 64, 96, "avg", 64),
    InceptionModule("3c", 2, 0, 128, 160, 64, 96, "max", 0),
    InceptionModule("4a", 1, 224, 64, 96, 96, 128, "avg", 128),
    InceptionModule("4b", 1, 192, 96, 128, 96, 128, "avg", 128),
    InceptionModule("4c", 1, 160, 128, 160, 128, 160, "avg", 128),
    InceptionModule("4d", 1, 96, 128, 192, 160, 192, "avg", 128),
    InceptionModule("4e", 2, 0, 128, 192, 192, 256, "max", 0),
    InceptionModule("5a", 1, 352, 192, 320, 160, 224, "avg", 128),
    InceptionModule("5b", 1, 352, 192, 320, 192, 224, "max", 128),
)

# TF-slim's inception_v2 reading: 96-filter pool projections in 4c and 4d, so that these modules
# output the 576 channels Figure 5's output-size column gives them (and 4e 1024, as listed).
SLIM_MODULES = tuple(
    dataclasses.replace(module, pool_proj=96) if module.name in ("4c", "4d") else module
    for module in CAFFE_MODULES
)

MODULE_TABLES = {"caffe": CAFFE_MODULES, "slim": SLIM_MODULES}
STEMS = ("conv", "separable")


def inception_module(x: Any, module: InceptionModule, depth: Any, conv: Any) -> Any:
    """Figure 5's Inception module: four branches concatenated along channels.

    Args:
        x: input feature map.
        module: the module's row of the table.
        depth: maps a table filter count to the built width (width multiplier, min depth).
        conv: the conv-BN-ReLU block, normalization arguments already bound.
    """
    prefix = f"inception_{module.name}"
    stride = module.stride
    branches = []
    if module.n1x1:
        branches.append(conv(x, depth(module.n1x1), 1, name=f"{prefix}_1x1"))

    branch = conv(x, depth(module.n3x3_reduce), 1, name=f"{prefix}_3x3_reduce")
    branches.append(conv(branch, depth(module.n3x3), 3, strides=stride, name=f"{prefix}_3x3"))

    # Two 3×3 convolutions see a 5×5 window with fewer weights than GoogLeNet's 5×5 (Appendix).
    branch = conv(x, depth(module.n_double_3x3_reduce), 1, name=f"{prefix}_double_3x3_reduce")
    branch = conv(branch, depth(module.n_double_3x3), 3, name=f"{prefix}_double_3x3_1")
    branches.append(
        conv(branch, depth(module.n_double_3x3), 3, strides=stride, name=f"{prefix}_double_3x3_2")
    )

    pool_layer = (
        keras.layers.MaxPooling2D if module.pool == "max" else keras.layers.AveragePooling2D
    )
    branch = pool_layer(3, strides=stride, padding="same", name=f"{prefix}_pool")(x)
    if module.pool_proj:
        branch = conv(branch, depth(module.pool_proj), 1, name=f"{prefix}_pool_proj")
    branches.append(branch)
    return keras.layers.Concatenate(axis=-1, name=f"{prefix}_output")(branches)


def bn_inception(
    include_top: bool = True,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: Any = "softmax",
    name: str = "bn_inception",
    normalization: str | None = "batch_norm",
    bn_momentum: float = 0.99,
    bn_epsilon: float = 1e-3,
    stem: str = "conv",
    module_table: str = "caffe",
    width_multiplier: float = 1.0,
    min_depth: int = 16,
    dropout_rate: float = 0.0,
) -> keras.Model:
    """BN-Inception, the Batch Normalization paper's ImageNet network (Figure 5).

    Defaults give the network as released in Caffe: 224×224×3 inputs, 1000 classes, a plain
    7×7/2 stem convolution, Figure 5's filter counts summed as written (4c and 4d output 608
    channels, 4e 1056), no dropout: 11,285,224 trainable parameters (11,305,256 with BN's moving
    statistics) and 2.03 G multiply-adds at 224×224.

    Args:
        include_top: end with global average pooling and the `classes`-way classifier.
        weights: None, or the path of a `.weights.h5` file saved from the same architecture.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: `(height, width, channels)`, at least 32×32; default `(224, 224, 3)`.
            Height and width may be None: the network is fully convolutional.
        pooling: with `include_top=False`, `None` (the 5b feature map), `"avg"` or `"max"`.
        classes: number of classes of the classifier.
        classifier_activation: activation of the classifier; `None` returns logits.
        name: the model's name.
        normalization: `"batch_norm"` (bnzoo's layer), `"keras"` (Keras' layer) or `None`
            (no BN; convolutions regain their bias).
        bn_momentum: momentum of BN's moving statistics.
        bn_epsilon: BN's epsilon.
        stem: `"conv"`, the Caffe release's 7×7/2 convolution, or `"separable"`, the paper's
            depthwise-separable 7×7/2 convolution with depth multiplier 8 (Appendix), cheaper
            in multiply-adds.
        module_table: `"caffe"` (4c/4d output 608 channels, 4e 1056) or `"slim"` (TF-slim's
            inception_v2: 576 and 1024); see the module docstring.
        width_multiplier: scales every convolution's filter count, as TF-slim's
            `depth_multiplier`: `max(int(filters * width_multiplier), min_depth)`. Values below
            1 give narrow networks for tests and CPU experiments.
        min_depth: the floor of that scaling (only active when `width_multiplier < 1`).
        dropout_rate: dropout before the classifier; 0 as in the paper, which removed it
            (§4.2.1), 0.2 in TF-slim.

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    model = models.bn_inception(classes=10, input_shape=(32, 32, 3), width_multiplier=0.25)
    model.get_layer("inception_3a_output").output.shape  # (None, 4, 4, 72)
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
    if stem not in STEMS:
        raise ValueError(
            f"Unknown stem={stem!r}. Use 'conv' (the Caffe release's 7x7 convolution) or "
            "'separable' (the paper's depthwise-separable 7x7 convolution)."
        )
    if module_table not in MODULE_TABLES:
        raise ValueError(
            f"Unknown module_table={module_table!r}. Use 'caffe' (4c/4d output 608 channels) "
            "or 'slim' (TF-slim's 576-channel reading)."
        )
    if not width_multiplier > 0:
        raise ValueError(
            f"width_multiplier must be positive; received width_multiplier={width_multiplier}."
        )
    if not (isinstance(min_depth, int) and min_depth >= 1):
        raise ValueError(f"min_depth must be a positive integer; received min_depth={min_depth!r}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); received dropout_rate={dropout_rate}.")

    input_shape = validate_input_shape(
        resolve_input_shape(input_tensor, input_shape),
        default_shape=DEFAULT_INPUT_SHAPE,
        min_size=MIN_INPUT_SIZE,
        model_name=name,
    )
    image, inputs = model_input(input_tensor, input_shape)

    depth = functools.partial(scaled_depth, multiplier=width_multiplier, min_depth=min_depth)
    conv = functools.partial(
        conv_norm_act,
        normalization=normalization,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        activation="relu",
        kernel_initializer="he_normal",
    )

    separable_depth_multiplier = None
    if stem == "separable":
        # TF-slim's rule: the depthwise stage may not have more channels than the pointwise
        # output (`in_channels * multiplier <= out_channels`), capped at the paper's 8.
        separable_depth_multiplier = max(1, min(depth(64) // input_shape[-1], 8))
    x = conv(
        image,
        depth(64),
        7,
        strides=2,
        name="conv1_7x7_s2",
        separable_depth_multiplier=separable_depth_multiplier,
    )
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_3x3_s2")(x)
    x = conv(x, depth(64), 1, name="conv2_3x3_reduce")
    x = conv(x, depth(192), 3, name="conv2_3x3")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2_3x3_s2")(x)

    for module in MODULE_TABLES[module_table]:
        x = inception_module(x, module, depth, conv)

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


_VARIANTS = {
    "bn_inception": dict(
        description="BN-Inception as released in Caffe: Figure 5, 7x7 stem conv, 4c/4d 608 ch",
    ),
    "bn_inception_slim": dict(
        description="TF-slim inception_v2: separable stem, 576-ch 4c/4d, dropout 0.2",
        stem="separable",
        module_table="slim",
        dropout_rate=0.2,
    ),
}

for _name, _defaults in _VARIANTS.items():
    register_model(
        _name,
        default_input_shape=DEFAULT_INPUT_SHAPE,
        min_input_size=MIN_INPUT_SIZE,
        **_defaults,
    )(bn_inception)
