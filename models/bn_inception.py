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

Two sets of ImageNet weights exist, one per reading, and each registered variant builds the
exact network of one of them (`weights="imagenet"`):

- `bn_inception`: the Caffe release (Xiong), as converted to PyTorch by Cadene's
  `pretrainedmodels` (`bn_inception-52deb4733.pth`). Caffe's conventions are part of that
  function, so the variant has them: symmetric padding for strided convolutions, pooling that
  rounds output sizes up (ceil mode), average pools that count the padding, BN epsilon 1e-5,
  inputs in BGR order minus the mean (104, 117, 128);
- `bn_inception_slim`: TF-slim's `inception_v2_2016_08_28` checkpoint: TensorFlow's "same"
  padding, a separable stem convolution with a bias and no BN (slim's arg scope normalizes
  `conv2d` only), BN without `gamma`, epsilon 1e-3, dropout 0.2, inputs scaled to [-1, 1], and
  a 1001-way classifier whose class 0 is "background" (dropped for `classes=1000`).

Layer names follow the Caffe release with `/` replaced by `_` (Keras 3 forbids `/` in layer
names): `conv1_7x7_s2`, `inception_3a_1x1`, `inception_3a_double_3x3_reduce`,
`inception_3a_pool_proj`, ..., and each module's concatenated output is `inception_3a_output`:

```python
model = models.bn_inception(include_top=False, weights="imagenet")
features = keras.Model(model.input, model.get_layer("inception_4e_output").output)
```
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import keras

from . import bn_inception_weights
from .inception_v1 import LocalResponseNormalization
from .pretrained import WeightSet
from .scaffold import Build, builder, check_choice

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
STEMS = {
    "conv": "the Caffe release's 7x7 convolution",
    "separable": "the paper's depthwise-separable 7x7 convolution",
}
TABLE_READINGS = {
    "caffe": "4c/4d output 608 channels",
    "slim": "TF-slim's 576-channel reading",
}
PADDINGS = {
    "caffe": "the released Caffe network's symmetric padding and ceil-mode pooling",
    "same": "TensorFlow's, any input size",
}
#: BN epsilon of each padding convention when `bn_epsilon=None`: Caffe's (and PyTorch's) 1e-5,
#: Keras' and TF-slim's 1e-3.
DEFAULT_EPSILONS = {"caffe": 1e-5, "same": 1e-3}

#: The nonlinearities: ReLU, and the paper's sigmoid (BN-x5-Sigmoid, section 4.2.2). Both
#: are non-negative, which Caffe's ceil-mode max pool needs (`ceil_mode_max_pool`).
ACTIVATIONS = {"relu": "ReLU, the paper's", "sigmoid": "the paper's BN-x5-Sigmoid"}

#: The last layer at each stride (input size / feature map size), for feature extraction; the
#: first candidate the built model has (LRN follows conv2 where there is one).
FEATURE_LAYERS = {
    2: tuple(f"conv1_7x7_s2_{activation}" for activation in ACTIVATIONS),
    4: ("conv2_norm2", *(f"conv2_3x3_{activation}" for activation in ACTIVATIONS)),
    8: "inception_3b_output",
    16: "inception_4d_output",
    32: "inception_5b_output",
}


def inception_module(x: Any, module: InceptionModule, depth: Any, conv: Any, padding: str) -> Any:
    """Figure 5's Inception module: four branches concatenated along channels.

    Args:
        x: input feature map.
        module: the module's row of the table.
        depth: maps a table filter count to the built width (width multiplier, min depth).
        conv: the conv-BN-ReLU block, normalization arguments already bound.
        padding: `"caffe"` or `"same"`; see `bn_inception`.
    """
    prefix = f"inception_{module.name}"
    stride = module.stride
    caffe = padding == "caffe"
    # Caffe pads a 3×3/2 convolution by one pixel on every side; TensorFlow's "same" pads only
    # the bottom and right, which shifts every window by one pixel.
    strided_padding = 1 if caffe and stride == 2 else "same"
    branches = []
    if module.n1x1:
        branches.append(conv(x, depth(module.n1x1), 1, name=f"{prefix}_1x1"))

    branch = conv(x, depth(module.n3x3_reduce), 1, name=f"{prefix}_3x3_reduce")
    branches.append(
        conv(
            branch,
            depth(module.n3x3),
            3,
            strides=stride,
            padding=strided_padding,
            name=f"{prefix}_3x3",
        )
    )

    # Two 3×3 convolutions see a 5×5 window with fewer weights than GoogLeNet's 5×5 (Appendix).
    branch = conv(x, depth(module.n_double_3x3_reduce), 1, name=f"{prefix}_double_3x3_reduce")
    branch = conv(branch, depth(module.n_double_3x3), 3, name=f"{prefix}_double_3x3_1")
    branches.append(
        conv(
            branch,
            depth(module.n_double_3x3),
            3,
            strides=stride,
            padding=strided_padding,
            name=f"{prefix}_double_3x3_2",
        )
    )

    if module.pool == "max" and stride == 2 and caffe:
        branch = ceil_mode_max_pool(x, name=f"{prefix}_pool")
    elif module.pool == "avg" and caffe:
        # Caffe's average pool divides by 9 at the border too: it counts the zero padding.
        branch = keras.layers.ZeroPadding2D(1, name=f"{prefix}_pool_pad")(x)
        branch = keras.layers.AveragePooling2D(3, strides=1, name=f"{prefix}_pool")(branch)
    else:
        # A 3×3/1 max pool pads with -inf in both conventions; TensorFlow's average pool
        # divides by the number of real inputs.
        pool_layer = (
            keras.layers.MaxPooling2D if module.pool == "max" else keras.layers.AveragePooling2D
        )
        branch = pool_layer(3, strides=stride, padding="same", name=f"{prefix}_pool")(x)
    if module.pool_proj:
        branch = conv(branch, depth(module.pool_proj), 1, name=f"{prefix}_pool_proj")
    branches.append(branch)
    return keras.layers.Concatenate(axis=-1, name=f"{prefix}_output")(branches)


def ceil_mode_max_pool(x: Any, name: str) -> Any:
    """Caffe's 3×3/2 max pool without padding, which rounds its output size up (ceil mode).

    Windows start at 0, 2, 4, ... and the last one may hang over the bottom/right edge by one
    pixel. That is a bottom/right padding of one, then a "valid" pool: `floor(H / 2)` outputs
    for every `H`. The padding is zeros, which equals Caffe's "ignore what is outside" because
    every pool in BN-Inception follows a ReLU or a sigmoid (inputs >= 0).
    """
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)


def caffe_feature_sizes(size: int) -> tuple[int, int, int]:
    """Height (or width) after conv1, at 3c's input and at 4e's input, with Caffe padding."""
    after_conv1 = (size - 1) // 2 + 1  # 7×7/2 convolution padded by 3
    at_3c = after_conv1 // 2 // 2  # two ceil-mode 3×3/2 pools
    return after_conv1, at_3c, at_3c // 2


def _check_caffe_size(input_shape: tuple, model_name: str) -> None:
    """Caffe's rounding works only when 3c and 4e see even sizes (else the branches differ)."""

    def works(size: int) -> bool:
        _, at_3c, at_4e = caffe_feature_sizes(size)
        return at_3c % 2 == 0 and at_4e % 2 == 0 and at_4e >= 2

    for size in input_shape[:2]:
        if size is None or works(size):
            continue
        below = next((s for s in range(size - 1, 31, -1) if works(s)), None)
        above = next(s for s in range(size + 1, size + 64) if works(s))
        suggestion = f"{below} or {above}" if below else str(above)
        raise ValueError(
            f"{model_name} with padding='caffe' cannot take {size}-pixel inputs "
            f"(input_shape={tuple(input_shape)}): Caffe's rounding gives its stride-2 modules "
            f"odd feature maps, whose branches then differ in size. Use {suggestion} (any "
            "multiple of 32 works), or padding='same'."
        )


def _check(arguments: dict[str, Any]) -> None:
    """The stem, module table and padding; an unset BN epsilon takes the padding's."""
    check_choice(arguments, "stem", STEMS)
    check_choice(arguments, "module_table", TABLE_READINGS)
    check_choice(arguments, "activation", ACTIVATIONS)
    if not isinstance(arguments["lrn"], bool):
        raise ValueError(f"lrn must be True or False; received lrn={arguments['lrn']!r}.")
    check_choice(arguments, "padding", PADDINGS)
    if arguments["bn_epsilon"] is None:
        arguments["bn_epsilon"] = DEFAULT_EPSILONS[arguments["padding"]]


@builder(
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=MIN_INPUT_SIZE,
    variants={
        "bn_inception": dict(
            description="BN-Inception as released in Caffe: Figure 5, 7x7 stem, 608-ch 4c/4d"
        ),
        "bn_inception_slim": dict(
            description="TF-slim inception_v2: separable stem, 576-ch 4c/4d, dropout 0.2",
            stem="separable",
            module_table="slim",
            padding="same",
            dropout_rate=0.2,
            bn_scale=False,
            normalize_stem=False,
        ),
    },
    feature_layers=FEATURE_LAYERS,
    weights=[
        WeightSet(
            model="bn_inception",
            tag="imagenet",
            source_format="pytorch",
            url="http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
            file_name="bn_inception-52deb4733.pth",
            file_hash="52deb4733",
            classes=1000,
            preprocessing="caffe",
            top1=73.524,
            top5=91.562,
            accuracy_source=(
                "Cadene/pretrained-models.pytorch README (224 center crop of a 256 resize)"
            ),
            description="Caffe BN-Inception (Xiong), via Cadene's pretrainedmodels .pth",
        ),
        WeightSet(
            model="bn_inception_slim",
            tag="imagenet",
            source_format="tf_checkpoint",
            url="http://download.tensorflow.org/models/inception_v2_2016_08_28.tar.gz",
            file_name="inception_v2_2016_08_28.tar.gz",
            file_hash=None,
            archive_member="inception_v2.ckpt",
            classes=1001,
            preprocessing="inception",
            top1=73.9,
            top5=91.8,
            accuracy_source=(
                "tensorflow/models research/slim README (224 center crop, 87.5% central)"
            ),
            description="TF-slim inception_v2_2016_08_28 checkpoint (1001 classes, 0 = background)",
        ),
    ],
    converters={
        "pytorch": bn_inception_weights.from_caffe_state_dict,
        "tf_checkpoint": bn_inception_weights.from_slim_checkpoint,
    },
    architecture=(
        "stem",
        "module_table",
        "padding",
        "bn_epsilon",
        "bn_scale",
        "normalize_stem",
        "width_multiplier",
        "normalization",
    ),
    check=_check,
    bn_epsilon=None,
)
def bn_inception(
    x: Any,
    build: Build,
    stem: str = "conv",
    module_table: str = "caffe",
    padding: str = "caffe",
    width_multiplier: float = 1.0,
    min_depth: int = 16,
    dropout_rate: float = 0.0,
    bn_scale: bool = True,
    normalize_stem: bool = True,
    activation: str = "relu",
    lrn: bool = False,
) -> Any:
    """BN-Inception, the Batch Normalization paper's ImageNet network (Figure 5).

    Defaults give the network as released in Caffe, the one `weights="imagenet"` loads:
    224×224×3 inputs, 1000 classes, a plain 7×7/2 stem convolution, Figure 5's filter counts
    summed as written (4c and 4d output 608 channels, 4e 1056), Caffe's padding and BN epsilon,
    no dropout: 11,285,224 trainable parameters (11,305,256 with BN's moving statistics) and
    2.03 G multiply-adds at 224×224. `models.create_model("bn_inception_slim")` is TF-slim's
    reading (see the module docstring).

    Args:
        weights: None, `"imagenet"` (the weight set these arguments build: the Caffe release
            for the defaults, TF-slim's checkpoint for `bn_inception_slim`'s; downloaded once
            and converted into Keras' cache), or a path: a `.weights.h5` file saved from the
            same architecture, Cadene's `.pth` file, or TF-slim's checkpoint.
        input_shape: `(height, width, channels)`, at least 32×32; default `(224, 224, 3)`.
            Height and width may be None: the network is fully convolutional. With
            `padding="caffe"`, sizes whose feature maps become odd before 3c or 4e are refused
            (any multiple of 32 works, as do 224 and 227).
        bn_epsilon: BN's epsilon; None takes the padding convention's: 1e-5 with
            `padding="caffe"` (Caffe's, part of the released weights' function), 1e-3 with
            `"same"` (Keras' and TF-slim's).
        include_preprocessing: start the model with the preprocessing of the weights these
            arguments build (`models.preprocessing`): the model then takes RGB values in
            [0, 255]. The Caffe weights' is `"caffe"` (BGR minus the mean), TF-slim's
            `"inception"` (scaled to [-1, 1]).
        stem: `"conv"`, the Caffe release's 7×7/2 convolution, or `"separable"`, the paper's
            depthwise-separable 7×7/2 convolution with depth multiplier 8 (Appendix), cheaper
            in multiply-adds.
        module_table: `"caffe"` (4c/4d output 608 channels, 4e 1056) or `"slim"` (TF-slim's
            inception_v2: 576 and 1024); see the module docstring.
        padding: `"caffe"`: the released Caffe network's arithmetic: strided convolutions padded
            symmetrically (7×7/2 by 3, 3×3/2 by 1), 3×3/2 max pools that round up (ceil mode),
            average pools that divide by 9 at the border. `"same"`: TensorFlow's "same"
            padding everywhere (TF-slim), for any input size from 32 up.
        width_multiplier: scales every convolution's filter count, as TF-slim's
            `depth_multiplier`: `max(int(filters * width_multiplier), min_depth)`. Values below
            1 give narrow networks for tests and CPU experiments.
        min_depth: the floor of that scaling (only active when `width_multiplier < 1`).
        dropout_rate: dropout before the classifier; 0 as in the paper, which removed it
            (§4.2.1), 0.2 in TF-slim.
        bn_scale: whether BN learns the scale `gamma`; TF-slim trains without it.
        normalize_stem: whether the stem convolution is followed by BN. TF-slim's
            inception_v2 gives its separable stem a bias and no BN (its arg scope attaches BN
            to `conv2d` layers only), and its checkpoint has that layer.
        activation: every convolution's nonlinearity: `"relu"`, or `"sigmoid"` for the
            paper's BN-x5-Sigmoid (section 4.2.2). Layer names follow it
            (`conv1_7x7_s2_sigmoid`).
        lrn: Local Response Normalization after the stem's first pool and after conv2, as in
            GoogLeNet (`models.inception_v1`), which the paper removed from its BN networks
            (section 4.2.1: "with Batch Normalization it is not necessary"); for the paper's
            Inception baseline (`--recipe paper_baseline`).

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    model = models.bn_inception(classes=10, input_shape=(32, 32, 3), width_multiplier=0.25)
    model.get_layer("inception_3a_output").output.shape  # (None, 4, 4, 72)
    features = models.bn_inception(include_top=False, pooling="avg", weights="imagenet")
    ```
    """
    if padding == "caffe":
        _check_caffe_size(build.input_shape, build.name)
    depth = build.depth
    conv = functools.partial(build.conv, bn_scale=bn_scale, activation=activation)

    separable_depth_multiplier = None
    if stem == "separable":
        # TF-slim's rule: the depthwise stage may not have more channels than the pointwise
        # output (`in_channels * multiplier <= out_channels`), capped at the paper's 8.
        separable_depth_multiplier = max(1, min(depth(64) // build.input_shape[-1], 8))
    x = conv(
        x,
        depth(64),
        7,
        strides=2,
        padding=3 if padding == "caffe" else "same",
        name="conv1_7x7_s2",
        normalization=build.normalization if normalize_stem else None,
        separable_depth_multiplier=separable_depth_multiplier,
    )
    x = _stem_pool(x, "pool1_3x3_s2", padding)
    if lrn:
        x = LocalResponseNormalization(name="pool1_norm1")(x)
    x = conv(x, depth(64), 1, name="conv2_3x3_reduce")
    x = conv(x, depth(192), 3, name="conv2_3x3")
    if lrn:
        x = LocalResponseNormalization(name="conv2_norm2")(x)
    x = _stem_pool(x, "pool2_3x3_s2", padding)

    for module in MODULE_TABLES[module_table]:
        x = inception_module(x, module, depth, conv, padding)
    return x


def _stem_pool(x: Any, name: str, padding: str) -> Any:
    if padding == "caffe":
        return ceil_mode_max_pool(x, name)
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name=name)(x)
