"""Experiment 2: BN tolerates much higher learning rates (paper §3.3 and §4.2.2, Figure 3).

The paper trains Inception without BN at its base learning rate, and with BN at 1x (BN-Baseline),
5x (BN-x5) and 30x (BN-x30) of it, and reports how many steps each needs to reach the
baseline's best accuracy and the best accuracy each reaches. This script does the same on
Fashion-MNIST, with a narrow ``plain_cnn`` and a narrow ``bn_inception`` on 32x32 inputs, and
adds what the paper only argues (§3.3): the network *without* BN at 5x and 30x, to show whether
it diverges.

Every run starts from the same seed, trains with momentum SGD (as the paper's Inception runs)
and is evaluated on a fixed 2,000-image test subset every ``eval_every`` steps, then on the full
test set at the end. The target accuracy is the best subset accuracy of the no-BN run at the
base learning rate, as in Figure 3.

    .venv/bin/python experiments/exp2_learning_rates.py                 # full: about 6 minutes
    .venv/bin/python experiments/exp2_learning_rates.py --models plain_cnn
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
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
        # 0.25 of BN-Inception's widths (min 8 filters) on 32x32: 0.65 M parameters. The paper's
        # batch of 32.
        "bn_inception": {"width_multiplier": 0.25, "min_depth": 8},
        "bn_inception_steps": 1000,
        "bn_inception_batch_size": 32,
        "bn_inception_eval_every": 100,
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
        "bn_inception": {"width_multiplier": 0.05, "min_depth": 4},
        "bn_inception_steps": 4,
        "bn_inception_batch_size": 16,
        "bn_inception_eval_every": 2,
        # Fewer runs than the full budget: each run costs its tracing time, which dominates here.
        "plain_cnn_variants": [_VARIANTS[0], _VARIANTS[3]],
        "bn_inception_variants": _VARIANTS[:2],
    },
}

# The paper's Figure 3, Inception on ImageNet (steps to 72.2%, the no-BN model's best).
PAPER_FIGURE_3 = [
    {"model": "Inception", "learning_rate": "0.0015", "steps_to_72.2%": 31.0e6, "max": 0.722},
    {"model": "BN-Baseline", "learning_rate": "0.0015", "steps_to_72.2%": 13.3e6, "max": 0.727},
    {"model": "BN-x5", "learning_rate": "0.0075", "steps_to_72.2%": 2.1e6, "max": 0.730},
    {"model": "BN-x30", "learning_rate": "0.045", "steps_to_72.2%": 2.7e6, "max": 0.748},
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


def run_model(model_name: str, config: dict, output_dir: Path) -> dict:
    seed = config["seed"]
    # BN-Inception needs at least 32x32: Fashion-MNIST is padded from 28x28 by bnzoo.data.
    image_size = (32, 32) if model_name == "bn_inception" else None
    splits = [
        harness.load_split(
            "fashion_mnist", split, image_size, config["data_dir"], config["manual_dir"]
        )
        for split in (config["train_split"], config["test_split"])
    ]
    train_data, test_data = splits
    eval_data = test_data.subset(config["eval_examples"], seed)
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
    for name, data in results["models"].items():
        out[f"{name}_table"] = variant_table(
            data["rows"], f"steps to {harness.percent(data['target_accuracy'])} (no-BN best)"
        )
        out[f"{name}_parameters"] = f"{data['trainable_parameters_with_bn']:,}"
    out["paper_table"] = harness.markdown_table(
        ["paper (Inception, ImageNet)", "initial learning rate", "steps to 72.2%", "max accuracy"],
        [
            [
                row["model"],
                row["learning_rate"],
                f"{row['steps_to_72.2%'] / 1e6:.1f} M",
                harness.percent(row["max"]),
            ]
            for row in results["paper_figure_3"]
        ],
    )
    return out


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(NAME, DESCRIPTION, PRESETS, run, argv, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
