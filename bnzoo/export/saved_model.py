"""The serving SavedModel: raw images in, probabilities out, preprocessing inside the graph.

A model is trained on `preprocess_images(uint8 images)` (scaling by the dataset's mean and std,
then padding or resizing to the model's input). Serving code should not have to know any of
that, so the exported signature takes the images exactly as the dataset delivers them and runs
the *same* `bnzoo.data.preprocess_images` ops in the graph; serving therefore equals training by
construction, not by a reimplementation that could drift.

The SavedModel is plain TensorFlow, whichever backend trained the model: loading it needs
neither bnzoo nor Keras custom objects::

    import tensorflow as tf

    loaded = tf.saved_model.load("runs/<run>/saved_model")
    outputs = loaded.serving_default(images)  # uint8 [batch, 28, 28, 1], NumPy or tensor
    outputs["probabilities"], outputs["logits"], outputs["classes"]

Keep `loaded` referenced while serving: the function does not own the variables, and they are
freed with the object (`tf.saved_model.load(path).serving_default` alone fails when called).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from bnzoo.atomic_files import replaced_atomically

if TYPE_CHECKING:
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

    It is the exported endpoint itself, so evaluating a Keras model through it measures what
    the SavedModel will serve, on either backend: on TensorFlow it calls the model; on JAX it
    calls the model's `jax2tf` conversion (Keras' `ExportArchive`), a TensorFlow function that
    runs the same computation as a serialized StableHLO module (`XlaCallModule`).

    The function is traced once, for uint8 `[None, *image_shape]`, and has no `input_signature`:
    a loaded SavedModel then dispatches a call on its traced types, so a NumPy array or tensor
    of another dtype matches nothing and is refused. With an `input_signature`, TensorFlow would
    first cast NumPy arrays to uint8 (0.5 -> 0, 300 -> 44) and serve a wrong answer.

    Args:
        model: a Keras model that maps preprocessed images to logits.
        image_shape: (height, width, channels) of the raw images, as the dataset delivers them.
        mean, std: per-channel statistics in [0, 1] pixel units (`DatasetInfo.mean`/`.std`).
        image_size: the model's (height, width) when it differs from the images' (padding or
            resizing happens in the graph); None to keep the images' size.

    Returns:
        A function `f(images) -> {"probabilities", "logits", "classes"}` with float32
        probabilities and logits `[batch, classes]` and int64 classes `[batch]`, for any batch
        size including 0.

    Raises:
        ValueError: a malformed `image_shape`, or a backend other than TensorFlow and JAX.
    """
    import tensorflow as tf

    from bnzoo.data import preprocess_images

    image_shape = _check_image_shape(image_shape)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    image_size = None if image_size is None else tuple(int(size) for size in image_size)
    logits_of = _inference_function(model)

    def serve(images):
        # A signature call does not check shapes: a 32x32 image would flow through a
        # size-agnostic model and give a silently wrong answer. ensure_shape refuses it.
        images = tf.ensure_shape(images, [None, *image_shape])
        # Convolution kernels (oneDNN, XNNPACK) and jax2tf's shape polymorphism (dimensions are
        # >= 1) cannot take an empty batch. A black image stands in for it and is sliced off
        # the outputs; any other batch gets zero extra rows, so the model's graph (and
        # Grappler's Conv2D+BN+ReLU fusion) is unchanged, with no control flow around it.
        batch = tf.shape(images)[0]
        empty = tf.cast(tf.equal(batch, 0), tf.int32)
        images = tf.concat([images, _black_images(images, empty)], axis=0)
        inputs = preprocess_images(images, mean=mean, std=std, image_size=image_size)
        # Under a mixed-precision policy the logits are float16/bfloat16; serving returns float32.
        logits = tf.cast(logits_of(inputs), tf.float32)[:batch]
        return {
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "logits": logits,
            "classes": tf.argmax(logits, axis=-1),
        }

    serve = tf.function(serve, autograph=False)
    serve.get_concrete_function(tf.TensorSpec([None, *image_shape], tf.uint8, name=INPUT_NAME))
    return serve


def _black_images(images, count):
    """`count` (0 or 1) black images shaped like `images`, as a constant sliced to `count` when
    the image size is known: TFLite's int8 calibration corrupts memory on the BROADCAST_TO that
    a dynamically shaped `tf.zeros` becomes (TensorFlow 2.21), and has no uint8 Pad."""
    import tensorflow as tf

    if images.shape[1:].is_fully_defined():
        return tf.zeros([1, *images.shape[1:]], images.dtype)[:count]
    return tf.zeros(tf.concat([[count], tf.shape(images)[1:]], axis=0), images.dtype)


def _check_image_shape(image_shape: Sequence[int | None]) -> tuple[int | None, ...]:
    # Height and width may be None for datasets whose images vary in size (image folders); the
    # graph then pads or resizes whatever arrives to `image_size`.
    image_shape = tuple(None if size is None else int(size) for size in image_shape)
    if len(image_shape) != 3 or image_shape[2] is None:
        raise ValueError(
            f"image_shape must be (height, width, channels) with known channels, got "
            f"{image_shape!r}"
        )
    return image_shape


def _inference_function(model: keras.Model) -> Callable:
    """`inputs -> logits` as TensorFlow code, whatever the backend trained `model`."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        return lambda inputs: model(inputs, training=False)
    if backend != "jax":
        raise ValueError(
            f"exporting a SavedModel needs the tensorflow or jax backend, not {backend!r}; set "
            "KERAS_BACKEND=tensorflow (model.keras files load on any backend)"
        )
    import tensorflow as tf

    # Keras' JAX export path: ExportArchive converts the model with jax2tf, holding its
    # weights as tf.Variables that the serving function captures (and the SavedModel saves).
    converter = keras.export.ExportArchive()
    converter.track(model)
    input_shape = tuple(model.inputs[0].shape[1:])

    def logits(inputs):
        return model(inputs, training=False)

    return converter.add_endpoint(
        "logits",
        logits,
        input_signature=[tf.TensorSpec([None, *input_shape], model.inputs[0].dtype)],
        jax2tf_kwargs={
            # Serving needs no gradient; without one, loading registers no custom gradient
            # (which TensorFlow would warn about on every load).
            "with_gradient": False,
            # Lowered for both, so the SavedModel serves on CPU and GPU whichever JAX used.
            "native_serialization_platforms": ("cpu", "cuda"),
        },
    )


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
    """Export `model` as a SavedModel whose `serving_default` takes raw uint8 images.

    `serving_default` has one input, `images`: uint8 `[batch, height, width, channels]` with the
    dataset's own height, width and channels and any batch size (0 included). It returns
    `probabilities` (softmax), `logits` and `classes` (argmax). It exists twice in the
    SavedModel, and both refuse what they cannot read instead of serving a wrong answer:

    - the loaded object's attribute, `loaded.serving_default(images)` (which
      `keras.layers.TFSMLayer` calls): any input that is not uint8 of the right rank and image
      size, whether a tensor, a NumPy array or a list of floats, matches no traced function and
      raises ValueError;
    - the signature, `loaded.signatures["serving_default"](images=...)`, what TF Serving and C++
      see: a tensor of another dtype, rank or image size is an InvalidArgumentError. NumPy arrays
      and lists, however, are cast to uint8 by TensorFlow's Python binding *before* the graph
      runs (`tf.TensorSpec.cast`: 0.5 becomes 0, 300 becomes 44), which no exported graph can
      detect; from Python, call the attribute, or pass the signature a `tf.Tensor`.

    On the JAX backend the model runs as its `jax2tf` conversion (see `serving_function`); the
    SavedModel has the same signature and loads with TensorFlow alone.

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
    import keras
    import tensorflow as tf

    path = os.fspath(path)
    image_shape = _check_image_shape(image_shape)
    serve = serving_function(
        model, image_shape=image_shape, mean=mean, std=std, image_size=image_size
    )
    archive = keras.export.ExportArchive()
    if keras.backend.backend() == "tensorflow":
        archive.track(model)
    # On JAX the weights are the tf.Variables of the jax2tf conversion, which `serve` captures;
    # tracking the model too would save a second copy of every weight.
    archive.add_endpoint(SIGNATURE_NAME, serve)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A folder is moved over the previous export in two renames; a kill between them leaves no
    # `path`, which `train.py` treats as "export again", never as a valid half-export.
    with replaced_atomically(path, folder=True) as tmp:
        archive.write_out(tmp, verbose=False)
        description = {
            **interface_description(image_shape, mean, std, image_size),
            "tensorflow_version": tf.__version__,
            "keras_backend": keras.backend.backend(),
            **(metadata or {}),
        }
        # Inside the folder just made for this export (exclusively): no other file to protect.
        os.makedirs(os.path.join(tmp, os.path.dirname(METADATA_PATH)), exist_ok=True)
        with open(os.path.join(tmp, METADATA_PATH), "w", encoding="utf-8") as stream:
            json.dump(description, stream, indent=2)
    return path


def interface_description(
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: Sequence[int] | None,
) -> dict[str, Any]:
    """What every export records about its interface (the SavedModel's `bnzoo.json`, the TFLite
    models' metadata): the signature, its uint8 input, its outputs and the preprocessing inside,
    so that `evaluate.py` and serving code read any artifact the same way."""
    return {
        "signature": SIGNATURE_NAME,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, *image_shape]},
        "outputs": ["probabilities", "logits", "classes"],
        "preprocessing": {
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "image_size": None if image_size is None else [int(s) for s in image_size],
        },
    }


#: bnzoo.json is a few hundred bytes (its class names at most a few MB): a larger file is not ours.
MAX_METADATA_BYTES = 16 * 1024 * 1024


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `assets.extra/bnzoo.json` of a bnzoo SavedModel, or {} for other SavedModels.

    Raises:
        ValueError: the file is not a JSON object with the fields `check_export_metadata`
            expects (one line naming the file and the field).
    """
    metadata_path = os.path.join(os.fspath(path), METADATA_PATH)
    if not os.path.isfile(metadata_path):
        return {}
    if os.path.getsize(metadata_path) > MAX_METADATA_BYTES:
        raise ValueError(f"{metadata_path}: larger than a bnzoo export description can be")
    try:
        with open(metadata_path, encoding="utf-8") as stream:
            description = json.load(stream)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise ValueError(
            f"{metadata_path}: not a JSON description of the export ({reason})"
        ) from None
    return check_export_metadata(description, metadata_path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_export_metadata(description: Any, source: str) -> dict[str, Any]:
    """`description` (a parsed bnzoo.json or TFLite `bnzoo` entry) if it has the shape the
    readers rely on: the fields of `interface_description` and the run's facts.

    Raises:
        ValueError: `{source}: ...` naming the field that is missing or of the wrong kind.
    """

    def fail(key: str, expected: str) -> None:
        got = description.get(key) if isinstance(description, dict) else description
        text = repr(got)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise ValueError(
            f"{source}: {key} must be {expected}, got {text}; the export is damaged or not "
            "bnzoo's: export the run again"
        )

    if not isinstance(description, dict):
        fail("the description", "a JSON object")
    for key in ("dataset", "test_split", "model", "signature"):
        if description.get(key) is not None and not isinstance(description[key], str):
            fail(key, "a string")
    class_names = description.get("class_names")
    if class_names is not None and not (
        isinstance(class_names, list) and all(isinstance(name, str) for name in class_names)
    ):
        fail("class_names", "a list of strings")
    model_input = description.get("input")
    if model_input is not None:
        shape = model_input.get("shape") if isinstance(model_input, dict) else None
        if not (
            isinstance(shape, list)
            and len(shape) == 4
            and shape[0] is None
            and all(_is_size(size) or size is None for size in shape[1:3])
            and _is_size(shape[3])
        ):
            fail("input", "{shape: [null, height, width, channels], ...}")
    preprocessing = description.get("preprocessing")
    if preprocessing is not None:
        if not isinstance(preprocessing, dict):
            fail("preprocessing", "a mapping of mean, std and image_size")
        for key in ("mean", "std"):
            values = preprocessing.get(key)
            if not (
                isinstance(values, list)
                and values
                and all(_is_number(value) for value in values)
                and (key == "mean" or all(value > 0 for value in values))
            ):
                fail("preprocessing", f"a mapping whose {key} is a list of numbers")
        image_size = preprocessing.get("image_size")
        if image_size is not None and not (
            isinstance(image_size, list) and len(image_size) == 2 and all(map(_is_size, image_size))
        ):
            fail("preprocessing", "a mapping whose image_size is null or [height, width]")
    return description
