"""The serving SavedModel: raw images in, probabilities out, preprocessing inside the graph.

A model is trained on `preprocess_images(uint8 images)` (scaling by the dataset's mean and std,
then padding or resizing to the model's input). Serving code should not have to know any of
that, so the exported signature takes the images exactly as the dataset delivers them and runs
the *same* `bnzoo.data.preprocess_images` ops in the graph; serving therefore equals training by
construction, not by a reimplementation that could drift.

The SavedModel is plain TensorFlow: loading it needs neither bnzoo nor Keras custom objects::

    import tensorflow as tf

    serve = tf.saved_model.load("runs/<run>/saved_model").signatures["serving_default"]
    outputs = serve(images=tf.zeros([8, 28, 28, 1], tf.uint8))
    outputs["probabilities"], outputs["logits"], outputs["classes"]
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import keras

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "images"
#: bnzoo's description of the export (dataset, class names, preprocessing), in the SavedModel's
#: `assets.extra/` folder, which TensorFlow reserves for files that serving code may read.
METADATA_PATH = os.path.join("assets.extra", "bnzoo.json")


def serving_function(
    model: keras.Model,
    *,
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: Sequence[int] | None = None,
) -> Callable:
    """A `tf.function` from uint8 images `[batch, *image_shape]` to the serving outputs.

    It is the exported signature's body, so evaluating a Keras model through it measures what
    the SavedModel will serve.

    Args:
        model: a Keras model that maps preprocessed images to logits.
        image_shape: (height, width, channels) of the raw images, as the dataset delivers them.
        mean, std: per-channel statistics in [0, 1] pixel units (`DatasetInfo.mean`/`.std`).
        image_size: the model's (height, width) when it differs from the images' (padding or
            resizing happens in the graph); None to keep the images' size.

    Returns:
        A function `f(images) -> {"probabilities", "logits", "classes"}` with float32
        probabilities and logits `[batch, classes]` and int64 classes `[batch]`.
    """
    import tensorflow as tf

    from bnzoo.data import preprocess_images

    # Height and width may be None for datasets whose images vary in size (image folders); the
    # graph then pads or resizes whatever arrives to `image_size`.
    image_shape = tuple(None if size is None else int(size) for size in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    image_size = None if image_size is None else tuple(int(size) for size in image_size)

    @tf.function(
        input_signature=[tf.TensorSpec([None, *image_shape], tf.uint8, name=INPUT_NAME)],
        autograph=False,
    )
    def serve(images):
        # The TensorSpec fixes dtype and batch-free shape for the traced graph, but a signature
        # call does not check shapes: a 32x32 image would flow through a size-agnostic model and
        # give a silently wrong answer. ensure_shape makes it an InvalidArgumentError.
        images = tf.ensure_shape(images, [None, *image_shape])
        inputs = preprocess_images(images, mean=mean, std=std, image_size=image_size)
        # Under a mixed-precision policy the logits are float16/bfloat16; serving returns float32.
        logits = tf.cast(model(inputs, training=False), tf.float32)
        return {
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "logits": logits,
            "classes": tf.argmax(logits, axis=-1),
        }

    return serve


def export_serving_model(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: Sequence[int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Export `model` as a SavedModel whose `serving_default` signature takes raw uint8 images.

    The signature has one input, `images`: uint8 `[batch, height, width, channels]` with the
    dataset's own height, width and channels and any batch size; a wrong dtype, rank or image
    size is rejected by the signature instead of being silently converted. It returns
    `probabilities` (softmax), `logits` and `classes` (argmax). The same function is also the
    `serving_default` attribute of the loaded object, which `keras.layers.TFSMLayer` calls.

    The folder is written under a temporary name and renamed into place, so `path` holds either
    the previous export or the complete new one, never a partial SavedModel.

    Args:
        model: maps preprocessed images to logits (built, e.g. by `train.py`).
        path: the SavedModel folder to (re)place.
        image_shape, mean, std, image_size: the preprocessing, see `serving_function`.
        metadata: extra facts (dataset, class names, ...) written with the preprocessing to
            `assets.extra/bnzoo.json`; `evaluate.py` reads it to pick the dataset.

    Returns:
        `path` as a string.

    Example:

    ```python
    bnzoo.export.export_serving_model(
        model, "saved_model", image_shape=(28, 28, 1), mean=(0.286,), std=(0.353,)
    )
    layer = keras.layers.TFSMLayer("saved_model", call_endpoint="serving_default")
    ```
    """
    import tensorflow as tf

    path = os.fspath(path)
    image_shape = tuple(None if size is None else int(size) for size in image_shape)
    serve = serving_function(
        model, image_shape=image_shape, mean=mean, std=std, image_size=image_size
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE_NAME, serve)

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(tmp, verbose=False)
    description = {
        "signature": SIGNATURE_NAME,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, *image_shape]},
        "outputs": ["probabilities", "logits", "classes"],
        "preprocessing": {
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "image_size": None if image_size is None else [int(s) for s in image_size],
        },
        "tensorflow_version": tf.__version__,
        **(metadata or {}),
    }
    os.makedirs(os.path.join(tmp, os.path.dirname(METADATA_PATH)), exist_ok=True)
    with open(os.path.join(tmp, METADATA_PATH), "w", encoding="utf-8") as stream:
        json.dump(description, stream, indent=2)

    # A folder cannot be os.replace'd over a non-empty one: move the old export aside first.
    # A kill between the two renames leaves no `path` (and a `.old-` folder that the next run
    # deletes), which `train.py` treats as "export again", never as a valid half-export.
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `assets.extra/bnzoo.json` of a bnzoo SavedModel, or {} for other SavedModels."""
    metadata_path = os.path.join(os.fspath(path), METADATA_PATH)
    if not os.path.isfile(metadata_path):
        return {}
    with open(metadata_path, encoding="utf-8") as stream:
        return json.load(stream)
