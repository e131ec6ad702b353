"""Experiment 5: bnzoo's ``layers.BatchNormalization`` against ``keras.layers.BatchNormalization``.

Each network (a ``plain_cnn``, where BN normalizes 4-D feature maps, and the paper's
``paper_mlp``, where it normalizes 2-D activations) is built twice from the same seed, once with
``normalization="batch_norm"`` (bnzoo's layer) and once with ``normalization="keras"`` (Keras'
own), and trained on the same mini-batches in the same order. Both layers compute the paper's
Algorithm 1, so the training curves should lie on top of each other; floating-point differences
in how the batch statistics are computed may make them drift apart slowly, as any change of
summation order does in SGD.

The two models are trained alternately, one epoch each in turn, so that load from other
processes on a shared machine slows both alike; an epoch's time is the sum of its compiled
training chunks (evaluation excluded). The first epoch includes tracing and compilation, so
the steady state is the median of the later epochs.

    .venv/bin/python experiments/exp5_layer_vs_keras.py          # full: about 3 minutes
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import models  # noqa: E402
from experiments import harness  # noqa: E402

NAME = "exp5_layer_vs_keras"
DESCRIPTION = "bnzoo's BatchNormalization vs Keras': overlapping curves and time per epoch"
RUNS = {"bnzoo": "batch_norm", "keras": "keras"}
LABELS = {"bnzoo": "bnzoo layers.BatchNormalization", "keras": "keras.layers.BatchNormalization"}

PRESETS = {
    "full": {
        "networks": {
            # A convolutional network: BN over [batch, height, width, channels].
            "plain_cnn": {
                "model": {"widths": [16, 32, 64], "depth": 1, "dropout_rate": 0.0},
                "batch_size": 128,
                "learning_rate": 0.02,
                "momentum": 0.9,
                "eval_every": 117,  # 4 evaluation points per 468-step epoch
            },
            # The paper's MLP as in exp1: BN over [batch, units].
            "paper_mlp": {
                "model": {},
                "batch_size": 60,
                "learning_rate": 0.1,
                "momentum": 0.0,
                "eval_every": 250,
            },
        },
        "epochs": 4,
        "eval_examples": 2000,
        "train_split": "train",
        "test_split": "test",
    },
    "smoke": {
        "networks": {
            "plain_cnn": {
                "model": {"widths": [8, 8, 8], "depth": 1, "dropout_rate": 0.0},
                "batch_size": 32,
                "learning_rate": 0.05,
                "momentum": 0.9,
                "eval_every": 5,
            },
            "paper_mlp": {
                "model": {"hidden_units": 16},
                "batch_size": 32,
                "learning_rate": 0.1,
                "momentum": 0.0,
                "eval_every": 5,
            },
        },
        "epochs": 2,
        "eval_examples": 200,
        "train_split": "train[:320]",
        "test_split": "test[:300]",
    },
}


def compare_initial_weights(first, second) -> bool:
    """Whether two models built from one seed start from identical kernels and biases.

    BN's own weights start at constants (gamma 1, beta 0, mean 0, variance 1), so only the
    convolution and dense weights depend on the seed; they are compared layer by layer.
    """
    for layer in first.layers:
        if not layer.weights or "bn" in layer.name:
            continue
        other = second.get_layer(layer.name)
        for a, b in zip(layer.weights, other.weights, strict=True):
            if not np.array_equal(a.numpy(), b.numpy()):
                return False
    return True


def loss_agreement(first: list[float], second: list[float]) -> dict:
    """How closely two per-step loss curves agree, overall and over the first 100 steps."""
    a, b = np.asarray(first), np.asarray(second)
    difference = np.abs(a - b)
    early = difference[: min(100, difference.size)]
    return {
        "max_abs_difference": float(difference.max()),
        "mean_abs_difference": float(difference.mean()),
        "max_abs_difference_first_100_steps": float(early.max()),
        "mean_relative_difference": float(np.mean(difference / np.maximum(np.abs(a), 1e-12))),
        "correlation": float(np.corrcoef(a, b)[0, 1]) if a.size > 1 else 1.0,
    }


def compare_network(
    name: str,
    network: dict,
    config: dict,
    data: tuple[harness.ArraySplit, harness.ArraySplit, harness.ArraySplit],
    output_dir: Path,
) -> dict:
    """Trains ``name`` with each BN implementation, alternating epochs, and compares them."""
    seed = config["seed"]
    train_data, eval_data, test_data = data
    built = {}
    for key, normalization in RUNS.items():
        harness.set_seed(seed)
        built[key] = models.create_model(
            name, normalization=normalization, classifier_activation=None, **network["model"]
        )
    identical_start = compare_initial_weights(built["bnzoo"], built["keras"])
    if not identical_start:
        # Then the comparison would be about initializations, not layers: start both alike.
        built["keras"].set_weights(built["bnzoo"].get_weights())

    trainers = {
        key: harness.Trainer(
            model,
            train_data,
            eval_data,
            optimizer=harness.sgd(network["learning_rate"], network["momentum"]),
            batch_size=network["batch_size"],
            eval_every=network["eval_every"],
            seed=seed,
            record_step_losses=True,
            log_prefix=f"[{name} {key}] ",
        )
        for key, model in built.items()
    }
    steps_per_epoch = trainers["bnzoo"].sampler.steps_per_epoch
    # --steps N overrides the epochs: N steps in all, still in epoch-sized turns.
    total_steps = config.get("steps") or config["epochs"] * steps_per_epoch
    epoch_seconds = {key: [] for key in trainers}
    done = 0
    while done < total_steps:
        turn = min(steps_per_epoch, total_steps - done)
        for key, trainer in trainers.items():
            chunks_before = len(trainer.run.chunk_seconds)
            trainer.train(turn, stop_on_divergence=False)
            epoch_seconds[key].append(sum(trainer.run.chunk_seconds[chunks_before:]))
        done += turn
    runs = {key: trainer.test(test_data) for key, trainer in trainers.items()}

    timing = {
        key: {
            "epoch_seconds": seconds,
            # Epoch 1 includes tracing; the later epochs are the steady state.
            "steady_state_epoch_seconds": float(np.median(seconds[1:] or seconds)),
        }
        for key, seconds in epoch_seconds.items()
    }
    plot_comparison(
        name, runs, timing, eval_data.num_examples, output_dir / f"{name}_layer_vs_keras.png"
    )
    return {
        "steps_per_epoch": steps_per_epoch,
        "identical_initial_weights_from_seed": identical_start,
        "loss_agreement": loss_agreement(runs["bnzoo"].step_losses, runs["keras"].step_losses),
        "final_test_accuracy": {key: run.final_test_accuracy for key, run in runs.items()},
        "final_test_accuracy_difference": abs(
            runs["bnzoo"].final_test_accuracy - runs["keras"].final_test_accuracy
        ),
        "timing": timing,
        # Above 1: bnzoo's layer trains faster than Keras'.
        "steady_state_speed_ratio_keras_over_bnzoo": (
            timing["keras"]["steady_state_epoch_seconds"]
            / timing["bnzoo"]["steady_state_epoch_seconds"]
        ),
        "runs": {key: run.to_dict() for key, run in runs.items()},
    }


def run(config: dict, output_dir: Path) -> dict:
    train_data, test_data = (
        harness.load_split("fashion_mnist", split, None, config["data_dir"], config["manual_dir"])
        for split in (config["train_split"], config["test_split"])
    )
    data = (train_data, test_data.subset(config["eval_examples"], config["seed"]), test_data)
    return {
        "networks": {
            name: compare_network(name, network, config, data, output_dir)
            for name, network in config["networks"].items()
        }
    }


def moving_average(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values)
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_comparison(name: str, runs: dict, timing: dict, eval_examples: int, path: Path) -> None:
    plt = harness.pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    window = 20
    for index, (key, run) in enumerate(runs.items()):
        smoothed = moving_average(run.step_losses, window)
        axes[0, 0].plot(
            np.arange(smoothed.size) + window,
            smoothed,
            label=LABELS[key],
            linestyle="-" if index == 0 else "--",
        )
        axes[1, 0].plot(
            run.steps,
            run.eval_accuracy,
            "o-" if index == 0 else "x--",
            label=LABELS[key],
            markersize=3,
        )
    axes[0, 0].set_title(f"training loss per step ({window}-step moving average)")
    axes[0, 0].set_xlabel("training steps")
    axes[1, 0].set_title(f"test accuracy (fixed {eval_examples:,}-image subset)")
    axes[1, 0].set_xlabel("training steps")

    difference = np.abs(np.asarray(runs["bnzoo"].step_losses) - runs["keras"].step_losses)
    axes[0, 1].semilogy(np.arange(1, difference.size + 1), np.maximum(difference, 1e-9))
    axes[0, 1].set_title("|loss(bnzoo) - loss(Keras)| per step (0 drawn at 1e-9)")
    axes[0, 1].set_xlabel("training steps")

    keys = list(timing)
    epochs = len(timing[keys[0]]["epoch_seconds"])
    width = 0.38
    for index, key in enumerate(keys):
        axes[1, 1].bar(
            np.arange(1, epochs + 1) + (index - 0.5) * width,
            timing[key]["epoch_seconds"],
            width,
            label=LABELS[key],
        )
    axes[1, 1].set_title("seconds per epoch (epoch 1 includes tracing)")
    axes[1, 1].set_xlabel("epoch")
    axes[1, 1].set_xticks(np.arange(1, epochs + 1))
    figure.suptitle(f"{name}: bnzoo's BatchNormalization vs Keras', same seed and batches")
    for axis in axes.ravel():
        axis.grid(alpha=0.3)
    for axis in (axes[0, 0], axes[1, 0], axes[1, 1]):
        axis.legend(fontsize=8)
    harness.save_figure(figure, path)


def report(results: dict) -> dict[str, str]:
    """Markdown table for docs/RESULTS.md, from ``results.json``."""
    rows = []
    for name, data in results["networks"].items():
        agreement = data["loss_agreement"]
        timing = data["timing"]
        rows.append(
            [
                name,
                "yes" if data["identical_initial_weights_from_seed"] else "no (copied)",
                f"{agreement['max_abs_difference_first_100_steps']:.1e}",
                f"{agreement['mean_abs_difference']:.1e}",
                f"{agreement['correlation']:.6f}",
                " / ".join(
                    harness.percent(data["final_test_accuracy"][k], 2) for k in ("bnzoo", "keras")
                ),
                " / ".join(
                    harness.seconds(timing[k]["steady_state_epoch_seconds"])
                    for k in ("bnzoo", "keras")
                ),
                f"{data['steady_state_speed_ratio_keras_over_bnzoo']:.2f}x",
            ]
        )
    return {
        "table": harness.markdown_table(
            [
                "network",
                "same initial weights from the seed",
                "max loss difference, first 100 steps",
                "mean loss difference, all steps",
                "loss correlation",
                "final accuracy bnzoo / Keras",
                "seconds per epoch bnzoo / Keras",
                "Keras time / bnzoo time",
            ],
            rows,
        )
    }


def main(argv: list[str] | None = None) -> int:
    return harness.cli_main(NAME, DESCRIPTION, PRESETS, run, argv)


if __name__ == "__main__":
    sys.exit(main())
