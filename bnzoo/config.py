"""A training run's configuration: the dataclass, the command line, `--config run.yaml`, and the
run folder's identity.

A run is described entirely by a `TrainConfig` (big_vision style). `train.py` builds one from
its command line, where `--config run.yaml` supplies values that flags given on the command line
override; the resolved config is saved as `config.yaml` in the run folder, so
`python train.py --config runs/<run>/config.yaml` repeats (or resumes) the run from its folder
alone. Rerunning into a folder checks that the folder holds the *same* run before resuming it.

No TensorFlow here: the command line is checked before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bnzoo.atomic_files import atomic_write_text
from bnzoo.cli import EXIT_STATUS_HELP, UsageError

NORMALIZATIONS = ("batch_norm", "keras", "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "exponential", "cosine")
DISTRIBUTE_MODES = ("auto", "none", "data_parallel", "multi_worker")
BN_STATISTICS = ("population", "moving")

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

#: Fields that say *where* things are rather than *what* the run is: changing them does not make
#: a different run, so they are left out of the run folder's identity check.
LOCATION_FIELDS = ("data_dir", "manual_dir", "output_dir", "overwrite")
#: Fields that say how many processes and devices run the training rather than what is trained:
#: a run resumes on another number of workers or replicas (the global batch stays the same).
EXECUTION_FIELDS = ("distribute", "collective_timeout")

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


# --- What each option accepts --------------------------------------------------------------------

#: The largest and smallest (normal) float32 magnitudes: the optimizer and the layers compute in
#: float32, where a learning rate of 1e-300 is 0 and 1e308 is inf.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 2**20
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
#: 30 days: a collective that waits longer for a worker is a hung run, not a slow one.
MAX_COLLECTIVE_TIMEOUT = 30 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class Interval:
    """The values a numeric option accepts, e.g. `Interval(0, 1, high_open=True)` is `[0, 1)`."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = (
            str(int(bound)) if float(bound).is_integer() else f"{bound:g}"
            for bound in (self.low, self.high)
        )
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


#: Every numeric option's accepted values, checked alike for flags, config files and Python.
#: The upper limits are far beyond any sensible setting but keep absurd values (a learning rate
#: of 1e308, a billion epochs) from starting a run that can only fail.
RANGES: dict[str, Interval] = {
    "lr": Interval(0, 10, low_open=True),
    "momentum": Interval(0, 1, high_open=True),
    "weight_decay": Interval(0, 1, high_open=True),
    "label_smoothing": Interval(0, 1, high_open=True),
    "lr_decay_rate": Interval(0, 1, low_open=True),
    "warmup_epochs": Interval(0, MAX_EPOCHS, high_open=True),
    "bn_momentum": Interval(0, 1, high_open=True),
    "bn_epsilon": Interval(0, 1, low_open=True),
    "epochs": Interval(1, MAX_EPOCHS),
    "batch_size": Interval(1, MAX_BATCH_SIZE),
    "shuffle_buffer": Interval(1, 2**31 - 1),
    "seed": Interval(0, MAX_SEED),
    "bn_statistics_batches": Interval(1, 2**31 - 1),
    "collective_timeout": Interval(0, MAX_COLLECTIVE_TIMEOUT, low_open=True),
}
INTEGER_OPTIONS = ("epochs", "batch_size", "shuffle_buffer", "seed", "bn_statistics_batches")
#: Floats that only the host uses (in float64), never the float32 training computation.
HOST_FLOAT_OPTIONS = ("collective_timeout",)
#: On/off options (`--augment/--no-augment`); a Python config must not pass "yes" for True.
SWITCHES = (
    "freeze_backbone",
    "augment",
    "horizontal_flip",
    "sync_bn",
    "mixed_precision",
    "deterministic",
    "overwrite",
)
#: Switches whose default None means "decided by the hardware or the dataset".
AUTO_SWITCHES = ("mixed_precision", "horizontal_flip")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_name(key: str) -> str:
    return key.replace("-", "_")


def check_number(name: str, value: Any) -> str | None:
    """Why `value` is not acceptable for numeric option `name` (a field name), or None.

    Integers must be integers (not bools, not 3.0); floats must be finite and, unless only the
    host uses them (`HOST_FLOAT_OPTIONS`), representable in float32 (zero, or between 1.2e-38
    and 3.4e38 in magnitude); both must lie in `RANGES`.
    """
    interval = RANGES[name]
    if name in INTEGER_OPTIONS:
        expected = (
            f"a positive integer (at most {interval.high:.0f})"
            if interval.low == 1
            else f"an integer in {interval}"
        )
        if isinstance(value, bool) or not isinstance(value, int) or value not in interval:
            return f"must be {expected}"
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number in {interval}"
        if not math.isfinite(value):
            return f"must be a finite number in {interval}"
        in_float32 = value == 0 or FLOAT32_TINY <= abs(value) <= FLOAT32_MAX
        if name not in HOST_FLOAT_OPTIONS and not in_float32:
            return f"must be in {interval} and representable in float32 (training computes in it)"
    if value not in interval:
        return f"must be in {interval}"
    return None


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


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; `train.py`'s flags map one to one onto fields.

    The defaults are `python train.py`: `plain_cnn` with Batch Normalization on Fashion-MNIST,
    trained with SGD + momentum at the high learning rate BN allows (Ioffe & Szegedy 2015,
    section 3.3) on a cosine schedule, in bfloat16 where the CPU has it: about 93% test accuracy in
    under 10 minutes on a 2-core CPU (docs/training.md).

    Example:

    ```python
    from bnzoo.config import TrainConfig
    from bnzoo.training import train

    config = TrainConfig(train_split="train[:512]", epochs=1, output_dir="runs/smoke")
    result = train(config)
    ```
    """

    # Model.
    model: str = "plain_cnn"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None  # None: random; a tag (imagenet) or a path (bnzoo.fine_tuning)
    freeze_backbone: bool = False
    freeze_until: str | None = None  # None: the whole backbone (with --freeze-backbone)
    normalization: str = "batch_norm"
    bn_momentum: float | str | None = None  # None: the builder's; "cumulative": momentum=None
    bn_epsilon: float | None = None
    # Data. The splits' "auto" resolves to `default_splits(dataset)`.
    dataset: str = "fashion_mnist"
    train_split: str = AUTO
    val_split: str | None = AUTO
    test_split: str | None = AUTO
    data_dir: str | None = None
    manual_dir: str | None = None
    image_size: tuple[int, int] | None = None
    augment: bool = False
    horizontal_flip: bool | None = None  # None: the dataset's policy (bnzoo.data.info)
    shuffle_buffer: int = 10_000
    # Optimization.
    epochs: int = 10  # chosen by validation accuracy: docs/training.md#the-default-recipe
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.5
    lr_decay_rate: float = 0.9
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    label_smoothing: float = 0.0
    # Batch Normalization's inference statistics and distribution.
    bn_statistics: str = "population"
    bn_statistics_batches: int = 50
    sync_bn: bool = False
    distribute: str = "auto"
    collective_timeout: float = 600.0
    # Run.
    mixed_precision: bool | None = None  # None: where the hardware has it (bnzoo.precision)
    seed: int = 42
    deterministic: bool = False
    output_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        # Resolved here, so that config.yaml records the values the run actually used.
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer)
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY.get(self.optimizer)
        if isinstance(self.dataset, str):
            self.dataset = _absolute_image_folder(self.dataset)
            splits = default_splits(self.dataset)
            if self.train_split == AUTO:
                self.train_split = splits[0]
            if self.val_split == AUTO:
                self.val_split = splits[1]
            if self.test_split == AUTO:
                self.test_split = splits[2]
        if isinstance(self.weights, str) and weights_is_path(self.weights):
            # Absolute, so that config.yaml names the same file from any working directory.
            self.weights = os.path.abspath(os.path.expanduser(self.weights))
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        self.model_args = dict(self.model_args)

    def validate(self) -> TrainConfig:
        """Raise `UsageError` (a ValueError) naming the first bad value and the fix; return self
        when all is well. Only the values themselves are checked here: whether the model, the
        dataset and its splits exist is for the run to find out."""
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("bn-statistics", self.bn_statistics, BN_STATISTICS)
        _check_choice("distribute", self.distribute, DISTRIBUTE_MODES)
        for name in RANGES:
            value = getattr(self, name)
            if name in ("bn_momentum", "bn_epsilon") and value in (None, CUMULATIVE):
                continue
            problem = check_number(name, value)
            if problem:
                raise UsageError(f"--{_flag(name)} {problem}, got {value!r}")
        if not self.warmup_epochs < self.epochs:
            raise UsageError(
                f"--warmup-epochs must be less than --epochs ({self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        if isinstance(self.bn_momentum, str) and self.bn_momentum != CUMULATIVE:
            raise UsageError(
                f"--bn-momentum must be a number in {RANGES['bn_momentum']}, {CUMULATIVE!r} or "
                f"none, got {self.bn_momentum!r}"
            )
        for name in SWITCHES:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name in AUTO_SWITCHES and value is None):
                raise UsageError(f"--{_flag(name)} is a switch: true or false, got {value!r}")
        self._check_normalization_options()
        if self.horizontal_flip is not None and not self.augment:
            raise UsageError(
                "--horizontal-flip/--no-horizontal-flip only has an effect with --augment; "
                "add --augment or drop it"
            )
        self._check_image_size()
        self._check_names()
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
                    raise UsageError(
                        f"--{_flag(name)} has no effect with --normalization none (there is no "
                        f"BN layer); drop --{_flag(name)} or choose --normalization batch_norm"
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

    def _check_image_size(self) -> None:
        if self.image_size is None:
            return
        sizes = tuple(self.image_size)
        if len(sizes) != 2 or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in sizes
        ):
            raise UsageError(
                f"--image-size must be one or two positive integers (HEIGHT,WIDTH), got "
                f"{self.image_size!r}"
            )

    def _check_names(self) -> None:
        """Text options: a set option must say something (an empty string is a typo, not a
        request for the default: that is spelled `none`, or leaving the option out)."""
        for name in ("model", "dataset", "train_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"--{_flag(name)} must not be empty, got {value!r}")
        if self.dataset.strip() == IMAGE_FOLDER_PREFIX:
            raise UsageError(
                f"--dataset {IMAGE_FOLDER_PREFIX} needs a folder, e.g. "
                f"{IMAGE_FOLDER_PREFIX}/path/to/images (one sub-folder per class)"
            )
        for name in (
            "val_split",
            "test_split",
            "data_dir",
            "manual_dir",
            "output_dir",
            "weights",
            "freeze_until",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UsageError(
                    f"--{_flag(name)} must not be empty, got {value!r}; use none for "
                    + ("no split" if name.endswith("split") else "the default")
                )

    def ignored_settings(self) -> list[str]:
        """Warnings for values that are set but have no effect on this run.

        Checked against their defaults, because a run's config.yaml records every option: an
        Adam run's `momentum: 0.9` there is the default, not a request.
        """
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        warnings = []
        if self.optimizer != "sgd" and self.momentum != defaults["momentum"]:
            warnings.append(
                f"--momentum {self.momentum:g} has no effect with --optimizer {self.optimizer} "
                "(it is SGD's momentum)"
            )
        if self.lr_schedule != "exponential" and self.lr_decay_rate != defaults["lr_decay_rate"]:
            warnings.append(
                f"--lr-decay-rate {self.lr_decay_rate:g} has no effect with --lr-schedule "
                f"{self.lr_schedule} (it is the exponential schedule's factor per epoch)"
            )
        if self.normalization == "none" and self.bn_statistics != defaults["bn_statistics"]:
            warnings.append(
                f"--bn-statistics {self.bn_statistics} has no effect with --normalization none "
                "(there is no BN layer)"
            )
        elif (
            self.normalization == "none" or self.bn_statistics != "population"
        ) and self.bn_statistics_batches != defaults["bn_statistics_batches"]:
            warnings.append(
                f"--bn-statistics-batches {self.bn_statistics_batches} has no effect "
                + (
                    "with --normalization none (there is no BN layer)"
                    if self.normalization == "none"
                    else f"with --bn-statistics {self.bn_statistics} (it sizes the population "
                    "statistics)"
                )
            )
        if (
            self.distribute in ("none", "data_parallel")
            and self.collective_timeout != defaults["collective_timeout"]
        ):
            warnings.append(
                f"--collective-timeout {self.collective_timeout:g} has no effect with "
                f"--distribute {self.distribute} (it bounds multi_worker's collectives)"
            )
        return warnings

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON types (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs the same run (everything but locations and how many
        processes run it)."""
        ignored = LOCATION_FIELDS + EXECUTION_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in ignored}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build a config from a mapping such as a parsed `config.yaml`; unknown keys are errors."""
        known = {field.name for field in dataclasses.fields(cls)}
        values = {_field_name(key): value for key, value in values.items()}
        for key in values:
            if key not in known:
                raise ValueError(f"{source}: unknown key {key!r}{close_matches(key, known)}")
        return cls(**values)


def default_output_dir(config: TrainConfig, today: datetime.date | None = None) -> str:
    """`runs/<date>-<model>-<dataset>`, with the dataset name made safe for a folder name."""
    today = today or datetime.date.today()
    dataset = config.dataset
    if dataset.startswith("image_folder:"):
        dataset = "image_folder-" + Path(dataset.split(":", 1)[1]).name
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-") or "dataset"
    return os.path.join("runs", f"{today.isoformat()}-{config.model}-{dataset}")


# --- Command line --------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` instead of printing usage and exiting, so the CLI
    reports a bad flag as one line like every other user error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes `-1e-3` and `-inf` for options (its pattern knows only `-1` and `-.5`),
        # so `--lr -1e-3` would read "expected one argument" instead of the range it breaks.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def close_matches(value: str, options: Sequence[str] | set[str]) -> str:
    """ "; did you mean 'x', 'y'?" for the options close to `value`, or ""."""
    matches = difflib.get_close_matches(value, sorted(options), n=3)
    return f"; did you mean {', '.join(map(repr, matches))}?" if matches else ""


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(
            f"--{name} must be one of {', '.join(choices)}, got {value!r}"
            f"{close_matches(str(value), choices)}"
        )


def optional(convert):
    """An argparse type that also accepts `none` (or `null`) for "not set". An empty value is
    refused: `--val-split ''` is far more likely a shell-quoting slip than a request."""

    def parse(text: str):
        if text.strip().lower() in ("none", "null"):
            return None
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be empty (use none to leave it unset)")
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    parse.accepts_none = True  # type: ignore[attr-defined]  (read by config files' null)
    return parse


def non_empty(text: str) -> str:
    """argparse type: any text but an empty one."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def number(name: str):
    """argparse type for numeric option `name` (a `RANGES` key): parsed as an int or a float
    and checked against its range, so `--lr inf` is refused with the flag named."""
    convert = int if name in INTEGER_OPTIONS else float

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            # Reuse check_number's wording for a value of the wrong kind.
            problem = check_number(name, "not a number")
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}") from None
        problem = check_number(name, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def bn_momentum(text: str) -> float | str:
    """argparse type for `--bn-momentum`: a number in [0, 1) or `cumulative`."""
    if text.strip().lower() == CUMULATIVE:
        return CUMULATIVE
    try:
        return number("bn_momentum")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a number in {RANGES['bn_momentum']}, {CUMULATIVE} (the layer's cumulative "
            f"average, momentum=None) or none (the builder's default), got {text!r}"
        ) from None


_IMAGE_SIZE = re.compile(r"\s*[\[(]?\s*(\d+)\s*(?:[,x]\s*(\d+)\s*)?[\])]?\s*")


def image_size(text: str) -> tuple[int, int]:
    """argparse type: '32' (square), '32,48' or '32x48' (height, width)."""
    match = _IMAGE_SIZE.fullmatch(text)
    sizes = [int(size) for size in match.groups() if size is not None] if match else []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected SIZE or HEIGHT,WIDTH in pixels (e.g. 32 or 32,48), got {text!r}"
        )
    return (sizes[0], sizes[1])


#: A `--model-arg` value that starts like a Python/YAML collection or quoted string must parse
#: as one: `widths=[abc` is a typo, not the string "[abc".
_LITERAL_OPENERS = ("[", "(", "{", "'", '"')


def parse_literal(text: str) -> Any:
    """A `--model-arg` value: a Python literal (`0.5`, `[32, 64]`, `(3, 3)`, `1e-3`) or, failing
    that, YAML (`true`, `null`, bare words such as `relu`).

    Raises:
        ValueError: the text opens a list, tuple, mapping or quoted string that does not
            close, or it parses to something other than numbers, strings, booleans, null and
            lists/mappings of them (YAML dates, for instance).
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError):
            if text.strip().startswith(_LITERAL_OPENERS):
                raise ValueError(
                    f"{text!r} is not a valid literal (unbalanced brackets or quotes?); e.g. "
                    "[32, 64], (3, 3), 'relu'"
                ) from None
            value = text
    if not _is_plain(value):
        raise ValueError(
            f"{text!r} is a {type(value).__name__}; a model argument must be a number, a string, "
            "true/false, null, or a list or mapping of them"
        )
    return value


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def model_arg(text: str) -> tuple[str, Any]:
    """argparse type: `key=value` for one model builder keyword."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a builder keyword (e.g. widths=[32,64]), got {text!r}"
        )
    if not value.strip():
        raise argparse.ArgumentTypeError(
            f"{key}= needs a value (e.g. {key}=null for None), got {text!r}"
        )
    try:
        return key, parse_literal(value.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{key}={value}: {error}") from None


def build_train_parser() -> ArgumentParser:
    """The `train.py` command line, in documented groups; defaults come from `TrainConfig`."""
    defaults = TrainConfig()
    parser = ArgumentParser(
        prog="train.py",
        description=(
            "Train a bnzoo model; the run folder gets config.yaml, history.csv, TensorBoard logs, "
            "checkpoints, model.keras, saved_model/, metrics.json and training_curves.png. "
            "Rerunning the same command resumes an interrupted run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument(
        "--config",
        metavar="RUN.yaml",
        help="YAML file of option values (keys as below, e.g. batch_size: 64); flags given on "
        "the command line override it. A run folder's config.yaml repeats that run.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback for errors")

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", type=non_empty, default=defaults.model, help="registered model name"
    )
    group.add_argument(
        "--model-arg",
        dest="model_args",
        metavar="KEY=VALUE",
        type=model_arg,
        action="append",
        default=None,
        help="builder keyword override, repeatable; VALUE is a Python/YAML literal "
        "(width=0.5, widths=[32,64])",
    )
    group.add_argument(
        "--weights",
        type=optional(str),
        default=defaults.weights,
        metavar="{none,TAG,PATH}",
        help="initialize the backbone from pretrained weights; the classifier (the dataset's "
        "classes) starts random. TAG: a registered weight set such as imagenet (the model "
        "then takes RGB 0-255 and applies the weights' preprocessing itself); PATH: a bnzoo "
        "model.keras, checkpoint or run folder, a .weights.h5 of the same model and classes, "
        "or a file the builder converts (.pth, TF checkpoint). Loaded only at a fresh start",
    )
    group.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=defaults.freeze_backbone,
        help="with --weights, train only the classifier: the backbone's layers get "
        "trainable=False, so by Keras' rule their BN layers run in inference mode and keep "
        "their statistics",
    )
    group.add_argument(
        "--freeze-until",
        type=optional(non_empty),
        default=defaults.freeze_until,
        metavar="LAYER",
        help="with --freeze-backbone, freeze only the layers up to and including LAYER (e.g. "
        "inception_4e_output) and fine-tune the later ones (none = the whole backbone)",
    )
    group.add_argument(
        "--normalization",
        default=defaults.normalization,
        choices=NORMALIZATIONS,
        help="batch_norm: bnzoo's Ioffe & Szegedy layer; keras: keras.layers.BatchNormalization; "
        "none: no normalization (the paper's baseline)",
    )
    group.add_argument(
        "--bn-momentum",
        type=optional(bn_momentum),
        default=defaults.bn_momentum,
        help="moving-average momentum of the BN statistics, in [0, 1); cumulative = the "
        "average of all training batches' statistics (the layer's momentum=None); none = the "
        "builder's default",
    )
    group.add_argument(
        "--bn-epsilon",
        type=optional(number("bn_epsilon")),
        default=defaults.bn_epsilon,
        help="epsilon added to the variance, in (0, 1] (none = the builder's default)",
    )

    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        type=non_empty,
        default=defaults.dataset,
        help="any TFDS name, or image_folder:/path (one sub-folder per class)",
    )
    # argparse %-formats help texts: a split's % must be doubled.
    tfds_splits = [split.replace("%", "%%") for split in TFDS_DEFAULT_SPLITS]
    folder_splits = [split.replace("%", "%%") for split in IMAGE_FOLDER_DEFAULT_SPLITS]
    group.add_argument(
        "--train-split",
        type=non_empty,
        default=AUTO,
        help=f"TFDS split syntax; auto = {tfds_splits[0]} for TFDS datasets, "
        f"{folder_splits[0]} for image folders (whose slices are stratified by class)",
    )
    group.add_argument(
        "--val-split",
        type=optional(str),
        default=AUTO,
        help=f"validation split, for best-checkpoint selection; auto = {tfds_splits[1]} for "
        f"TFDS datasets, {folder_splits[1]} for image folders; none = no validation",
    )
    group.add_argument(
        "--test-split",
        type=optional(str),
        default=AUTO,
        help=f"split evaluated into metrics.json at the end; auto = {tfds_splits[2]} for TFDS "
        f"datasets, {folder_splits[2]} for image folders; none = skip",
    )
    group.add_argument(
        "--data-dir",
        type=optional(str),
        default=defaults.data_dir,
        help="TFDS data directory (none = TFDS's default, ~/tensorflow_datasets)",
    )
    group.add_argument(
        "--manual-dir",
        type=optional(str),
        default=defaults.manual_dir,
        help="folder with the original IDX files when TFDS cannot download them "
        "(none = /usr/share/datasets/fashion-mnist for Fashion-MNIST)",
    )
    group.add_argument(
        "--image-size",
        type=optional(image_size),
        default=defaults.image_size,
        metavar="H[,W]",
        help="model input size; images are padded or resized to it (none = the dataset's size, "
        "raised to the model's minimum)",
    )
    group.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=defaults.augment,
        help="padded random crop (+ horizontal flip where the dataset allows) while training",
    )
    group.add_argument(
        "--horizontal-flip",
        action=argparse.BooleanOptionalAction,
        default=defaults.horizontal_flip,
        help="with --augment, mirror half of the training images (default: the dataset's "
        "policy, off for digits, characters and Fashion-MNIST's aligned product photos)",
    )
    group.add_argument(
        "--shuffle-buffer",
        type=number("shuffle_buffer"),
        default=defaults.shuffle_buffer,
        help="examples in the shuffle buffer",
    )

    group = parser.add_argument_group("optimization")
    group.add_argument(
        "--epochs",
        type=number("epochs"),
        default=defaults.epochs,
        help="passes over --train-split; raising it on a finished run trains it further",
    )
    group.add_argument(
        "--batch-size",
        type=number("batch_size"),
        default=defaults.batch_size,
        help="examples per step; the last partial batch is dropped",
    )
    group.add_argument(
        "--optimizer",
        default=defaults.optimizer,
        choices=OPTIMIZERS,
        help="sgd with --momentum, adam, or adamw (decoupled weight decay)",
    )
    group.add_argument(
        "--lr",
        type=optional(number("lr")),
        default=None,
        help="peak learning rate, reached after the warmup, in (0, 10] (none = "
        + ", ".join(f"{rate:g} for {name}" for name, rate in DEFAULT_LR.items())
        + ")",
    )
    group.add_argument(
        "--momentum",
        type=number("momentum"),
        default=defaults.momentum,
        help="SGD momentum, in [0, 1) (sgd only)",
    )
    group.add_argument(
        "--lr-schedule",
        default=defaults.lr_schedule,
        choices=LR_SCHEDULES,
        help="learning-rate decay after the warmup",
    )
    group.add_argument(
        "--warmup-epochs",
        type=number("warmup_epochs"),
        default=defaults.warmup_epochs,
        help="linear warmup from 0 to --lr over this many epochs (fractions allowed)",
    )
    group.add_argument(
        "--lr-decay-rate",
        type=number("lr_decay_rate"),
        default=defaults.lr_decay_rate,
        help="exponential schedule: learning-rate factor per epoch, in (0, 1]",
    )
    group.add_argument(
        "--weight-decay",
        type=optional(number("weight_decay")),
        default=None,
        help="decoupled weight decay on kernels, not on biases or BN's gamma and beta (none = "
        + ", ".join(f"{decay:g} for {name}" for name, decay in DEFAULT_WEIGHT_DECAY.items())
        + ")",
    )
    group.add_argument(
        "--label-smoothing",
        type=number("label_smoothing"),
        default=defaults.label_smoothing,
        help="mix this much of the uniform distribution into the one-hot training targets, in "
        "[0, 1)",
    )

    group = parser.add_argument_group("batch normalization's inference statistics")
    group.add_argument(
        "--bn-statistics",
        default=defaults.bn_statistics,
        choices=BN_STATISTICS,
        help="what BN normalizes with at inference, in validation and in every saved model: "
        "population = recomputed after each epoch as the paper's Algorithm 2 (mean of batch "
        "means, m/(m-1) x mean of batch variances over training batches, weights frozen); "
        "moving = the moving averages kept during training",
    )
    group.add_argument(
        "--bn-statistics-batches",
        type=number("bn_statistics_batches"),
        default=defaults.bn_statistics_batches,
        help="training batches (of --batch-size, no augmentation) that the population "
        "statistics average over; at most one epoch's worth are used",
    )

    group = parser.add_argument_group("distribution")
    group.add_argument(
        "--distribute",
        default=defaults.distribute,
        choices=DISTRIBUTE_MODES,
        help="none: one device; data_parallel: every local GPU (TensorFlow MirroredStrategy, "
        "JAX keras.distribution.DataParallel); multi_worker: several processes or hosts "
        "running the same command (TF_CONFIG, or KERAS_DISTRIBUTION_* on JAX); auto: "
        "multi_worker when the environment names several workers, data_parallel with several "
        "local GPUs, else none. --batch-size stays the global batch",
    )
    group.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=defaults.sync_bn,
        help="BN statistics over the global batch of all replicas (TensorFlow) instead of each "
        "replica's share; JAX's DataParallel always normalizes over the global batch",
    )
    group.add_argument(
        "--collective-timeout",
        type=number("collective_timeout"),
        default=defaults.collective_timeout,
        metavar="SECONDS",
        help="multi_worker on TensorFlow: a collective operation (gradient all-reduce) that "
        f"waits longer than this for a worker fails the run, in (0, {MAX_COLLECTIVE_TIMEOUT:.0f}]"
        "; a killed worker is detected within about 10 s regardless",
    )

    group = parser.add_argument_group("run")
    group.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=defaults.mixed_precision,
        help="mixed_float16 on a GPU, mixed_bfloat16 on CPU; BN statistics stay in float32 "
        "(default: on where the hardware computes it natively: any GPU, a CPU with "
        "AVX512-BF16 or AMX)",
    )
    group.add_argument(
        "--seed",
        type=number("seed"),
        default=defaults.seed,
        help=f"global random seed, in [0, {MAX_SEED}]",
    )
    group.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=defaults.deterministic,
        help="TensorFlow op determinism: bit-identical reruns, somewhat slower",
    )
    group.add_argument(
        "--output-dir",
        type=optional(str),
        default=defaults.output_dir,
        help="run folder (none = runs/<date>-<model>-<dataset>); rerunning resumes it",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run folder that holds a different run",
    )
    return parser


class _DuplicateKeyError(yaml.YAMLError):
    pass


class StrictYamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding the same key twice: PyYAML silently
    keeps the last value, so `batch_size: 64` further up a file would be accepted and ignored."""


def _construct_mapping_without_duplicates(loader: StrictYamlLoader, node: yaml.MappingNode):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise _DuplicateKeyError(
                f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one"
            )
    return loader.construct_mapping(node, deep=True)


StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates
)


def read_yaml_mapping(path: str, what: str, error: type[ValueError] = UsageError) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty for an empty file), read strictly.

    Raises:
        `error` (UsageError for a `--config` file, a command-line error; ValueError for a run
        folder's file): invalid YAML, a key set twice, or something other than a mapping; the
        message starts with `what` (e.g. `--config run.yaml`).
    """
    with open(path, encoding="utf-8") as stream:
        try:
            values = yaml.load(stream, Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader)
        except _DuplicateKeyError as problem:
            raise error(f"{what}: {problem}") from None
        except yaml.YAMLError as problem:
            raise error(f"{what}: not valid YAML ({' '.join(str(problem).split())})") from None
        except UnicodeDecodeError:
            raise error(f"{what}: not a text (UTF-8) file") from None
        except RecursionError:
            raise error(f"{what}: nested too deeply to be a config file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise error(f"{what}: expected a mapping of option: value, got {values!r}")
    return values


def is_run_config(path: str) -> bool:
    """Whether `path` is the `config.yaml` that `train.py` wrote into a run folder."""
    if os.path.basename(path) != CONFIG_FILENAME:
        return False
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.readline().rstrip("\n") == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _config_file_argv(path: str, parser: ArgumentParser) -> list[str]:
    """Turn a YAML config file into command-line tokens, so argparse checks and converts its
    values exactly like flags, and real flags placed after them win.

    A run folder's own `config.yaml` runs in that folder, wherever it has moved and whatever the
    working directory: its `output_dir` becomes the file's folder (`--output-dir` still wins).
    """
    if os.path.isdir(path):
        inside = os.path.join(path, CONFIG_FILENAME)
        hint = f"; did you mean --config {inside}?" if os.path.isfile(inside) else ""
        raise FileNotFoundError(f"--config {path}: is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    values = read_yaml_mapping(path, f"--config {path}")
    actions = {
        action.dest: action
        for action in parser._actions
        if action.option_strings and action.dest not in ("help", "config", "debug")
    }
    spelled: dict[str, str] = {}
    argv: list[str] = []
    for key, value in values.items():
        name = _field_name(str(key))
        if name not in actions:
            raise UsageError(
                f"--config {path}: unknown option {key!r}{close_matches(name, actions)}"
            )
        if name in spelled:
            raise UsageError(
                f"--config {path}: {spelled[name]!r} and {key!r} set the same option; keep one"
            )
        spelled[name] = str(key)
        argv += _option_tokens(actions[name], name, key, value, f"--config {path}")
    if is_run_config(path):
        argv += ["--output-dir", os.path.dirname(path) or os.curdir]
    return argv


def _option_tokens(
    action: argparse.Action, name: str, key: Any, value: Any, what: str
) -> list[str]:
    """The command-line tokens that set option `name` to a config file's `value`."""
    flag = action.option_strings[0]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if value is None and name in AUTO_SWITCHES:
            return []  # null: the automatic choice, which is the option's default
        if not isinstance(value, bool):
            expected = "true, false or null" if name in AUTO_SWITCHES else "true or false"
            raise UsageError(f"{what}: {key} must be {expected}, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []
    if name == "model_args":
        if value is None:
            return []
        if not isinstance(value, dict):
            raise UsageError(f"{what}: model_args must be a mapping such as {{widths: [32, 64]}}")
        tokens = []
        for arg_key, arg_value in value.items():
            try:
                text = json.dumps(arg_value, allow_nan=True)
            except TypeError:
                raise UsageError(
                    f"{what}: model_args {arg_key}: {arg_value!r} is a "
                    f"{type(arg_value).__name__}; use numbers, strings, true/false, null or "
                    "lists of them"
                ) from None
            tokens += [flag, f"{arg_key}={text}"]
        return tokens
    if value is None:
        if not getattr(action.type, "accepts_none", False):
            raise UsageError(f"{what}: {key} needs a value, got null")
        return [flag, "none"]
    if isinstance(value, bool):
        raise UsageError(
            f"{what}: {key} must be a value, got {str(value).lower()}"
            + (" (use null to turn it off)" if name in ("val_split", "test_split") else "")
        )
    if isinstance(value, list) and name == "image_size":
        return [flag, ",".join(str(item) for item in value)]
    if isinstance(value, (list, dict)):
        raise UsageError(f"{what}: {key} must be a single value, got {value!r}")
    return [flag, str(value)]


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse `train.py`'s command line (and its `--config` file) into a validated `TrainConfig`
    whose `output_dir` is resolved.

    Raises:
        UsageError: anything wrong with the command line or the config file's contents.
        FileNotFoundError: `--config` names no file.
    """
    parser = build_train_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config:
        args = parser.parse_args([*_config_file_argv(args.config, parser), *argv])
    values = vars(args)
    for key in ("config", "debug"):
        values.pop(key)
    # `--model-arg` is repeatable; later values (command line after file) win per key.
    values["model_args"] = dict(values["model_args"] or [])
    config = TrainConfig(**values).validate()
    if config.output_dir is None:
        config.output_dir = default_output_dir(config)
    return config


# --- The run folder's config ---------------------------------------------------------------------

CONFIG_FILENAME = "config.yaml"
#: The first line of every config.yaml train.py writes; `is_run_config` recognizes it by it.
CONFIG_HEADER = "# bnzoo training run: the resolved configuration."


def save_config(config: TrainConfig, run_dir: str | os.PathLike) -> str:
    """Write the resolved config as `run_dir/config.yaml` (atomically); return its path.

    Locations are stored as absolute paths, so the file means the same run from any working
    directory (and `--config` of a run's own config.yaml always trains in that folder).
    """
    path = os.path.join(run_dir, CONFIG_FILENAME)
    header = (
        f"{CONFIG_HEADER}\n"
        f"# Repeat, resume or extend it with: python train.py --config {os.path.abspath(path)}\n"
    )
    values = config.to_dict()
    # `--overwrite` is an action on the folder, not a property of the run: saved, it would make
    # `--config runs/<run>/config.yaml` silently wipe the run it is meant to repeat.
    values.pop("overwrite")
    for key in ("data_dir", "manual_dir"):
        if values[key] is not None:
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    values["output_dir"] = os.path.abspath(run_dir)
    atomic_write_text(path, header + yaml.safe_dump(values, sort_keys=False))
    return path


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """Read a run folder's `config.yaml` back into a `TrainConfig`."""
    path = os.path.join(run_dir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a bnzoo run folder: it has no {CONFIG_FILENAME}")
    return TrainConfig.from_dict(read_yaml_mapping(path, path, ValueError), source=path)


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Human-readable `key: saved -> current` for every identity field that differs."""
    old, new = saved.identity(), current.identity()
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
