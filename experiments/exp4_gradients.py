"""Experiment 4: vanishing gradients in a sigmoid network, and what BN does to them (§3.3).

The paper's argument (§3.3): a sigmoid's derivative is at most 0.25 and nearly 0 where its input
is large, so each sigmoid layer shrinks the gradient passed back to the layers below; BN keeps
every sigmoid input near zero mean and unit variance, where the derivative is largest, so the
gradient reaches the early layers.

Measured on a deeper ``paper_mlp`` (6 hidden layers of 100 sigmoids, Gaussian(0, 0.1) weights),
with and without BN, from identical initial weights:

* the L2 norm of the loss gradient for every layer's kernel on a fixed training batch, at
  initialization and every ``eval_every`` steps (in training mode, without moving BN's
  averages);
* the mean sigmoid derivative sigma'(x) = s(x)(1 - s(x)) over every hidden layer's inputs (at
  most 0.25): the factor by which each layer scales the gradient on its way back;
* the distribution of one hidden layer's pre-activations ``Wu`` before and after BN (and the
  sigmoid input without BN), at initialization and after training.

    .venv/bin/python experiments/exp4_gradients.py               # full: about 1 minute
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import models  # noqa: E402
from experiments import harness  # noqa: E402

NAME = "exp4_gradients"
DESCRIPTION = "Per-layer gradient norms and sigmoid inputs of a sigmoid MLP, with and without BN"
RUNS = {"without_bn": None, "with_bn": "batch_norm"}
LABELS = {"without_bn": "without BN", "with_bn": "with BN"}

PRESETS = {
    "full": {
        "hidden_layers": 6,
        "steps": 5000,
        "batch_size": 60,
        "learning_rate": 0.1,  # exp1's
        "eval_every": 250,
        "eval_examples": 2000,
        "gradient_batch": 500,  # fixed training examples the gradient norms are measured on
        "histogram_layer": 3,  # the middle of the six hidden layers
        "train_split": "train",
        "test_split": "test",
    },
    "smoke": {
        "hidden_layers": 3,
        "steps": 20,
        "batch_size": 60,
        "learning_rate": 0.1,
        "eval_every": 10,
        "eval_examples": 200,
        "gradient_batch": 100,
        "histogram_layer": 2,
        "train_split": "train[:1200]",
        "test_split": "test[:300]",
    },
}


def sigmoid_derivative(x: np.ndarray) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 - s)


def sigmoid_input_probe(model, images: np.ndarray, hidden_layers: int):
    """Per hidden layer: mean sigma'(x) and the fraction of inputs with |x| > 4 (saturated)."""
    names = [f"hidden_{i}_preactivation" for i in range(1, hidden_layers + 1)]

    def probe(_model) -> dict:
        values = harness.layer_values(model, names, images, training=True)
        return {
            "mean_sigmoid_derivative": [float(sigmoid_derivative(v).mean()) for v in values],
            "saturated_fraction": [float(np.mean(np.abs(v) > 4.0)) for v in values],
        }

    return probe


def histogram_values(model, layer: int, images: np.ndarray) -> dict:
    """The chosen layer's ``Wu`` (before BN) and sigmoid input (after BN), in training mode."""
    names = [f"hidden_{layer}_dense", f"hidden_{layer}_preactivation"]
    before, sigmoid_input = harness.layer_values(model, names, images, training=True)
    return {"before_bn": before, "sigmoid_input": sigmoid_input}


def moments(values: np.ndarray) -> dict:
    """Statistics of a layer's values ``[examples, units]``.

    ``within_unit_std`` (the mean over units of the standard deviation over examples) is the
    part of the spread that depends on the input image: the signal the layer passes on. The
    overall ``std`` also counts differences between units that are constant across images.
    """
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "within_unit_std": float(values.std(axis=0).mean()),
        "saturated_fraction": float(np.mean(np.abs(values) > 4.0)),
        "mean_sigmoid_derivative": float(sigmoid_derivative(values).mean()),
    }


def run(config: dict, output_dir: Path) -> dict:
    seed = config["seed"]
    train_data, test_data = (
        harness.load_split("fashion_mnist", split, None, config["data_dir"], config["manual_dir"])
        for split in (config["train_split"], config["test_split"])
    )
    eval_data = test_data.subset(config["eval_examples"], seed)
    gradient_data = train_data.subset(config["gradient_batch"], seed)
    hidden_layers = config["hidden_layers"]
    layer = config["histogram_layer"]
    if not 1 <= layer <= hidden_layers:
        raise ValueError(
            f"histogram_layer={layer} is not one of the {hidden_layers} hidden layers; "
            f"use 1 to {hidden_layers}."
        )
    kernel_layers = [f"hidden_{i}_dense" for i in range(1, hidden_layers + 1)] + ["predictions"]

    runs, histograms, results_runs = {}, {}, {}
    for key, normalization in RUNS.items():
        harness.set_seed(seed)
        model = models.create_model(
            "paper_mlp",
            normalization=normalization,
            hidden_layers=hidden_layers,
            classifier_activation=None,
            seed=seed,
        )
        histograms[key] = {"initialization": histogram_values(model, layer, eval_data.images)}
        runs[key] = harness.train(
            model,
            train_data,
            eval_data,
            optimizer=harness.sgd(config["learning_rate"]),
            steps=config["steps"],
            batch_size=config["batch_size"],
            eval_every=config["eval_every"],
            seed=seed,
            test_data=test_data,
            probes={
                "gradient_norms": harness.gradient_norms_probe(
                    model, gradient_data.images, gradient_data.labels, kernel_layers
                ),
                "sigmoid_inputs": sigmoid_input_probe(model, eval_data.images, hidden_layers),
            },
            log_prefix=f"[{LABELS[key]}] ",
        )
        histograms[key]["trained"] = histogram_values(model, layer, eval_data.images)
        results_runs[key] = {
            **runs[key].to_dict(),
            "gradient_norms_at_initialization": runs[key].probes["gradient_norms"][0],
            "gradient_norms_trained": runs[key].probes["gradient_norms"][-1],
            "first_to_last_hidden_gradient_ratio": [
                norms["hidden_1_dense"] / norms[f"hidden_{hidden_layers}_dense"]
                for norms in runs[key].probes["gradient_norms"]
            ],
            "histogram_moments": {
                when: {name: moments(values) for name, values in by_name.items()}
                for when, by_name in histograms[key].items()
            },
        }

    plot_gradient_norms(runs, kernel_layers, output_dir / "gradient_norms.png")
    plot_histograms(histograms, layer, output_dir / "preactivation_histograms.png")
    return {
        "hidden_layers": hidden_layers,
        "kernel_layers": kernel_layers,
        "histogram_layer": f"hidden_{layer}",
        "runs": results_runs,
    }


def plot_gradient_norms(runs: dict, kernel_layers: list[str], path: Path) -> None:
    """Per-layer gradient norms at initialization and trained; first/last ratio over training."""
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    positions = np.arange(len(kernel_layers))
    short = [name.replace("_dense", "").replace("hidden_", "h") for name in kernel_layers]
    for key, run in runs.items():
        norms = run.probes["gradient_norms"]
        for axis, point, when in ((axes[0], 0, "at initialization"), (axes[1], -1, "trained")):
            axis.plot(positions, [norms[point][n] for n in kernel_layers], "o-", label=LABELS[key])
            axis.set_title(f"gradient norm per layer, {when} (step {run.steps[point]})")
        first, last = kernel_layers[0], kernel_layers[-2]
        ratio = [n[first] / n[last] for n in norms]
        axes[2].plot(run.steps, ratio, label=LABELS[key])
    for axis in axes[:2]:
        axis.set_xticks(positions, short)
        axis.set_xlabel("layer (input -> output)")
        axis.set_ylabel("||dL/dW||")
    axes[2].set_title("first / last hidden layer gradient norm")
    axes[2].set_xlabel("training steps")
    axes[2].axhline(1.0, color="gray", linewidth=0.8)
    for axis in axes:
        axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    harness.save_figure(figure, path)


def plot_histograms(histograms: dict, layer: int, path: Path) -> None:
    """Pre-activations of one layer: without BN; with BN before and after normalizing."""
    plt = harness.pyplot()
    panels = [
        ("without_bn", "sigmoid_input", "without BN: Wu + b (sigmoid input)"),
        ("with_bn", "before_bn", "with BN: Wu (before BN)"),
        ("with_bn", "sigmoid_input", "with BN: BN(Wu) (sigmoid input)"),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    grid = np.linspace(-8, 8, 400)
    for row, when in enumerate(("initialization", "trained")):
        for column, (key, name, title) in enumerate(panels):
            axis = axes[row, column]
            layer_values = histograms[key][when][name]
            values = layer_values.ravel()
            low, high = np.percentile(values, [0.5, 99.5])
            low, high = min(low, -4.5), max(high, 4.5)
            axis.hist(values, bins=80, range=(low, high), density=True, color="C0", alpha=0.8)
            curve = sigmoid_derivative(grid)
            scale = axis.get_ylim()[1] / 0.25
            axis.plot(grid, curve * scale, "k--", linewidth=1, label="sigmoid'(x), scaled")
            axis.set_xlim(low, high)
            axis.set_title(f"{title}, {when}", fontsize=9)
            stats = moments(layer_values)
            axis.text(
                0.02,
                0.95,
                f"mean {stats['mean']:.2f}, std {stats['std']:.2f}\n"
                f"std within a unit {stats['within_unit_std']:.2f}\n"
                f"|x|>4: {100 * stats['saturated_fraction']:.1f}%",
                transform=axis.transAxes,
                fontsize=8,
                verticalalignment="top",
            )
            if row == 1:
                axis.set_xlabel(f"hidden layer {layer} pre-activation")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    harness.save_figure(figure, path)


def report(results: dict) -> dict[str, str]:
    """Markdown tables for docs/RESULTS.md, from ``results.json``."""
    table = harness.markdown_table
    layers = results["kernel_layers"]
    short = [name.replace("_dense", "") for name in layers]
    rows = []
    for key, run in results["runs"].items():
        for when, norms in (
            ("initialization", run["gradient_norms_at_initialization"]),
            (f"step {run['summary']['steps_trained']:,}", run["gradient_norms_trained"]),
        ):
            rows.append([LABELS[key], when] + [f"{norms[name]:.3g}" for name in layers])
    gradients = table(["network", "when"] + short, rows)

    rows = []
    for key, run in results["runs"].items():
        probes = run["probes"]["sigmoid_inputs"]
        for when, index in (("initialization", 0), ("trained", -1)):
            derivative = probes[index]["mean_sigmoid_derivative"]
            saturated = probes[index]["saturated_fraction"]
            rows.append(
                [LABELS[key], when]
                + [f"{d:.3f} ({100 * f:.1f}%)" for d, f in zip(derivative, saturated, strict=True)]
            )
    hidden = [f"hidden_{i}" for i in range(1, results["hidden_layers"] + 1)]
    derivatives = table(["network", "when"] + hidden, rows)

    rows = []
    for key, run in results["runs"].items():
        ratios = run["first_to_last_hidden_gradient_ratio"]
        rows.append(
            [
                LABELS[key],
                f"{ratios[0]:.3g}",
                f"{ratios[-1]:.3g}",
                f"{min(ratios):.3g} to {max(ratios):.3g}",
                harness.percent(run["summary"]["final_test_accuracy"], 2),
            ]
        )
    ratio_table = table(
        [
            "network",
            "hidden_1 / last hidden gradient norm, initialization",
            "trained",
            "range over training",
            "final accuracy, full test set",
        ],
        rows,
    )

    rows = []
    for key, run in results["runs"].items():
        for when, by_name in run["histogram_moments"].items():
            for name, stats in by_name.items():
                if key == "without_bn" and name == "before_bn":
                    continue  # without BN, Wu + b is the sigmoid input itself
                rows.append(
                    [
                        LABELS[key],
                        when,
                        "Wu (before BN)" if name == "before_bn" else "sigmoid input",
                        f"{stats['mean']:+.2f}",
                        f"{stats['std']:.2f}",
                        f"{stats['within_unit_std']:.2f}",
                        f"{stats['mean_sigmoid_derivative']:.3f}",
                        harness.percent(stats["saturated_fraction"]),
                    ]
                )
    moments_table = table(
        [
            "network",
            "when",
            f"{results['histogram_layer']} values",
            "mean",
            "std",
            "std across images, per unit",
            "mean sigmoid'",
            "abs > 4",
        ],
        rows,
    )
    return {
        "gradient_table": gradients,
        "derivative_table": derivatives,
        "ratio_table": ratio_table,
        "histogram_table": moments_table,
    }


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(NAME, DESCRIPTION, PRESETS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
