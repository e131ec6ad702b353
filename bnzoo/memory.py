"""Whether a training run fits in memory, estimated before the run starts.

`--image-size 100000` would otherwise start a run, create its folder and die in the first step
with an 80-line out-of-memory traceback, or be killed by the kernel's OOM killer without a word.
Keras builds a model symbolically (shapes only, no activations), so a training step's memory can
be estimated before anything is computed:

- the model: every layer's output is kept for the backward pass, so their sum at the batch size
  is a lower bound on a step's activations; weights take their size four times over (weights,
  gradients, up to two optimizer slots);
- the input pipeline, on the host: resizing a batch (with antialiasing), the parallel map and
  the prefetch buffer hold several float32 copies of a batch. Measured on this project's machine:
  `paper_mlp` on Fashion-MNIST resized to 1000x1000 at batch size 64 peaked at 5.6 GB resident,
  1.9 GB at 500x500: about 70 bytes per value of an input batch. `PIPELINE_BYTES_PER_VALUE`
  uses 64.

The estimate is compared with the memory available now (Linux's MemAvailable; the GPU's memory
for the model when TensorFlow sees a GPU), so a refusal means the run could not work here, now.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

#: Bytes per weight during training: the weight, its gradient and two optimizer slots (Adam).
BYTES_PER_WEIGHT = 4 * 4
#: Host bytes per value of a float32 input batch held by the input pipeline (see above).
PIPELINE_BYTES_PER_VALUE = 64
#: Bytes per input value when a model is evaluated (`check_inference_fits`): the float32 batch,
#: its resized and its normalized copy, and the first layer's output, at least as large: 4 x 4.
INFERENCE_BYTES_PER_VALUE = 16


def format_bytes(count: float) -> str:
    """`count` bytes as `3.2 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def host_memory() -> tuple[int | None, str]:
    """`(bytes, what)`: the memory available now (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available memory"
    except (OSError, ValueError, IndexError):
        pass
    from bnzoo.data.pipeline import physical_memory_bytes

    return physical_memory_bytes(), "memory"


def gpu_memory() -> int | None:
    """The first GPU's memory as TensorFlow sees it, or None without a GPU (or an answer)."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    try:
        from tensorflow.python.client import device_lib

        limits = [
            device.memory_limit
            for device in device_lib.list_local_devices()
            if device.device_type == "GPU"
        ]
    except Exception:  # a private API: without an answer, the host check still runs
        return None
    return int(limits[0]) if limits else None


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


def pipeline_bytes(input_shape: tuple[int, int, int], batch_size: int) -> float:
    """Host memory the input pipeline needs for batches of `input_shape` images."""
    return float(batch_size) * math.prod(input_shape) * PIPELINE_BYTES_PER_VALUE


def _refuse(size_text: str, needs: str, estimate: float, memory: int, what: str) -> None:
    raise ValueError(
        f"{size_text}: {needs} about {format_bytes(estimate)}, more than this machine's "
        f"{format_bytes(memory)} of {what}; use a smaller --image-size or --batch-size"
    )


def check_input_batch_fits(
    input_shape: tuple[int, int, int], batch_size: int, size_text: str
) -> None:
    """Refuse an input pipeline that alone exceeds the host's memory, before the model is even
    built (a Dense layer on a huge flattened input allocates its weights while being built).

    Raises:
        ValueError: naming `size_text` (e.g. "--image-size 100000x100000"), with the estimate.
    """
    memory, what = host_memory()
    estimate = pipeline_bytes(input_shape, batch_size)
    if memory is not None and estimate > memory:
        needs = f"the input pipeline for batches of {batch_size} images needs"
        _refuse(size_text, needs, estimate, memory, what)


def check_training_step_fits(
    model: keras.Model,
    batch_size: int,
    size_text: str,
    *,
    device_batch_size: int | None = None,
) -> None:
    """Refuse a run whose training step cannot fit in memory at `batch_size`: the model's part
    on the GPU (when there is one) or the host, the input pipeline's on the host.

    Args:
        model: the built model.
        batch_size: the examples this process feeds and trains on per step (with several
            workers, its share of `--batch-size`).
        size_text: how the message names the input size.
        device_batch_size: the examples one GPU trains on (a replica's share); None:
            `batch_size`. Without a GPU every local replica's activations are on the host.

    Raises:
        ValueError: naming `size_text`, with the estimate and the machine's memory.
    """
    import keras

    dtype = keras.mixed_precision.global_policy().compute_dtype

    def model_bytes(examples: int) -> float:
        activations = activation_elements(model) * examples * _bytes_per_element(dtype)
        return activations + model.count_params() * BYTES_PER_WEIGHT

    input_shape = tuple(int(size) for size in model.input_shape[1:])
    host_bytes = pipeline_bytes(input_shape, batch_size)
    needs = f"one training step of {model.name} on batches of {batch_size} images needs at least"
    device_memory = gpu_memory()
    if device_memory is not None:
        device_batch_size = device_batch_size or batch_size
        on_device = model_bytes(device_batch_size)
        if on_device > device_memory:
            if device_batch_size != batch_size:
                needs = (
                    f"one training step of {model.name} on a GPU's {device_batch_size} images "
                    "needs at least"
                )
            _refuse(size_text, needs, on_device, device_memory, "GPU memory")
    else:
        host_bytes += model_bytes(batch_size)
    memory, what = host_memory()
    if memory is not None and host_bytes > memory:
        _refuse(size_text, needs, host_bytes, memory, what)


def check_inference_fits(
    input_shape: tuple[int, ...], batch_size: int, what: str, *, fix: str = "--batch-size"
) -> None:
    """Refuse to evaluate a model whose input batches cannot fit in memory, before the model is
    loaded or built: a `.keras` file can declare 100,000 x 100,000 inputs in a few bytes, and
    TensorFlow would fail on the first batch with a 50-line out-of-memory traceback.

    The estimate is a lower bound (`INFERENCE_BYTES_PER_VALUE` per input value, the model's
    own activations not counted), compared with the GPU's memory when TensorFlow sees one,
    else with the host's available memory.

    Args:
        input_shape: one example's shape, without the batch dimension.
        batch_size: examples per call.
        what: how the message names the model.
        fix: the option that sets `batch_size`.

    Raises:
        ValueError: naming `what`, the estimate and the memory.
    """
    per_example = math.prod(input_shape) * INFERENCE_BYTES_PER_VALUE
    shape_text = "x".join(str(size) for size in input_shape)
    device_memory = gpu_memory() if "tensorflow" in sys.modules else None
    memory, kind = (device_memory, "GPU memory") if device_memory else host_memory()
    if memory is None:
        return
    if per_example > memory:
        raise ValueError(
            f"{what} takes {shape_text} inputs: one example needs about "
            f"{format_bytes(per_example)}, more than this machine's {format_bytes(memory)} of "
            f"{kind}; it cannot be evaluated here"
        )
    if per_example * batch_size > memory:
        fitting = max(1, memory // per_example)
        raise ValueError(
            f"{what} takes {shape_text} inputs: batches of {batch_size} need about "
            f"{format_bytes(per_example * batch_size)}, more than this machine's "
            f"{format_bytes(memory)} of {kind}; use {fix} {fitting} or less"
        )
