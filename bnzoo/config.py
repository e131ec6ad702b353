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
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bnzoo.atomic_files import atomic_write_text
from bnzoo.cli import UsageError

NORMALIZATIONS = ("batch_norm", "keras", "none")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "exponential", "cosine")
DISTRIBUTE_MODES = ("auto", "none", "data_parallel", "multi_worker")
BN_STATISTICS = ("population", "moving")

#: Model keywords that `train.py` sets itself (from the dataset or from a dedicated flag), so a
#: `--model-arg` for them would be silently overridden or contradict the flag.
RESERVED_MODEL_ARGS = {
    "include_top": "train.py always trains the classifier",
    "weights": "train.py trains from scratch",
    "input_tensor": "train.py builds the input from the dataset",
    "input_shape": "the input shape comes from the dataset; use --image-size to resize or pad",
    "classes": "the number of classes comes from the dataset",
    "classifier_activation": "train.py trains on logits and the export adds the softmax",
    "normalization": "use --normalization",
    "bn_momentum": "use --bn-momentum",
    "bn_epsilon": "use --bn-epsilon",
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


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run; `train.py`'s flags map one to one onto fields.

    The defaults are `python train.py`: `plain_cnn` with Batch Normalization on Fashion-MNIST,
    trained with SGD + momentum at the high learning rate BN allows (Ioffe & Szegedy 2015,
    section 3.3) on a cosine schedule, sized to reach 90% test accuracy in about 10 minutes on a
    2-core CPU.

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
    normalization: str = "batch_norm"
    bn_momentum: float | None = None
    bn_epsilon: float | None = None
    # Data.
    dataset: str = "fashion_mnist"
    train_split: str = "train[:90%]"
    val_split: str | None = "train[90%:]"
    test_split: str | None = "test"
    data_dir: str | None = None
    manual_dir: str | None = None
    image_size: tuple[int, int] | None = None
    augment: bool = False
    shuffle_buffer: int = 10_000
    # Optimization.
    epochs: int = 5
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
    mixed_precision: bool = False
    seed: int = 42
    deterministic: bool = False
    output_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        # Resolved here, so that config.yaml records the numbers the run actually used.
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer)
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY.get(self.optimizer)
        if self.image_size is not None:
            self.image_size = tuple(int(size) for size in self.image_size)
        self.model_args = dict(self.model_args)

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad value and the fix; return self when all is well."""
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("bn-statistics", self.bn_statistics, BN_STATISTICS)
        _check_choice("distribute", self.distribute, DISTRIBUTE_MODES)
        for name in ("epochs", "batch_size", "shuffle_buffer", "bn_statistics_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        if self.lr is None or not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay is None or not 0 <= self.weight_decay < 1:
            raise ValueError(f"--weight-decay must be in [0, 1), got {self.weight_decay!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"--lr-decay-rate must be in (0, 1], got {self.lr_decay_rate!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"--warmup-epochs must be at least 0 and less than --epochs ({self.epochs}), "
                f"got {self.warmup_epochs!r}"
            )
        if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
            raise ValueError(f"--bn-momentum must be in [0, 1), got {self.bn_momentum!r}")
        if self.bn_epsilon is not None and not self.bn_epsilon > 0:
            raise ValueError(f"--bn-epsilon must be positive, got {self.bn_epsilon!r}")
        if not self.collective_timeout > 0:
            raise ValueError(
                f"--collective-timeout must be a positive number of seconds, got "
                f"{self.collective_timeout!r}"
            )
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(
                f"--image-size must be one or two positive integers, got {self.image_size!r}"
            )
        if not self.train_split:
            raise ValueError("--train-split must name a split, e.g. 'train[:90%]'")
        for key in self.model_args:
            if key in RESERVED_MODEL_ARGS:
                raise ValueError(
                    f"--model-arg {key}=... is not allowed: {RESERVED_MODEL_ARGS[key]}"
                )
        return self

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
                raise ValueError(f"{source}: unknown key {key!r}{_close_matches(key, known)}")
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

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_name(key: str) -> str:
    return key.replace("-", "_")


def _close_matches(value: str, options: Sequence[str] | set[str]) -> str:
    matches = difflib.get_close_matches(value, sorted(options), n=3)
    return f"; did you mean {', '.join(map(repr, matches))}?" if matches else ""


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(
            f"--{name} must be one of {', '.join(choices)}, got {value!r}"
            f"{_close_matches(str(value), choices)}"
        )


def _none_or(convert):
    """An argparse type that also accepts 'none' (or 'null') for "not set"."""

    def parse(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
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


def image_size(text: str) -> tuple[int, int]:
    """argparse type: '32' (square), '32,48' or '32x48' (height, width)."""
    parts = [part for part in re.split(r"[,x\s]+", text.strip().strip("[]()")) if part]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected SIZE or HEIGHT,WIDTH in pixels (e.g. 32 or 32,48), got {text!r}"
        )
    return (sizes[0], sizes[1])


def parse_literal(text: str) -> Any:
    """A `--model-arg` value: a Python literal (`0.5`, `[32, 64]`, `(3, 3)`, `1e-3`) or, failing
    that, YAML (`true`, `null`, bare words such as `relu`)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def model_arg(text: str) -> tuple[str, Any]:
    """argparse type: `key=value` for one model builder keyword."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY a builder keyword (e.g. widths=[32,64]), got {text!r}"
        )
    return key, parse_literal(value.strip())


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
    )
    parser.add_argument(
        "--config",
        metavar="RUN.yaml",
        help="YAML file of option values (keys as below, e.g. batch_size: 64); flags given on "
        "the command line override it. A run folder's config.yaml repeats that run.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback for errors")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=defaults.model, help="registered model name")
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
        "--normalization",
        default=defaults.normalization,
        choices=NORMALIZATIONS,
        help="batch_norm: bnzoo's Ioffe & Szegedy layer; keras: keras.layers.BatchNormalization; "
        "none: no normalization (the paper's baseline)",
    )
    group.add_argument(
        "--bn-momentum",
        type=_none_or(float),
        default=defaults.bn_momentum,
        help="moving-average momentum of the BN statistics (none = the builder's default)",
    )
    group.add_argument(
        "--bn-epsilon",
        type=_none_or(float),
        default=defaults.bn_epsilon,
        help="epsilon added to the variance (none = the builder's default)",
    )

    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="any TFDS name, or image_folder:/path (one sub-folder per class)",
    )
    group.add_argument("--train-split", default=defaults.train_split, help="TFDS split syntax")
    group.add_argument(
        "--val-split",
        type=_none_or(str),
        default=defaults.val_split,
        help="validation split, for best-checkpoint selection (none = no validation)",
    )
    group.add_argument(
        "--test-split",
        type=_none_or(str),
        default=defaults.test_split,
        help="split evaluated into metrics.json at the end (none = skip)",
    )
    group.add_argument(
        "--data-dir",
        type=_none_or(str),
        default=defaults.data_dir,
        help="TFDS data directory (none = TFDS's default, ~/tensorflow_datasets)",
    )
    group.add_argument(
        "--manual-dir",
        type=_none_or(str),
        default=defaults.manual_dir,
        help="folder with the original IDX files when TFDS cannot download them "
        "(none = /usr/share/datasets/fashion-mnist for Fashion-MNIST)",
    )
    group.add_argument(
        "--image-size",
        type=_none_or(image_size),
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
        "--shuffle-buffer",
        type=positive_int,
        default=defaults.shuffle_buffer,
        help="examples in the shuffle buffer",
    )

    group = parser.add_argument_group("optimization")
    group.add_argument(
        "--epochs", type=positive_int, default=defaults.epochs, help="passes over --train-split"
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
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
        type=_none_or(float),
        default=None,
        help="peak learning rate, reached after the warmup (none = "
        + ", ".join(f"{rate:g} for {name}" for name, rate in DEFAULT_LR.items())
        + ")",
    )
    group.add_argument(
        "--momentum", type=float, default=defaults.momentum, help="SGD momentum (sgd only)"
    )
    group.add_argument(
        "--lr-schedule",
        default=defaults.lr_schedule,
        choices=LR_SCHEDULES,
        help="learning-rate decay after the warmup",
    )
    group.add_argument(
        "--warmup-epochs",
        type=float,
        default=defaults.warmup_epochs,
        help="linear warmup from 0 to --lr over this many epochs (fractions allowed)",
    )
    group.add_argument(
        "--lr-decay-rate",
        type=float,
        default=defaults.lr_decay_rate,
        help="exponential schedule: learning-rate factor per epoch",
    )
    group.add_argument(
        "--weight-decay",
        type=_none_or(float),
        default=None,
        help="decoupled weight decay on kernels, not on biases or BN's gamma and beta (none = "
        + ", ".join(f"{decay:g} for {name}" for name, decay in DEFAULT_WEIGHT_DECAY.items())
        + ")",
    )
    group.add_argument(
        "--label-smoothing",
        type=float,
        default=defaults.label_smoothing,
        help="mix this much of the uniform distribution into the one-hot training targets",
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
        type=positive_int,
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
        type=float,
        default=defaults.collective_timeout,
        metavar="SECONDS",
        help="multi_worker on TensorFlow: a collective operation (gradient all-reduce) that "
        "waits longer than this for a worker fails the run; a killed worker is detected "
        "within about 10 s regardless",
    )

    group = parser.add_argument_group("run")
    group.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=defaults.mixed_precision,
        help="mixed_float16 on a GPU, mixed_bfloat16 on CPU; BN statistics stay in float32",
    )
    group.add_argument("--seed", type=int, default=defaults.seed, help="global random seed")
    group.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=defaults.deterministic,
        help="TensorFlow op determinism: bit-identical reruns, somewhat slower",
    )
    group.add_argument(
        "--output-dir",
        type=_none_or(str),
        default=defaults.output_dir,
        help="run folder (none = runs/<date>-<model>-<dataset>); rerunning resumes it",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run folder that holds a different run",
    )
    return parser


def _config_file_argv(path: str, parser: ArgumentParser) -> list[str]:
    """Turn a YAML config file into command-line tokens, so argparse checks and converts its
    values exactly like flags, and real flags placed after them win."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as stream:
        try:
            values = yaml.safe_load(stream)
        except yaml.YAMLError as error:
            raise ValueError(
                f"--config {path}: not valid YAML ({' '.join(str(error).split())})"
            ) from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {values!r}")
    actions = {
        action.dest: action
        for action in parser._actions
        if action.option_strings and action.dest not in ("help", "config", "debug")
    }
    argv: list[str] = []
    for key, value in values.items():
        name = _field_name(str(key))
        if name not in actions:
            raise UsageError(
                f"--config {path}: unknown option {key!r}{_close_matches(name, actions)}"
            )
        action = actions[name]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
            if value:
                argv.append(flag)
        elif name == "model_args":
            if not isinstance(value, dict):
                raise UsageError(
                    f"--config {path}: model_args must be a mapping such as {{widths: [32, 64]}}"
                )
            for arg_key, arg_value in value.items():
                argv += [flag, f"{arg_key}={json.dumps(arg_value)}"]
        elif value is None:
            argv += [flag, "none"]
        elif isinstance(value, list):
            argv += [flag, ",".join(str(item) for item in value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse `train.py`'s command line (and its `--config` file) into a validated `TrainConfig`
    whose `output_dir` is resolved."""
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


def save_config(config: TrainConfig, run_dir: str | os.PathLike) -> str:
    """Write the resolved config as `run_dir/config.yaml` (atomically); return its path."""
    path = os.path.join(run_dir, CONFIG_FILENAME)
    header = (
        "# bnzoo training run: the resolved configuration.\n"
        f"# Repeat or resume it with: python train.py --config {path}\n"
    )
    values = config.to_dict()
    # `--overwrite` is an action on the folder, not a property of the run: saved, it would make
    # `--config runs/<run>/config.yaml` silently wipe the run it is meant to repeat.
    values.pop("overwrite")
    atomic_write_text(path, header + yaml.safe_dump(values, sort_keys=False))
    return path


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """Read a run folder's `config.yaml` back into a `TrainConfig`."""
    path = os.path.join(run_dir, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a bnzoo run folder: it has no {CONFIG_FILENAME}")
    with open(path, encoding="utf-8") as stream:
        try:
            values = yaml.safe_load(stream) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return TrainConfig.from_dict(values, source=path)


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Human-readable `key: saved -> current` for every identity field that differs."""
    old, new = saved.identity(), current.identity()
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
