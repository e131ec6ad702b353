"""The input conventions of pretrained weights, as a function and as a layer inside the model.

Pretrained weights only compute what they were trained to compute on inputs prepared the way
their training prepared them. Each weight set names one convention (a *mode*):

- `"caffe"`: channels reversed to BGR, minus the per-channel mean (B 104, G 117, R 128); the
  BN-Inception Caffe release (Cadene's `pretrainedmodels`).
- `"inception"`: `x / 127.5 - 1`, in [-1, 1]; Inception-v3 (keras.applications) and TF-slim.

(Both from RGB values in [0, 255].) A model file whose weights were trained otherwise declares
its convention with `register_convention`, next to the weights.

`preprocess_input(images, mode)` applies a mode to a batch outside the model;
`ImagePreprocessing(mode)` is the same as a Keras layer, which the builders put in front of the
network with `include_preprocessing=True`: the model then takes RGB values in [0, 255], and
any export of it (`model.export`, bnzoo's SavedModel) carries the preprocessing with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

#: Per-channel mean of the Caffe BN-Inception's training images, in BGR order.
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """How a weight set's training turned RGB values in [0, 255] into network inputs.

    Reverse the channels (RGB to BGR) if asked, divide by `scale`, subtract `mean`, divide by
    `std`: the order in which keras.applications' `preprocess_input` modes compute, so the
    results are the same to the bit (dividing by 1 and subtracting 0 are exact).

    Attributes:
        description: one line for listings, e.g. "RGB in [0, 255] -> x / 127.5 - 1".
        reverse_channels: feed BGR (Caffe's channel order).
        scale: divisor applied first.
        mean: subtracted next; a scalar, or one value per channel (in the fed order).
        std: divisor applied last; a scalar, or one value per channel.
    """

    description: str
    reverse_channels: bool = False
    scale: float = 1.0
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0

    def channels(self) -> int | None:
        """The channel count the convention needs, or None when any count works."""
        per_channel = [v for v in (self.mean, self.std) if isinstance(v, tuple)]
        if per_channel:
            return len(per_channel[0])
        return 3 if self.reverse_channels else None


#: Every registered mode -> its convention.
CONVENTIONS: dict[str, InputConvention] = {
    "caffe": InputConvention(
        "RGB in [0, 255] -> BGR minus the mean (104, 117, 128)",
        reverse_channels=True,
        mean=CAFFE_BGR_MEAN,
    ),
    "inception": InputConvention("RGB in [0, 255] -> x / 127.5 - 1", scale=127.5, mean=1.0),
}


class NoInputConventionError(ValueError):
    """`include_preprocessing=True` for builder arguments that no weight set was trained with:
    there is no input convention to put in the model. `train.py --weights` catches it to keep
    the dataset's normalization for such models."""


def register_convention(mode: str, convention: InputConvention) -> InputConvention:
    """Make `mode` a preprocessing mode (for weight sets, `preprocess_input` and the layer).

    Registering the same convention again (a reloaded module) is allowed.

    Raises:
        ValueError: if `mode` already names another convention.
    """
    existing = CONVENTIONS.get(mode)
    if existing is not None and existing != convention:
        raise ValueError(f"preprocessing mode {mode!r} is already {existing.description!r}.")
    CONVENTIONS[mode] = convention
    return convention


def get_convention(mode: str) -> InputConvention:
    """The convention registered as `mode`.

    Raises:
        ValueError: an unknown mode, listing the known ones.
    """
    if mode not in CONVENTIONS:
        raise ValueError(
            f"Unknown preprocessing mode={mode!r}. Use one of: "
            + "; ".join(f"{name!r} ({c.description})" for name, c in CONVENTIONS.items())
            + "."
        )
    return CONVENTIONS[mode]


def preprocess_input(images: Any, mode: str) -> Any:
    """Prepare RGB images with values in [0, 255] (channels last) for weights of `mode`.

    Works on NumPy arrays (returns float32 NumPy) and on backend tensors (returns a tensor).

    Example:

    ```python
    x = models.preprocessing.preprocess_input(rgb_uint8_batch, "caffe")
    ```
    """
    convention = get_convention(mode)
    if isinstance(images, np.ndarray):
        x = images.astype(np.float32)
        if convention.reverse_channels:
            x = x[..., ::-1]
        x = x / np.float32(convention.scale) - np.asarray(convention.mean, np.float32)
        return x / np.asarray(convention.std, np.float32)
    return ImagePreprocessing(mode)(images)


@keras.saving.register_keras_serializable(package="bnzoo")
class ImagePreprocessing(keras.layers.Layer):
    """Turns RGB images in [0, 255] into the input a weight set expects (see module docstring).

    Args:
        mode: a registered mode: `"caffe"` (BGR minus the Caffe mean), `"inception"` (scaled
            to [-1, 1]), or one a model file registered for its weights.
        **kwargs: base layer arguments (`name`, `dtype`).

    The layer has no weights; integer inputs are cast to the layer's compute dtype first.

    Example:

    ```python
    inputs = keras.Input((224, 224, 3))
    x = models.preprocessing.ImagePreprocessing("caffe")(inputs)
    ```
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.convention = get_convention(mode)
        self.mode = mode

    def call(self, inputs):
        convention = self.convention
        x = keras.ops.cast(inputs, self.compute_dtype)
        channels = convention.channels()
        if channels is not None and x.shape[-1] != channels:
            raise ValueError(
                f"mode={self.mode!r} needs {channels} channels; received shape {x.shape}"
            )
        # Steps that would divide by 1 or subtract 0 are left out of the graph.
        if convention.reverse_channels:
            x = keras.ops.flip(x, axis=-1)
        if convention.scale != 1:
            x = x / convention.scale
        if convention.mean != 0:
            x = x - keras.ops.convert_to_tensor(convention.mean, self.compute_dtype)
        if convention.std != 1:
            x = x / keras.ops.convert_to_tensor(convention.std, self.compute_dtype)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}
