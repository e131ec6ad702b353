"""Shared machinery for the paper's experiments: one CLI, seeding, data as arrays, a step-based
training loop with periodic evaluation and probes, JSON writing and plots.

Every experiment script (``experiments/exp*_*.py``) is a thin description of *what* to train and
*what* to measure; this module is the *how*, so that all experiments train, evaluate, time and
record results the same way and differ only where the paper's setups differ.

Design choices, and why:

* **Arrays, not an input pipeline.** The experiments train tiny models for thousands of small
  steps (the paper's §4.1 uses mini-batches of 60). The whole Fashion-MNIST training set fits in
  memory, so it is loaded once through ``bnzoo.data`` (``load_dataset`` + ``preprocess_images``,
  the same normalization as ``train.py``) and sampled by index inside the compiled step, which
  keeps a step well under a millisecond of overhead on a 2-core CPU.
* **Chunks of steps in one ``tf.function``.** ``eval_every`` steps run inside one graph call
  (a ``tf.range`` loop), so Python is entered only at evaluation points. Per-step losses come
  back as a vector, which is what the layer-vs-Keras comparison plots.
* **Sampling without replacement, one seeded permutation per epoch**, so two runs with the same
  seed see exactly the same mini-batches (needed to compare two BN implementations step by step).
* **BN networks are evaluated with the paper's inference statistics** (Algorithm 2: population
  mean and variance over training mini-batches, weights frozen), recomputed at every evaluation
  point (``layers.recompute_population_statistics``); the moving averages' accuracy is recorded
  next to it (``PopulationStatistics``).
* **Probes** are callables evaluated at every evaluation point (percentiles of a sigmoid input,
  per-layer gradient norms). Gradient probes use ``Model.stateless_call`` so that looking at a
  model in training mode does not move its BN moving averages.
* **A run is its folder**: ``config.json`` (the resolved config, written before training) and
  ``results.json`` (every measured number, strict JSON) next to the plots;
  ``--config <folder>/config.json`` repeats the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "experiments" / "results"
BUDGETS = ("smoke", "full")

# Fashion-MNIST and MNIST both have 10 classes; the accuracy of guessing.
CHANCE_ACCURACY_10_CLASSES = 0.1

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.machine import describe_machine  # noqa: E402

# Experiments build many small models on purpose; TensorFlow warns that each new model's
# compiled functions are "retracing", which is expected here and would bury the progress lines.
tf.get_logger().setLevel("ERROR")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from layers import batch_norm_layers, recompute_population_statistics  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Command line and configuration
# ---------------------------------------------------------------------------------------------


def build_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The flags every experiment script accepts.

    Flags left out are ``None`` here, so that ``resolve_config`` can tell a flag given on the
    command line (which overrides) from one left out (which keeps the preset or ``--config``).

    Args:
        name: the experiment's name (its script's stem), used for the default output folder.
        description: first line of ``--help``.
    """
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"folder for config.json, results.json and the PNG plots "
        f"(default: experiments/results/{name})",
    )
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default=None,
        help="'full' (default): the run documented in docs/RESULTS.md; 'smoke': a check in seconds",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="repeat a run from the config.json it saved (other flags still override it)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="every training run of the experiment trains this many steps",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed for weights and batch order (default: 0)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data_dir (default: TFDS' own default)"
    )
    parser.add_argument(
        "--manual-dir",
        default=None,
        help="folder with Fashion-MNIST's IDX files (default: /usr/share/datasets/fashion-mnist)",
    )
    return parser


def resolve_config(
    args: argparse.Namespace, presets: Mapping[str, Mapping[str, Any]], name: str
) -> dict:
    """The config a run is made from, and can be repeated from: preset, then command line.

    Args:
        args: parsed command line from ``build_parser`` (plus any experiment-specific flags).
        presets: ``{"smoke": {...}, "full": {...}}``.
        name: the experiment's name.

    Returns:
        A JSON-serializable dict: the budget's preset (or the ``--config`` file), overridden by
        every flag given on the command line. ``--steps N`` sets every ``*steps`` entry.

    Raises:
        ValueError: ``--steps`` below 1; ``--config`` of another experiment, or together with
            ``--budget``.
        FileNotFoundError: ``--config`` names no file.
    """
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive number of training steps, got {args.steps}.")
    if args.config is not None:
        if args.budget is not None:
            raise ValueError(
                f"--config {args.config} and --budget {args.budget} both choose the run's "
                "settings; pass only one of them."
            )
        config = read_json(args.config)
        if config.get("experiment") != name:
            raise ValueError(
                f"--config {args.config} is the config of {config.get('experiment')!r}, not of "
                f"{name!r}; pass experiments/results/{name}/config.json."
            )
        # Repeating a run writes a new folder (--output-dir, else the default), never over the
        # run it repeats; a published config's folder may not even exist here.
        config.pop("output_dir", None)
    else:
        config = {"budget": args.budget or "full", **presets[args.budget or "full"]}
    for key, value in vars(args).items():
        if key != "config" and (value is not None or key not in config):
            config[key] = str(value) if isinstance(value, Path) else value
    config["budget"] = config["budget"] or "full"
    config["seed"] = 0 if config["seed"] is None else config["seed"]
    config["output_dir"] = config["output_dir"] or str(RESULTS_ROOT / name)
    if args.steps is not None:
        # Every training run of the experiment, including secondary runs with their own preset
        # length (a sweep, a second model).
        for key in config:
            if key.endswith("steps"):
                config[key] = args.steps
    config["experiment"] = name
    return config


def run_experiment(
    name: str,
    description: str,
    presets: Mapping[str, Mapping[str, Any]],
    run: Callable[[dict, Path], dict],
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict:
    """Parses the command line, runs one experiment and writes its config and results.

    The resolved config is written *before* training starts, so a crashed run still says what it
    was; ``results.json`` is written at the end with the runtime and the machine.

    Args:
        name: the experiment's name (``exp1_mnist_mlp``).
        description: one-line description for ``--help``.
        presets: the ``smoke`` and ``full`` budgets.
        run: ``run(config, output_dir) -> results``; it saves its own plots into ``output_dir``.
        argv: command-line arguments (``None``: ``sys.argv[1:]``).
        add_arguments: adds experiment-specific flags to the parser.

    Returns:
        The results dict that was written to ``results.json``.
    """
    parser = build_parser(name, description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    require_tensorflow_backend()
    config = resolve_config(args, presets, name)
    output_dir = Path(config["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "config.json", config)

    started = time.perf_counter()
    results = run(config, output_dir)
    results = {
        "experiment": name,
        "budget": config["budget"],
        "runtime_seconds": time.perf_counter() - started,
        "environment": environment(),
        **results,
    }
    write_json(output_dir / "results.json", results)
    print(f"{name}: wrote {output_dir / 'results.json'} ({results['runtime_seconds']:.0f} s)")
    return results


def cli_main(
    name: str,
    description: str,
    presets: Mapping[str, Mapping[str, Any]],
    run: Callable[[dict, Path], dict],
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """``run_experiment`` for a script's ``__main__``: user errors become one line and exit 2."""
    try:
        run_experiment(name, description, presets, run, argv, add_arguments)
    except (ValueError, FileNotFoundError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    return 0


def require_tensorflow_backend() -> None:
    """The loop below uses ``tf.function`` and ``tf.GradientTape``; say so instead of failing."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"The experiments run on the TensorFlow backend, but KERAS_BACKEND is {backend!r}. "
            "Unset KERAS_BACKEND or set KERAS_BACKEND=tensorflow."
        )


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras, so weights and dropout masks repeat."""
    keras.utils.set_random_seed(seed)


def environment() -> dict:
    """What the numbers were measured on; RESULTS.md quotes it next to every runtime."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        # Model and instruction sets: oneDNN's kernels, so every wall time, depend on them.
        "cpu": describe_machine().describe(),
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        # Other processes' load slows every timing; it is recorded so timings can be judged.
        "load_average_1_5_15_min": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """One dataset split, preprocessed exactly like ``train.py`` does, held as NumPy arrays.

    Attributes:
        images: float32 ``[N, H, W, C]``, ``(x/255 - mean) / std`` and resized/padded.
        labels: int32 ``[N]``.
        info: the ``bnzoo.data.DatasetInfo`` of the split.
    """

    images: np.ndarray
    labels: np.ndarray
    info: Any

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, count: int, seed: int) -> ArraySplit:
        """A fixed random subset of ``count`` examples (all of them when ``count`` is larger).

        Evaluation every few hundred steps uses such a subset: its accuracy has a standard error
        of about 0.7 points at 2,000 examples, small next to the effects measured, at a fifth of
        the cost of the full test set.
        """
        if count >= self.num_examples:
            return self
        order = np.sort(np.random.default_rng(seed).choice(self.num_examples, count, replace=False))
        return ArraySplit(self.images[order], self.labels[order], self.info)


@functools.lru_cache(maxsize=8)
def load_split(
    dataset: str,
    split: str,
    image_size: tuple[int, int] | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> ArraySplit:
    """Loads a split through ``bnzoo.data`` and preprocesses it once into arrays.

    Cached, so experiments run in one process (``run_all`` and the smoke test) read each split
    once. The arrays are made read-only because they are shared.

    Args:
        dataset: a ``bnzoo.data`` dataset name (``"fashion_mnist"``, ``"mnist"``).
        split: TFDS split syntax (``"train"``, ``"test"``, ``"train[:2000]"``).
        image_size: ``(H, W)`` the model expects, e.g. ``(32, 32)`` for ``bn_inception``; ``None``
            keeps the dataset's size.
        data_dir: TFDS data_dir.
        manual_dir: folder with the dataset's IDX files.

    Raises:
        ValueError / FileNotFoundError: from ``bnzoo.data`` for unknown datasets or missing files.
    """
    from bnzoo.data import load_dataset, preprocess_images

    ds, info = load_dataset(dataset, split=split, data_dir=data_dir, manual_dir=manual_dir)

    def preprocess(images, labels):
        return (
            preprocess_images(images, mean=info.mean, std=info.std, image_size=image_size),
            tf.cast(labels, tf.int32),
        )

    batches = ds.batch(4096).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    for image_batch, label_batch in batches.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        raise ValueError(f"Split {split!r} of {dataset!r} is empty; choose a non-empty split.")
    split_arrays = ArraySplit(np.concatenate(images), np.concatenate(labels), info)
    split_arrays.images.setflags(write=False)
    split_arrays.labels.setflags(write=False)
    return split_arrays


def dataset_available(dataset: str, manual_dir: str | None, data_dir: str | None) -> str | None:
    """``None`` when ``dataset`` loads, else the one-line reason it does not (for skipping)."""
    try:
        load_split(dataset, "test", None, data_dir, manual_dir)
    except (FileNotFoundError, ValueError) as error:
        return str(error)
    return None


class BatchSampler:
    """Mini-batch indices: one seeded permutation per epoch, batches drawn without replacement.

    Two samplers with the same seed produce the same batches, so two models trained with the same
    seed see identical data in identical order.

    With a `shuffle_buffer` smaller than the split, an epoch's order is what `tf.data`'s
    `shuffle(shuffle_buffer)` makes of the split's stored order (as `train.py`'s pipeline
    shuffles): a partial shuffle, in which examples stored close together tend to share
    batches. Section 4.2.1's "shuffle training examples more thoroughly" is the difference.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, shuffle_buffer: int | None = None
    ):
        if batch_size > num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {num_examples} training examples; "
                "use a smaller batch or a larger split."
            )
        if shuffle_buffer is not None and shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be a positive number, got {shuffle_buffer}.")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self._rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int32)
        self._position = 0

    def _epoch_order(self) -> np.ndarray:
        buffer_size = self.shuffle_buffer
        if buffer_size is None or buffer_size >= self.num_examples:
            return self._rng.permutation(self.num_examples).astype(np.int32)
        # tf.data's shuffle: fill the buffer from the stored order, then each output is a
        # uniformly drawn slot, refilled with the next stored example while any are left.
        buffer = list(range(buffer_size))
        order = np.empty(self.num_examples, dtype=np.int32)
        draws = self._rng.random(self.num_examples)
        following = buffer_size
        for position in range(self.num_examples):
            slot = int(draws[position] * len(buffer))
            order[position] = buffer[slot]
            if following < self.num_examples:
                buffer[slot] = following
                following += 1
            else:
                buffer[slot] = buffer[-1]
                buffer.pop()
        return order

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def take(self, steps: int) -> np.ndarray:
        """Indices for the next ``steps`` batches, int32 ``[steps, batch_size]``."""
        batches = np.empty((steps, self.batch_size), dtype=np.int32)
        for step in range(steps):
            if self._position + self.batch_size > self._order.shape[0]:
                # The remainder of an epoch is dropped so that every batch has the same size
                # (BN's batch statistics depend on it).
                self._order = self._epoch_order()
                self._position = 0
            batches[step] = self._order[self._position : self._position + self.batch_size]
            self._position += self.batch_size
        return batches


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

Probe = Callable[[keras.Model], dict]


@dataclasses.dataclass
class TrainingRun:
    """Everything measured while training one model.

    Attributes:
        steps: the step count at each evaluation point (0 = at initialization).
        eval_accuracy / eval_loss: on the fixed evaluation subset, at each evaluation point;
            a BN network infers with the population statistics of Algorithm 2
            (``PopulationStatistics``), recomputed at each point.
        eval_accuracy_moving_averages: the same accuracy with BN's moving averages, what
            ``model.predict`` would give (BN networks only).
        train_loss: mean training loss over the steps since the previous evaluation point (at
            step 0, where no step was taken, the eval loss).
        step_losses: every step's training loss (only when ``record_step_losses``).
        chunk_seconds: wall time of each chunk of training steps (the first includes tracing).
        learning_rate: the learning rate of the next step, at each evaluation point.
        probes: name -> list of values, one per evaluation point.
        diverged_at_step: first evaluation point whose loss or weights were not finite.
        final_test_accuracy / final_test_loss: on the full test split after training
            (population statistics); ``final_test_accuracy_moving_averages`` with the moving
            averages.
    """

    steps: list[int] = dataclasses.field(default_factory=list)
    eval_accuracy: list[float] = dataclasses.field(default_factory=list)
    eval_accuracy_moving_averages: list[float] = dataclasses.field(default_factory=list)
    eval_loss: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    step_losses: list[float] = dataclasses.field(default_factory=list)
    chunk_seconds: list[float] = dataclasses.field(default_factory=list)
    learning_rate: list[float] = dataclasses.field(default_factory=list)
    probes: dict[str, list] = dataclasses.field(default_factory=dict)
    diverged_at_step: int | None = None
    final_test_accuracy: float | None = None
    final_test_loss: float | None = None
    final_test_accuracy_moving_averages: float | None = None

    @property
    def best_accuracy(self) -> float:
        return max(self.eval_accuracy)

    @property
    def best_step(self) -> int:
        return self.steps[int(np.argmax(self.eval_accuracy))]

    @property
    def train_seconds(self) -> float:
        return float(sum(self.chunk_seconds))

    def steps_to_reach(self, target: float) -> int | None:
        """The first evaluation step at which accuracy is at least ``target`` (``None``: never)."""
        return steps_to_reach(self.steps, self.eval_accuracy, target)

    def summary(self) -> dict:
        """The headline numbers of the run (what the tables in RESULTS.md show)."""
        return {
            "best_eval_accuracy": self.best_accuracy,
            "best_eval_step": self.best_step,
            "final_eval_accuracy": self.eval_accuracy[-1],
            "final_test_accuracy": self.final_test_accuracy,
            "final_test_loss": self.final_test_loss,
            "final_test_accuracy_moving_averages": self.final_test_accuracy_moving_averages,
            "diverged_at_step": self.diverged_at_step,
            "steps_trained": self.steps[-1],
            "train_seconds": self.train_seconds,
        }

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "summary": self.summary()}


def steps_to_reach(steps: Sequence[int], accuracies: Sequence[float], target: float) -> int | None:
    """The first step whose accuracy is at least ``target``, as in the paper's Figure 3."""
    for step, accuracy in zip(steps, accuracies, strict=True):
        if accuracy >= target:
            return int(step)
    return None


def sgd(learning_rate: float, momentum: float = 0.0) -> keras.optimizers.Optimizer:
    """Plain or momentum SGD, the optimizers the paper uses (§4.1 and §4.2)."""
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)


def _loss_fn(labels, logits):
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _weights_finite(model: keras.Model) -> bool:
    return all(bool(np.all(np.isfinite(w.numpy()))) for w in model.trainable_weights)


def evaluate(model: keras.Model, data: ArraySplit, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (inference mode) on ``data``.

    A model whose weights went to NaN has NaN logits; ``argmax`` then picks class 0, so its
    accuracy is reported as what it is: near chance.
    """
    losses, correct = [], 0
    for start in range(0, data.num_examples, batch_size):
        images = data.images[start : start + batch_size]
        labels = data.labels[start : start + batch_size]
        # Keras compiles (and caches on the model) its own inference function here.
        logits = np.asarray(model.predict_on_batch(images))
        losses.append(_loss_fn(labels, logits).numpy())
        correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
    return float(np.mean(np.concatenate(losses))), correct / data.num_examples


class PopulationStatistics:
    """Evaluation with the paper's inference statistics (Algorithm 2), then back to training.

    ``applied()`` replaces every BN layer's moving statistics by Algorithm 2's population
    statistics over the training mini-batches of ``images`` with the current weights
    (``layers.recompute_population_statistics``: the mean of the batch means and ``m / (m - 1)``
    times the mean of the batch variances), and puts the moving averages back afterwards, so
    that training continues exactly as if nothing had been evaluated.

    Why: the moving averages (what ``model.predict`` uses) trail the weights, and in short runs
    at high learning rates they can be far off: exp3's sigmoid CNN with BN scores 85% on the
    test set with these statistics after 1,500 steps, and 59% with its moving averages.
    Evaluating with Algorithm 2's statistics measures the network the paper defines; the
    moving-average accuracy is recorded alongside it.

    Args:
        model: the model (any BN layers: bnzoo's or Keras', any axis, nested).
        images: training images the statistics are estimated on (a fixed subset); only whole
            batches are used, so every batch has Algorithm 2's size ``m``.
        batch_size: the training batch size.
    """

    def __init__(self, model: keras.Model, images: np.ndarray, batch_size: int):
        self.model = model
        self.layers = batch_norm_layers(model)
        self._batch_size = min(batch_size, images.shape[0])
        self._images = images[: images.shape[0] // self._batch_size * self._batch_size]

    @contextlib.contextmanager
    def applied(self):
        """Within the block, every BN layer infers with the population statistics."""
        if not self.layers:
            yield
            return
        # Moving statistics, renorm's moving stddev, momentum=None's counter: all BN state.
        variables = [v for layer in self.layers for v in layer.non_trainable_variables]
        saved = [v.numpy() for v in variables]
        try:
            recompute_population_statistics(self.model, self._images, batch_size=self._batch_size)
            yield
        finally:
            for variable, value in zip(variables, saved, strict=True):
                variable.assign(value)


class Trainer:
    """Trains one model in chunks of compiled steps, evaluating between chunks; resumable.

    ``Trainer.train(steps)`` can be called repeatedly: the step counter, the batch order and the
    record carry on. That lets an experiment interleave two models epoch by epoch, so that the
    load of a shared machine affects both timings alike.

    The model must output logits (build it with ``classifier_activation=None``). Evaluation and
    probes run at step 0 (initialization), every ``eval_every`` steps and at the last step.

    Args:
        model: a built Keras model mapping ``train_data.images`` to logits.
        train_data: the training split.
        eval_data: the fixed subset evaluated at each evaluation point.
        optimizer: a fresh optimizer for this model.
        batch_size: examples per step.
        eval_every: steps between evaluation points (and per compiled chunk).
        seed: seed of the batch order.
        probes: name -> ``probe(model) -> dict``, recorded at each evaluation point.
        record_step_losses: keep every step's loss, not only the chunk means.
        population_examples: training examples (a fixed subset) over which BN's inference
            statistics are recomputed at each evaluation point (``PopulationStatistics``).
        learning_rate_schedule: sets the optimizer's learning rate before every step from its
            step counter (``bnzoo.optimization.apply_learning_rate_schedule``, as ``train.py``'s
            loop does); None keeps the optimizer's rate.
        shuffle_buffer: see ``BatchSampler`` (None: a full permutation every epoch).
        log_prefix: printed before each progress line.
    """

    def __init__(
        self,
        model: keras.Model,
        train_data: ArraySplit,
        eval_data: ArraySplit,
        *,
        optimizer: keras.optimizers.Optimizer,
        batch_size: int,
        eval_every: int,
        seed: int,
        probes: Mapping[str, Probe] | None = None,
        record_step_losses: bool = False,
        population_examples: int = 1920,
        learning_rate_schedule: keras.optimizers.schedules.LearningRateSchedule | None = None,
        shuffle_buffer: int | None = None,
        log_prefix: str = "",
    ):
        if eval_every < 1:
            raise ValueError(f"eval_every must be a positive number of steps, got {eval_every}.")
        self.model = model
        self.eval_data = eval_data
        self.eval_every = eval_every
        self.probes = dict(probes or {})
        self.record_step_losses = record_step_losses
        self.log_prefix = log_prefix
        self.sampler = BatchSampler(train_data.num_examples, batch_size, seed, shuffle_buffer)
        self.step = 0
        self.run = TrainingRun(probes={name: [] for name in self.probes})
        self.optimizer = optimizer
        self.learning_rate_schedule = learning_rate_schedule
        self._images = tf.constant(train_data.images)
        self._labels = tf.constant(train_data.labels)
        self._train_chunk = self._compile(
            model, optimizer, learning_rate_schedule, self._images, self._labels, batch_size
        )
        self.population = PopulationStatistics(
            model, train_data.subset(population_examples, seed).images, batch_size
        )

    @staticmethod
    def _compile(
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        schedule: keras.optimizers.schedules.LearningRateSchedule | None,
        images: tf.Tensor,
        labels: tf.Tensor,
        batch_size: int,
    ):
        from bnzoo.optimization import apply_learning_rate_schedule

        variables = model.trainable_variables

        def train_chunk(images, labels, batch_indices):
            # The whole chunk is one graph: Python is not re-entered between steps.
            num_steps = tf.shape(batch_indices)[0]
            losses = tf.TensorArray(tf.float32, size=num_steps)
            for step in tf.range(num_steps):
                index = batch_indices[step]
                x = tf.gather(images, index)
                y = tf.gather(labels, index)
                with tf.GradientTape() as tape:
                    logits = model(x, training=True)
                    loss = tf.reduce_mean(_loss_fn(y, logits))
                    # Weight regularizers a builder may add are part of the objective.
                    total = loss + tf.add_n(model.losses) if model.losses else loss
                gradients = tape.gradient(total, variables)
                if schedule is not None:
                    apply_learning_rate_schedule(optimizer, schedule)
                optimizer.apply_gradients(zip(gradients, variables, strict=True))
                losses = losses.write(step, tf.cast(loss, tf.float32))
            return losses.stack()

        # Chunks of any length share one graph (the first chunk after a change of `eval_every`
        # and a last, shorter one would otherwise each trace the whole model again).
        signature = [
            tf.TensorSpec(images.shape, images.dtype),
            tf.TensorSpec(labels.shape, labels.dtype),
            tf.TensorSpec([None, batch_size], tf.int32),
        ]
        return tf.function(train_chunk, input_signature=signature)

    @property
    def diverged(self) -> bool:
        return self.run.diverged_at_step is not None

    def learning_rate(self) -> float:
        """The learning rate of the next step."""
        if self.learning_rate_schedule is not None:
            return float(self.learning_rate_schedule(self.optimizer.iterations))
        return float(np.asarray(self.optimizer.learning_rate))

    def _record(self, chunk_losses: np.ndarray | None) -> None:
        run = self.run
        if self.population.layers:
            _, moving_average_accuracy = evaluate(self.model, self.eval_data)
            run.eval_accuracy_moving_averages.append(moving_average_accuracy)
        with self.population.applied():
            eval_loss, eval_accuracy = evaluate(self.model, self.eval_data)
        run.steps.append(self.step)
        run.learning_rate.append(self.learning_rate())
        run.eval_loss.append(eval_loss)
        run.eval_accuracy.append(eval_accuracy)
        train_loss = float(np.mean(chunk_losses)) if chunk_losses is not None else eval_loss
        run.train_loss.append(train_loss)
        for name, probe in self.probes.items():
            run.probes[name].append(probe(self.model))
        healthy = math.isfinite(train_loss) and math.isfinite(eval_loss)
        if not (healthy and _weights_finite(self.model)) and run.diverged_at_step is None:
            run.diverged_at_step = self.step

    def train(self, steps: int, stop_on_divergence: bool = True) -> TrainingRun:
        """Trains ``steps`` more steps (fewer if the model diverges) and returns the record.

        Args:
            steps: number of training steps to add.
            stop_on_divergence: stop at the first evaluation point whose loss or weights are not
                finite (the model cannot recover; the remaining steps would only cost time).
        """
        if steps < 1:
            raise ValueError(f"steps must be a positive number of training steps, got {steps}.")
        if not self.run.steps:
            self._record(None)  # step 0: the model at initialization
        target = self.step + steps
        while self.step < target and not (stop_on_divergence and self.diverged):
            chunk = min(self.eval_every, target - self.step)
            indices = tf.constant(self.sampler.take(chunk))
            started = time.perf_counter()
            chunk_losses = self._train_chunk(self._images, self._labels, indices).numpy()
            self.run.chunk_seconds.append(time.perf_counter() - started)
            self.step += chunk
            if self.record_step_losses:
                self.run.step_losses.extend(float(v) for v in chunk_losses)
            self._record(chunk_losses)
            run = self.run
            print(
                f"{self.log_prefix}step {self.step:>6}: loss {run.train_loss[-1]:.4f} "
                f"eval accuracy {run.eval_accuracy[-1]:.4f} ({run.chunk_seconds[-1]:.1f} s)",
                flush=True,
            )
        if self.diverged and stop_on_divergence:
            print(f"{self.log_prefix}diverged at step {self.run.diverged_at_step}: not finite")
        return self.run

    def test(self, test_data: ArraySplit) -> TrainingRun:
        """Evaluates the trained model on the full ``test_data`` and records it in the run."""
        if self.population.layers:
            _, self.run.final_test_accuracy_moving_averages = evaluate(self.model, test_data)
        with self.population.applied():
            self.run.final_test_loss, self.run.final_test_accuracy = evaluate(self.model, test_data)
        return self.run


def train(
    model: keras.Model,
    train_data: ArraySplit,
    eval_data: ArraySplit,
    *,
    optimizer: keras.optimizers.Optimizer,
    steps: int,
    batch_size: int,
    eval_every: int,
    seed: int,
    test_data: ArraySplit | None = None,
    probes: Mapping[str, Probe] | None = None,
    record_step_losses: bool = False,
    stop_on_divergence: bool = True,
    log_prefix: str = "",
) -> TrainingRun:
    """Trains ``model`` for ``steps`` steps with a ``Trainer`` and tests it on ``test_data``.

    See ``Trainer`` for the arguments; ``test_data`` (the full test split) is evaluated once
    at the end.

    Returns:
        The ``TrainingRun`` with every measured number.
    """
    trainer = Trainer(
        model,
        train_data,
        eval_data,
        optimizer=optimizer,
        batch_size=batch_size,
        eval_every=eval_every,
        seed=seed,
        probes=probes,
        record_step_losses=record_step_losses,
        log_prefix=log_prefix,
    )
    trainer.train(steps, stop_on_divergence=stop_on_divergence)
    if test_data is not None:
        trainer.test(test_data)
    return trainer.run


# ---------------------------------------------------------------------------------------------
# Comparisons of BN / no BN at multiples of a base learning rate (paper §4.2.2, Figure 3)
# ---------------------------------------------------------------------------------------------


def variant_key(normalization: str | None, multiplier: float) -> str:
    """``bn_x5``, ``no_bn_x30``: a run's key in the results."""
    return f"{'bn' if normalization else 'no_bn'}_x{multiplier:g}"


def variant_label(normalization: str | None, multiplier: float, base_learning_rate: float) -> str:
    """``BN, lr x5 (0.05)``: a run's label in plots and tables."""
    name = "BN" if normalization else "no BN"
    return f"{name}, lr x{multiplier:g} ({base_learning_rate * multiplier:g})"


def compare_variants(
    build_model: Callable[[str | None], keras.Model],
    variants: Sequence[Mapping[str, Any]],
    train_data: ArraySplit,
    eval_data: ArraySplit,
    test_data: ArraySplit,
    *,
    base_learning_rate: float,
    momentum: float,
    steps: int,
    batch_size: int,
    eval_every: int,
    seed: int,
    log_prefix: str = "",
) -> dict[str, TrainingRun]:
    """Trains one model per variant: with/without BN at a multiple of the base learning rate.

    Every variant starts from the same seed (weights and batch order) and trains with momentum
    SGD, as the paper's Inception runs do (§4.2), at ``base_learning_rate * multiplier``.

    Args:
        build_model: ``build_model(normalization) -> model`` (logits out).
        variants: ``[{"normalization": None | "batch_norm", "multiplier": 5}, ...]``.
        train_data / eval_data / test_data: the splits (eval: the fixed subset).
        base_learning_rate: the learning rate of multiplier 1.
        momentum: SGD momentum.
        steps / batch_size / eval_every / seed: see ``Trainer``.
        log_prefix: printed before each progress line.

    Returns:
        ``variant_key(...) -> TrainingRun``, in the order of ``variants``.
    """
    runs = {}
    for variant in variants:
        normalization, multiplier = variant["normalization"], variant["multiplier"]
        key = variant_key(normalization, multiplier)
        label = variant_label(normalization, multiplier, base_learning_rate)
        set_seed(seed)
        runs[key] = train(
            build_model(normalization),
            train_data,
            eval_data,
            optimizer=sgd(base_learning_rate * multiplier, momentum),
            steps=steps,
            batch_size=batch_size,
            eval_every=eval_every,
            seed=seed,
            test_data=test_data,
            log_prefix=f"{log_prefix}[{label}] ",
        )
    return runs


def variant_rows(
    runs: Mapping[str, TrainingRun],
    variants: Sequence[Mapping[str, Any]],
    base_learning_rate: float,
    target: float,
) -> list[dict]:
    """One row per variant, the columns of the paper's Figure 3 plus what CPU runs add."""
    rows = []
    for variant in variants:
        normalization, multiplier = variant["normalization"], variant["multiplier"]
        run = runs[variant_key(normalization, multiplier)]
        rows.append(
            {
                "key": variant_key(normalization, multiplier),
                "label": variant_label(normalization, multiplier, base_learning_rate),
                "batch_norm": normalization is not None,
                "learning_rate": base_learning_rate * multiplier,
                "steps_to_target": run.steps_to_reach(target),
                **run.summary(),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Runs made from train.py's recipes (the paper's §4.2 and §4.2.1: bnzoo.recipes)
# ---------------------------------------------------------------------------------------------

#: `TrainConfig` options this harness does not implement: a recipe run must leave them at
#: their defaults, so that what it trains is what the recipe says (train.py would apply them).
NOT_IMPLEMENTED_OPTIONS = (
    "dataset",
    "weights",
    "freeze_backbone",
    "freeze_until",
    "image_size",
    "augment",
    "label_smoothing",
    "bn_statistics",
    "sync_bn",
)


def recipe_config(recipe: str, lr_multiplier: float = 1.0, **options: Any):
    """The resolved ``TrainConfig`` of ``train.py --recipe RECIPE`` with ``options`` set as on
    its command line: the recipe's values are read from ``bnzoo.recipes`` through the same
    layering as train.py's, never restated here.

    Args:
        recipe: a registered recipe (``paper_baseline``, ``paper_bn_accelerated_x5``, ...).
        lr_multiplier: the run's learning rate is the recipe's times this (the paper's
            Inception at 5x and 30x its rate: the same recipe, a higher rate).
        **options: ``TrainConfig`` options over the recipe's (``model_args`` merge by key).

    Raises:
        ValueError: a bad option, or one this harness does not implement set away from its
            default (``NOT_IMPLEMENTED_OPTIONS``; mixed precision: the harness trains float32).
    """
    from bnzoo.config import TrainConfig

    if lr_multiplier != 1:
        options["lr"] = TrainConfig(recipe=recipe, **options).resolved().lr * lr_multiplier
    config = TrainConfig(recipe=recipe, **options).validate().resolved()
    changed = [
        name
        for name in NOT_IMPLEMENTED_OPTIONS
        if getattr(config, name) != TrainConfig.default(name)
    ]
    if config.mixed_precision:
        changed.append("mixed_precision")
    if changed:
        raise ValueError(
            f"Recipe {recipe!r} (with {options}) sets {', '.join(changed)}, which the "
            "experiments' harness does not implement; train it with train.py, or leave "
            "these options at their defaults."
        )
    return config


def train_recipe(
    config: Any,
    train_data: ArraySplit,
    eval_data: ArraySplit,
    test_data: ArraySplit | None,
    *,
    steps: int,
    eval_every: int | Sequence[Sequence[int]],
    steps_per_epoch: float,
    seed: int,
    make_probes: Callable[[keras.Model], Mapping[str, Probe]] | None = None,
    log_prefix: str = "",
) -> tuple[keras.Model, TrainingRun]:
    """Trains ``config``'s model on the arrays as ``train.py`` would: its builder arguments
    (``bnzoo.training.build_model``), its optimizer, weight decay and learning-rate schedule
    (``bnzoo.optimization``), its batch size and shuffle buffer.

    Args:
        config: a resolved ``TrainConfig`` (``recipe_config``).
        train_data / eval_data / test_data: the splits (eval: the fixed subset; test:
            evaluated once at the end, or None).
        steps: training steps.
        eval_every: steps between evaluation points, or ``[[until_step, every], ...]``: every
            ``every`` steps up to ``until_step``, then the next pair's (finer early on, where
            steps-to-target are decided, coarser later).
        steps_per_epoch: the schedule's epoch in steps; a fraction lets each step stand for a
            share of another dataset's epoch (the paper's schedules are in ImageNet epochs).
        seed: weights and batch order.
        make_probes: ``make_probes(model) -> {name: probe}``, probes of the built model
            recorded at every evaluation point (see ``Trainer``).
        log_prefix: printed before each progress line.

    Returns:
        The trained model and its ``TrainingRun``.
    """
    from bnzoo.optimization import build_optimizer, build_schedule
    from bnzoo.training import build_model

    classes = train_data.info.num_classes if train_data.info is not None else None
    classes = classes or int(train_data.labels.max()) + 1
    set_seed(seed)
    model = build_model(config, tuple(train_data.images.shape[1:]), classes)
    phases = [[steps, eval_every]] if isinstance(eval_every, int) else eval_every
    trainer = Trainer(
        model,
        train_data,
        eval_data,
        optimizer=build_optimizer(config, model, steps_per_epoch),
        batch_size=config.batch_size,
        eval_every=phases[0][1],
        seed=seed,
        learning_rate_schedule=build_schedule(config, steps_per_epoch),
        shuffle_buffer=config.shuffle_buffer,
        probes=make_probes(model) if make_probes is not None else None,
        log_prefix=log_prefix,
    )
    for until, every in phases:
        if trainer.diverged:
            break
        if min(until, steps) > trainer.step:
            trainer.eval_every = every
            trainer.train(min(until, steps) - trainer.step)
    if trainer.step < steps and not trainer.diverged:
        trainer.train(steps - trainer.step)
    if test_data is not None:
        trainer.test(test_data)
    return model, trainer.run


# ---------------------------------------------------------------------------------------------
# Probes: what the experiments look at inside a model
# ---------------------------------------------------------------------------------------------


def layer_outputs_model(model: keras.Model, layer_names: Sequence[str]) -> keras.Model:
    """A model sharing ``model``'s layers that returns the named layers' outputs.

    Raises:
        ValueError: a name is not a layer of ``model``; the message lists the layer names.
    """
    names = [layer.name for layer in model.layers]
    missing = [name for name in layer_names if name not in names]
    if missing:
        raise ValueError(f"Model {model.name!r} has no layer {missing}; its layers are {names}.")
    return keras.Model(model.inputs, [model.get_layer(name).output for name in layer_names])


def _forward(tap: keras.Model, images: tf.Tensor, training: bool):
    """``tap(images)``; in training mode through ``stateless_call``, so BN uses the batch's
    statistics, as in a training step, without moving its moving averages."""
    if not training:
        return tap(images, training=False)
    outputs, _ = tap.stateless_call(
        [tf.convert_to_tensor(v) for v in tap.trainable_variables],
        [tf.convert_to_tensor(v) for v in tap.non_trainable_variables],
        images,
        training=True,
    )
    return outputs


def activation_percentiles_probe(
    model: keras.Model,
    layer_name: str,
    images: np.ndarray,
    percentiles: Sequence[float] = (15, 50, 85),
    unit: int = 0,
    training: bool = True,
) -> Probe:
    """Percentiles over ``images`` of each unit of a layer's output.

    This is the paper's Figure 1(b, c): the distribution of the input to one sigmoid over the
    course of training, as its 15th, 50th and 85th percentiles. ``training=True`` (default)
    measures the distribution the sigmoid sees in a training step (BN normalizes with the
    statistics of ``images``); in inference mode early points would instead show how far BN's
    moving averages lag behind.

    The probe returns the chosen ``unit``'s percentiles, their mean over all units, and every
    unit's (``all_units``, ``[len(percentiles), units]``), so that the stability claim can be
    checked over the whole layer rather than one hand-picked unit.
    """
    tap = layer_outputs_model(model, [layer_name])
    batch = tf.constant(images)
    forward = tf.function(lambda x: _forward(tap, x, training))

    def probe(_model: keras.Model) -> dict:
        values = np.asarray(forward(batch)).reshape(images.shape[0], -1)
        per_unit = np.percentile(values, percentiles, axis=0)
        return {
            "unit": [float(v) for v in per_unit[:, unit]],
            "mean_over_units": [float(v) for v in per_unit.mean(axis=1)],
            "all_units": per_unit,
        }

    return probe


def nonlinearity_input_probe(
    model: keras.Model, conv_layers: Sequence[str], images: np.ndarray
) -> Probe:
    """Each channel's mean and standard deviation of the input to a convolution's nonlinearity,
    over ``images`` (batch and positions), in training mode.

    The nonlinearity's input is the convolution's output without BN (``Wu + b``) and BN's
    output with it (``BN(Wu)``): the distribution whose change during training the paper calls
    internal covariate shift (§2), measured per layer as Figure 1(b, c) measures it for one
    sigmoid. Training mode normalizes with the batch's statistics, as a training step does;
    through ``stateless_call``, so the moving averages stay untouched.

    Args:
        model: a model built by ``models.create_model`` (conv-BN-activation blocks named
            ``NAME``, ``NAME_bn``, ``NAME_<activation>``).
        conv_layers: the convolutions' names.
        images: a fixed batch.
    """
    names = {layer.name for layer in model.layers}
    taps = [f"{name}_bn" if f"{name}_bn" in names else name for name in conv_layers]
    tap = layer_outputs_model(model, taps)
    batch = tf.constant(images)
    forward = tf.function(lambda x: _forward(tap, x, True))

    def probe(_model: keras.Model) -> dict:
        outputs = forward(batch)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        statistics = {}
        for name, values in zip(conv_layers, outputs, strict=True):
            values = np.asarray(values, dtype=np.float64).reshape(-1, values.shape[-1])
            statistics[name] = {"mean": values.mean(axis=0), "std": values.std(axis=0)}
        return statistics

    return probe


def gradient_norms_probe(
    model: keras.Model, images: np.ndarray, labels: np.ndarray, kernel_layers: Sequence[str]
) -> Probe:
    """L2 norm of the loss gradient for each named layer's kernel, on one fixed batch.

    Computed in training mode (BN normalizes with the batch's statistics, as during a training
    step) through ``stateless_call``, so the probe does not update the BN moving averages.
    """
    kernels = []
    for name in kernel_layers:
        layer = model.get_layer(name)
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            raise ValueError(f"Layer {name!r} has no kernel; pass Dense or Conv layer names.")
        kernels.append(kernel)
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    positions = [next(i for i, v in enumerate(trainable) if v is k) for k in kernels]
    x = tf.constant(images)
    y = tf.constant(labels)

    @tf.function
    def norms():
        values = [tf.convert_to_tensor(v) for v in trainable]
        with tf.GradientTape() as tape:
            tape.watch(values)
            logits, _ = model.stateless_call(
                values, [tf.convert_to_tensor(v) for v in non_trainable], x, training=True
            )
            loss = tf.reduce_mean(_loss_fn(y, logits))
        gradients = tape.gradient(loss, values)
        return tf.stack([tf.norm(gradients[i]) for i in positions])

    def probe(_model: keras.Model) -> dict:
        return dict(zip(kernel_layers, (float(v) for v in norms().numpy()), strict=True))

    return probe


def layer_values(
    model: keras.Model, layer_names: Sequence[str], images: np.ndarray, training: bool = True
) -> list[np.ndarray]:
    """The named layers' outputs on ``images`` (training mode is stateless: no BN updates)."""
    tap = layer_outputs_model(model, layer_names)
    outputs = _forward(tap, tf.constant(images), training)
    if not isinstance(outputs, list | tuple):
        outputs = [outputs]
    return [np.asarray(o) for o in outputs]


# ---------------------------------------------------------------------------------------------
# Writing results
# ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    # NaN and infinity are not JSON; a diverged run's non-finite numbers become null and the run
    # says where it diverged (``diverged_at_step``).
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer | bool):
        return value if isinstance(value, bool) else int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Writes strict JSON (no NaN): every number in it is finite."""
    path.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; run the experiment first.")
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """Saves ``figure`` as a PNG and closes it (figures otherwise accumulate in memory)."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def plot_accuracy_curves(
    runs: Mapping[str, TrainingRun],
    path: Path,
    title: str,
    target: float | None = None,
    log_steps: bool = False,
    skip_initial: bool = False,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Eval accuracy against training steps, one line per run (the paper's Figures 1a and 2).

    Args:
        runs: label -> run, plotted in order.
        path: the PNG to write.
        title: the figure's title.
        target: draws the target accuracy as a dashed line (steps-to-target in Figure 3).
        log_steps: log-scale step axis (step 0 is then left out).
        skip_initial: leave out step 0, whose chance-level accuracy would squash the axis.
        ylim: accuracy axis limits.
    """
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, run in runs.items():
        steps = np.asarray(run.steps)
        accuracy = np.asarray(run.eval_accuracy)
        keep = steps > 0 if (log_steps or skip_initial) else np.ones_like(steps, dtype=bool)
        suffix = ""
        if run.diverged_at_step is not None:
            suffix = f" (diverged by step {run.diverged_at_step})"
        axis.plot(steps[keep], accuracy[keep], label=label + suffix, linewidth=1.4)
    if target is not None:
        axis.axhline(
            target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}"
        )
    if log_steps:
        axis.set_xscale("log")
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.set_xlabel("training steps")
    axis.set_ylabel("test accuracy (fixed subset)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# Markdown for docs/RESULTS.md (each script's ``report(results)`` uses these)
# ---------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are already formatted strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(value: float | None, digits: int = 1) -> str:
    """``0.8836`` -> ``88.4%``; ``None`` (a diverged run's NaN) -> ``n/a``."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def step_count(value: int | None, missing: str = "not reached") -> str:
    """``24000`` -> ``24,000``; ``None`` -> ``missing``."""
    return missing if value is None else f"{value:,}"


def seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
