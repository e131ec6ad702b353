"""Starting a training run from pretrained weights (`--weights`) and freezing its backbone
(`--freeze-backbone`).

The training model always keeps `train.py`'s own classifier, sized for the dataset's classes;
only the backbone comes from the source, matched layer by layer by name:

- a tag (`imagenet`) or a file the builder converts (`.pth`, legacy `.h5`, a TensorFlow
  checkpoint): a donor is built with `include_top=False, weights=SOURCE` by the model's own
  builder, which checks the architecture against the weights, and its layers are copied. When
  the builder arguments are those of a registered weight set, the model starts with that
  set's input convention (`include_preprocessing=True`: RGB in [0, 255], e.g. Caffe's BGR
  minus the mean) and the input pipeline feeds it raw pixel values, as every export then does;
- a bnzoo `.keras` model (a run's `model.keras` or `checkpoints/*.keras`) or a run folder: loaded
  and copied, every layer but the classifier (copied too when its shape matches); the dataset's
  normalization is kept, unless the source model carries an input convention itself;
- a `.weights.h5` file: loaded into the whole model, so it must come from the same model with
  the same classes (the format records no layer names, only their order).

Freezing follows Keras' rule (`models.freeze_backbone`): a layer with `trainable=False` runs in
inference mode, so its BN layers normalize with and keep their moving statistics, and
Algorithm 2's recomputation (`--bn-statistics population`) leaves them alone too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from bnzoo.cli import UsageError
from bnzoo.config import CONFIG_FILENAME, TrainConfig, weights_is_path
from bnzoo.model_files import load_keras_model, read_keras_config

logger = logging.getLogger(__name__)

#: The classifier: `train.py` sizes it for the dataset, so it is the one layer a source may lack
#: or have in another shape.
CLASSIFIER = "predictions"
#: The class name a `.keras` file records for `models.preprocessing.ImagePreprocessing`.
PREPROCESSING_CLASS = "ImagePreprocessing"

TAG, CONVERTED_FILE, KERAS_MODEL, KERAS_WEIGHTS = "tag", "file", "keras_model", "keras_weights"


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """What `--weights` names.

    Attributes:
        value: the option's value (a tag, or an absolute path).
        kind: `"tag"`, `"file"` (converted by the builder), `"keras_model"` or
            `"keras_weights"`.
        path: the file to read (a run folder's `model.keras`), None for a tag.
    """

    value: str
    kind: str
    path: str | None = None

    @property
    def is_released(self) -> bool:
        """A released weight set (a tag, or its original file) rather than a bnzoo model."""
        return self.kind in (TAG, CONVERTED_FILE)


def weights_source(config: TrainConfig) -> WeightsSource | None:
    """Classify `config.weights` by its spelling; nothing is read."""
    value = config.weights
    if value is None:
        return None
    if not weights_is_path(value):
        return WeightsSource(value, TAG)
    if os.path.isfile(os.path.join(value, CONFIG_FILENAME)):
        return WeightsSource(value, KERAS_MODEL, os.path.join(value, "model.keras"))
    if value.endswith(".keras"):
        return WeightsSource(value, KERAS_MODEL, value)
    if value.endswith(".weights.h5"):
        return WeightsSource(value, KERAS_WEIGHTS, value)
    return WeightsSource(value, CONVERTED_FILE, value)


def check_weights_source(config: TrainConfig) -> None:
    """That a `--weights` path exists and is a file of the kind its name says, at a fresh
    start (a resumed run does not read it), before the dataset is loaded: a text file named
    `x.h5` is called what it is, not found wanting later for another reason.

    Raises:
        UsageError: no such file or folder, or a run folder without its model.keras yet.
        ValueError: a file that is not of its kind (not HDF5, not a PyTorch file, not a
            TensorFlow checkpoint, not a `.keras` archive Keras could have written).
    """
    source = weights_source(config)
    if source is None or source.kind == TAG:
        return
    if source.kind == KERAS_MODEL and source.path != source.value:  # a run folder
        if not os.path.isfile(source.path):
            raise UsageError(
                f"--weights {source.value}: this run folder has no model.keras yet (an unfinished "
                "run); pass one of its checkpoints/*.keras files instead"
            )
    elif not (
        source.kind == CONVERTED_FILE
        and (os.path.exists(source.value + ".index") or os.path.isdir(source.value))
    ) and not os.path.isfile(source.value):  # not a TensorFlow checkpoint's prefix or folder
        raise UsageError(
            f"--weights {source.value}: no such file or folder; pass a bnzoo .keras model or run "
            "folder, a .weights.h5, .pth or TensorFlow checkpoint, or a tag such as imagenet"
        )
    if source.kind == KERAS_MODEL:
        try:
            read_keras_config(source.path)
        except ValueError as error:
            raise ValueError(f"--weights {error}") from None
    elif source.kind == KERAS_WEIGHTS:
        from bnzoo.models.weight_files import check_hdf5_file

        check_hdf5_file(source.path, what="--weights")
    else:
        from bnzoo.models.pretrained import check_local_weights

        check_local_weights(source.value, what="--weights")


def keras_file_has_preprocessing(path: str) -> bool:
    """Whether a `.keras` file's model starts with an `ImagePreprocessing` layer (it then takes
    RGB in [0, 255]); read from the archive's config.json, without building the model."""
    try:
        config = read_keras_config(path)
    except ValueError as error:
        raise ValueError(f"--weights {error}") from None
    return PREPROCESSING_CLASS in json.dumps(config)


def include_preprocessing(
    source: WeightsSource | None, fallback_checkpoint: str | None = None
) -> bool | None:
    """Whether the training model starts with its weights' input convention.

    True for a tag; None ("if these builder arguments have one") for a converted file; for a
    `.keras` source whether that model has one, read from the source or, once the run has
    started and the source is gone, from the run's own checkpoint (the same architecture).
    """
    if source is None or source.kind == KERAS_WEIGHTS:
        return False
    if source.kind == TAG:
        return True
    if source.kind == CONVERTED_FILE:
        return None
    for path in (source.path, fallback_checkpoint):
        if path and os.path.isfile(path):
            return keras_file_has_preprocessing(path)
    raise UsageError(f"--weights {source.value}: no such file (it is read to build the model)")


def has_input_convention(model: Any) -> bool:
    """Whether `model` applies a weight set's preprocessing itself (takes RGB in [0, 255])."""
    from bnzoo.models.preprocessing import ImagePreprocessing

    return any(isinstance(layer, ImagePreprocessing) for layer in model.layers)


def raw_pixel_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) that make `bnzoo.data.preprocess_images` feed pixel values in [0, 255]:
    `(x / 255 - 0) / (1 / 255)`. Recorded in the export metadata, so every export serves a
    model with an input convention raw uint8 images."""
    return (0.0,) * channels, (1.0 / 255.0,) * channels


def check_channels(config: TrainConfig, source: WeightsSource | None, channels: int) -> None:
    """Released weights are RGB.

    Raises:
        UsageError: a dataset of `channels` != 3 images with released weights.
    """
    if source is not None and source.is_released and channels != 3:
        raise UsageError(
            f"--weights {source.value} needs 3-channel (RGB) images, but {config.dataset} has "
            f"{channels}-channel ones; use an RGB dataset, or drop --weights"
        )


# --- Copying the source's weights ---------------------------------------------------------------


def load_source_model(
    config: TrainConfig, source: WeightsSource, architecture: dict[str, Any]
) -> Any | None:
    """The model whose layers the training model copies: built by the builder without its
    classifier for released weights, loaded for a `.keras` source; None for a `.weights.h5`
    file, which loads into the training model itself. Called before the training model is
    built, so that a source that does not fit is reported first.

    Args:
        config: the run.
        source: `weights_source(config)`.
        architecture: the builder arguments of the training model but the head's (`classes`,
            `classifier_activation`) and `include_preprocessing`.

    Raises:
        UsageError: weights that do not fit the model (another architecture, an unknown tag, a
            file the builder cannot read), in one line.
        OSError: a tag whose file is not cached and cannot be downloaded (offline).
    """
    if source.kind == KERAS_WEIGHTS:
        return None
    if source.kind == KERAS_MODEL:
        return _load_keras_model(source)
    return _build_donor(config, source, architecture)


def initialize_from_source(
    model: Any,
    source_model: Any | None,
    config: TrainConfig,
    source: WeightsSource,
) -> None:
    """Load the source's weights into the freshly built training `model` (train.py's
    classifier, the dataset's classes), with one progress line.

    Raises:
        UsageError: not the same architecture, in one line.
    """
    if source_model is None:
        _load_weights_file(model, source, config)
        logger.info(f"initialized every layer of {model.name} from {source.value}")
        return
    if source.kind == KERAS_MODEL:
        origin = source.path
    elif source.kind == TAG:
        origin = f"{config.model} weights {source.value!r}"
    else:
        origin = source.value
    copied, classifier_copied = copy_weights_by_name(model, source_model, source.value)
    head = (
        f"the classifier ({CLASSIFIER}) too"
        if classifier_copied
        else f"the classifier ({CLASSIFIER}, {model.get_layer(CLASSIFIER).units} classes) "
        "starts random"
    )
    inputs = (
        "; the model takes RGB 0-255 and applies the weights' preprocessing itself"
        if has_input_convention(model)
        else ""
    )
    logger.info(f"initialized {copied} layers of {model.name} from {origin}; {head}{inputs}")


def _build_donor(config: TrainConfig, source: WeightsSource, architecture: dict[str, Any]):
    from bnzoo import models

    try:
        return models.create_model(
            config.model, **architecture, include_top=False, weights=source.value
        )
    except (ValueError, TypeError) as error:
        raise UsageError(f"--weights {source.value}: {' '.join(str(error).split())}") from None


def _load_keras_model(source: WeightsSource):
    try:
        return load_keras_model(source.path)
    except ValueError as error:
        raise UsageError(f"--weights {source.value}: {error}") from None


def _load_weights_file(model: Any, source: WeightsSource, config: TrainConfig) -> None:
    try:
        model.load_weights(source.path)
    except (ValueError, KeyError, OSError) as error:
        raise UsageError(
            f"--weights {source.value}: does not fit {config.model} with "
            f"{model.get_layer(CLASSIFIER).units} classes ({' '.join(str(error).split())[:200]})."
            " A .weights.h5 file records the layers' order, not their names: it loads only "
            "into the same model with the same classes. Pass the .keras model that saved it "
            "(copied layer by layer, with a new classifier) instead"
        ) from None


def copy_weights_by_name(model: Any, source: Any, what: str) -> tuple[int, bool]:
    """Assign `source`'s weights to `model`'s layers of the same name
    (`models.pretrained.assign_layer_weights`, which checks every name and shape before
    assigning anything).

    Every layer of `model` with weights must have a namesake in `source` with variables of
    the same shapes, except the classifier, which is copied only when its shapes match (the
    same classes) and otherwise keeps its fresh initialization.

    Returns:
        (the number of layers copied, whether the classifier was among them).

    Raises:
        UsageError: a layer missing from `source`, of other shapes, or a layer of `source`
            with weights that `model` lacks: not the same architecture.
    """
    import keras

    from bnzoo.models.pretrained import assign_layer_weights

    values = {
        layer.name: {v.name: keras.ops.convert_to_numpy(v) for v in layer.weights}
        for layer in source.layers
        if layer.weights
    }
    targets = {layer.name: layer for layer in model.layers if layer.weights}
    classifier = targets.get(CLASSIFIER)
    classifier_copied = (
        classifier is not None
        and CLASSIFIER in values
        and [tuple(v.shape) for v in classifier.weights]
        == [tuple(a.shape) for a in values[CLASSIFIER].values()]
    )
    if not classifier_copied:
        values.pop(CLASSIFIER, None)
    try:
        assign_layer_weights(model, values, source=what, keep=(CLASSIFIER,))
    except ValueError as error:
        raise UsageError(
            f"--weights {what}: not the same architecture as {model.name} with these options "
            f"({' '.join(str(error).split())}); pass weights of the same --model and "
            "--model-arg values"
        ) from None
    return sum(name in values for name in targets), classifier_copied


# --- Freezing ------------------------------------------------------------------------------------


def freeze(model: Any, config: TrainConfig) -> int:
    """`models.freeze_backbone(model, until=--freeze-until)` with one progress line; returns the
    number of frozen layers with weights.

    Raises:
        UsageError: a `--freeze-until` that is not a layer of the model.
    """
    from bnzoo import models
    from bnzoo.config import close_matches
    from bnzoo.layers import batch_norm_layers

    if not config.freeze_backbone:
        return 0
    if config.freeze_until is not None and config.freeze_until not in {
        layer.name for layer in model.layers
    }:
        raise UsageError(
            f"--freeze-until {config.freeze_until}: {config.model} has no such layer"
            f"{close_matches(config.freeze_until, [layer.name for layer in model.layers])}"
        )
    frozen = models.freeze_backbone(model, until=config.freeze_until)
    trainable = [layer.name for layer in model.layers if layer.trainable_weights]
    batch_norms = sum(1 for layer in batch_norm_layers(model) if not layer.trainable)
    logger.info(
        f"froze {frozen} layers"
        + (f" up to {config.freeze_until}" if config.freeze_until else "")
        + f" ({batch_norms} BN layers in inference mode, their statistics kept); training "
        + (", ".join(trainable) if len(trainable) <= 3 else f"{len(trainable)} layers")
    )
    return frozen
