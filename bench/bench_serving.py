"""Serving latency of exported SavedModels: bnzoo's BN vs Keras' BN vs no BN, batch 1 and 64.

Exports `plain_cnn` and a small BN-Inception (Fashion-MNIST's 28x28x1 images, padded to 32x32 in
the graph, as `train.py` trains it) with `bnzoo.export.export_serving_model`, once per
normalization, then measures the `serving_default` signature in another process that imports only
TensorFlow (`bench/serve_saved_models.py`, empty PYTHONPATH, run outside the repository): medians
of interleaved calls on uint8 images, batch 1 and batch 64, and the number of fused
conv-BN-ReLU ops (`_FusedConv2D`) in the graph the runtime executes. Wall and CPU time (all of
the serving process' threads) are both printed: CPU time stays meaningful on a shared machine.

Usage: `make bench` or `.venv/bin/python bench/bench_serving.py [--rounds N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402

import models  # noqa: E402
from bnzoo.export import export_serving_model  # noqa: E402

NORMALIZATIONS = {"ours": "batch_norm", "keras": "keras", "no BN": None}
# Fashion-MNIST as the dataset delivers it, and its statistics (DatasetInfo.mean/std).
IMAGE_SHAPE = (28, 28, 1)
MEAN, STD = (0.286,), (0.353,)
# (registry name, the model's input size): BN-Inception needs at least 32x32.
MODELS = {"plain_cnn": (28, 28), "bn_inception": (32, 32)}
BATCHES = (1, 64)


def export_all(root: str) -> dict[str, str]:
    """Export every (model, normalization) pair under `root`; returns {label: path}."""
    paths = {}
    for name, size in MODELS.items():
        for label, normalization in NORMALIZATIONS.items():
            keras.utils.set_random_seed(0)
            model = models.create_model(
                name,
                input_shape=(*size, IMAGE_SHAPE[-1]),
                classes=10,
                normalization=normalization,
                classifier_activation=None,
            )
            path = os.path.join(root, f"{name}_{label.replace(' ', '_')}")
            export_serving_model(
                model,
                path,
                image_shape=IMAGE_SHAPE,
                mean=MEAN,
                std=STD,
                image_size=None if size == IMAGE_SHAPE[:2] else size,
            )
            paths[f"{name}|{label}"] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=51, help="timed calls per model and batch")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    with tempfile.TemporaryDirectory() as root:
        paths = export_all(root)
        command = [
            sys.executable,
            str(ROOT / "bench" / "serve_saved_models.py"),
            str(args.rounds),
            ",".join(map(str, BATCHES)),
            *(f"{label}={path}" for label, path in paths.items()),
        ]
        result = subprocess.run(
            command,
            cwd=root,
            env={**os.environ, "PYTHONPATH": ""},
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        sys.exit(f"bench_serving: the TensorFlow-only serving process failed:\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["project_modules_imported"]:
        sys.exit(
            f"bench_serving: the serving process imported {report['project_modules_imported']}"
        )

    from machine import machine_line

    print(
        f"## Serving latency: SavedModel `serving_default` from a TensorFlow-only process "
        f"(TensorFlow {report['tensorflow']}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}), uint8 {IMAGE_SHAPE} images; median of "
        f"{args.rounds} interleaved calls; load average {os.getloadavg()[0]:.1f}."
    )
    header = " | ".join(f"batch {b} ms | vs Keras" for b in BATCHES)
    for key, title in (
        ("latency_ms", "Wall time (the latency a client sees; trust it on an idle machine)"),
        ("cpu_ms", "CPU time of all the serving process' threads (robust on a shared machine)"),
    ):
        times = report[key]
        print(f"\n{title}:\n")
        print(machine_line())
        print(f"| model | BN | {header} | batch 64 img/s | fused conv-BN-ReLU ops |")
        print("|---|---|" + "---:|---:|" * len(BATCHES) + "---:|---:|")
        for name in MODELS:
            for label in NORMALIZATIONS:
                cells = []
                for batch in BATCHES:
                    ms = times[f"{name}|{label}"][str(batch)]
                    keras_ms = times[f"{name}|keras"][str(batch)]
                    cells.append(f"{ms:.2f} | {ms / keras_ms:.2f}")
                per_second = 64 / times[f"{name}|{label}"]["64"] * 1e3
                fused = report["fused_convolutions"][f"{name}|{label}"]
                print(f"| {name} | {label} | {' | '.join(cells)} | {per_second:.0f} | {fused} |")
    print()


if __name__ == "__main__":
    main()
