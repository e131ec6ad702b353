"""Experiment 2: BN tolerates much higher learning rates (paper §3.3 and §4.2.2, Figures 2, 3).

The paper trains Inception without BN at its base learning rate, and with BN at 1x (BN-Baseline),
5x (BN-x5) and 30x (BN-x30) of it, and reports how many steps each needs to reach the
baseline's best accuracy and the best accuracy each reaches. This script does the same on
Fashion-MNIST, in two sections:

* ``plain_cnn``: a small CNN at a constant learning rate (base 0.01, momentum SGD), with and
  without BN at 1x, 5x and 30x.
* ``bn_inception``: the paper's network (``models.bn_inception``, narrowed) on Fashion-MNIST
  resized to 64x64, so that module 3a sees 8x8 maps, trained with the paper's own recipes
  (``bnzoo.recipes``, read through ``harness.recipe_config`` exactly as ``train.py --recipe``
  reads them): Inception (``paper_baseline`` without BN), BN-Baseline (the same with BN),
  BN-x5 and BN-x30 (``paper_bn_accelerated_x5``/``_x30``: §4.2.1 applied), BN-x5-Sigmoid,
  and what the paper only argues (§3.3): the network *without* BN at 5x and 30x.
  The recipes' schedules are in ImageNet epochs; the run lets its steps stand for the paper's
  Inception run (31.0 M steps of 32, 774 epochs of ImageNet's 1,281,167 images), so that
  every run's learning rate decays as much, relative to the run, as the paper's did.

Every run starts from the same seed, trains with momentum SGD (as the paper's Inception runs)
and is evaluated on a fixed 2,000-image test subset at regular points (with Algorithm 2's
population statistics for BN), then on the full test set at the end. The target accuracy is
the best subset accuracy of the no-BN run at the base learning rate, as in Figure 3.

    .venv/bin/python experiments/exp2_learning_rates.py                 # full: about an hour
    .venv/bin/python experiments/exp2_learning_rates.py --models plain_cnn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bnzoo import recipes  # noqa: E402
from experiments import harness  # noqa: E402

NAME = "exp2_learning_rates"
DESCRIPTION = "Paper §4.2.2 / Figure 3: BN at 1x, 5x, 30x the learning rate, and no BN"
MODEL_NAMES = ("plain_cnn", "bn_inception")

_VARIANTS = [
    {"normalization": None, "multiplier": 1},
    {"normalization": "batch_norm", "multiplier": 1},
    {"normalization": "batch_norm", "multiplier": 5},
    {"normalization": "batch_norm", "multiplier": 30},
    {"normalization": None, "multiplier": 5},
    {"normalization": None, "multiplier": 30},
]

# The paper's Figure 3 runs (and the no-BN network at the higher rates), as train.py's recipes
# with the command-line options that make each run (bnzoo.recipes documents the recipes).
_BN_INCEPTION_RUNS = [
    {"key": "inception", "label": "Inception", "recipe": "paper_baseline", "normalization": "none"},
    {"key": "bn_baseline", "label": "BN-Baseline", "recipe": "paper_baseline"},
    {"key": "bn_x5", "label": "BN-x5", "recipe": "paper_bn_accelerated_x5"},
    {"key": "bn_x30", "label": "BN-x30", "recipe": "paper_bn_accelerated_x30"},
    {
        "key": "bn_x5_sigmoid",
        "label": "BN-x5-Sigmoid",
        "recipe": "paper_bn_accelerated_x5",
        "model_args": {"activation": "sigmoid"},
    },
    {
        "key": "inception_x5",
        "label": "Inception x5",
        "recipe": "paper_baseline",
        "normalization": "none",
        "lr_multiplier": 5,
    },
    {
        "key": "inception_x30",
        "label": "Inception x30",
        "recipe": "paper_baseline",
        "normalization": "none",
        "lr_multiplier": 30,
    },
]

#: The paper's Inception run, whose length the BN-Inception runs stand for: 31.0 M steps of 32
#: images (Figure 3) over ImageNet's 1,281,167 training images.
PAPER_INCEPTION_STEPS = 31.0e6
PAPER_BATCH_SIZE = 32
IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER_INCEPTION_EPOCHS = PAPER_INCEPTION_STEPS * PAPER_BATCH_SIZE / IMAGENET_TRAIN_IMAGES

_BN_INCEPTION = {
    # A quarter of Figure 5's widths (at least 8 filters): 0.65 M parameters; the recipes add
    # their own model arguments (LRN, dropout) to these.
    "model_args": {"width_multiplier": 0.25, "min_depth": 8},
    # Fashion-MNIST resized (bilinear) from 28x28: the stem's four stride-2 stages leave 8x8 at
    # 3a, 4x4 at 4a and 2x2 at 5a, where 32x32 left 2x2 and 1x1.
    "image_size": [64, 64],
    "runs": _BN_INCEPTION_RUNS,
    # The recipes' schedules are in ImageNet epochs; this many of them pass during the run.
    "schedule_epochs": PAPER_INCEPTION_EPOCHS,
}

PRESETS = {
    "full": {
        "models": list(MODEL_NAMES),
        "base_learning_rate": 0.01,
        "momentum": 0.9,
        # Keras' default. Accuracy is measured with Algorithm 2's population statistics, so
        # it only affects the moving-average accuracy recorded next to it.
        "bn_momentum": 0.99,
        "eval_examples": 2000,
        "train_split": "train",
        "test_split": "test",
        "variants": _VARIANTS,
        "plain_cnn": {"widths": [16, 32, 64], "depth": 1, "dropout_rate": 0.0},
        "plain_cnn_steps": 2000,
        "plain_cnn_batch_size": 64,
        "plain_cnn_eval_every": 100,
        "bn_inception": _BN_INCEPTION,
        # 3.2 epochs of Fashion-MNIST in batches of 32: what 7 runs fit in about an hour.
        "bn_inception_steps": 6000,
        # Every 100 steps over the first 1,000 (where the paper's BN-x5 and BN-x30 would reach
        # the target, at 2.1 M and 2.7 M of 31 M steps), then every 250.
        "bn_inception_eval_every": [[1000, 100], [6000, 250]],
    },
    "smoke": {
        "models": list(MODEL_NAMES),
        "base_learning_rate": 0.01,
        "momentum": 0.9,
        "bn_momentum": 0.99,
        "eval_examples": 200,
        "train_split": "train[:1000]",
        "test_split": "test[:300]",
        "variants": _VARIANTS,
        "plain_cnn": {"widths": [8, 8, 8], "depth": 1, "dropout_rate": 0.0},
        "plain_cnn_steps": 10,
        "plain_cnn_batch_size": 32,
        "plain_cnn_eval_every": 5,
        "bn_inception": {
            **_BN_INCEPTION,
            "model_args": {"width_multiplier": 0.05, "min_depth": 4},
            # Fewer runs than the full budget: each costs its tracing time, which dominates here.
            "runs": [_BN_INCEPTION_RUNS[0], _BN_INCEPTION_RUNS[3]],
        },
        "bn_inception_steps": 4,
        "bn_inception_eval_every": [[2, 1], [4, 2]],
        "plain_cnn_variants": [_VARIANTS[0], _VARIANTS[3]],
    },
}

# The paper's Figure 3, Inception on ImageNet (steps to 72.2%, the no-BN model's best;
# BN-x5-Sigmoid never reaches it).
PAPER_FIGURE_3 = [
    {"model": "Inception", "learning_rate": "0.0015", "steps_to_72.2%": 31.0e6, "max": 0.722},
    {"model": "BN-Baseline", "learning_rate": "0.0015", "steps_to_72.2%": 13.3e6, "max": 0.727},
    {"model": "BN-x5", "learning_rate": "0.0075", "steps_to_72.2%": 2.1e6, "max": 0.730},
    {"model": "BN-x30", "learning_rate": "0.045", "steps_to_72.2%": 2.7e6, "max": 0.748},
    {"model": "BN-x5-Sigmoid", "learning_rate": "0.0075", "steps_to_72.2%": None, "max": 0.698},
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODEL_NAMES,
        default=None,
        help="which networks to run (default: both)",
    )


def builder(model_name: str, config: dict, input_shape: tuple[int, int, int]):
    options = dict(config[model_name])

    def build(normalization: str | None):
        return models.create_model(
            model_name,
            normalization=normalization,
            bn_momentum=config["bn_momentum"],
            input_shape=input_shape,
            classes=10,
            classifier_activation=None,
            **options,
        )

    return build


def load_splits(config: dict, image_size: tuple[int, int] | None):
    """The training split, the test split and the fixed evaluation subset of the test split."""
    train_data, test_data = (
        harness.load_split(
            "fashion_mnist", split, image_size, config["data_dir"], config["manual_dir"]
        )
        for split in (config["train_split"], config["test_split"])
    )
    return train_data, test_data, test_data.subset(config["eval_examples"], config["seed"])


def run_model(model_name: str, config: dict, output_dir: Path) -> dict:
    if model_name == "bn_inception":
        return run_bn_inception(config, output_dir)
    seed = config["seed"]
    train_data, test_data, eval_data = load_splits(config, None)
    input_shape = tuple(train_data.images.shape[1:])

    variants = config.get(f"{model_name}_variants", config["variants"])
    runs = harness.compare_variants(
        builder(model_name, config, input_shape),
        variants,
        train_data,
        eval_data,
        test_data,
        base_learning_rate=config["base_learning_rate"],
        momentum=config["momentum"],
        steps=config[f"{model_name}_steps"],
        batch_size=config[f"{model_name}_batch_size"],
        eval_every=config[f"{model_name}_eval_every"],
        seed=seed,
        log_prefix=f"[{model_name}] ",
    )
    baseline = harness.variant_key(None, 1)
    if baseline not in runs:
        raise ValueError(
            f"The variants of {model_name} need the no-BN run at the base learning rate "
            "({'normalization': None, 'multiplier': 1}): its best accuracy is the target."
        )
    target = runs[baseline].best_accuracy
    rows = harness.variant_rows(runs, variants, config["base_learning_rate"], target)
    harness.plot_accuracy_curves(
        {row["label"]: runs[row["key"]] for row in rows},
        output_dir / f"{model_name}_accuracy.png",
        f"{model_name} on Fashion-MNIST: BN and the learning rate",
        target=target,
        skip_initial=True,
    )
    return {
        "input_shape": list(input_shape),
        "trainable_parameters_with_bn": models.count_parameters(
            builder(model_name, config, input_shape)("batch_norm"), trainable_only=True
        ),
        "target_accuracy": target,
        "rows": rows,
        "runs": {key: run.to_dict() for key, run in runs.items()},
    }


def bn_inception_configs(section: dict) -> dict:
    """Each run's resolved ``TrainConfig``: its recipe, with the run's options over it as
    ``train.py --recipe NAME --normalization ... --model-arg ...`` would set them; a run's
    ``switched_off`` changes of §4.2.1 get the baseline's values back (``bnzoo.recipes``)."""
    epochs = int(np.ceil(section["schedule_epochs"]))
    configs = {}
    for spec in section["runs"]:
        options = {}
        for title in spec.get("switched_off", ()):
            options.update(recipes.switched_off(title))
        model_args = {
            **options.pop("model_args", {}),
            **section["model_args"],
            **spec.get("model_args", {}),
        }
        configs[spec["key"]] = harness.recipe_config(
            spec["recipe"],
            lr_multiplier=spec.get("lr_multiplier", 1),
            normalization=spec.get("normalization", "batch_norm"),
            model_args=model_args,
            epochs=epochs,
            **options,
        )
    return configs


def train_bn_inception(
    section: dict, config: dict, steps: int, eval_every: list, make_probes=None
) -> dict:
    """Trains ``section``'s runs (the first sets the target: its best accuracy) and returns
    every number of them, as ``results.json`` holds them."""
    seed = config["seed"]
    train_data, test_data, eval_data = load_splits(config, tuple(section["image_size"]))
    # Each step stands for PAPER_INCEPTION_STEPS / steps of the paper's: the schedule's epochs
    # (ImageNet's) pass at `steps_per_epoch` of our steps each.
    steps_per_epoch = steps / section["schedule_epochs"]
    configs = bn_inception_configs(section)
    runs, parameters, rows = {}, {}, []
    for spec in section["runs"]:
        key, run_config = spec["key"], configs[spec["key"]]
        model, runs[key] = harness.train_recipe(
            run_config,
            train_data,
            eval_data,
            test_data,
            steps=steps,
            eval_every=eval_every,
            steps_per_epoch=steps_per_epoch,
            seed=seed,
            make_probes=(
                (lambda model: make_probes(model, train_data))
                if make_probes is not None and spec.get("probes")
                else None
            ),
            log_prefix=f"[bn_inception] [{spec['label']}] ",
        )
        parameters[key] = models.count_parameters(model, trainable_only=True)
    target = runs[section["runs"][0]["key"]].best_accuracy
    for spec in section["runs"]:
        key, run_config = spec["key"], configs[spec["key"]]
        rows.append(
            {
                "key": key,
                "label": spec["label"],
                "recipe": spec["recipe"],
                "batch_norm": run_config.normalization != "none",
                "learning_rate": run_config.lr,
                "steps_to_target": runs[key].steps_to_reach(target),
                **runs[key].summary(),
            }
        )
    return {
        "input_shape": list(train_data.images.shape[1:]),
        "steps_per_schedule_epoch": steps_per_epoch,
        "trainable_parameters": parameters,
        "trainable_parameters_with_bn": next(
            parameters[row["key"]] for row in rows if row["batch_norm"]
        ),
        "configs": {key: run_config.to_dict() for key, run_config in configs.items()},
        "target_accuracy": target,
        "rows": rows,
        "runs": {key: run.to_dict() for key, run in runs.items()},
    }


def run_bn_inception(config: dict, output_dir: Path) -> dict:
    """The paper's Figure 3 runs with BN-Inception, trained by the paper's recipes."""
    results = train_bn_inception(
        config["bn_inception"],
        config,
        config["bn_inception_steps"],
        config["bn_inception_eval_every"],
    )
    plot_figure_2(
        results["runs"],
        results["rows"],
        results["target_accuracy"],
        output_dir / "bn_inception_accuracy.png",
    )
    return results


def plot_figure_2(runs: dict, rows: list[dict], target: float, path: Path) -> Path:
    """The paper's Figure 2: test accuracy against training steps, with the learning rate of
    each run under it (the schedules are the recipes')."""
    plt = harness.pyplot()
    figure, (accuracy_axis, rate_axis) = plt.subplots(
        2, 1, figsize=(6.8, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    bottom = max(0.0, target - 0.3)
    for row in rows:
        run = runs[row["key"]]
        steps = np.asarray(run["steps"])
        style = "-" if row["batch_norm"] else "--"
        label = row["label"]
        if row["diverged_at_step"] is not None:
            label += f" (diverged by step {row['diverged_at_step']:,})"
        elif row["best_eval_accuracy"] < bottom:
            label += f" (below the axis: best {100 * row['best_eval_accuracy']:.1f}%)"
        (line,) = accuracy_axis.plot(
            steps[1:], np.asarray(run["eval_accuracy"])[1:], style, label=label, linewidth=1.4
        )
        rate_axis.plot(steps, run["learning_rate"], style, color=line.get_color(), linewidth=1.2)
    accuracy_axis.axhline(target, color="gray", linestyle=":", linewidth=1)
    accuracy_axis.annotate(
        f"Inception's best {100 * target:.1f}%",
        (0, target),
        xytext=(4, 3),
        textcoords="offset points",
        fontsize=8,
        color="gray",
    )
    accuracy_axis.set_ylabel("test accuracy (2k subset)")
    accuracy_axis.set_ylim(bottom, 1.0)
    accuracy_axis.set_title("BN-Inception on Fashion-MNIST 64x64: Figure 2's runs")
    accuracy_axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=8, loc="lower right")
    rate_axis.set_yscale("log")
    # The accelerated schedules fall to 1e-20 and below: show three decades under the lowest
    # initial rate, where the runs still move.
    rate_axis.set_ylim(min(row["learning_rate"] for row in rows) * 1e-3, None)
    rate_axis.set_ylabel("learning rate")
    rate_axis.set_xlabel("training steps")
    rate_axis.grid(alpha=0.3)
    return harness.save_figure(figure, path)


def run(config: dict, output_dir: Path) -> dict:
    return {
        "models": {name: run_model(name, config, output_dir) for name in config["models"]},
        "paper_figure_3": PAPER_FIGURE_3,
    }


def outcome(row: dict) -> str:
    """How a run ended: its loss went to NaN, it never rose clearly above chance, or it learned."""
    if row["diverged_at_step"] is not None:
        return f"diverged (NaN) by step {row['diverged_at_step']:,}"
    if row["best_eval_accuracy"] <= 2 * harness.CHANCE_ACCURACY_10_CLASSES:
        return "stuck at chance"
    return "learns"


def variant_table(rows: list[dict], target_column: str) -> str:
    """The Figure 3 style table shared by exp2 and exp3."""
    return harness.markdown_table(
        [
            "run",
            target_column,
            "best accuracy, 2k test subset (step)",
            "final accuracy, full test set",
            "same, BN moving averages",
            "outcome",
            "training time",
        ],
        [
            [
                row["label"],
                harness.step_count(
                    row.get("steps_to_target", row.get("steps_to_learning_threshold"))
                ),
                f"{harness.percent(row['best_eval_accuracy'])} (step {row['best_eval_step']:,})",
                harness.percent(row["final_test_accuracy"], 2),
                harness.percent(row["final_test_accuracy_moving_averages"], 2)
                if row["batch_norm"]
                else "",
                outcome(row),
                harness.seconds(row["train_seconds"]),
            ]
            for row in rows
        ],
    )


def report(results: dict) -> dict[str, str]:
    """Markdown tables for docs/RESULTS.md, from ``results.json``."""
    out = {}
    for name in MODEL_NAMES:
        if name not in results["models"]:
            not_run = (
                f"_({name} not run: `.venv/bin/python experiments/{NAME}.py --models {name}`)_"
            )
            for key in ("table", "parameters", "figure3_table", "curve_table", "setup"):
                out[f"{name}_{key}"] = not_run
            continue
        data = results["models"][name]
        out[f"{name}_table"] = variant_table(
            data["rows"], f"steps to {harness.percent(data['target_accuracy'])} (no-BN best)"
        )
        out[f"{name}_parameters"] = f"{data['trainable_parameters_with_bn']:,}"
        if name == "bn_inception":
            out["bn_inception_figure3_table"] = figure_3_table(data, results["paper_figure_3"])
            out["bn_inception_curve_table"] = curve_table(data)
            out["bn_inception_setup"] = bn_inception_setup(data)
    out["paper_table"] = harness.markdown_table(
        ["paper (Inception, ImageNet)", "initial learning rate", "steps to 72.2%", "max accuracy"],
        [
            [
                row["model"],
                row["learning_rate"],
                _million_steps(row["steps_to_72.2%"]),
                harness.percent(row["max"]),
            ]
            for row in results["paper_figure_3"]
        ],
    )
    return out


def _million_steps(steps: float | None) -> str:
    return "never" if steps is None else f"{steps / 1e6:.1f} M"


def _fewer_steps(baseline: float | None, steps: float | None) -> str:
    if baseline is None or not steps:
        return ""
    return f"{baseline / steps:.1f}x"


# What the paper says of the runs it has no Figure 3 row for.
_PAPER_WITHOUT_ROW = {
    "Inception x5": '"caused the model parameters to reach machine infinity" (§4.2.2)',
    "Inception x30": "not run",
}


def figure_3_table(data: dict, paper_rows: list[dict]) -> str:
    """Figure 3 beside ours: each run's rate, its steps to the no-BN network's best accuracy
    and how many times fewer those are than Inception's, and its best accuracy."""
    paper = {row["model"]: row for row in paper_rows}
    paper_inception = paper["Inception"]["steps_to_72.2%"]
    ours = {row["label"]: row for row in data["rows"]}
    inception = ours.get("Inception", {}).get("steps_to_target")
    target = harness.percent(data["target_accuracy"])
    lines = []
    for row in data["rows"]:
        published = paper.get(row["label"])
        if published is None:
            paper_cells = [_PAPER_WITHOUT_ROW.get(row["label"], "not run"), "", "", ""]
        else:
            paper_cells = [
                published["learning_rate"],
                _million_steps(published["steps_to_72.2%"]),
                _fewer_steps(paper_inception, published["steps_to_72.2%"]),
                harness.percent(published["max"]),
            ]
        steps = row["steps_to_target"]
        lines.append(
            [
                row["label"],
                *paper_cells,
                f"{row['learning_rate']:g}",
                harness.step_count(steps, "never"),
                _fewer_steps(inception, steps),
                harness.percent(row["best_eval_accuracy"]),
            ]
        )
    return harness.markdown_table(
        [
            "run",
            "paper: initial rate",
            "paper: steps to 72.2%",
            "paper: fewer steps than Inception",
            "paper: max accuracy",
            "here: initial rate",
            f"here: steps to {target}",
            "here: fewer steps than Inception",
            "here: max accuracy",
        ],
        lines,
    )


def curve_table(data: dict, fractions: tuple[float, ...] = (1 / 12, 1 / 6, 1 / 3, 2 / 3, 1)) -> str:
    """Figure 2 read off at a few points: each run's accuracy (2k subset) after those shares of
    the run, and the run's learning rate there relative to its initial one."""
    steps = max(run["summary"]["steps_trained"] for run in data["runs"].values())
    points = [round(steps * fraction) for fraction in fractions]
    lines = []
    for row in data["rows"]:
        run = data["runs"][row["key"]]
        cells = [row["label"]]
        for point in points:
            if point in run["steps"]:
                index = run["steps"].index(point)
                rate = run["learning_rate"][index] / run["learning_rate"][0]
                cells.append(f"{harness.percent(run['eval_accuracy'][index])} ({rate:.1g})")
            else:
                cells.append("")
        lines.append(cells)
    return harness.markdown_table(["run", *(f"step {point:,}" for point in points)], lines)


def bn_inception_setup(data: dict) -> str:
    """The run's length and schedule in words, from the JSON."""
    rows = {row["key"]: row for row in data["rows"]}
    runs, configs = data["runs"], data["configs"]
    steps = max(run["summary"]["steps_trained"] for run in runs.values())
    batch = configs["inception"]["batch_size"]
    per_epoch = data["steps_per_schedule_epoch"]

    def decay(key: str) -> str:
        config = configs[key]
        every = config["lr_decay_epochs"] * per_epoch
        final = runs[key]["learning_rate"][-1] / rows[key]["learning_rate"]
        return (
            f"{100 * (1 - config['lr_decay_rate']):.0f}% every {every:.1f} steps "
            f"({config['lr_decay_epochs']:.3g} ImageNet epochs), down to {final:.2g} of its "
            "initial value at the last step"
        )

    accelerated = next(key for key in ("bn_x5", "bn_x30") if key in configs)
    return (
        f"{steps:,} steps of {batch} ({steps * batch / 60000:.1f} epochs of Fashion-MNIST's "
        f"60,000 training images) per run. Each step stands for "
        f"{PAPER_INCEPTION_STEPS / steps:,.0f} of the paper's 31.0 M, so an ImageNet epoch of "
        f"the recipes' schedules is {per_epoch:.2f} steps: `paper_baseline`'s rate falls "
        f"{decay('inception')}; the accelerated recipes' {decay(accelerated)}."
    )


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(NAME, DESCRIPTION, PRESETS, run, argv, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
