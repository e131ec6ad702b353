"""What a model costs: parameters and multiply-adds, from the layers' static shapes.

`python -m models` prints these figures for every model; architecture papers count
multiply-adds the same way (convolutions and dense layers; normalization, pooling and
activations are elementwise and left out).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import keras


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """What a model costs.

    Attributes:
        name: the model's name.
        parameters: every weight, trainable or not (BN's moving statistics included), as
            `model.count_params()` counts them.
        trainable_parameters: the weights the optimizer updates.
        multiply_adds: multiply-accumulate operations of one forward pass on one example, in
            convolutions and dense layers (normalization, pooling and activations are
            elementwise and left out, the usual convention of architecture papers).
        input_shape: the input shape the figures were measured at, without the batch axis.
    """

    name: str
    parameters: int
    trainable_parameters: int
    multiply_adds: int
    input_shape: tuple[int | None, ...]


def count_parameters(model: keras.Model, trainable_only: bool = False) -> int:
    """Number of scalar weights in `model` (only the trainable ones if `trainable_only`)."""
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(math.prod(weight.shape) for weight in weights))


def count_multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one forward pass on one example, from the layers' static shapes.

    Convolutions (plain, depthwise, separable, transposed) and dense layers are counted; nested
    models are walked. A convolution producing an `H×W×C_out` map with a `k×k` window over
    `C_in` channels costs `H·W·k·k·C_in·C_out` (divided by `groups`).

    Raises:
        ValueError: if a counted layer's spatial shape is unknown (a model built with
            `input_shape=(None, None, C)`); rebuild it with a static input shape.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_multiply_adds(layer)
        else:
            total += _layer_multiply_adds(layer)
    return total


def _static(shape: Sequence[int | None], layer: keras.layers.Layer) -> tuple[int, ...]:
    if any(size is None for size in shape):
        raise ValueError(
            f"Cannot count the multiply-adds of layer {layer.name!r}: its shape {tuple(shape)} is "
            "not fully known. Build the model with a static input_shape, e.g. (224, 224, 3)."
        )
    return tuple(int(size) for size in shape)


def _layer_multiply_adds(layer: keras.layers.Layer) -> int:
    conv_types = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    separable_types = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
    depthwise_types = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    transpose_types = (
        keras.layers.Conv1DTranspose,
        keras.layers.Conv2DTranspose,
        keras.layers.Conv3DTranspose,
    )
    if isinstance(layer, keras.layers.Dense):
        in_shape = _static(layer.input.shape[1:], layer)
        return math.prod(in_shape) * layer.units
    if not isinstance(layer, conv_types + separable_types + depthwise_types + transpose_types):
        return 0
    in_shape = _static(layer.input.shape[1:], layer)
    out_shape = _static(layer.output.shape[1:], layer)
    in_channels = in_shape[-1]
    window = math.prod(layer.kernel_size)
    if isinstance(layer, separable_types):
        positions = math.prod(out_shape[:-1])
        depthwise_channels = in_channels * layer.depth_multiplier
        return positions * (window * depthwise_channels + depthwise_channels * layer.filters)
    if isinstance(layer, depthwise_types):
        return math.prod(out_shape[:-1]) * window * in_channels * layer.depth_multiplier
    if isinstance(layer, transpose_types):
        # Every input position scatters a full window into the output.
        return math.prod(in_shape[:-1]) * window * in_channels * layer.filters
    groups = getattr(layer, "groups", 1)
    return math.prod(out_shape[:-1]) * window * (in_channels // groups) * layer.filters


def profile_model(model: keras.Model) -> ModelProfile:
    """Parameters and multiply-adds of `model` (see `ModelProfile`)."""
    input_shape = tuple(model.inputs[0].shape[1:]) if model.inputs else ()
    return ModelProfile(
        name=model.name,
        parameters=count_parameters(model),
        trainable_parameters=count_parameters(model, trainable_only=True),
        multiply_adds=count_multiply_adds(model),
        input_shape=input_shape,
    )
