"""Experiment 3: BN makes a sigmoid CNN trainable (the paper's BN-x5-Sigmoid, §4.2.2).

The paper: "Without Batch Normalization, Inception with sigmoid never achieves better than
1/1000 accuracy", while BN-x5-Sigmoid (BN, sigmoid, 5x the learning rate) reaches 69.8%.
The sigmoid's derivative is at most 0.25 and nearly 0 once its input leaves [-4, 4], so in a
deep sigmoid network without BN the gradient that reaches the early layers vanishes.

Here: a ``plain_cnn`` with sigmoid activations, 6 convolutions deep, on Fashion-MNIST, without
BN at the base learning rate and at 5x, and with BN at 5x (BN-x5-Sigmoid) and 1x. "Stalled"
is measured as the number of steps before the test accuracy first exceeds twice chance (20%).

    .venv/bin/python experiments/exp3_sigmoid_cnn.py              # full: about 5 minutes
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from experiments import harness  # noqa: E402

NAME = "exp3_sigmoid_cnn"
DESCRIPTION = "Paper's BN-x5-Sigmoid: a sigmoid CNN stalls without BN and trains with it"
# Twice the accuracy of guessing among 10 classes: a network above it has started to learn.
LEARNING_THRESHOLD = 2 * harness.CHANCE_ACCURACY_10_CLASSES

_VARIANTS = [
    {"normalization": None, "multiplier": 1},
    {"normalization": None, "multiplier": 5},
    {"normalization": "batch_norm", "multiplier": 1},
    {"normalization": "batch_norm", "multiplier": 5},
]

PRESETS = {
    "full": {
        "steps": 1500,
        "batch_size": 64,
        "eval_every": 100,
        "eval_examples": 2000,
        "base_learning_rate": 0.01,  # the same base as exp2's ReLU network
        "momentum": 0.9,
        "bn_momentum": 0.99,  # Keras' default; see exp2
        "variants": _VARIANTS,
        # Two sigmoid convolutions per stage, three stages: six saturating layers in a row.
        "plain_cnn": {"widths": [16, 32, 64], "depth": 2, "dropout_rate": 0.0},
        "train_split": "train",
        "test_split": "test",
    },
    "smoke": {
        "steps": 10,
        "batch_size": 32,
        "eval_every": 5,
        "eval_examples": 200,
        "base_learning_rate": 0.01,
        "momentum": 0.9,
        "bn_momentum": 0.99,
        "plain_cnn": {"widths": [8, 8, 8], "depth": 2, "dropout_rate": 0.0},
        # Each run costs its tracing time, which dominates a smoke run: the two that matter.
        "variants": [_VARIANTS[0], _VARIANTS[3]],
        "train_split": "train[:1000]",
        "test_split": "test[:300]",
    },
}

PAPER = {
    "inception_sigmoid_without_bn": "never better than 1/1000 accuracy (chance on ImageNet)",
    "bn_x5_sigmoid_max_accuracy": 0.698,
    "bn_x5_relu_max_accuracy": 0.730,
}


def run(config: dict, output_dir: Path) -> dict:
    seed = config["seed"]
    train_data, test_data = (
        harness.load_split("fashion_mnist", split, None, config["data_dir"], config["manual_dir"])
        for split in (config["train_split"], config["test_split"])
    )
    eval_data = test_data.subset(config["eval_examples"], seed)

    def build(normalization: str | None):
        return models.create_model(
            "plain_cnn",
            normalization=normalization,
            bn_momentum=config["bn_momentum"],
            activation="sigmoid",
            classifier_activation=None,
            **config["plain_cnn"],
        )

    runs = harness.compare_variants(
        build,
        config["variants"],
        train_data,
        eval_data,
        test_data,
        base_learning_rate=config["base_learning_rate"],
        momentum=config["momentum"],
        steps=config["steps"],
        batch_size=config["batch_size"],
        eval_every=config["eval_every"],
        seed=seed,
        log_prefix="[sigmoid plain_cnn] ",
    )
    rows = harness.variant_rows(
        runs, config["variants"], config["base_learning_rate"], LEARNING_THRESHOLD
    )
    for row in rows:
        # In this experiment the "target" is only the sign of learning.
        row["steps_to_learning_threshold"] = row.pop("steps_to_target")
    harness.plot_accuracy_curves(
        {row["label"]: runs[row["key"]] for row in rows},
        output_dir / "sigmoid_cnn_accuracy.png",
        "Sigmoid plain_cnn (6 conv layers) on Fashion-MNIST",
        target=LEARNING_THRESHOLD,
    )
    return {
        "learning_threshold": LEARNING_THRESHOLD,
        "rows": rows,
        "runs": {key: run.to_dict() for key, run in runs.items()},
        "paper": PAPER,
    }


def report(results: dict) -> dict[str, str]:
    """Markdown table for docs/RESULTS.md, from ``results.json``."""
    from experiments.exp2_learning_rates import variant_table

    threshold = harness.percent(results["learning_threshold"], 0)
    return {"table": variant_table(results["rows"], f"steps until above {threshold}")}


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(NAME, DESCRIPTION, PRESETS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
