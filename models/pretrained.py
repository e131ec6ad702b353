"""Pretrained weights: what each model has, where it comes from, and how it is loaded.

This is the one path by which weights reach a zoo model. Each model file declares its weight
sets (`WeightSet`: the tag users pass, such as `"imagenet"`, the variant the weights belong to,
where the file lives, what it was reported to reach, the preprocessing its inputs need) and the
converters of the formats it reads; `models.scaffold` registers them. A builder resolves its
`weights` argument with `resolve_weights` *before* building (so a bad value fails fast, with the
fix in the message) and loads it with `load_weights` after.

`weights` can be:

- `None`: random initialization;
- a tag such as `"imagenet"`: the weight set whose variant has the architecture being built;
  downloaded once with `keras.utils.get_file` into Keras' cache (`~/.keras/models`, or
  `$KERAS_HOME/models`), converted there if the source is not a Keras file;
- a path: a Keras `.weights.h5` file (`model.save_weights`) for every model; for the models
  whose weights are published in them, keras.applications' legacy `.h5` files, a PyTorch
  `.pth`/`.pt` state dict or a TensorFlow checkpoint (prefix, `.index` file or folder).

No PyTorch or TF-slim is needed for any of it: `models.pytorch_checkpoint` reads `.pth` files with
the standard library and NumPy, and `tf.train.load_checkpoint` reads TF checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from .registry import create_model, get_model_spec

#: Seconds a download may stall before it is abandoned (urllib's default is to wait forever).
DOWNLOAD_TIMEOUT = 60.0

#: Converts a source file into `{layer name: {variable name: array}}` for a given model.
Converter = Callable[[str, Any], dict[str, dict[str, np.ndarray]]]

#: Formats `model.load_weights` reads: Keras 3's `.weights.h5`, and Keras 2's HDF5 layout of the
#: files keras.applications publishes.
KERAS_FORMATS = ("keras", "keras_h5")


@dataclasses.dataclass(frozen=True)
class WeightSet:
    """One set of pretrained weights for one model.

    Attributes:
        model: the registered variant the weights belong to (e.g. `"bn_inception_slim"`): its
            arguments build the architecture of the weights.
        tag: what users pass as `weights=` (e.g. `"imagenet"`).
        source_format: `"keras"` (a `.weights.h5` file), `"keras_h5"` (a legacy Keras `.h5`
            file, keras.applications' format), `"pytorch"` (a `.pth` state dict) or
            `"tf_checkpoint"`.
        url: where the file is published.
        file_name: the name it is cached under.
        file_hash: the file's sha256 (64 hex digits) or md5 (32), or a sha256 prefix as in
            PyTorch file names (`bn_inception-52deb4733.pth`); None to skip the check.
        classes: the number of outputs of the released classifier.
        preprocessing: the `models.preprocessing` mode of the inputs the weights expect.
        top1, top5: reported ImageNet validation accuracy (%), single center crop.
        accuracy_source: where `top1`/`top5` are reported.
        description: one line: what the weights are.
        notop_url, notop_file_name, notop_file_hash: a separate file without the classifier, as
            keras.applications publishes, used when `include_top=False`.
        archive_member: when the published file is a `.tar.gz`, the member to read in it.
        builder_arguments: builder arguments the weights need beyond the variant's defaults:
            none for a published set; a narrowed stand-in (tests) sets `width_multiplier`.
    """

    model: str
    tag: str
    source_format: str
    url: str
    file_name: str
    file_hash: str | None
    classes: int
    preprocessing: str
    top1: float | None = None
    top5: float | None = None
    accuracy_source: str = ""
    description: str = ""
    notop_url: str | None = None
    notop_file_name: str | None = None
    notop_file_hash: str | None = None
    archive_member: str | None = None
    builder_arguments: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )


#: Where keras.applications publishes its ImageNet weights.
KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


def keras_applications_weights(
    model: str,
    *,
    folder: str,
    file_stem: str,
    md5: tuple[str, str],
    top1: float,
    top5: float,
    input_size: int,
    preprocessing: str,
    description: str,
) -> WeightSet:
    """The ImageNet weight set keras.applications publishes for a network.

    Its files are `<folder>/<file_stem>_weights_tf_dim_ordering_tf_kernels.h5` and the same
    with `_notop` (for `include_top=False`), Keras 2's HDF5 layout; the same URL, md5 and cache
    entry as keras.applications, so one download serves both.

    Args:
        model: the variant the weights belong to.
        folder, file_stem: where keras.applications puts the files, and their common stem.
        md5: the md5 sums of the file with and without the top.
        top1, top5: ImageNet accuracy reported on keras.io (%).
        input_size: the input size of that report.
        preprocessing: the `models.preprocessing` mode of keras.applications' preprocess_input.
        description: one line.
    """
    top = f"{file_stem}_weights_tf_dim_ordering_tf_kernels.h5"
    notop = f"{file_stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return WeightSet(
        model=model,
        tag="imagenet",
        source_format="keras_h5",
        url=f"{KERAS_APPLICATIONS_URL}{folder}/{top}",
        file_name=top,
        file_hash=md5[0],
        notop_url=f"{KERAS_APPLICATIONS_URL}{folder}/{notop}",
        notop_file_name=notop,
        notop_file_hash=md5[1],
        classes=1000,
        preprocessing=preprocessing,
        top1=top1,
        top5=top5,
        accuracy_source=f"keras.io/api/applications ({input_size} input)",
        description=description,
    )


@dataclasses.dataclass(frozen=True)
class _BuilderWeights:
    """What `register_builder` knows about one builder."""

    architecture: Callable[[Mapping[str, Any]], dict[str, Any]]
    converters: Mapping[str, Converter]


_WEIGHTS: list[WeightSet] = []
_BUILDERS: dict[str, _BuilderWeights] = {}


def _qualified_name(builder: Callable[..., Any]) -> str:
    return f"{builder.__module__}.{builder.__qualname__}"


def register_builder(
    builder: Callable[..., Any],
    *,
    architecture: Callable[[Mapping[str, Any]], dict[str, Any]],
    converters: Mapping[str, Converter] | None = None,
) -> None:
    """Tell the weights path how `builder`'s arguments map to an architecture, and which
    source formats it converts.

    Args:
        builder: a registered builder.
        architecture: maps builder keyword arguments (a variant's defaults, or a call's) to the
            arguments that decide which weights fit, defaults and derived values filled in.
        converters: `{source format: converter}` for files that are not Keras files.
    """
    _BUILDERS[_qualified_name(builder)] = _BuilderWeights(
        architecture, types.MappingProxyType(dict(converters or {}))
    )


def register_weights(weight_set: WeightSet) -> WeightSet:
    """Declare a weight set (replacing one with the same model and tag)."""
    weight_set = dataclasses.replace(
        weight_set, builder_arguments=types.MappingProxyType(dict(weight_set.builder_arguments))
    )
    _WEIGHTS[:] = [
        w for w in _WEIGHTS if (w.model, w.tag) != (weight_set.model, weight_set.tag)
    ] + [weight_set]
    return weight_set


def list_weights(model: str | None = None) -> list[WeightSet]:
    """The registered weight sets, optionally only those of the registry name `model`."""
    return [w for w in _WEIGHTS if model is None or w.model == model]


def get_weights(model: str, tag: str = "imagenet") -> WeightSet:
    """The weight set `tag` of the registry name `model`.

    Raises:
        ValueError: if `model` has no such weights, listing the ones it has.
    """
    for weight_set in _WEIGHTS:
        if weight_set.model == model and weight_set.tag == tag:
            return weight_set
    available = ", ".join(w.tag for w in list_weights(model)) or "none"
    raise ValueError(
        f"{model!r} has no weights {tag!r} (available: {available}). Pass weights=None, or the "
        "path of a weights file saved from the same architecture."
    )


def required_arguments(weight_set: WeightSet) -> dict[str, Any]:
    """The architecture arguments a model needs for `weight_set`: its variant's, resolved."""
    builder = get_model_spec(weight_set.model).builder
    architecture = _BUILDERS[_qualified_name(builder)].architecture
    return architecture(
        {**get_model_spec(weight_set.model).default_kwargs, **weight_set.builder_arguments}
    )


def _weight_sets_of(builder: Callable[..., Any]) -> list[WeightSet]:
    name = _qualified_name(builder)
    return [w for w in _WEIGHTS if _qualified_name(get_model_spec(w.model).builder) == name]


def matching_weights(
    builder: Callable[..., Any], arguments: Mapping[str, Any], ignore: tuple[str, ...] = ()
) -> list[WeightSet]:
    """Weight sets of `builder` whose architecture (but `ignore`) is `arguments`'."""
    return [
        w
        for w in _weight_sets_of(builder)
        if not _mismatches(
            {k: v for k, v in required_arguments(w).items() if k not in ignore}, arguments
        )
    ]


def _mismatches(required: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[str]:
    return [
        f"{key}={arguments.get(key)!r} (the weights need {value!r})"
        for key, value in required.items()
        if key in arguments and not _same(arguments.get(key), value)
    ]


def _same(a: Any, b: Any) -> bool:
    if b == "batch_norm":  # bnzoo's layer or Keras' own: the same weights, the same function
        return a in ("batch_norm", "keras")
    if isinstance(a, float) or isinstance(b, float):
        try:
            return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=0.0))
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and tuple(a) == tuple(b)
    return a == b


# --------------------------------------------------------------------------------------------
# Resolving `weights=` before the model is built.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightsRequest:
    """A validated `weights` argument: a registered weight set, or a local file."""

    weight_set: WeightSet | None = None
    path: str | None = None
    source_format: str = "keras"


def readable_formats(builder: Callable[..., Any]) -> tuple[str, ...]:
    """The formats `builder` loads from a path: `.weights.h5` always, and those its weight
    sets are published in or its converters read."""
    formats = {"keras"} | {w.source_format for w in _weight_sets_of(builder)}
    registered = _BUILDERS.get(_qualified_name(builder))
    formats |= set(registered.converters) if registered else set()
    return tuple(sorted(formats))


_FORMAT_NAMES = {
    "keras": "Keras '.weights.h5' files (model.save_weights)",
    "keras_h5": "legacy Keras '.h5' files (keras.applications')",
    "pytorch": "PyTorch '.pth' state dicts",
    "tf_checkpoint": "TensorFlow checkpoints",
}


def resolve_weights(
    builder: Callable[..., Any],
    weights: str | os.PathLike | None,
    *,
    arguments: Mapping[str, Any],
    include_top: bool,
    classes: int,
    input_channels: int,
    model_name: str,
) -> WeightsRequest | None:
    """Check a builder's `weights` argument and say what to load, before anything is built.

    Args:
        builder: the builder (its weight sets and converters are looked up by it).
        weights: None, a tag (`"imagenet"`) or a path.
        arguments: the builder's architecture arguments, matched against the weight sets'.
        include_top, classes: the classifier being built; a released classifier has a fixed
            number of classes.
        input_channels: channels of the input; pretrained ImageNet weights need 3.
        model_name: for messages.

    Raises:
        ValueError: an unknown tag, arguments no weight set was trained with, a classifier size
            the weights do not have, a file format the builder cannot read.
        FileNotFoundError: a path that does not exist.
    """
    if weights is None:
        return None
    path = os.fspath(weights)
    weight_sets = _weight_sets_of(builder)
    tags = {w.tag for w in weight_sets}
    if path in tags:
        candidates = [w for w in weight_sets if w.tag == path]
        matches = [w for w in candidates if not _mismatches(required_arguments(w), arguments)]
        if not matches:
            closest = min(
                candidates, key=lambda w: len(_mismatches(required_arguments(w), arguments))
            )
            raise ValueError(
                f"weights={path!r} do not fit the arguments given to {model_name}: "
                f"{'; '.join(_mismatches(required_arguments(closest), arguments))}. Build it "
                f"with models.create_model({closest.model!r}, weights={path!r}) or with those "
                "arguments."
            )
        weight_set = matches[0]
        if include_top and classes not in _classes_accepted(weight_set):
            raise ValueError(
                f"weights={path!r} for {weight_set.model} come with a {weight_set.classes}-class "
                f"classifier; received classes={classes}. Pass "
                f"classes={weight_set.classes if weight_set.classes == 1000 else 1000}, or "
                "include_top=False to put your own classifier on the features."
            )
        if input_channels != 3:
            raise ValueError(
                f"weights={path!r} were trained on RGB images; received {input_channels} input "
                "channels. Pass input_shape=(height, width, 3), e.g. by repeating a grayscale "
                "channel three times."
            )
        return WeightsRequest(weight_set=weight_set, source_format=weight_set.source_format)
    if path == "imagenet" or (
        os.path.sep not in path and not os.path.exists(path) and not _looks_like_a_file(path)
    ):
        available = ", ".join(sorted(tags)) or "none"
        raise ValueError(
            f"{model_name} has no pretrained weights {path!r} (available: {available}). Pass "
            "weights=None, or the path of a weights file saved with model.save_weights() "
            "('.weights.h5')."
        )
    source_format, path = _local_format(path)
    readable = readable_formats(builder)
    if source_format not in readable:
        raise ValueError(
            f"weights={path!r}: {model_name} reads "
            f"{', '.join(_FORMAT_NAMES[f] for f in readable)}, not "
            f"{_FORMAT_NAMES[source_format]}. Pass a '.weights.h5' file saved with "
            "model.save_weights() from the same architecture, or None."
        )
    if not os.path.exists(path) and not os.path.exists(path + ".index"):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist. Check the path, or pass weights=None for a "
            "randomly initialized model."
        )
    check_local_weights(path)
    return WeightsRequest(path=path, source_format=source_format)


def _classes_accepted(weight_set: WeightSet) -> tuple[int, ...]:
    # A 1001-class TF-slim classifier (class 0: background) can drop the background logit.
    return (1000, 1001) if weight_set.classes == 1001 else (weight_set.classes,)


def _looks_like_a_file(path: str) -> bool:
    return path.endswith((".h5", ".hdf5", ".pth", ".pt", ".ckpt", ".index", ".keras"))


def check_local_weights(path: str, what: str = "") -> tuple[str, str]:
    """(source format, path) of a local weights file, checked to be a file of that format
    (`models.weight_files`): a text file named `x.h5` is refused here, naming it, not by h5py
    as "file signature not found" once the model is built. `what` names it in messages.

    Raises:
        FileNotFoundError: no such file or checkpoint.
        ValueError: a `.keras` model, an unknown extension, or a file that is not of its format.
    """
    from .weight_files import check_weights_file

    source_format, path = _local_format(path)
    check_weights_file(path, source_format, what)
    return source_format, path


def _local_format(path: str) -> tuple[str, str]:
    """(source format, path) of a local weights file, from its name (and, for checkpoints,
    the files beside it); raises for a whole saved model or a name of no known format."""
    if path.endswith(".keras"):
        raise ValueError(
            f"weights={path!r} is a whole saved model, not a weights file. Load it with "
            "keras.models.load_model(), or save its weights with model.save_weights("
            "'name.weights.h5') and pass that."
        )
    if os.path.isdir(path):
        import tensorflow as tf

        prefix = tf.train.latest_checkpoint(path)
        if prefix is None:
            raise FileNotFoundError(
                f"weights folder {path!r} holds no TensorFlow checkpoint (no 'checkpoint' "
                "file). Pass the checkpoint's prefix, e.g. 'folder/model.ckpt'."
            )
        return "tf_checkpoint", prefix
    if path.endswith(".index"):
        return "tf_checkpoint", path[: -len(".index")]
    if os.path.isfile(path + ".index") or path.endswith(".ckpt"):
        # A V2 checkpoint's prefix, or a V1 single-file checkpoint (TF-slim's 2016 releases).
        return "tf_checkpoint", path
    if path.endswith(".weights.h5"):
        return "keras", path
    if path.endswith((".h5", ".hdf5")):
        return "keras_h5", path
    if path.endswith((".pth", ".pt", ".bin")):
        return "pytorch", path
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist. Check the path, or pass weights=None for a "
            "randomly initialized model."
        )
    raise ValueError(
        f"weights={path!r} is not a weights file bnzoo reads: use a Keras '.weights.h5' (from "
        "model.save_weights) or legacy '.h5' file, a PyTorch '.pth' state dict, or a "
        "TensorFlow checkpoint prefix."
    )


# --------------------------------------------------------------------------------------------
# Loading, once the model is built.
# --------------------------------------------------------------------------------------------


def load_weights(
    model: Any,
    request: WeightsRequest | None,
    *,
    builder: Callable[..., Any],
    include_top: bool,
) -> None:
    """Load what `resolve_weights` resolved into `model` (built by `builder`)."""
    if request is None:
        return
    if request.weight_set is not None:
        path, source_format = fetch_weights(request.weight_set, include_top=include_top)
    else:
        path, source_format = request.path, request.source_format
    if source_format in KERAS_FORMATS:
        _load_keras_file(model, path)
        return
    converter = _BUILDERS[_qualified_name(builder)].converters[source_format]
    try:
        layer_weights = converter(path, model)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"cannot read {source_format} weights from {path!r} into {model.name!r}: {error}"
        ) from error
    assign_layer_weights(model, layer_weights, source=path)


def _load_keras_file(model: Any, path: str) -> None:
    try:
        model.load_weights(path)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(
            f"weights file {path!r} does not match the architecture of {model.name!r} "
            f"({' '.join(str(error).split())[:300]}). Build the model with the same arguments "
            "(classes, widths, normalization, ...) as the model that saved the file."
        ) from error


def assign_layer_weights(
    model: Any,
    layer_weights: Mapping[str, Mapping[str, np.ndarray]],
    *,
    source: str = "",
    keep: tuple[str, ...] = (),
) -> None:
    """Assign `{layer name: {variable name: array}}` to `model`'s layers, by name.

    Every layer of `model` that has weights must be in `layer_weights`, with an array of the
    right shape for each variable, except BN's `gamma`, which becomes 1 when the source trained
    without it (TF-slim, Inception-v3): the same function, and the layers named in `keep`, which
    keep their weights when `layer_weights` has none for them (a new classifier when
    fine-tuning). Entries for the classifier (`predictions`) are ignored when the model has none
    (`include_top=False`).

    Raises:
        ValueError: a missing layer or variable, a shape mismatch or an entry that fits no layer,
            naming it.
    """
    source_text = f" in {source!r}" if source else ""
    model_layers = {layer.name: layer for layer in model.layers if layer.weights}
    unused = set(layer_weights) - set(model_layers) - {"predictions"}
    if unused:
        raise ValueError(
            f"{model.name!r} has no layer for {sorted(unused)[:5]}{source_text}: the "
            "checkpoint is of another architecture."
        )
    assignments = []
    for name, layer in model_layers.items():
        if name not in layer_weights and name in keep:
            continue
        if name not in layer_weights:
            raise ValueError(
                f"layer {name!r} of {model.name!r} has no weights{source_text}: the checkpoint "
                "is of another architecture (check width_multiplier, module_table, stem)."
            )
        values = layer_weights[name]
        extra = set(values) - {variable.name for variable in layer.weights}
        if extra:
            raise ValueError(
                f"layer {name!r} of {model.name!r} has no {sorted(extra)} but the source has"
                f"{source_text} (build it with the source's arguments, e.g. bn_scale=True)."
            )
        for variable in layer.weights:
            value = values.get(variable.name)
            if value is None and variable.name == "gamma":
                value = np.ones(variable.shape, "float32")
            if value is None:
                raise ValueError(f"no {variable.name!r} for layer {name!r}{source_text}.")
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"layer {name!r}: {variable.name} has shape {tuple(variable.shape)} in "
                    f"{model.name!r} but {tuple(value.shape)}{source_text} (check "
                    "width_multiplier and classes)."
                )
            assignments.append((variable, value))
    for variable, value in assignments:
        variable.assign(np.asarray(value, dtype=variable.dtype))


# --------------------------------------------------------------------------------------------
# Downloading and caching.
# --------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """Keras' cache folder for model files: `$KERAS_HOME/models`, else `~/.keras/models`."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def fetch_weights(weight_set: WeightSet, *, include_top: bool = True) -> tuple[str, str]:
    """The local path of `weight_set`'s file and its format, downloading it on first use.

    Keras-format files are returned as downloaded (the same cache entry keras.applications
    uses). Other formats are converted once into a Keras `.weights.h5` file beside them
    (`<cache>/bnzoo/<model>_<tag>.weights.h5`), which later calls load directly.

    Raises:
        OSError: when the file is not cached and cannot be downloaded (offline), with how to
            pass a local copy instead.
        ValueError: when the downloaded file is not the published one (hash mismatch).
    """
    if weight_set.source_format in KERAS_FORMATS:
        if not include_top and weight_set.notop_url:
            return (
                download(
                    weight_set.notop_url,
                    weight_set.notop_file_name,
                    weight_set.notop_file_hash,
                    weight_set=weight_set,
                ),
                "keras",
            )
        return (
            download(
                weight_set.url, weight_set.file_name, weight_set.file_hash, weight_set=weight_set
            ),
            "keras",
        )
    converted = os.path.join(
        cache_dir(), "bnzoo", f"{weight_set.model}_{weight_set.tag}.weights.h5"
    )
    if os.path.isfile(converted):
        return converted, "keras"
    source = download(
        weight_set.url,
        weight_set.file_name,
        weight_set.file_hash,
        weight_set=weight_set,
        extract=weight_set.archive_member is not None,
    )
    if weight_set.archive_member:
        source = os.path.join(source, weight_set.archive_member)
    convert_weights(weight_set.model, source, converted, tag=weight_set.tag)
    return converted, "keras"


def download(
    url: str,
    file_name: str,
    file_hash: str | None,
    *,
    weight_set: WeightSet | None = None,
    extract: bool = False,
) -> str:
    """`keras.utils.get_file` into Keras' model cache, with a one-line error when offline."""
    import keras

    target = os.path.join(cache_dir(), file_name)
    full_hash = file_hash if file_hash and len(file_hash) in (32, 64) else None
    what = f"{weight_set.model} weights {weight_set.tag!r}" if weight_set else file_name
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            path = keras.utils.get_file(
                file_name, url, cache_subdir=_cache_subdir(), file_hash=full_hash, extract=extract
            )
    except Exception as error:  # get_file raises a bare Exception for URL errors
        if isinstance(error, ValueError) and "hash" in str(error):
            raise ValueError(
                f"the {what} downloaded from {url} are not the published file (hash mismatch). "
                f"Download it again, or pass weights='/path/to/{file_name}'."
            ) from error
        reason = " ".join(str(error).split())[:200]
        raise OSError(
            f"cannot download the {what} from {url} ({reason}). Download {file_name} on a "
            f"machine with internet access and pass weights='/path/to/{file_name}', or copy it "
            f"to {target}."
        ) from None
    if file_hash and not full_hash and not extract and not sha256(path).startswith(file_hash):
        os.remove(path)
        raise ValueError(
            f"{path} is not the published {file_name} (its sha256 does not start with "
            f"{file_hash}); it was removed. Download it again, or pass weights='/path/to/file'."
        )
    return path


def _cache_subdir() -> str:
    # An absolute cache_subdir is used as is by get_file, so $KERAS_HOME is honored the same
    # way whatever Keras read from the environment when it was imported.
    return cache_dir()


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def sha256(path: str) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_weights(model: str, source: str, destination: str, *, tag: str = "imagenet") -> str:
    """Convert a source checkpoint into a Keras `.weights.h5` file for the registry name `model`.

    The model is built with the arguments of its weight set `tag` (include_top=True, the
    released number of classes), loaded from `source` and saved with `model.save_weights`,
    written under a temporary name and renamed, so `destination` is complete or absent.
    This is what `python -m models convert` runs.

    Returns:
        `destination`.
    """
    weight_set = get_weights(model, tag)
    if not destination.endswith(".weights.h5"):
        raise ValueError(
            f"destination {destination!r} must end in '.weights.h5' (Keras' weights format)."
        )
    keras_model = create_model(
        model, **weight_set.builder_arguments, classes=weight_set.classes, weights=source
    )
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    temporary = f"{destination[: -len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5"
    try:
        keras_model.save_weights(temporary)
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination
