"""The input conventions of pretrained weights, as a function and as a layer inside the model.

Pretrained weights only compute what they were trained to compute on inputs prepared the way
their training prepared them. Each weight set names one mode:

- `"caffe"`: channels reversed to BGR, minus the per-channel mean (B 104, G 117, R 128); the
  BN-Inception Caffe release (Cadene's `pretrainedmodels`).
- `"inception"`: `x / 127.5 - 1`, in [-1, 1]; Inception-v3 (keras.applications) and TF-slim.

(Both from RGB values in [0, 255].)

`preprocess_input(images, mode)` applies a mode to a batch outside the model;
`ImagePreprocessing(mode)` is the same as a Keras layer, which the builders put in front of the
network with `include_preprocessing=True`: the model then takes RGB values in [0, 255], and
any export of it (`model.export`, bnzoo's SavedModel) carries the preprocessing with it.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

#: Per-channel mean of the Caffe BN-Inception's training images, in BGR order.
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)

MODES = {
    "caffe": "RGB in [0, 255] -> BGR minus the mean (104, 117, 128)",
    "inception": "RGB in [0, 255] -> x / 127.5 - 1",
}


class NoInputConventionError(ValueError):
    """`include_preprocessing=True` for builder arguments that no weight set was trained with:
    there is no input convention to put in the model. `train.py --weights` catches it to keep
    the dataset's normalization for such models."""


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(
            f"Unknown preprocessing mode={mode!r}. Use one of: "
            + "; ".join(f"{name!r} ({what})" for name, what in MODES.items())
            + "."
        )
    return mode


def preprocess_input(images: Any, mode: str) -> Any:
    """Prepare RGB images with values in [0, 255] (channels last) for weights of `mode`.

    Works on NumPy arrays (returns float32 NumPy) and on backend tensors (returns a tensor).

    Example:

    ```python
    x = models.preprocessing.preprocess_input(rgb_uint8_batch, "caffe")
    ```
    """
    _check_mode(mode)
    if isinstance(images, np.ndarray):
        x = images.astype(np.float32)
        if mode == "caffe":
            return x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, np.float32)
        return x / np.float32(127.5) - np.float32(1.0)
    return ImagePreprocessing(mode)(images)


@keras.saving.register_keras_serializable(package="bnzoo")
class ImagePreprocessing(keras.layers.Layer):
    """Turns RGB images in [0, 255] into the input a weight set expects (see module docstring).

    Args:
        mode: `"caffe"` (BGR minus the Caffe mean) or `"inception"` (scaled to [-1, 1]).
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
        self.mode = _check_mode(mode)

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            if x.shape[-1] != 3:
                raise ValueError(f"mode='caffe' needs 3 channels; received shape {x.shape}")
            x = keras.ops.flip(x, axis=-1)
            return x - keras.ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        return x / 127.5 - 1.0

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}
