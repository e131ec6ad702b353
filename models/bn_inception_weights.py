"""BN-Inception's two ImageNet checkpoints, mapped onto `models.bn_inception`'s layers.

Both converters return `{layer name: {variable name: array}}` for
`models.pretrained.assign_layer_weights`, and check first that the model has the conventions the
checkpoint computes with, since weights loaded into a model with other padding or another BN
epsilon would run without error and compute something else.

**Caffe (Cadene's `bn_inception-52deb4733.pth`)**: the state dict names follow the Caffe
prototxt (`inception_3a_1x1.weight`, `inception_3a_1x1_bn.running_mean`, ...), which is where
our layer names come from, so the mapping is the identity on names. Kernels go from PyTorch's
`(out, in, height, width)` to Keras' `(height, width, in, out)`. Every Caffe convolution has a
bias although BN follows it; BN subtracts the mean right after, so the bias is folded into the
moving mean, exactly:
`gamma * (Wx + b - mean) / sqrt(var + eps) + beta = gamma * (Wx - (mean - b)) / sqrt(var + eps)
+ beta`.

**TF-slim (`inception_v2_2016_08_28/inception_v2.ckpt`)**: read with `tf.train.load_checkpoint`
(TF-slim itself no longer imports with TensorFlow 2.21). Slim's scopes map to our layers:
`Mixed_3b` is module 3a (slim counts the stride-2 modules as `Mixed_4a`/`Mixed_5a`), `Branch_0`
the 1×1 branch, `Branch_1` the 3×3 branch, `Branch_2` the double 3×3, `Branch_3` the pooling; in
the stride-2 modules `Branch_0` is the 3×3 and `Branch_1` the double 3×3. Slim's BN has no
`gamma` (1 here). The classifier is a 1×1 convolution with 1001 outputs, class 0 being
"background": a 1000-class model drops it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._layers import layers
from .pytorch_checkpoint import read_state_dict

#: BN epsilon of the released Caffe model (Caffe's and PyTorch's default).
CAFFE_EPSILON = 1e-5
#: BN epsilon of TF-slim's inception arg scope.
SLIM_EPSILON = 1e-3

_SLIM_MODULES = {
    "3a": "Mixed_3b",
    "3b": "Mixed_3c",
    "3c": "Mixed_4a",
    "4a": "Mixed_4b",
    "4b": "Mixed_4c",
    "4c": "Mixed_4d",
    "4d": "Mixed_4e",
    "4e": "Mixed_5a",
    "5a": "Mixed_5b",
    "5b": "Mixed_5c",
}
_SLIM_BRANCHES = {
    "1x1": "Branch_0/Conv2d_0a_1x1",
    "3x3_reduce": "Branch_1/Conv2d_0a_1x1",
    "3x3": "Branch_1/Conv2d_0b_3x3",
    "double_3x3_reduce": "Branch_2/Conv2d_0a_1x1",
    "double_3x3_1": "Branch_2/Conv2d_0b_3x3",
    "double_3x3_2": "Branch_2/Conv2d_0c_3x3",
    "pool_proj": "Branch_3/Conv2d_0b_1x1",
}
_SLIM_STRIDED_BRANCHES = {
    "3x3_reduce": "Branch_0/Conv2d_0a_1x1",
    "3x3": "Branch_0/Conv2d_1a_3x3",
    "double_3x3_reduce": "Branch_1/Conv2d_0a_1x1",
    "double_3x3_1": "Branch_1/Conv2d_0b_3x3",
    "double_3x3_2": "Branch_1/Conv2d_1a_3x3",
}
_SLIM_STEM = {
    "conv1_7x7_s2": "Conv2d_1a_7x7",
    "conv2_3x3_reduce": "Conv2d_2b_1x1",
    "conv2_3x3": "Conv2d_2c_3x3",
}


def _check_conventions(model: Any, *, caffe: bool, source: str) -> None:
    expected_epsilon = CAFFE_EPSILON if caffe else SLIM_EPSILON
    wrong_epsilon = [
        layer.name
        for layer in layers.batch_norm_layers(model)
        if not np.isclose(layer.epsilon, expected_epsilon, rtol=1e-6)
    ]
    has_caffe_padding = any(layer.name == "pool1_3x3_s2_pad" for layer in model.layers)
    if wrong_epsilon or has_caffe_padding != caffe:
        variant = "bn_inception" if caffe else "bn_inception_slim"
        padding = "caffe" if caffe else "same"
        raise ValueError(
            f"{source} computes with padding={padding!r} and bn_epsilon={expected_epsilon}, "
            f"but {model.name!r} was built otherwise; the weights would load and compute "
            f"something else. Build it with models.create_model({variant!r}, ...) or pass "
            f"padding={padding!r}, bn_epsilon={expected_epsilon}."
        )


def _classifier(kernel: np.ndarray, bias: np.ndarray, model: Any) -> dict[str, np.ndarray]:
    """The `predictions` entry, dropping a background class when the model has one fewer."""
    try:
        units = model.get_layer("predictions").units
    except ValueError:
        return {"kernel": kernel, "bias": bias}
    if units == kernel.shape[1] - 1:
        kernel, bias = kernel[:, 1:], bias[1:]
    return {"kernel": kernel, "bias": bias}


def _caffe_tensor(
    state: dict[str, np.ndarray], key: str, shape: tuple[int, ...], layer: str, model: Any
) -> np.ndarray:
    """`state[key]`, checked to have `shape` before any arithmetic: a `.pth` from elsewhere
    may hold tensors of any shape, and `running_mean - bias` of a (n, 1) and an (n,) array would
    broadcast to n x n."""
    value = state.get(key)
    if value is None:
        raise ValueError(f"no {key!r} for layer {layer!r} in the state dict")
    if value.shape != shape:
        raise ValueError(
            f"{key!r} has shape {value.shape}, but layer {layer!r} of {model.name!r} needs "
            f"{shape} (PyTorch's order): the state dict is of another architecture (check "
            "width_multiplier, min_depth and classes)"
        )
    return value


def from_caffe_state_dict(path: str, model: Any) -> dict[str, dict[str, np.ndarray]]:
    """`{layer: {variable: array}}` for `model` from Cadene's BN-Inception `.pth` file."""
    state = read_state_dict(path)
    if "conv1_7x7_s2.weight" not in state:
        raise ValueError(
            f"{path!r} is not a BN-Inception state dict (no 'conv1_7x7_s2.weight'; it has "
            f"{', '.join(list(state)[:3])}, ...)"
        )
    _check_conventions(model, caffe=True, source=f"Caffe BN-Inception {path!r}")
    weights: dict[str, dict[str, np.ndarray]] = {}
    for layer in model.layers:
        name = layer.name
        if not layer.weights or name == "predictions" or name.endswith("_bn"):
            continue
        if not hasattr(layer, "kernel"):
            raise ValueError(
                f"layer {name!r} of {model.name!r} is not a convolution: Caffe BN-Inception "
                "weights fit models.bn_inception's layers only"
            )
        height, width, inputs, filters = (int(size) for size in layer.kernel.shape)
        kernel = _caffe_tensor(
            state, f"{name}.weight", (filters, inputs, height, width), name, model
        )
        weights[name] = {"kernel": np.transpose(kernel, (2, 3, 1, 0))}
        if f"{name}.bias" in state:
            bias = _caffe_tensor(state, f"{name}.bias", (filters,), name, model)
        else:
            bias = np.zeros(filters, kernel.dtype)
        if f"{name}_bn.running_mean" in state:
            bn = {
                variable: _caffe_tensor(state, f"{name}_bn.{key}", (filters,), f"{name}_bn", model)
                for variable, key in (
                    ("gamma", "weight"),
                    ("beta", "bias"),
                    ("moving_mean", "running_mean"),
                    ("moving_variance", "running_var"),
                )
            }
            # Exact at inference: BN subtracts the mean right after the bias.
            bn["moving_mean"] = bn["moving_mean"] - bias
            weights[f"{name}_bn"] = bn
        else:
            weights[name]["bias"] = bias
    classifier = state.get("last_linear.weight", state.get("fc.weight"))
    classifier_bias = state.get("last_linear.bias", state.get("fc.bias"))
    if classifier is None or classifier_bias is None:
        raise ValueError("no classifier ('last_linear.weight' and '.bias') in the state dict")
    if classifier.ndim != 2 or classifier_bias.shape != classifier.shape[:1]:
        raise ValueError(
            f"the classifier has shapes {classifier.shape} and {classifier_bias.shape}, not "
            "(classes, features) and (classes,)"
        )
    weights["predictions"] = _classifier(classifier.T, classifier_bias, model)
    return weights


def slim_variable_names() -> dict[str, str]:
    """`{our layer name: TF-slim scope}` for every convolution of `bn_inception_slim`."""
    names = {ours: f"InceptionV2/{scope}" for ours, scope in _SLIM_STEM.items()}
    for module, slim_module in _SLIM_MODULES.items():
        # Slim starts a stage's count at its stride-2 module: Mixed_4a and Mixed_5a.
        branches = _SLIM_STRIDED_BRANCHES if slim_module.endswith("a") else _SLIM_BRANCHES
        for branch, scope in branches.items():
            names[f"inception_{module}_{branch}"] = f"InceptionV2/{slim_module}/{scope}"
    return names


def from_slim_checkpoint(path: str, model: Any) -> dict[str, dict[str, np.ndarray]]:
    """`{layer: {variable: array}}` for `model` from TF-slim's inception_v2 checkpoint."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as error:
        reason = getattr(error, "message", str(error)).splitlines()[0]
        raise ValueError(f"{path!r} is not a readable TensorFlow checkpoint ({reason})") from None
    available = reader.get_variable_to_shape_map()
    if "InceptionV2/Conv2d_2b_1x1/weights" not in available:
        raise ValueError(f"{path!r} is not a TF-slim inception_v2 checkpoint")
    _check_conventions(model, caffe=False, source=f"TF-slim inception_v2 {path!r}")

    def get(name: str) -> np.ndarray:
        if name not in available:
            raise ValueError(f"the checkpoint has no variable {name!r}")
        return np.asarray(reader.get_tensor(name))

    weights: dict[str, dict[str, np.ndarray]] = {}
    for ours, scope in slim_variable_names().items():
        if ours not in {layer.name for layer in model.layers}:
            continue
        layer = model.get_layer(ours)
        if hasattr(layer, "depthwise_kernel"):
            entry = {
                "depthwise_kernel": get(f"{scope}/depthwise_weights"),
                "pointwise_kernel": get(f"{scope}/pointwise_weights"),
            }
        else:
            entry = {"kernel": get(f"{scope}/weights")}
        has_bn = f"{scope}/BatchNorm/moving_mean" in available
        if has_bn != any(layer.name == f"{ours}_bn" for layer in model.layers):
            raise ValueError(
                f"the checkpoint's {scope} {'has' if has_bn else 'has no'} BN, unlike layer "
                f"{ours!r}; build with normalize_stem={has_bn}."
            )
        if has_bn:
            bn = {
                "beta": get(f"{scope}/BatchNorm/beta"),
                "moving_mean": get(f"{scope}/BatchNorm/moving_mean"),
                "moving_variance": get(f"{scope}/BatchNorm/moving_variance"),
            }
            if f"{scope}/BatchNorm/gamma" in available:
                bn["gamma"] = get(f"{scope}/BatchNorm/gamma")
            weights[f"{ours}_bn"] = bn
        else:
            entry["bias"] = get(f"{scope}/biases")
        weights[ours] = entry
    kernel = get("InceptionV2/Logits/Conv2d_1c_1x1/weights")
    weights["predictions"] = _classifier(
        kernel.reshape(kernel.shape[-2], kernel.shape[-1]),
        get("InceptionV2/Logits/Conv2d_1c_1x1/biases"),
        model,
    )
    return weights
