"""Evaluating a trained classifier: metrics, a terminal table, JSON and a confusion-matrix PNG.

Every artifact is evaluated the same way: as a function from raw uint8 images (exactly as the
dataset delivers them) to logits. For a SavedModel that function is its serving signature; for
a `.keras` model it is `bnzoo.export.serving_function`, the very function the export wraps; for
a `.tflite` model it is the model's `serving_default` signature in LiteRT's interpreter, which
preprocesses inside like the SavedModel. So `evaluate.py runs/<run>/saved_model`,
`evaluate.py runs/<run>/model.keras` and `evaluate.py runs/<run>/model_int8.tflite` measure the
same thing, and `metrics.json` (written by `train.py`) has the same schema as
`evaluate.py --output`.

The metrics (schema of metrics.json)::

    model, dataset, split          what was evaluated
    num_examples                   examples in the split
    loss                           mean cross-entropy of the softmax (no label smoothing)
    accuracy, top5_accuracy        fraction correct; top-5 counts ties at the boundary as in,
                                   like tf.math.in_top_k. Omitted with 5 classes or fewer,
                                   where every prediction is in the top 5
    per_class_accuracy             {class name: recall of that class, null if absent}
    class_names                    in label order
    confusion_matrix               counts, rows = true class, columns = predicted class
    images_per_second              inference throughput (preprocessing + model, no data loading)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bnzoo.atomic_files import atomic_write_text
from bnzoo.config import CONFIG_FILENAME, load_config
from bnzoo.memory import check_inference_fits
from bnzoo.model_files import (
    declared_input_shapes,
    input_values,
    load_keras_model,
    read_keras_config,
)

logger = logging.getLogger(__name__)

TOP_K = 5


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Loss, accuracy, top-5 accuracy, per-class accuracy and the confusion matrix, in NumPy
    float64 from `logits` [N, C] and integer `labels` [N]."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits [N, classes] for {labels.shape[0]} labels, got {logits.shape}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"the model predicts {logits.shape[1]} classes but the dataset has {num_classes} "
            f"({', '.join(class_names[:5])}{', ...' if num_classes > 5 else ''}); evaluate it "
            "on the dataset it was trained on (--dataset)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    count = labels.shape[0]
    if count == 0:
        raise ValueError("the split holds no examples; choose a non-empty --split")

    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(count)
    loss = float(-log_probabilities[rows, labels].mean())
    predictions = logits.argmax(axis=1)
    true_logits = logits[rows, labels]
    rank = (logits > true_logits[:, None]).sum(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = {
        name: (float(confusion[i, i] / support[i]) if support[i] else None)
        for i, name in enumerate(class_names)
    }
    metrics = {
        "num_examples": int(count),
        "loss": loss,
        "accuracy": float((predictions == labels).mean()),
        "top5_accuracy": float((rank < TOP_K).mean()),
        "per_class_accuracy": per_class,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes <= TOP_K:
        del metrics["top5_accuracy"]  # always 1.0: it would only look like a result
    return metrics


def evaluate_classifier(
    classifier: Callable,
    dataset,
    *,
    class_names: Sequence[str],
    batch_size: int = 256,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `classifier` over `dataset` and compute the metrics.

    Args:
        classifier: maps a uint8 image batch to logits, or to a dict with a "logits" entry (a
            serving signature or `bnzoo.export.serving_function`).
        dataset: unbatched `tf.data.Dataset` of (uint8 image, integer label).
        class_names: in label order.
        batch_size: examples per call.
        description: entries put first in the result (model, dataset, split).

    Returns:
        The metrics dict (see the module docstring), plus `images_per_second` measured over
        the classifier calls only, after one untimed warm-up call that absorbs tracing.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")

    def logits_of(images):
        outputs = classifier(images)
        if isinstance(outputs, dict):
            outputs = outputs["logits"]
        return outputs

    if dataset.element_spec[0].shape[:2].is_fully_defined():
        batches = dataset.batch(batch_size)
    else:
        # Images of varying size (an image folder) cannot share a batch tensor; the serving
        # signature takes them as they come, so batch images of equal size together. The
        # metrics do not depend on the order.
        def size_key(image, label):
            shape = tf.shape(image, out_type=tf.int64)
            return shape[0] * 1_000_000 + shape[1]

        batches = dataset.group_by_window(
            size_key, lambda key, window: window.batch(batch_size), window_size=batch_size
        )
    batches = batches.prefetch(tf.data.AUTOTUNE)
    all_logits, all_labels = [], []
    seconds = 0.0
    warmed_up = False
    for images, labels in batches:
        if not warmed_up:
            np.asarray(logits_of(images))
            warmed_up = True
        start = time.perf_counter()
        logits = np.asarray(logits_of(images))
        seconds += time.perf_counter() - start
        all_logits.append(logits)
        all_labels.append(np.asarray(labels))
    if not all_logits:
        raise ValueError("the split holds no examples; choose a non-empty --split")
    metrics = compute_metrics(np.concatenate(all_logits), np.concatenate(all_labels), class_names)
    metrics["images_per_second"] = float(metrics["num_examples"] / max(seconds, 1e-9))
    return {**(description or {}), **metrics}


def save_metrics_json(metrics: dict[str, Any], path: str | os.PathLike) -> str:
    """Write `metrics` as indented JSON, atomically; returns the path."""
    path = os.fspath(path)
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A readable summary: headline metrics, per-class accuracy and the confusion matrix."""
    lines = []
    for key in ("model", "dataset", "split"):
        if metrics.get(key) is not None:
            lines.append(f"{key:<16}{metrics[key]}")
    lines += [
        f"{'examples':<16}{metrics['num_examples']}",
        f"{'loss':<16}{metrics['loss']:.4f}",
        f"{'accuracy':<16}{metrics['accuracy']:.2%}",
    ]
    if "top5_accuracy" in metrics:
        lines.append(f"{'top-5 accuracy':<16}{metrics['top5_accuracy']:.2%}")
    lines += [
        f"{'speed':<16}{metrics['images_per_second']:,.0f} images/s",
        "",
        "per-class accuracy:",
    ]
    names = metrics["class_names"]
    width = max(len(name) for name in names)
    matrix = metrics["confusion_matrix"]
    for index, name in enumerate(names):
        value = metrics["per_class_accuracy"][name]
        shown = "   n/a" if value is None else f"{value:6.1%}"
        count = sum(matrix[index])
        lines.append(f"  {name:<{width}}  {shown}  ({count} example{'' if count == 1 else 's'})")
    if len(names) <= 20:
        # Rows are labelled "index name"; columns by the same index, for want of room.
        cell = max(5, len(str(max(max(row) for row in matrix))) + 1)
        digits = len(str(len(names) - 1))
        label = digits + 1 + width
        lines += [
            "",
            "confusion matrix (rows: true class, columns: predicted class, numbered as the rows):",
        ]
        lines.append("  " + " " * label + "".join(f"{i:>{cell}}" for i in range(len(names))))
        for index, name in enumerate(names):
            row = "".join(f"{count:>{cell}}" for count in matrix[index])
            lines.append(f"  {index:>{digits}} {name:<{width}}{row}")
    return "\n".join(lines)


def save_confusion_matrix_png(metrics: dict[str, Any], path: str | os.PathLike) -> str:
    """The metrics' confusion matrix as a PNG heat map (needs matplotlib)."""
    from bnzoo.plotting import plot_confusion_matrix

    title = " ".join(str(metrics[key]) for key in ("dataset", "split") if metrics.get(key))
    return plot_confusion_matrix(
        metrics["confusion_matrix"],
        metrics["class_names"],
        path,
        title=f"confusion matrix {title}".strip(),
    )


# --- Loading what PATH points at -----------------------------------------------------------------


@dataclasses.dataclass
class ModelSource:
    """What `evaluate.py PATH` found at PATH."""

    kind: str  # "saved_model", "keras" or "tflite"
    model_path: str
    run_dir: str | None
    defaults: dict[str, Any]  # dataset, split, data_dir, manual_dir (from a run or export)
    preprocessing: dict[str, Any] | None  # mean, std, image_size recorded by the export


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb")) or os.path.isfile(
        os.path.join(path, "saved_model.pbtxt")
    )


def _find_run_dir(path: str) -> str | None:
    """The run folder holding `path` (model.keras, saved_model/, checkpoints/x.keras)."""
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(candidate, CONFIG_FILENAME)):
            return candidate
    return None


def locate_model(path: str) -> ModelSource:
    """Classify PATH as a run folder, a SavedModel folder, a `.keras` or a `.tflite` file.

    Raises:
        FileNotFoundError: PATH does not exist.
        ValueError: PATH exists but is none of those (or a run folder without a model yet).
    """
    from bnzoo.export import read_export_metadata
    from bnzoo.export.tflite import is_tflite_file, read_tflite_metadata

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; give a SavedModel folder, a .keras or .tflite file or a run "
            "folder"
        )
    run_dir = None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILENAME)):
        run_dir = path
        if _is_saved_model(os.path.join(path, "saved_model")):
            model_path, kind = os.path.join(path, "saved_model"), "saved_model"
        elif os.path.isfile(os.path.join(path, "model.keras")):
            model_path, kind = os.path.join(path, "model.keras"), "keras"
        else:
            raise ValueError(
                f"run folder {path} has no trained model yet (no saved_model/ or model.keras): "
                "rerun its train.py command to finish it"
            )
    elif os.path.isdir(path):
        if not _is_saved_model(path):
            raise ValueError(
                f"{path} is not a model: expected a SavedModel folder (with saved_model.pb), a "
                ".keras file or a bnzoo run folder (with config.yaml)"
            )
        model_path, kind = path, "saved_model"
        run_dir = _find_run_dir(path)
    elif is_tflite_file(path):
        model_path, kind = path, "tflite"
        run_dir = _find_run_dir(path)
    elif path.endswith(".tflite"):
        raise ValueError(
            f"{path} is not a TFLite model (it lacks the TFL3 file identifier); write one from "
            "a run with python -m bnzoo.export RUN"
        )
    else:
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not a model: expected a .keras file (a zip archive), a .tflite "
                "file, a SavedModel folder or a bnzoo run folder"
            )
        # A crafted archive (a config nested 100,000 deep, a bomb, weights that are not HDF5)
        # is refused here, before TensorFlow is even imported.
        read_keras_config(path)
        model_path, kind = path, "keras"
        run_dir = _find_run_dir(path)

    defaults: dict[str, Any] = {}
    preprocessing = None
    if run_dir is not None:
        config = load_config(run_dir)
        defaults = {
            "dataset": config.dataset,
            "split": config.test_split or "test",
            "data_dir": config.data_dir,
            "manual_dir": config.manual_dir,
            "train_split": config.train_split,
            "train_batch_size": config.batch_size,
        }
        exported = read_export_metadata(os.path.join(run_dir, "saved_model"))
        preprocessing = exported.get("preprocessing")
    if kind in ("saved_model", "tflite"):
        if kind == "saved_model":
            exported = read_export_metadata(model_path)
        else:
            exported = read_tflite_metadata(model_path)
        if exported:
            defaults.setdefault("dataset", exported.get("dataset"))
            defaults.setdefault("split", exported.get("test_split") or "test")
            preprocessing = exported.get("preprocessing")
    return ModelSource(kind, model_path, run_dir, defaults, preprocessing)


def _saved_model_classifier(path: str, image_shape: Sequence[int]) -> Callable:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
    except Exception as error:  # TF raises several unrelated types for unreadable folders
        raise ValueError(f"cannot load SavedModel {path}: {' '.join(str(error).split())}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ValueError(f"SavedModel {path} has no serving_default signature")
    _, inputs = signature.structured_input_signature
    if list(inputs) != ["images"] or "logits" not in signature.structured_outputs:
        raise ValueError(
            f"SavedModel {path} is not a bnzoo classifier export: its serving_default takes "
            f"{sorted(inputs)} and returns {sorted(signature.structured_outputs)}, expected "
            "'images' -> 'logits'"
        )
    expected = tuple(inputs["images"].shape[1:])
    if expected != tuple(image_shape):
        raise ValueError(
            f"SavedModel {path} takes images of shape {expected} but the dataset delivers "
            f"{tuple(image_shape)}; evaluate it on the dataset it was trained on (--dataset)"
        )

    def classify(images):
        return signature(images=images)

    classify.loaded = loaded  # keeps the variables alive as long as the function
    return classify


@dataclasses.dataclass(frozen=True)
class StatisticsRecompute:
    """`evaluate.py --bn-statistics-split`: recompute BN's population statistics (Algorithm 2)
    on training images before scoring a Keras model.

    Attributes:
        split: the split the images come from (of the evaluated dataset).
        batches: how many batches to average over.
        batch_size: images per batch: the training batch size, which is the statistics' m.
        seed: seed of the shuffle that picks the batches.
    """

    split: str
    batches: int = 50
    batch_size: int = 128
    seed: int = 0


def recompute_statistics_on_split(
    model,
    recompute: StatisticsRecompute,
    *,
    dataset: str,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: Sequence[int] | None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> int:
    """Replace `model`'s BN statistics by Algorithm 2's population statistics over batches of
    `recompute.split`, preprocessed as the model was trained (its `mean`, `std`, input size),
    without augmentation. Returns the number of batches averaged (0: the model has no BN)."""
    from bnzoo.data import load_dataset
    from bnzoo.layers import recompute_population_statistics
    from bnzoo.training_data import statistics_batches

    examples, info = load_dataset(
        dataset, split=recompute.split, data_dir=data_dir, manual_dir=manual_dir
    )
    if info.num_examples < recompute.batch_size:
        raise ValueError(
            f"--bn-statistics-split {recompute.split} has {info.num_examples} examples, fewer "
            f"than one batch of {recompute.batch_size}; use a larger split or a smaller "
            "--bn-statistics-batch-size"
        )
    info = dataclasses.replace(info, mean=tuple(mean), std=tuple(std))
    batches = statistics_batches(
        examples,
        info,
        batch_size=recompute.batch_size,
        batches=recompute.batches,
        seed=recompute.seed,
        image_size=image_size,
    )
    return recompute_population_statistics(model, batches)


def _keras_classifier(
    path: str,
    info,
    preprocessing: dict[str, Any] | None,
    recompute: StatisticsRecompute | None = None,
    data_kwargs: dict[str, Any] | None = None,
    batch_size: int = 256,
) -> Callable:
    from bnzoo.export import serving_function

    # The inputs the file declares are checked against memory before Keras builds anything:
    # the serving function resizes every batch to them.
    for shape in declared_input_shapes(read_keras_config(path)):
        if input_values(shape) is not None:
            check_inference_fits(shape[1:], batch_size, path)
    model = load_keras_model(path)
    input_shape = tuple(model.input_shape[1:])
    if len(input_shape) != 3 or input_shape[2] != info.image_shape[2]:
        raise ValueError(
            f"{path} takes inputs of shape {input_shape} but the dataset delivers images of "
            f"shape {tuple(info.image_shape)}; evaluate it on the dataset it was trained on"
        )
    if preprocessing:
        mean, std = preprocessing["mean"], preprocessing["std"]
    else:
        mean, std = info.mean, info.std
    image_size = None if input_shape[:2] == tuple(info.image_shape[:2]) else input_shape[:2]
    if recompute is not None:
        used = recompute_statistics_on_split(
            model,
            recompute,
            dataset=info.name if data_kwargs is None else data_kwargs["dataset"],
            mean=mean,
            std=std,
            image_size=image_size,
            data_dir=None if data_kwargs is None else data_kwargs.get("data_dir"),
            manual_dir=None if data_kwargs is None else data_kwargs.get("manual_dir"),
        )
        if used:
            logger.info(
                f"recomputed BN's population statistics over {used} batches of "
                f"{recompute.batch_size} from {recompute.split}"
            )
    return serving_function(
        model, image_shape=info.image_shape, mean=mean, std=std, image_size=image_size
    )


def keras_model_for_recompute(path: str, source: ModelSource) -> ModelSource:
    """The Keras model whose statistics `--bn-statistics-split` can recompute: the file
    itself, or a run folder's model.keras; anything else is refused, saying why."""
    if source.kind == "keras":
        return source
    is_run_folder = os.path.isfile(os.path.join(path, CONFIG_FILENAME))
    keras_model = os.path.join(path, "model.keras")
    if is_run_folder and os.path.isfile(keras_model):
        return dataclasses.replace(source, kind="keras", model_path=keras_model)
    raise ValueError(
        f"--bn-statistics-split needs a .keras model or a run folder, not the {source.kind} "
        f"{path}: an exported model's BN statistics are constants in its graph, with no "
        "training mode to recompute them in"
    )


def evaluate_path(
    path: str,
    *,
    dataset: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    bn_statistics_split: str | None = None,
    bn_statistics_batches: int = 50,
    bn_statistics_batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate the model at PATH (SavedModel folder, `.keras` or `.tflite` file, run folder).

    The dataset and split default to the run's (its config.yaml, or the export's metadata),
    then to Fashion-MNIST's test split; arguments override them.

    With `bn_statistics_split`, a Keras model's BN statistics are first recomputed as the
    paper's population statistics (Algorithm 2) over `bn_statistics_batches` batches of that
    split, of `bn_statistics_batch_size` images (default: the run's training batch size, else
    128); a run folder is then evaluated through its model.keras. The file is not changed.

    Returns:
        The metrics dict (module docstring).
    """
    from bnzoo.data import load_dataset

    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")
    source = locate_model(path)
    dataset = dataset or source.defaults.get("dataset") or "fashion_mnist"
    split = split or source.defaults.get("split") or "test"
    if data_dir is None:
        data_dir = source.defaults.get("data_dir")
    if manual_dir is None:
        manual_dir = source.defaults.get("manual_dir")
    recompute = None
    if bn_statistics_split is not None:
        source = keras_model_for_recompute(path, source)
        recompute = StatisticsRecompute(
            bn_statistics_split,
            batches=bn_statistics_batches,
            batch_size=bn_statistics_batch_size or source.defaults.get("train_batch_size") or 128,
        )
    examples, info = load_dataset(dataset, split=split, data_dir=data_dir, manual_dir=manual_dir)
    if source.kind == "saved_model":
        classifier = _saved_model_classifier(source.model_path, info.image_shape)
    elif source.kind == "tflite":
        from bnzoo.export.tflite import tflite_serving_function

        classifier = tflite_serving_function(source.model_path, image_shape=info.image_shape)
    else:
        classifier = _keras_classifier(
            source.model_path,
            info,
            source.preprocessing,
            recompute,
            {"dataset": dataset, "data_dir": data_dir, "manual_dir": manual_dir},
            batch_size=batch_size,
        )
    import tensorflow as tf

    try:
        return evaluate_classifier(
            classifier,
            examples,
            class_names=info.class_names,
            batch_size=batch_size,
            description={"model": source.model_path, "dataset": dataset, "split": split},
        )
    except tf.errors.ResourceExhaustedError:
        # A SavedModel's graph is opaque: what it allocates is known only when it runs.
        raise ValueError(
            f"{source.model_path} ran out of memory on batches of {batch_size}; use a smaller "
            "--batch-size, or a machine with more memory"
        ) from None
