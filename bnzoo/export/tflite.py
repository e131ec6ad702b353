"""TFLite models with the SavedModel's contract: raw uint8 images in, preprocessing inside.

A phone app or microcontroller has the camera's pixels, not bnzoo's normalization constants, so
the TFLite model takes what the SavedModel takes and runs the same graph: its `serving_default`
signature has one input, `images` (uint8 `[batch, height, width, channels]` as the dataset
delivers them; the batch is resizable, 0 included), and returns `probabilities` and `logits`
(float32 `[batch, classes]`) and `classes` (int64 `[batch]`). Scaling by the dataset's mean and
std and padding or resizing run inside it, converted from the same `bnzoo.data.preprocess_images`
ops, and BN is folded into the convolutions by the converter.

Two variants, both converted by TensorFlow's own `tf.lite.TFLiteConverter` from the serving
SavedModel (`bnzoo.export.export_serving_model`):

- float32: the model as trained (a mixed-precision model is computed in float32: TFLite has no
  bfloat16 kernels).
- int8: post-training quantization of every weight and activation, calibrated on training
  images. Because preprocessing is part of the graph, the calibration images are raw uint8
  training images and every tensor's range is measured exactly where training saw it. The input
  stays raw uint8 pixels and the outputs float32, so the int8 model is a drop-in replacement;
  inside, everything from the first normalization op to the logits is int8.

Each file carries bnzoo's description (dataset, class names, preprocessing, quantization) as a
`bnzoo` metadata entry of the flatbuffer, so an app can read its labels from the model file
(`read_tflite_metadata`) and `evaluate.py model.tflite` knows what to evaluate it on.

The interpreter is LiteRT's (`ai_edge_litert`), which replaces the deprecated
`tf.lite.Interpreter`::

    from ai_edge_litert.interpreter import Interpreter

    serve = Interpreter(model_path="runs/<run>/model_int8.tflite").get_signature_runner()
    outputs = serve(images=images)  # uint8 [batch, 28, 28, 1]
    outputs["classes"], outputs["probabilities"]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bnzoo.atomic_files import atomic_write_bytes
from bnzoo.export.saved_model import (
    INPUT_NAME,
    SIGNATURE_NAME,
    check_export_metadata,
    interface_description,
)

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

#: Name of the flatbuffer metadata entry holding bnzoo's JSON description.
METADATA_NAME = "bnzoo"
#: A TFLite flatbuffer carries this file identifier at bytes 4-8.
FILE_IDENTIFIER = b"TFL3"
QUANTIZATIONS = ("float32", "int8")


def convert_to_tflite(
    model: keras.Model,
    *,
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    image_size: Sequence[int] | None = None,
    quantization: str = "float32",
    calibration_images: Iterable[np.ndarray] | None = None,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The TFLite flatbuffer of `model` behind bnzoo's preprocessing (see the module docstring).

    Args:
        model: maps preprocessed images to logits (a trained bnzoo model, e.g. `model.keras`).
        image_shape, mean, std, image_size: the preprocessing, as for
            `bnzoo.export.serving_function`.
        quantization: "float32" or "int8".
        calibration_images: for "int8": batches of raw uint8 images `[n, *image_shape]` from
            the training split (a few hundred to a thousand images in all). The iterable is
            read once.
        metadata: extra facts stored with the preprocessing in the `bnzoo` metadata entry.

    Returns:
        The flatbuffer's bytes.

    Raises:
        ValueError: an unknown quantization, "int8" without calibration images, or a Keras
            backend other than TensorFlow (the converter reads TensorFlow graphs; a `.keras`
            file from any backend loads on TensorFlow).

    Example:

    ```python
    blob = bnzoo.export.tflite.convert_to_tflite(
        model, image_shape=(28, 28, 1), mean=(0.286,), std=(0.353,)
    )
    ```
    """
    import keras

    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}"
        )
    if quantization == "int8" and calibration_images is None:
        raise ValueError("int8 quantization needs calibration_images (raw uint8 training images)")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"TFLite conversion needs the tensorflow Keras backend, not "
            f"{keras.backend.backend()!r}: run it with KERAS_BACKEND=tensorflow (model.keras "
            "files load on any backend)"
        )
    import tensorflow as tf

    from bnzoo.export.saved_model import export_serving_model

    with tempfile.TemporaryDirectory(prefix="bnzoo-tflite-") as folder:
        saved_model = os.path.join(folder, "saved_model")
        export_serving_model(
            float32_copy(model),
            saved_model,
            image_shape=image_shape,
            mean=mean,
            std=std,
            image_size=image_size,
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model, signature_keys=[SIGNATURE_NAME]
        )
        if quantization == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = _representative_dataset(calibration_images)
        with warnings.catch_warnings(), native_stderr_captured():
            # The calibrator runs TensorFlow's own (deprecated) interpreter internally.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            blob = converter.convert()

    description = {
        **interface_description(image_shape, mean, std, image_size),
        "quantization": quantization,
        "tensorflow_version": tf.__version__,
        **(metadata or {}),
    }
    return add_metadata(blob, description)


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` itself, or for a mixed-precision model a float32 copy with the same weights.

    TFLite has no bfloat16 kernels and converts float16 compute back to float32 anyway; a copy
    whose layers compute in float32 converts to a plain float32 graph, which int8 quantization
    then calibrates.
    """

    def to_float32(value):
        if isinstance(value, dict):
            if value.get("class_name") == "DTypePolicy":
                return {**value, "config": {**value["config"], "name": "float32"}}
            return {key: to_float32(item) for key, item in value.items()}
        if isinstance(value, list):
            return [to_float32(item) for item in value]
        return value

    config = model.get_config()
    float32_config = to_float32(config)
    if float32_config == config:
        return model
    copy = type(model).from_config(float32_config)
    copy.set_weights(model.get_weights())
    return copy


def _representative_dataset(batches: Iterable[np.ndarray]) -> Callable[[], Iterator[dict]]:
    def representative_dataset():
        for images in batches:
            images = np.asarray(images)
            if images.dtype != np.uint8:
                raise ValueError(
                    f"calibration images must be raw uint8 pixels, got {images.dtype}; the "
                    "model normalizes them itself"
                )
            yield {INPUT_NAME: images}

    return representative_dataset


def export_tflite(model: keras.Model, path: str | os.PathLike, **kwargs: Any) -> str:
    """`convert_to_tflite(model, **kwargs)` written atomically to `path`; returns `path`."""
    blob = convert_to_tflite(model, **kwargs)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, blob)
    return path


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[None]:
    """Keep the converter's and interpreter's C++ logging ("fully_quantize: 0, ...", "Created
    TensorFlow Lite XNNPACK delegate") off the terminal, where a CLI prints one line per
    result; if the block fails, the captured text is added to the error's message."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except Exception as error:
            os.dup2(saved, 2)
            capture.seek(0)
            logged = " ".join(capture.read().decode(errors="replace").split())
            if logged and error.args and isinstance(error.args[0], str):
                error.args = (f"{error.args[0]} ({logged[-500:]})", *error.args[1:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --- The flatbuffer's metadata -------------------------------------------------------------------


def _schema():
    """TFLite's flatbuffer schema (generated Python), from LiteRT or else from TensorFlow."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def add_metadata(blob: bytes, description: dict[str, Any]) -> bytes:
    """`blob` with `description` as JSON in its `bnzoo` metadata entry (replacing an old one).

    Metadata entries are named buffers that interpreters ignore; TFLite Support's labels live
    in the same place.
    """
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    model.metadata = [entry for entry in model.metadata or [] if entry.name != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(description).encode("utf-8"), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(blob) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def is_tflite_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts like a TFLite flatbuffer."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as stream:
        return stream.read(8)[4:8] == FILE_IDENTIFIER


def read_tflite_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `bnzoo` metadata of a TFLite file, or {} for other TFLite models.

    Raises:
        ValueError: `path` is not a readable TFLite flatbuffer.
    """
    path = os.fspath(path)
    with open(path, "rb") as stream:
        blob = stream.read()
    if blob[4:8] != FILE_IDENTIFIER:
        raise ValueError(
            f"{path} is not a TFLite model (no {FILE_IDENTIFIER.decode()} file identifier); "
            "write one with python -m bnzoo.export RUN"
        )
    try:
        model = _schema().Model.GetRootAs(blob, 0)
        for index in range(model.MetadataLength()):
            entry = model.Metadata(index)
            if entry.Name() == METADATA_NAME.encode():
                data = model.Buffers(entry.Buffer()).DataAsNumpy()
                description = json.loads(bytes(data).decode("utf-8"))
                break
        else:
            return {}
    except Exception as error:  # a damaged flatbuffer fails in struct, flatbuffers or json
        raise ValueError(
            f"{path} is a damaged TFLite model ({type(error).__name__}: {error}); export it "
            "again with python -m bnzoo.export RUN"
        ) from None
    return check_export_metadata(description, f"{path} ({METADATA_NAME} metadata)")


# --- Serving -------------------------------------------------------------------------------------


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        import tensorflow as tf

        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        Interpreter = tf.lite.Interpreter  # noqa: N806
    return Interpreter


def tflite_serving_function(
    path: str | os.PathLike,
    *,
    image_shape: Sequence[int | None] | None = None,
    num_threads: int | None = None,
) -> Callable:
    """A function from uint8 images to the TFLite model's outputs (NumPy arrays).

    Args:
        path: a `.tflite` file with bnzoo's `serving_default` signature.
        image_shape: the (height, width, channels) the caller will pass; checked against the
            model's input, so a wrong dataset is an error before any image is served.
        num_threads: CPU threads of the interpreter; None for all cores.

    Returns:
        `serve(images) -> {"probabilities", "logits", "classes"}` for any batch size; the
        interpreter is resized when the batch size changes.

    Raises:
        ValueError: `path` is not a TFLite model with bnzoo's signature, or `image_shape` does
            not match its input.
    """
    path = os.fspath(path)
    read_tflite_metadata(path)  # a clear error for files that are not TFLite flatbuffers
    try:
        with native_stderr_captured():
            interpreter = _interpreter_class()(
                model_path=path, num_threads=num_threads or os.cpu_count() or 1
            )
            signatures = interpreter.get_signature_list()
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"cannot load TFLite model {path}: {' '.join(str(error).split())}"
        ) from None
    signature = signatures.get(SIGNATURE_NAME)
    if (
        signature is None
        or signature["inputs"] != [INPUT_NAME]
        or "logits" not in signature.get("outputs", [])
    ):
        raise ValueError(
            f"TFLite model {path} is not a bnzoo classifier export: expected a "
            f"{SIGNATURE_NAME} signature taking '{INPUT_NAME}' and returning 'logits', found "
            f"{signatures}"
        )
    runner = interpreter.get_signature_runner(SIGNATURE_NAME)
    details = runner.get_input_details()[INPUT_NAME]
    expected = tuple(int(size) for size in details["shape_signature"][1:])
    if details["dtype"] != np.uint8:
        raise ValueError(f"TFLite model {path} takes {details['dtype']} images, not uint8")
    if image_shape is not None:
        given = tuple(-1 if size is None else int(size) for size in image_shape)
        if given != expected:
            raise ValueError(
                f"TFLite model {path} takes images of shape {expected} but the dataset delivers "
                f"{tuple(image_shape)}; evaluate it on the dataset it was trained on (--dataset)"
            )

    def serve(images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images of shape [batch, {', '.join(map(str, expected))}], got "
                f"{images.dtype} {list(images.shape)}"
            )
        if serve.delegate_logged:
            return runner(**{INPUT_NAME: images})
        # The first call applies the XNNPACK delegate, which logs a line on stderr.
        with native_stderr_captured():
            outputs = runner(**{INPUT_NAME: images})
        serve.delegate_logged = True
        return outputs

    serve.delegate_logged = False
    serve.interpreter = interpreter  # keeps the interpreter alive as long as the function
    return serve


# --- From a run folder ---------------------------------------------------------------------------


def calibration_batches(
    dataset, count: int, *, batch_size: int = 50, seed: int = 0
) -> Iterator[np.ndarray]:
    """`count` raw images drawn at random from `dataset` (unbatched (uint8 image, label)), in
    batches of `batch_size`: the int8 calibration set."""
    import tensorflow as tf

    shuffled = dataset.shuffle(max(10 * count, 10_000), seed=seed, reshuffle_each_iteration=False)
    batches = shuffled.take(count).map(lambda image, label: image).batch(batch_size)
    for images in batches.prefetch(tf.data.AUTOTUNE):
        yield images.numpy()


def read_run(run_dir: str | os.PathLike):
    """A finished run's `TrainConfig` and its SavedModel's metadata (without TensorFlow, so the
    command line refuses a wrong folder at once).

    Raises:
        FileNotFoundError / ValueError: not a run folder, or a run without a trained model yet.
    """
    from bnzoo.config import load_config
    from bnzoo.export.saved_model import read_export_metadata
    from bnzoo.run_folder import RunPaths

    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist; give a bnzoo run folder")
    config = load_config(run_dir)
    paths = RunPaths(run_dir)
    exported = read_export_metadata(paths.saved_model)
    if not os.path.isfile(paths.model) or not exported:
        raise ValueError(
            f"run folder {run_dir} has no trained model yet (model.keras and saved_model/): "
            "rerun its train.py command to finish it"
        )
    return config, exported


def export_run(
    run_dir: str | os.PathLike,
    *,
    int8: bool = True,
    calibration_images: int = 1000,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> list[str]:
    """Write `model.tflite` (and `model_int8.tflite`) into a finished run folder.

    The model is the run's `model.keras`; the preprocessing is the one its SavedModel records
    (`saved_model/assets.extra/bnzoo.json`), so the TFLite files serve what the SavedModel
    serves. Calibration images are drawn from the run's training split with the run's seed.

    Returns:
        The paths written.

    Raises:
        FileNotFoundError / ValueError: not a run folder, an unfinished run, missing data.
    """
    import keras

    from bnzoo import layers  # noqa: F401  (registers bnzoo's layers for loading model.keras)
    from bnzoo.data import load_dataset
    from bnzoo.run_folder import RunPaths, locked_run_folder

    if calibration_images < 1:
        raise ValueError(f"--calibration-images must be positive, got {calibration_images}")
    run_dir = os.fspath(run_dir)
    config, exported = read_run(run_dir)
    paths = RunPaths(run_dir)
    preprocessing = exported["preprocessing"]
    kwargs = {
        "image_shape": exported["input"]["shape"][1:],
        "mean": preprocessing["mean"],
        "std": preprocessing["std"],
        "image_size": preprocessing["image_size"],
    }
    description = {
        key: exported[key]
        for key in ("dataset", "class_names", "test_split", "model")
        if key in exported
    }
    if int8:  # missing data is an error before any file is written
        train_ds, train_info = load_dataset(
            config.dataset,
            split=config.train_split,
            data_dir=data_dir or config.data_dir,
            manual_dir=manual_dir or config.manual_dir,
        )
        count = min(calibration_images, train_info.num_examples)

    written = []
    # train.py holds this lock while it trains and replaces model.keras: a run in progress is
    # refused rather than exported from a model about to change.
    with locked_run_folder(paths):
        model = keras.models.load_model(paths.model, compile=False)
        path = export_tflite(model, paths.tflite_model, **kwargs, metadata=description)
        logger.info(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, float32)")
        written.append(path)
        if int8:
            calibration = {"images": count, "split": config.train_split, "seed": config.seed}
            path = export_tflite(
                model,
                paths.tflite_int8_model,
                **kwargs,
                quantization="int8",
                calibration_images=calibration_batches(train_ds, count, seed=config.seed),
                metadata={**description, "calibration": calibration},
            )
            logger.info(
                f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, int8, calibrated on {count} "
                f"images of {config.dataset} {config.train_split})"
            )
            written.append(path)
    return written
