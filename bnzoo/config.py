"""A training run's configuration: its options (each declared once, as a `TrainConfig` field),
recipes, the values derived from them, the command line, and the run folder's `config.yaml`.

A run is described by a `TrainConfig` (big_vision style). Each option is one field carrying its
help, the values it accepts and its command-line group (`bnzoo.options`); the `train.py`
parser, `--config run.yaml` and the checks of a config made in Python are generated from the
fields. Values come in layers, each above the one before:

    the field's default < a recipe (--recipe NAME) < the --config file < the command line

and the layers the user set (the file and the command line) are remembered as the run's
*chosen* options. A few options are *derived* when left unset: the learning rate and weight
decay from the optimizer, the splits from the dataset. They are resolved where the run uses
them (`TrainConfig.resolved`), never stored as if the user had chosen them: the run folder's
`config.yaml` holds the chosen options and, apart under `resolved:`, every value the run used.
So `python train.py --config runs/<run>/config.yaml --optimizer adam` derives Adam's learning
rate afresh, while the folder's identity check compares what the runs really use.

No TensorFlow here: the command line is checked before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bnzoo.atomic_files import atomic_write_text
from bnzoo.cli import EXIT_STATUS_HELP, UsageError
from bnzoo.options import (
    ArgumentParser,
    Choice,
    Interval,
    KeywordArguments,
    Kind,
    Number,
    Optional,
    Problem,
    Switch,
    Text,
    add_options,
    check_values,
    close_matches,
    command_line_values,
    declared_options,
    field_default,
    flag_of,
    option,
    read_yaml_mapping,
    values_from_mapping,
)
from bnzoo.recipes import PAPER_RECIPES, recipe_flags

NORMALIZATIONS = ("batch_norm", "keras", "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "exponential", "cosine")
WEIGHT_DECAY_FORMS = ("decoupled", "l2")
DISTRIBUTE_MODES = ("auto", "none", "data_parallel", "multi_worker")
BN_STATISTICS = ("population", "moving")
RESUME_FROM = ("last", "best")

#: Model keywords that `train.py` sets itself (from the dataset or from a dedicated flag), so a
#: `--model-arg` for them would be silently overridden or contradict the flag.
RESERVED_MODEL_ARGS = {
    "include_top": "train.py always trains the classifier",
    "weights": "use --weights (imagenet, or the PATH of a model or weights file)",
    "include_preprocessing": "--weights decides it: released weights bring their input "
    "convention, bnzoo models keep the dataset's normalization",
    "input_tensor": "train.py builds the input from the dataset",
    "input_shape": "the input shape comes from the dataset; use --image-size to resize or pad",
    "classes": "the number of classes comes from the dataset",
    "classifier_activation": "train.py trains on logits and the export adds the softmax",
    "normalization": "use --normalization",
    "bn_momentum": "use --bn-momentum",
    "bn_epsilon": "use --bn-epsilon",
    "name": "the model is named after --model",
}

#: Per-optimizer defaults for `--lr` and `--weight-decay`. SGD runs at the high rate BN allows;
#: Adam's normalized steps want ~1e-3. Keras' weight decay is decoupled (`w -= lr * wd * w`), so
#: its strength scales with the rate: 5e-4 at lr 0.1 and 0.05 at lr 1e-3 both shrink kernels by
#: 5e-5 per step. Plain Adam gets none, AdamW is Adam with it.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05}

#: `--train-split`/`--val-split`/`--test-split` default: the dataset's own default splits below.
AUTO = "auto"
#: TFDS datasets: 90% of `train` to train on, the other 10% to validate, `test` to test.
TFDS_DEFAULT_SPLITS = ("train[:90%]", "train[90%:]", "test")
#: Image folders are one split, `train`, in a class-stratified order (bnzoo.data.image_folder),
#: so these slices are a seeded, stratified 80/10/10 train/validation/test partition.
IMAGE_FOLDER_DEFAULT_SPLITS = ("train[:80%]", "train[80%:90%]", "train[90%:]")
IMAGE_FOLDER_PREFIX = "image_folder:"

#: `--bn-momentum cumulative`: the layer's `momentum=None`, a cumulative (equal-weight) average
#: of every training step's batch statistics instead of an exponential moving average.
CUMULATIVE = "cumulative"

MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 2**20
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
#: 30 days: a collective that waits longer for a worker is a hung run, not a slow one.
MAX_COLLECTIVE_TIMEOUT = 30 * 24 * 3600.0
MAX_INT32 = 2**31 - 1

#: The command line's groups, in --help order: field group -> title.
GROUPS = {
    "model": "model",
    "data": "data",
    "optimization": "optimization",
    "statistics": "batch normalization's inference statistics",
    "distribution": "distribution",
    "run": "run",
}


def default_splits(dataset: str) -> tuple[str, str, str]:
    """(train, validation, test) splits that `auto` stands for with `dataset`."""
    if dataset.startswith(IMAGE_FOLDER_PREFIX):
        return IMAGE_FOLDER_DEFAULT_SPLITS
    return TFDS_DEFAULT_SPLITS


#: File names that make a `--weights` value a path rather than a tag such as `imagenet`.
WEIGHTS_FILE_SUFFIXES = (".keras", ".h5", ".hdf5", ".pth", ".pt", ".bin", ".ckpt", ".index")


def weights_is_path(weights: str) -> bool:
    """Whether a `--weights` value names a file or folder (else it is a tag: `imagenet`).

    Decided by its spelling, never by what happens to exist in the working directory (an
    ImageNet data folder called `imagenet` must not shadow the tag): a path has a folder
    separator, starts with `~` or `.`, or ends like a weights file.
    """
    return (
        os.sep in weights
        or "/" in weights
        or weights.startswith(("~", "."))
        or weights.lower().endswith(WEIGHTS_FILE_SUFFIXES)
    )


def _absolute_image_folder(dataset: str) -> str:
    """`image_folder:PATH` with PATH absolute, so the saved config names the same folder from
    any working directory."""
    if not dataset.startswith(IMAGE_FOLDER_PREFIX) or dataset == IMAGE_FOLDER_PREFIX:
        return dataset
    path = dataset[len(IMAGE_FOLDER_PREFIX) :]
    return IMAGE_FOLDER_PREFIX + os.path.abspath(os.path.expanduser(path))


# --- Kinds particular to training -----------------------------------------------------------------

_IMAGE_SIZE = re.compile(r"\s*[\[(]?\s*(\d+)\s*(?:[,x]\s*(\d+)\s*)?[\])]?\s*")


class ImageSize(Kind):
    """`32` (square), `32,48` or `32x48` (height, width); a `[32, 48]` list in a file."""

    metavar = "H[,W]"

    def parse(self, text: str) -> tuple[int, int]:
        match = _IMAGE_SIZE.fullmatch(text)
        sizes = [int(size) for size in match.groups() if size is not None] if match else []
        if len(sizes) == 1:
            sizes = sizes * 2
        if len(sizes) != 2 or min(sizes) < 1:
            raise Problem(
                f"expected SIZE or HEIGHT,WIDTH in pixels (e.g. 32 or 32,48), got {text!r}"
            )
        return (sizes[0], sizes[1])

    def check(self, value: Any) -> Problem | None:
        sizes = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if len(sizes) != 2 or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in sizes
        ):
            return Problem(f"must be one or two positive integers (HEIGHT,WIDTH), got {value!r}")
        return None

    def read(self, value: Any) -> tuple[int, int]:
        if isinstance(value, list) and len(value) <= 3:
            return self.parse(",".join(str(item) for item in value))
        if isinstance(value, int) and not isinstance(value, bool):
            return self.parse(str(value))
        return super().read(value)


class BatchNormMomentum(Kind):
    """A moving-average momentum in [0, 1), or `cumulative` (the layer's `momentum=None`)."""

    number = Number(Interval(0, 1, high_open=True))

    def _refused(self, shown: str) -> Problem:
        return Problem(
            f"must be a number in {self.number.interval}, {CUMULATIVE} (the layer's cumulative "
            f"average, momentum=None) or none (the builder's default), got {shown}"
        )

    def parse(self, text: str) -> float | str:
        if text.strip().lower() == CUMULATIVE:
            return CUMULATIVE
        try:
            return self.number.parse(text)
        except Problem:
            raise self._refused(repr(text)) from None

    def check(self, value: Any) -> Problem | None:
        if value == CUMULATIVE:
            return None
        if isinstance(value, str) or self.number.check(value):
            return self._refused(repr(value))
        return None

    def describe_choices(self) -> str:
        return f"{self.number.interval} or {CUMULATIVE}"

    def in_help(self) -> bool:
        return True


# --- Recipes --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named bundle of option values (`--recipe NAME`): above the options' defaults, below
    everything the user sets (config file, command line)."""

    name: str
    description: str
    values: Mapping[str, Any]


#: The registered recipes, by name (`register_recipe`).
RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, **values: Any) -> Recipe:
    """Register a recipe: option values (as `TrainConfig` fields) that `--recipe NAME` applies.

    A recipe says *what* is trained and how, never where or on how many processes: options
    that are not part of a run's identity (locations, `--distribute`, `--overwrite`) are refused.

    Raises:
        ValueError: a name already taken, an unknown option or one a recipe may not set, or a
            value its option refuses.
    """
    if name in RECIPES:
        raise ValueError(f"recipe {name!r} is already registered")
    options = {field.name: declared for field, declared in declared_options(TrainConfig)}
    for key, value in values.items():
        if key not in options:
            raise ValueError(f"recipe {name}: unknown option {key!r}{close_matches(key, options)}")
        if not options[key].identity or key == "recipe":
            raise ValueError(f"recipe {name}: {key} is not something a recipe may set")
        problem = options[key].kind.check(value)
        if problem:
            raise ValueError(f"recipe {name}: {key} {problem}")
    recipe = Recipe(name, description, dict(values))
    RECIPES[name] = recipe
    return recipe


def _recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


# --- The configuration ----------------------------------------------------------------------------


def _lr_default(config: TrainConfig) -> float | None:
    return DEFAULT_LR.get(config.optimizer)


def _weight_decay_default(config: TrainConfig) -> float | None:
    return DEFAULT_WEIGHT_DECAY.get(config.optimizer)


def _split_default(index: int):
    def derive(config: TrainConfig) -> str | None:
        if not isinstance(config.dataset, str):
            return None
        return default_splits(config.dataset)[index]

    return derive


def _per_optimizer(defaults: Mapping[str, float]) -> str:
    return "the optimizer's: " + ", ".join(
        f"{value:g} for {name}" for name, value in defaults.items()
    )


def _split_help(what: str, index: int) -> str:
    return (
        f"{what}; auto = {TFDS_DEFAULT_SPLITS[index]} for TFDS datasets, "
        f"{IMAGE_FOLDER_DEFAULT_SPLITS[index]} for image folders (whose slices are stratified "
        "by class)"
    )


@dataclasses.dataclass(init=False)
class TrainConfig:
    """Everything that defines a training run; `train.py`'s flags map one to one onto fields.

    Each field declares its option once: default, help, accepted values and command-line group
    (`bnzoo.options.option`). The defaults are what `python train.py` trains, chosen as
    docs/training.md#the-default-recipe describes.

    Options are keyword arguments. The ones given are the run's *chosen* options (saved in its
    config.yaml as such); the others take the recipe's value (`recipe=`), else their default.
    Derived options (`lr`, `weight_decay`, the splits) keep their automatic value (None, "auto")
    here and are filled in by `resolved()`, which the run calls.

    Example:

    ```python
    from bnzoo.config import TrainConfig
    from bnzoo.training import train

    config = TrainConfig(train_split="train[:512]", epochs=1, output_dir="runs/smoke")
    result = train(config)
    ```
    """

    # Model.
    model: str = option(
        "plain_cnn_small", "registered model name (python -m models lists them)", group="model"
    )
    model_args: dict[str, Any] = option(
        help="builder keyword override, repeatable; VALUE is a Python/YAML literal "
        "(width=0.5, widths=[32,64]), checked against the builder's signature",
        kind=KeywordArguments(),
        group="model",
        flag="--model-arg",
        default_factory=dict,
    )
    weights: str | None = option(
        None,
        "initialize the backbone from pretrained weights; the classifier (the dataset's "
        "classes) starts random. TAG: a registered weight set such as imagenet (the model "
        "then takes RGB 0-255 and applies the weights' preprocessing itself); PATH: a bnzoo "
        "model.keras, checkpoint or run folder, a .weights.h5 of the same model and classes, "
        "or a file the builder converts (.pth, TF checkpoint). Loaded only at a fresh start",
        kind=Optional(Text(), "the default"),
        group="model",
        metavar="{none,TAG,PATH}",
        default_text="none, random initialization",
    )
    freeze_backbone: bool = option(
        False,
        "with --weights, train only the classifier: the backbone's layers get "
        "trainable=False, so by Keras' rule their BN layers run in inference mode and keep "
        "their statistics",
        kind=Switch(),
        group="model",
    )
    freeze_until: str | None = option(
        None,
        "with --freeze-backbone, freeze only the layers up to and including LAYER (e.g. "
        "inception_4e_output) and fine-tune the later ones",
        kind=Optional(Text(), "the default"),
        group="model",
        metavar="LAYER",
        default_text="none, the whole backbone",
    )
    normalization: str = option(
        "batch_norm",
        "batch_norm: bnzoo's Ioffe & Szegedy layer; keras: keras.layers.BatchNormalization; "
        "none: no normalization (the paper's baseline)",
        kind=Choice(NORMALIZATIONS),
        group="model",
    )
    bn_momentum: float | str | None = option(
        None,
        "moving-average momentum of the BN statistics; cumulative = the average of all "
        "training batches' statistics (the layer's momentum=None)",
        kind=Optional(BatchNormMomentum(), "the builder's default"),
        group="model",
        default_text="none, the builder's",
    )
    bn_epsilon: float | None = option(
        None,
        "epsilon added to the variance",
        kind=Optional(Number(Interval(0, 1, low_open=True)), "the builder's default"),
        group="model",
        default_text="none, the builder's",
    )
    # Data.
    dataset: str = option(
        "fashion_mnist",
        "any TFDS name, or image_folder:/path (one sub-folder per class)",
        group="data",
    )
    train_split: str = option(
        AUTO,
        _split_help("TFDS split syntax", 0),
        group="data",
        automatic=AUTO,
        derive=_split_default(0),
    )
    val_split: str | None = option(
        AUTO,
        _split_help("validation split, for best-checkpoint selection", 1)
        + "; none = no validation",
        kind=Optional(Text(), "no split"),
        group="data",
        automatic=AUTO,
        derive=_split_default(1),
    )
    test_split: str | None = option(
        AUTO,
        _split_help("split evaluated into metrics.json at the end", 2) + "; none = skip",
        kind=Optional(Text(), "no split"),
        group="data",
        automatic=AUTO,
        derive=_split_default(2),
    )
    data_dir: str | None = option(
        None,
        "TFDS data directory",
        kind=Optional(Text(), "the default"),
        group="data",
        identity=False,
        default_text="none, TFDS's ~/tensorflow_datasets",
    )
    manual_dir: str | None = option(
        None,
        "folder with the original IDX files when TFDS cannot download them",
        kind=Optional(Text(), "the default"),
        group="data",
        identity=False,
        default_text="none, /usr/share/datasets/fashion-mnist for Fashion-MNIST",
    )
    image_size: tuple[int, int] | None = option(
        None,
        "model input size; images are padded or resized to it",
        kind=Optional(ImageSize(), "the dataset's size"),
        group="data",
        default_text="none, the dataset's size raised to the model's minimum",
    )
    augment: bool = option(
        False,
        "padded random crop (+ horizontal flip where the dataset allows) while training",
        kind=Switch(),
        group="data",
    )
    horizontal_flip: bool | None = option(
        None,
        "with --augment, mirror half of the training images",
        kind=Switch(automatic=True),
        group="data",
        default_text="the dataset's policy, off for digits, characters and Fashion-MNIST's "
        "aligned product photos",
    )
    shuffle_buffer: int = option(
        10_000,
        "examples in the shuffle buffer",
        kind=Number(Interval(1, MAX_INT32), integer=True),
        group="data",
    )
    # Optimization.
    epochs: int = option(
        13,  # chosen by validation accuracy: docs/training.md#the-default-recipe
        "passes over --train-split; raising it on a finished run trains it further",
        kind=Number(Interval(1, MAX_EPOCHS), integer=True),
        group="optimization",
    )
    batch_size: int = option(
        64,
        "examples per step; the last partial batch is dropped",
        kind=Number(Interval(1, MAX_BATCH_SIZE), integer=True),
        group="optimization",
    )
    optimizer: str = option(
        "sgd",
        "sgd with --momentum, adam, or adamw (decoupled weight decay)",
        kind=Choice(OPTIMIZERS),
        group="optimization",
    )
    lr: float | None = option(
        None,
        "peak learning rate, reached after the warmup",
        kind=Optional(Number(Interval(0, 10, low_open=True)), "the optimizer's default"),
        group="optimization",
        derive=_lr_default,
        default_text=_per_optimizer(DEFAULT_LR),
    )
    momentum: float = option(
        0.9,
        "SGD momentum (sgd only)",
        kind=Number(Interval(0, 1, high_open=True)),
        group="optimization",
    )
    lr_schedule: str = option(
        "cosine",
        "learning-rate decay after the warmup",
        kind=Choice(LR_SCHEDULES),
        group="optimization",
    )
    warmup_epochs: float = option(
        0.5,
        "linear warmup from 0 to --lr over this many epochs (fractions allowed), less than "
        "--epochs",
        kind=Number(Interval(0, MAX_EPOCHS, high_open=True)),
        group="optimization",
    )
    lr_decay_rate: float = option(
        0.9,
        "exponential schedule: learning-rate factor per epoch (per --lr-decay-epochs with those)",
        kind=Number(Interval(0, 1, low_open=True)),
        group="optimization",
    )
    lr_decay_epochs: float | None = option(
        None,
        "exponential schedule as a staircase: the rate drops by --lr-decay-rate once every "
        "this many epochs (fractions allowed), as GoogLeNet's 4% every 8 epochs",
        kind=Optional(Number(Interval(0, MAX_EPOCHS, low_open=True)), "a smooth decay"),
        group="optimization",
        metavar="EPOCHS",
        default_text="none, a smooth decay",
    )
    weight_decay: float | None = option(
        None,
        "weight decay on kernels (see --weight-decay-form), not on biases or BN's gamma and beta",
        kind=Optional(Number(Interval(0, 1, high_open=True)), "the optimizer's default"),
        group="optimization",
        derive=_weight_decay_default,
        default_text=_per_optimizer(DEFAULT_WEIGHT_DECAY),
    )
    weight_decay_form: str = option(
        "decoupled",
        "decoupled: Keras' w -= lr * wd * w after each step; l2: the paper's L2 loss "
        "wd/2 * sum(w**2), whose gradient wd * w goes through momentum (Caffe's weight_decay, "
        "TF-slim's l2_regularizer)",
        kind=Choice(WEIGHT_DECAY_FORMS),
        group="optimization",
    )
    label_smoothing: float = option(
        0.0,
        "mix this much of the uniform distribution into the one-hot training targets",
        kind=Number(Interval(0, 1, high_open=True)),
        group="optimization",
    )
    # Batch Normalization's inference statistics and distribution.
    bn_statistics: str = option(
        "population",
        "what BN normalizes with at inference, in validation and in every saved model: "
        "population = recomputed after each epoch as the paper's Algorithm 2 (mean of batch "
        "means, m/(m-1) x mean of batch variances over training batches, weights frozen); "
        "moving = the moving averages kept during training",
        kind=Choice(BN_STATISTICS),
        group="statistics",
    )
    bn_statistics_batches: int = option(
        50,
        "training batches (of --batch-size, no augmentation) that the population "
        "statistics average over; at most one epoch's worth are used",
        kind=Number(Interval(1, MAX_INT32), integer=True),
        group="statistics",
    )
    sync_bn: bool = option(
        False,
        "BN statistics over the global batch of all replicas (TensorFlow) instead of each "
        "replica's share; JAX's DataParallel always normalizes over the global batch",
        kind=Switch(),
        group="distribution",
    )
    distribute: str = option(
        "auto",
        "none: one device; data_parallel: every local GPU (TensorFlow MirroredStrategy, "
        "JAX keras.distribution.DataParallel); multi_worker: several processes or hosts "
        "running the same command (TF_CONFIG, or KERAS_DISTRIBUTION_* on JAX); auto: "
        "multi_worker when the environment names several workers, data_parallel with several "
        "local GPUs, else none. --batch-size stays the global batch",
        kind=Choice(DISTRIBUTE_MODES),
        group="distribution",
        identity=False,
    )
    collective_timeout: float = option(
        600.0,
        "multi_worker on TensorFlow: a collective operation (gradient all-reduce) that "
        "waits longer than this for a worker fails the run; a killed worker is detected within "
        "about 10 s regardless",
        # Only the host uses it, in float64: no float32 limit.
        kind=Number(Interval(0, MAX_COLLECTIVE_TIMEOUT, low_open=True), host=True),
        group="distribution",
        metavar="SECONDS",
        identity=False,
    )
    # Run.
    recipe: str | None = option(
        None,
        "a named bundle of option values, applied under everything set in --config and on "
        "the command line",
        kind=Optional(Choice(_recipe_names), "no recipe"),
        group="run",
        metavar="NAME",
        identity=False,
    )
    mixed_precision: bool | None = option(
        None,
        "mixed_float16 on a GPU, mixed_bfloat16 on CPU; BN statistics stay in float32",
        kind=Switch(automatic=True),
        group="run",
        default_text="on where the hardware computes it natively: any GPU, a CPU with "
        "AVX512-BF16 or AMX",
    )
    seed: int = option(
        42,
        "global random seed",
        kind=Number(Interval(0, MAX_SEED), integer=True),
        group="run",
    )
    deterministic: bool = option(
        False,
        "TensorFlow op determinism: bit-identical reruns, somewhat slower",
        kind=Switch(),
        group="run",
    )
    output_dir: str | None = option(
        None,
        "run folder; rerunning resumes it",
        kind=Optional(Text(), "the default"),
        group="run",
        identity=False,
        default_text="none, runs/<date>-<model>-<dataset>",
    )
    overwrite: bool = option(
        False,
        "replace the bnzoo run in --output-dir that holds a different run (only its own files "
        "are removed; a folder holding no bnzoo run is never touched)",
        kind=Switch(),
        group="run",
        saved=False,
        identity=False,
    )
    resume_from: str = option(
        "last",
        "the checkpoint a run folder resumes from: last = the newest epoch; best = "
        "checkpoints/best.keras, the epochs after it trained again (the way on when "
        "last.keras is damaged)",
        kind=Choice(RESUME_FROM),
        group="run",
        saved=False,
        identity=False,
    )

    def __init__(self, **values: Any) -> None:
        fields = {field.name: field for field in dataclasses.fields(self)}
        for key in values:
            if key not in fields:
                raise TypeError(
                    f"TrainConfig got an unexpected keyword argument {key!r}"
                    f"{close_matches(key, fields)}"
                )
        recipe = (
            RECIPES.get(values.get("recipe")) if isinstance(values.get("recipe"), str) else None
        )
        below = dict(recipe.values) if recipe is not None else {}
        # The model arguments a recipe sets are a bundle of their own: the user's keys override
        # them one by one (as --model-arg does over a --config file) instead of replacing them
        # all, so `--recipe paper_baseline --model-arg width_multiplier=0.5` keeps the recipe's
        # dropout and LRN.
        from_recipe: set[str] = set()
        if isinstance(below.get("model_args"), dict) and isinstance(values.get("model_args"), dict):
            from_recipe = set(below["model_args"]) - set(values["model_args"])
            values = {
                **values,
                "model_args": {**copy.deepcopy(below["model_args"]), **values["model_args"]},
            }
        for name, field in fields.items():
            if name in values:
                value = values[name]
            elif name in below:
                value = copy.deepcopy(below[name])
            else:
                value = field_default(field)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_chosen", set(values))
        object.__setattr__(self, "_derived", set())
        # Model arguments that are the recipe's, not chosen: `chosen()` leaves them out.
        object.__setattr__(self, "_recipe_model_args", from_recipe)
        self.__post_init__()

    def __post_init__(self) -> None:
        # Where a value names a path, it is made absolute, so that config.yaml names the same
        # file or folder from any working directory.
        if isinstance(self.dataset, str):
            object.__setattr__(self, "dataset", _absolute_image_folder(self.dataset))
        if isinstance(self.weights, str) and weights_is_path(self.weights):
            object.__setattr__(self, "weights", os.path.abspath(os.path.expanduser(self.weights)))
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        if isinstance(self.model_args, dict):
            object.__setattr__(self, "model_args", dict(self.model_args))

    def __setattr__(self, name: str, value: Any) -> None:
        # An option set after construction is chosen like one passed to the constructor.
        object.__setattr__(self, name, value)
        if name in _FIELD_NAMES:
            self._chosen.add(name)
            self._derived.discard(name)
            if name == "model_args":
                self._recipe_model_args.clear()

    @classmethod
    def default(cls, name: str) -> Any:
        """Option `name`'s declared default."""
        return field_default(next(f for f in dataclasses.fields(cls) if f.name == name))

    def resolved(self) -> TrainConfig:
        """A copy with every derived option that was left automatic filled in: `lr` and
        `weight_decay` from the optimizer, the `auto` splits from the dataset. The run uses
        this; `chosen()` still tells the derived values from the chosen ones."""
        resolved = copy.copy(self)
        object.__setattr__(resolved, "_chosen", set(self._chosen))
        object.__setattr__(resolved, "_derived", set(self._derived))
        object.__setattr__(resolved, "_recipe_model_args", set(self._recipe_model_args))
        for field, declared in declared_options(self):
            if declared.derive is not None and getattr(self, field.name) == declared.automatic:
                object.__setattr__(resolved, field.name, declared.derive(self))
                resolved._derived.add(field.name)
        return resolved

    def chosen(self) -> dict[str, Any]:
        """The options the user set (constructor keywords, `--config`, the command line), as
        plain YAML/JSON types; derived options appear with their automatic value."""
        values = {}
        for field, declared in declared_options(self):
            if field.name in self._chosen and declared.saved:
                value = getattr(self, field.name)
                values[field.name] = declared.automatic if field.name in self._derived else value
        if "model_args" in values:
            values["model_args"] = {
                key: value
                for key, value in values["model_args"].items()
                if key not in self._recipe_model_args
            }
        return _plain(values)

    def to_dict(self) -> dict[str, Any]:
        """Every option as plain YAML/JSON types (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: every resolved value but locations, actions and
        how many processes run it (JSON-able, for comparing workers' and saved configs)."""
        resolved = self.resolved().to_dict()
        return {
            field.name: resolved[field.name]
            for field, declared in declared_options(self)
            if declared.identity
        }

    def validate(self) -> TrainConfig:
        """Raise `UsageError` (a ValueError) naming the first bad value and the fix; return self
        when all is well. Only the values themselves are checked here: whether the model, the
        dataset and its splits exist is for the run to find out."""
        check_values(self)
        if not self.warmup_epochs < self.epochs:
            raise UsageError(
                f"--warmup-epochs must be less than --epochs ({self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        if self.dataset.strip() == IMAGE_FOLDER_PREFIX:
            raise UsageError(
                f"--dataset {IMAGE_FOLDER_PREFIX} needs a folder, e.g. "
                f"{IMAGE_FOLDER_PREFIX}/path/to/images (one sub-folder per class)"
            )
        self._check_normalization_options()
        if self.horizontal_flip is not None and not self.augment:
            raise UsageError(
                "--horizontal-flip/--no-horizontal-flip only has an effect with --augment; "
                "add --augment or drop it"
            )
        self._check_fine_tuning_options()
        for key in self.model_args:
            if key in RESERVED_MODEL_ARGS:
                raise UsageError(
                    f"--model-arg {key}=... is not allowed: {RESERVED_MODEL_ARGS[key]}"
                )
        return self

    def _check_normalization_options(self) -> None:
        if self.normalization == "none":
            for name in ("bn_momentum", "bn_epsilon"):
                if getattr(self, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    raise UsageError(
                        f"{flag} has no effect with --normalization none (there is no BN layer); "
                        f"drop {flag} or choose --normalization batch_norm"
                    )
            if self.sync_bn:
                raise UsageError(
                    "--sync-bn has no effect with --normalization none (there is no BN layer "
                    "to synchronize); drop --sync-bn or choose --normalization batch_norm"
                )
        if self.normalization == "keras" and self.bn_momentum == CUMULATIVE:
            raise UsageError(
                f"--bn-momentum {CUMULATIVE} needs bnzoo's layer (keras.layers."
                "BatchNormalization has no cumulative average); use --normalization batch_norm"
            )

    def _check_fine_tuning_options(self) -> None:
        if self.freeze_backbone and self.weights is None:
            raise UsageError(
                "--freeze-backbone needs --weights: a randomly initialized backbone has nothing "
                "worth keeping; add --weights imagenet (or a PATH), or drop --freeze-backbone"
            )
        if self.freeze_until is not None and not self.freeze_backbone:
            raise UsageError(
                "--freeze-until only has an effect with --freeze-backbone; add "
                "--freeze-backbone or drop --freeze-until"
            )

    def ignored_settings(self) -> list[str]:
        """Warnings for options that the user set but that have no effect on this run (an
        option left at its default or a recipe's value is no request)."""
        chosen = self._chosen
        warnings = []
        if self.optimizer != "sgd" and "momentum" in chosen:
            warnings.append(
                f"--momentum {self.momentum:g} has no effect with --optimizer {self.optimizer} "
                "(it is SGD's momentum)"
            )
        if self.lr_schedule != "exponential" and "lr_decay_rate" in chosen:
            warnings.append(
                f"--lr-decay-rate {self.lr_decay_rate:g} has no effect with --lr-schedule "
                f"{self.lr_schedule} (it is the exponential schedule's factor per epoch)"
            )
        if (
            self.lr_schedule != "exponential"
            and self.lr_decay_epochs is not None
            and "lr_decay_epochs" in chosen
        ):
            warnings.append(
                f"--lr-decay-epochs {self.lr_decay_epochs:g} has no effect with --lr-schedule "
                f"{self.lr_schedule} (it is the exponential schedule's staircase)"
            )
        if "weight_decay_form" in chosen and self.resolved().weight_decay == 0:
            warnings.append(
                f"--weight-decay-form {self.weight_decay_form} has no effect without weight "
                "decay (--weight-decay is 0)"
            )
        if self.normalization == "none" and "bn_statistics" in chosen:
            warnings.append(
                f"--bn-statistics {self.bn_statistics} has no effect with --normalization none "
                "(there is no BN layer)"
            )
        elif (
            self.normalization == "none" or self.bn_statistics != "population"
        ) and "bn_statistics_batches" in chosen:
            warnings.append(
                f"--bn-statistics-batches {self.bn_statistics_batches} has no effect "
                + (
                    "with --normalization none (there is no BN layer)"
                    if self.normalization == "none"
                    else f"with --bn-statistics {self.bn_statistics} (it sizes the population "
                    "statistics)"
                )
            )
        if self.distribute in ("none", "data_parallel") and "collective_timeout" in chosen:
            warnings.append(
                f"--collective-timeout {self.collective_timeout:g} has no effect with "
                f"--distribute {self.distribute} (it bounds multi_worker's collectives)"
            )
        return warnings

    @classmethod
    def from_dict(
        cls,
        values: Mapping[Any, Any],
        *,
        source: str = "config",
        error: type[ValueError] = ValueError,
    ) -> TrainConfig:
        """A config from a mapping such as a parsed YAML file, every value read and checked by
        its option (`{source}: <key> ...` errors); the keys are its chosen options."""
        return cls(**values_from_mapping(values, cls, source, error=error))


_FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(TrainConfig))


def _plain(values: Any) -> Any:
    """`values` as plain YAML/JSON types (tuples become lists)."""
    return json.loads(json.dumps(values))


def default_output_dir(config: TrainConfig, today: datetime.date | None = None) -> str:
    """`runs/<date>-<model>-<dataset>`, with the dataset name made safe for a folder name."""
    today = today or datetime.date.today()
    dataset = config.dataset
    if dataset.startswith(IMAGE_FOLDER_PREFIX):
        dataset = "image_folder-" + Path(dataset.split(":", 1)[1]).name
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-") or "dataset"
    return os.path.join("runs", f"{today.isoformat()}-{config.model}-{dataset}")


# --- Command line ---------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that paragraphs of the description and epilog with indented
    lines (the recipe list) keep their line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def recipes_help(width: int = 78) -> str:
    """The `--help` paragraph that lists the registered recipes and the flags each sets."""
    if not RECIPES:
        return "No recipes are registered."
    lines = textwrap.wrap(
        "recipes (--recipe NAME; options set in --config or on the command line override a "
        "recipe's, and --model-arg keys merge with its model arguments):",
        width,
    )
    for recipe in RECIPES.values():
        flags = " ".join(recipe_flags(recipe.values))
        for text, indent in ((f"{recipe.name}: {recipe.description}", "  "), (f"sets {flags}", "")):
            # A flag and its value stay on one line: their space is a placeholder while wrapping.
            wrapped = textwrap.wrap(
                _FLAG_AND_VALUE.sub("\\1\0", text),
                width,
                initial_indent=indent or "      ",
                subsequent_indent="      ",
                break_long_words=False,
                break_on_hyphens=False,
            )
            lines += [line.replace("\0", " ") for line in wrapped]
    return "\n".join(lines)


_FLAG_AND_VALUE = re.compile(r"(--[a-z][a-z-]*) (?=[^-\s])")


def build_train_parser() -> ArgumentParser:
    """The `train.py` command line, generated from `TrainConfig`'s fields."""
    parser = ArgumentParser(
        prog="train.py",
        description=(
            "Train a bnzoo model; the run folder gets config.yaml, history.csv, TensorBoard logs, "
            "checkpoints, model.keras, saved_model/, metrics.json and training_curves.png. "
            "Rerunning the same command resumes an interrupted run. Options are layered: "
            "defaults < --recipe < --config file < command line."
        ),
        epilog=f"{recipes_help()}\n\n{EXIT_STATUS_HELP}",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="RUN.yaml",
        help="YAML file of option values (keys as below, e.g. batch_size: 64); flags given on "
        "the command line override it. A run folder's config.yaml repeats that run.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback for errors")
    add_options(parser, TrainConfig, GROUPS)
    return parser


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse `train.py`'s command line (and its `--config` file) into a validated `TrainConfig`
    whose `output_dir` is set.

    The options given in the file and on the command line (which wins; `--model-arg` keys merge)
    are the config's chosen options.

    Raises:
        UsageError: anything wrong with the command line or the config file's contents.
        FileNotFoundError: `--config` names no file.
    """
    parser = build_train_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    values = command_line_values(args, TrainConfig)
    if args.config:
        from_file = read_config_file(args.config)
        if "model_args" in from_file and "model_args" in values:
            values["model_args"] = {**from_file["model_args"], **values["model_args"]}
        values = {**from_file, **values}
    config = TrainConfig(**values).validate()
    if config.output_dir is None:
        config.output_dir = default_output_dir(config)
    return config


# --- Config files ---------------------------------------------------------------------------------

CONFIG_FILENAME = "config.yaml"
#: The first line of every config.yaml train.py writes; `is_run_config` recognizes it by it.
CONFIG_HEADER = (
    "# bnzoo training run: the options chosen for it; under resolved: every value it used."
)
#: The first line of the run folders' config.yaml before `resolved:` was kept apart: every
#: value, derived ones included, at the top level.
LEGACY_CONFIG_HEADER = "# bnzoo training run: the resolved configuration."
#: The key under which a run's config.yaml records every value the run used. Not an option:
#: `--config` never reads values from it.
RESOLVED_KEY = "resolved"


def is_run_config(path: str) -> bool:
    """Whether `path` is the `config.yaml` that `train.py` wrote into a run folder."""
    if os.path.basename(path) != CONFIG_FILENAME:
        return False
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.readline(200).rstrip("\n") in (CONFIG_HEADER, LEGACY_CONFIG_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A config file's contents: the options it sets, and (a run's config.yaml) the values that
    run resolved to, both read and checked by the options' rules."""

    chosen: dict[str, Any]
    resolved: dict[str, Any] | None


def read_config_values(path: str, what: str, error: type[ValueError] = UsageError) -> ConfigFile:
    """Read and check a YAML config file (`--config`, or a run's config.yaml).

    Raises:
        FileNotFoundError: no such file.
        `error`: bad YAML, an unknown key, a value its option refuses; one line starting with
            `what`, naming the key.
    """
    values = read_yaml_mapping(path, what, error)
    recorded = values.pop(RESOLVED_KEY, None)
    chosen = values_from_mapping(values, TrainConfig, what, error=error)
    resolved = None
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise error(f"{what}: {RESOLVED_KEY} must be a mapping of option: value")
        resolved = values_from_mapping(
            recorded, TrainConfig, f"{what} ({RESOLVED_KEY})", error=error
        )
    return ConfigFile(chosen, resolved)


def read_config_file(path: str) -> dict[str, Any]:
    """A `--config` file's options, checked like flags.

    A run folder's own `config.yaml` runs in that folder, wherever it has moved and whatever the
    working directory: its `output_dir` becomes the file's folder (`--output-dir` still wins).
    Its `resolved:` record is checked but sets nothing: derived values are derived afresh.
    """
    if os.path.isdir(path):
        inside = os.path.join(path, CONFIG_FILENAME)
        hint = f"; did you mean --config {inside}?" if os.path.isfile(inside) else ""
        raise FileNotFoundError(f"--config {path}: is a folder, not a file{hint}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    values = read_config_values(path, f"--config {path}").chosen
    if is_run_config(path):
        values["output_dir"] = os.path.dirname(path) or os.curdir
    return values


def shell_quote(text: str) -> str:
    """`text` as one shell word: `shlex.quote`, or bash's `$'...'` when it holds a newline or
    another control character (which a single-quoted word would carry onto a second line)."""
    if not any(ord(char) < 32 or ord(char) == 127 for char in text):
        return shlex.quote(text)
    escaped = []
    for char in text:
        if char in "\\'":
            escaped.append("\\" + char)
        elif ord(char) < 32 or ord(char) == 127:
            escaped.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\x{ord(char):02x}"))
        else:
            escaped.append(char)
    return "$'" + "".join(escaped) + "'"


def save_config(config: TrainConfig, run_dir: str | os.PathLike, *, resumed: bool = False) -> str:
    """Write the run's `run_dir/config.yaml` (atomically); return its path.

    The file holds the chosen options at the top level (what `--config` reads back) and every
    value the run uses under `resolved:` (what the folder's identity check compares). Locations
    are absolute, so the file means the same run from any working directory (and `--config
    runs/<run>/config.yaml` always trains in that folder). `--overwrite` and `--resume-from`
    are actions on the folder, not properties of the run, and are not saved: saved, they would
    make repeating the run wipe or roll it back.

    `resumed`: the options chosen when the run started stay chosen while the run uses their
    values (a resumed run's command line rarely repeats every flag, and its identity is the
    same), unless they are set anew.
    """
    path = os.path.join(run_dir, CONFIG_FILENAME)
    chosen = config.chosen()
    resolved = config.resolved().to_dict()
    if resumed and os.path.isfile(path):
        before = read_config_values(path, path, ValueError)
        if before.resolved is not None:  # a legacy file cannot tell chosen from derived
            # A choice stays one while the run still uses its value (not after --epochs rose).
            kept = {
                key: value
                for key, value in _plain(before.chosen).items()
                if key not in chosen and resolved.get(key) == value
            }
            chosen = {**kept, **chosen}
    for field, declared in declared_options(TrainConfig):
        if not declared.saved:
            resolved.pop(field.name)
    for values in (chosen, resolved):
        for key in ("data_dir", "manual_dir"):
            if values.get(key) is not None:
                values[key] = os.path.abspath(os.path.expanduser(values[key]))
        values["output_dir"] = os.path.abspath(run_dir)
    header = (
        f"{CONFIG_HEADER}\n"
        "# Repeat, resume or extend it with: python train.py --config "
        f"{shell_quote(os.path.abspath(path))}\n"
    )
    body = yaml.safe_dump({**chosen, RESOLVED_KEY: resolved}, sort_keys=False, allow_unicode=False)
    atomic_write_text(path, header + body)
    return path


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The configuration a run folder's run used (its `config.yaml`'s `resolved:` values),
    checked by the same rules as the command line.

    Raises:
        FileNotFoundError: the folder has no config.yaml.
        ValueError: the file is not a valid run configuration; one line naming the file and
            the key.
    """
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a bnzoo run folder: it has no {CONFIG_FILENAME}")
    contents = read_config_values(path, path, ValueError)
    # A config.yaml written before `resolved:` existed holds every value at the top level.
    values = contents.resolved if contents.resolved is not None else contents.chosen
    try:
        return TrainConfig(**values).validate().resolved()
    except UsageError as error:
        raise ValueError(f"{path}: {error}") from None


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Human-readable `key: saved -> current` for every identity value that differs."""
    old, new = saved.identity(), current.identity()
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def options_table() -> str:
    """The Markdown table of every option, for docs/training.md (kept equal by a test)."""
    rows = ["| option | default | accepts | what it does |", "| --- | --- | --- | --- |"]
    for field, declared in declared_options(TrainConfig):
        kind = declared.kind
        flag = flag_of(field, declared)
        if kind.action == "switch":
            flag = f"{flag}, --no-{flag[2:]}"
        default = declared.default_text or (
            "" if kind.action == "append" else _markdown_default(field_default(field))
        )
        accepts = kind.describe_choices() or declared.metavar or kind.metavar or "text"
        text = declared.help.replace("|", "\\|")
        rows.append(f"| `{flag}` | {default} | {accepts} | {text} |")
    return "\n".join(rows)


def _markdown_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return f"`{value}`"


# The built-in recipes (bnzoo.recipes), registered once TrainConfig exists to check them.
for _name, (_description, _values) in PAPER_RECIPES.items():
    register_recipe(_name, _description, **_values)
