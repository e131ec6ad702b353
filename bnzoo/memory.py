"""Whether one training step fits in memory, estimated before the run starts.

`--image-size 100000` would otherwise start a run, create its folder and die in the first step
with an 80-line out-of-memory traceback. Keras builds a model symbolically (shapes only, no
activations), so the activations of a training step can be counted before any is computed:
every layer's output is kept for the backward pass, so their sum at the batch size is a lower
bound on the step's memory. Weights add their own size four times over (the weights, their
gradients and up to two optimizer slots).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

#: Bytes per weight during training: the weight, its gradient and two optimizer slots (Adam).
BYTES_PER_WEIGHT = 4 * 4


def format_bytes(count: float) -> str:
    """`count` bytes as `3.2 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def available_memory() -> tuple[int | None, str]:
    """`(bytes, what)`: the first GPU's memory when TensorFlow sees a GPU, else physical memory.
    `bytes` is None where neither can be found out."""
    import tensorflow as tf

    from bnzoo.data.pipeline import physical_memory_bytes

    if tf.config.list_physical_devices("GPU"):
        try:
            from tensorflow.python.client import device_lib

            limits = [
                device.memory_limit
                for device in device_lib.list_local_devices()
                if device.device_type == "GPU"
            ]
            if limits:
                return int(limits[0]), "GPU memory"
        except Exception:  # a private API: fall back to the host's memory
            pass
    return physical_memory_bytes(), "memory"


def _elements(shape) -> int:
    return math.prod(int(size) for size in shape[1:] if size is not None)


def activation_elements(model: keras.Model) -> int:
    """Sum over every layer (nested models included) of its output's elements per example."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += activation_elements(layer)
            continue
        try:
            outputs = keras.tree.flatten(layer.output)
        except (AttributeError, ValueError):  # a layer used twice has no single output
            continue
        total += sum(_elements(output.shape) for output in outputs)
    return total


def _bytes_per_element(dtype: str) -> int:
    return 2 if dtype in ("float16", "bfloat16") else 4


def _refuse(needs: str, size_text: str, estimate: float, memory: int, what: str) -> None:
    raise ValueError(
        f"{size_text}: {needs} about {format_bytes(estimate)}, more than this machine's "
        f"{format_bytes(memory)} of {what}; use a smaller --image-size or --batch-size"
    )


def check_input_batch_fits(
    input_shape: tuple[int, int, int], batch_size: int, size_text: str
) -> None:
    """Refuse an input batch that alone exceeds memory, before the model is even built (a
    Dense layer on a huge flattened input would allocate its weights while being built).

    Raises:
        ValueError: naming `size_text` (e.g. "--image-size 100000x100000"), with the estimate.
    """
    memory, what = available_memory()
    estimate = batch_size * math.prod(input_shape) * 4.0
    if memory is not None and estimate > memory:
        _refuse(
            f"one batch of {batch_size} float32 images needs", size_text, estimate, memory, what
        )


def check_training_step_fits(model: keras.Model, batch_size: int, size_text: str) -> None:
    """Refuse a model whose training step cannot fit in memory at `batch_size`.

    Raises:
        ValueError: naming `size_text`, with the estimate and the machine's memory.
    """
    import keras

    memory, what = available_memory()
    if memory is None:
        return
    dtype = keras.mixed_precision.global_policy().compute_dtype
    activations = activation_elements(model) * batch_size * _bytes_per_element(dtype)
    estimate = activations + model.count_params() * BYTES_PER_WEIGHT
    if estimate > memory:
        _refuse(
            f"one training step of {model.name} at --batch-size {batch_size} needs at least",
            size_text,
            estimate,
            memory,
            what,
        )
