"""Whole-model throughput: bnzoo's BN vs Keras' BN vs no BN, float32 vs mixed_bfloat16.

For each model (plain_cnn_small and plain_cnn on 28x28x1; BN-Inception in both readings,
`bn_inception` and `bn_inception_slim`, at a small input) it builds one copy per normalization
(`normalization="batch_norm"|"keras"|None`) and precision (float32, `mixed_bfloat16`), then
times, interleaved in one process in rotating order so that every variant sees the same machine
state:

- a training step: `model.train_on_batch` (SGD with momentum, sparse cross-entropy), what `fit()`
  runs per batch;
- inference: `model.predict_on_batch`.

It prints medians, images per second, and ratios against Keras' BN in the same precision (the
baseline) and against the same model without BN (what BN costs), twice: in wall time, what a
user waits for on an idle machine, and in CPU time of all the process' threads, which stays
meaningful on a shared machine. `--backend jax` runs the same
models on the JAX backend in another process (Keras must pick its backend before it is
imported); there our layer runs its `keras.ops` path and XLA compiles every step.

Usage: `make bench` or
`.venv/bin/python bench/bench_models.py [--backend jax] [--rounds N] [--output results.json]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NORMALIZATIONS = {"ours": "batch_norm", "keras": "keras", "no BN": None}
PRECISIONS = ("float32", "mixed_bfloat16")
# (registry name, input shape, batch size): plain_cnn_small as `make train` runs it, plain_cnn as
# the earlier default did; BN-Inception at 96x96, batch 32, small enough for a CPU and large
# enough that its 3x3 stage is not degenerate.
MODELS = {
    "plain_cnn_small": ((28, 28, 1), 64),
    "plain_cnn": ((28, 28, 1), 128),
    "bn_inception": ((96, 96, 3), 32),
    "bn_inception_slim": ((96, 96, 3), 32),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default=None)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}"
    )
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help=f"comma-separated subset of {PRECISIONS}"
    )
    parser.add_argument(
        "--inception-size", type=int, default=96, help="BN-Inception's input height and width"
    )
    parser.add_argument("--inception-batch", type=int, default=32)
    parser.add_argument("--output", help="also write the results, with the machine, as JSON")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.precisions = [p for p in args.precisions.split(",") if p]
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {list(MODELS)}")
    for precision in args.precisions:
        if precision not in PRECISIONS:
            parser.error(f"--precisions: unknown {precision!r}; choose from {list(PRECISIONS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def build_variants(name: str, input_shape, batch: int, precisions: list[str]) -> dict:
    """`{(precision, normalization label): (train_step, predict)}` for one model."""
    import keras
    import numpy as np

    import models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *input_shape)).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    variants = {}
    for precision in precisions:
        keras.mixed_precision.set_global_policy(precision)
        try:
            for label, normalization in NORMALIZATIONS.items():
                model = models.create_model(
                    name, input_shape=input_shape, classes=10, normalization=normalization
                )
                model.compile(
                    optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                    loss="sparse_categorical_crossentropy",
                )
                variants[(precision, label)] = (
                    lambda m=model: m.train_on_batch(x, y),
                    lambda m=model: m.predict_on_batch(x),
                )
        finally:
            keras.mixed_precision.set_global_policy("float32")
    return variants


def run(args: argparse.Namespace) -> None:
    import keras
    from machine import machine_line, write_results
    from timing import time_interleaved

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # Every model traces its own step functions; TensorFlow's retracing warning counts them
        # as retraces of one function.
        tf.get_logger().setLevel("ERROR")
        versions = f"TensorFlow {tf.__version__}"
        jit = "no XLA (Keras' default on CPU)"
    else:
        import jax

        versions = f"JAX {jax.__version__}"
        jit = "XLA (every step jit-compiled)"
    print(machine_line())
    print(
        f"## Backend {backend}: {versions}, Keras {keras.__version__}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), {jit}; median of {args.rounds} "
        "interleaved calls per variant; load average at start "
        f"{os.getloadavg()[0]:.1f}.\n"
    )
    header = (
        "| model | input, batch | precision | BN | train ms | train img/s | train vs Keras "
        "| BN's training cost | infer ms | infer img/s | infer vs Keras |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows: dict[str, list[str]] = {"wall": [], "cpu": []}
    records = []
    for name in args.models:
        input_shape, batch = MODELS[name]
        if name.startswith("bn_inception"):
            input_shape = (args.inception_size, args.inception_size, 3)
            batch = args.inception_batch
        variants = build_variants(name, input_shape, batch, args.precisions)
        functions = {}
        for key, (train, predict) in variants.items():
            functions[("train", *key)] = train
            functions[("infer", *key)] = predict
        wall, cpu = time_interleaved(functions, args.rounds)
        for metric, times in (("wall", wall), ("cpu", cpu)):
            for precision in args.precisions:
                for label in NORMALIZATIONS:
                    train, infer = (
                        times[("train", precision, label)],
                        times[("infer", precision, label)],
                    )
                    no_bn = times[("train", precision, "no BN")]
                    cost = "" if label == "no BN" else f"{100 * (train - no_bn) / no_bn:+.0f}%"
                    records.append(
                        {
                            "time": metric,
                            "model": name,
                            "input_shape": input_shape,
                            "batch": batch,
                            "precision": precision,
                            "normalization": label,
                            "train_ms": train * 1e3,
                            "infer_ms": infer * 1e3,
                        }
                    )
                    rows[metric].append(
                        f"| {name} | {'x'.join(map(str, input_shape))}, {batch} | {precision} "
                        f"| {label} | {train * 1e3:.1f} | {batch / train:.0f} "
                        f"| {train / times[('train', precision, 'keras')]:.2f} | {cost} "
                        f"| {infer * 1e3:.1f} | {batch / infer:.0f} "
                        f"| {infer / times[('infer', precision, 'keras')]:.2f} |"
                    )
        print(f"(measured {name})", file=sys.stderr, flush=True)
    print("Wall time (what a user waits for; trust it on an idle machine):\n")
    print(machine_line())
    print(header)
    print("\n".join(rows["wall"]))
    print(
        "\nCPU time of all the process' threads (img/s per CPU-second; robust on a shared "
        "machine, where wall time includes waiting for a core):\n"
    )
    print(machine_line())
    print(header)
    print("\n".join(rows["cpu"]))
    print()
    if args.output:
        software = {"backend": backend, "versions": versions, "keras": keras.__version__}
        write_results(args.output, {"software": software, "rounds": args.rounds, "rows": records})
        print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    current = os.environ.get("KERAS_BACKEND", "tensorflow")
    if args.backend is not None and args.backend != current:
        # Keras reads KERAS_BACKEND once, at import: the other backend needs its own process.
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        sys.exit(subprocess.call([sys.executable, __file__, *argv], env=env))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # The script runs from bench/; make the repository importable without an editable install.
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    run(args)


if __name__ == "__main__":
    main()
