"""`.keras` model files from elsewhere, checked before Keras parses or builds them.

A `.keras` file is a zip archive of `config.json` (the architecture), `metadata.json` and
`model.weights.h5`. `keras.saving.load_model` parses all of config.json with Python's recursive
`json` module, then deserializes and builds every layer it names before it reads a weight, so
a crafted archive can crash it (a config nested 100,000 deep: `RecursionError`), make it read
gigabytes (an HDF5 dataset declaring them in a few kilobytes), or describe a model whose inputs
no machine can evaluate (`declared_input_shapes` lets the caller check them against memory
before anything is built).

`read_keras_config` checks the archive and its config (sizes, depth) without importing
TensorFlow and returns the parsed config; `check_keras_weights` checks the HDF5 weights member;
`load_keras_model` loads the model after both, with Keras' `safe_mode`, which refuses Lambda
layers and other serialized code, and turns any failure into one `ValueError` that names the
file. A `.keras` file is data to Keras in safe mode; a SavedModel is a program
(docs/security.md).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Any

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.weights.h5"
#: The largest config.json read: 16 MiB, fifty times Inception-v3's (313 kB; BN-Inception's is
#: 243 kB). It is parsed into Python objects about ten times its size.
MAX_CONFIG_BYTES = 16 * 2**20
#: How deep config.json may nest: bnzoo's models nest 10-11 levels, each model nested in
#: another adds 3; Keras loads 100 nested models (300 levels) without running out of stack.
MAX_CONFIG_DEPTH = 300
#: How far an archive's members may inflate: Keras stores them uncompressed (1x), so 16x only
#: refuses a zip bomb. Archives under `SMALL_ARCHIVE_BYTES` inflated may inflate as they like.
MAX_ARCHIVE_EXPANSION = 16
SMALL_ARCHIVE_BYTES = 16 * 2**20


def _config_depth(config: Any) -> int:
    """How deep `config` nests (lists and dicts), without recursion."""
    deepest, stack = 0, [(config, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in value if isinstance(item, (dict, list)))
    return deepest


def read_keras_config(path: str) -> dict[str, Any]:
    """The architecture (`config.json`) of the `.keras` file at `path`, after checking that the
    archive is one Keras could have written: its members inflate to no more than
    `MAX_ARCHIVE_EXPANSION` times the archive (Keras stores them uncompressed) and config.json
    is at most `MAX_CONFIG_BYTES` of JSON nested at most `MAX_CONFIG_DEPTH` deep. Reads only
    config.json and imports neither TensorFlow nor Keras (`evaluate.py` calls it first).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not such a file, naming it and the reason.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Keras model {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a .keras model (not a regular file)")
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a .keras model (not a zip archive); save one with model.save()"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if CONFIG_FILENAME not in members:
                raise ValueError(f"{path} is a zip archive but not a .keras model (no config.json)")
            declared = sum(info.file_size for info in members.values())
            if declared > max(SMALL_ARCHIVE_BYTES, MAX_ARCHIVE_EXPANSION * size):
                raise ValueError(
                    f"{path}: its members inflate to {declared:,} bytes from {size:,}: a zip "
                    "bomb, not a file Keras wrote (it stores members uncompressed)"
                )
            info = members[CONFIG_FILENAME]
            if info.file_size > MAX_CONFIG_BYTES:
                raise ValueError(
                    f"{path}: its config.json has {info.file_size:,} bytes, more than the "
                    f"{MAX_CONFIG_BYTES:,} of any model bnzoo loads"
                )
            with archive.open(info) as entry:
                raw = entry.read(MAX_CONFIG_BYTES)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as error:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
        reason = " ".join(str(error).split())
        raise ValueError(f"{path} is a damaged .keras archive ({reason})") from None
    try:
        config = json.loads(raw)
    except RecursionError:
        raise ValueError(
            f"{path}: its config.json nests deeper than Python can parse; not a model Keras wrote"
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: its config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{path}: its config.json does not describe a Keras model")
    depth = _config_depth(config)
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(
            f"{path}: its config.json nests {depth} levels deep, more than the "
            f"{MAX_CONFIG_DEPTH} of any model Keras writes"
        )
    return config


def declared_input_shapes(config: dict[str, Any]) -> list[tuple[int | None, ...]]:
    """The input shapes (batch dimension first) a `.keras` config declares for its model: the
    `batch_shape` of the top-level InputLayers, or the `build_config` of a model built
    without one. Shapes that are not lists of integers and None are left out."""
    candidates = []
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("class_name") == "InputLayer":
            layer_config = layer.get("config")
            if isinstance(layer_config, dict):
                candidates.append(
                    layer_config.get("batch_shape", layer_config.get("batch_input_shape"))
                )
    build_config = config.get("build_config")
    if isinstance(build_config, dict):
        candidates.append(build_config.get("input_shape"))
    return [
        tuple(candidate)
        for candidate in candidates
        if isinstance(candidate, list)
        and all(size is None or (type(size) is int and size >= 0) for size in candidate)
    ]


def input_values(shape: tuple[int | None, ...]) -> int | None:
    """Values per example of a declared input shape, None if a size is unknown."""
    sizes = shape[1:]
    return None if any(size is None for size in sizes) else math.prod(sizes)


def keras_load_reason(error: BaseException, limit: int = 300) -> str:
    """The gist of a Keras deserialization error, which embeds whole layer configs."""
    message = " ".join(str(error).split()) or type(error).__name__
    _, marker, reason = message.partition("Exception encountered: ")
    if marker:
        message = reason.split(" Full object config:")[0]
    return message if len(message) <= limit else message[: limit - 3] + "..."


def check_keras_weights(path: str) -> None:
    """That the `.keras` file's model.weights.h5 is an HDF5 file whose datasets declare no
    more data than it holds (`models.weight_files.check_hdf5_file`): Keras' own guard lets a
    few kilobytes declare up to 4 GiB, which it reads before comparing shapes.

    Raises:
        ValueError: naming the file.
    """
    from bnzoo.models.weight_files import check_hdf5_file

    try:
        with zipfile.ZipFile(path) as archive:
            if WEIGHTS_FILENAME not in archive.namelist():
                return  # Keras says what it expected
            info = archive.getinfo(WEIGHTS_FILENAME)
            with archive.open(info) as entry:
                check_hdf5_file(
                    f"{path}/{WEIGHTS_FILENAME}",
                    what="the weights",
                    file=entry,
                    size=info.file_size,
                )
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{path} is a damaged .keras archive ({reason})") from None


def load_keras_model(path: str) -> Any:
    """`keras.saving.load_model(path, compile=False, safe_mode=True)`, after
    `read_keras_config`'s and `check_keras_weights`' checks, with bnzoo's layers registered.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not a loadable `.keras` model, naming it and the reason (Keras'
            safe mode refusing a Lambda layer is one).
    """
    path = os.fspath(path)
    read_keras_config(path)
    check_keras_weights(path)
    import keras

    # Registers bnzoo's layers and the models' preprocessing layer for deserialization.
    from bnzoo import layers, models  # noqa: F401

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a malformed archive
        raise ValueError(
            f"cannot load {path} as a Keras model: {keras_load_reason(error)}"
        ) from None
