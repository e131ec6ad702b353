"""Benchmark layers.BatchNormalization against keras.layers.BatchNormalization (TensorFlow).

For each shape it times, interleaved in one process so that both layers see the same machine
state: training forward+backward (outputs and the gradients for x, gamma and beta, plus the
moving-statistics update) and inference, each in a `tf.function`, without and with XLA
(`jit_compile=True`). It prints medians, the ratio ours/Keras, and the achieved bandwidth as a
fraction of a plain memory copy of the same tensor, BN's physical limit since it is memory-bound:

- inference moves 2 tensors (read x, write y): fraction = t_copy / t;
- training moves at least 8 (forward: read x for the statistics, read x and write y; backward:
  read dy and x for the reductions, read dy and x and write dx): fraction = 4 * t_copy / t.

Every time includes the fixed cost of calling a `tf.function` (measured with a trivial one,
interleaved with the others). The bandwidth fractions subtract it; times and ratios keep it.

Usage: `make bench` or
`.venv/bin/python bench/bench_batch_normalization.py [--rounds N] [--output results.json]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The script runs from bench/; make the repository importable without an editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from machine import machine_line, write_results  # noqa: E402
from timing import time_interleaved  # noqa: E402

from layers import BatchNormalization  # noqa: E402

SHAPES = [(128, 28, 28, 64), (64, 14, 14, 256), (1024, 512)]


def make_functions(shape: tuple[int, ...], jit_compile: bool) -> dict:
    """The timed functions for one shape: train/infer for both layers, a copy, a trivial call."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    layers = {"ours": BatchNormalization(), "keras": keras.layers.BatchNormalization()}
    for layer in layers.values():
        layer.build(shape)

    def train(layer):
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, [x, layer.gamma.value, layer.beta.value], output_gradients=dy)

        return step

    def infer(layer):
        return lambda: layer(x, training=False)

    # A variable, not a constant, so that the add cannot be folded away: one read, one write.
    zero = tf.Variable(0.0)
    scalar = tf.constant(1.0)
    functions = {"copy": lambda: x + zero, "call": lambda: scalar + zero}
    for name, layer in layers.items():
        functions[f"train {name}"] = train(layer)
        functions[f"infer {name}"] = infer(layer)
    return {
        name: tf.function(fn, jit_compile=jit_compile, autograph=False)
        for name, fn in functions.items()
    }


def copy_fraction(copies: float, copy: float, elapsed: float, call: float) -> float:
    """Achieved bandwidth as a fraction of a copy's, both without the fixed call cost."""
    return copies * max(copy - call, 0.0) / max(elapsed - call, 1e-9)


def geometric_mean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=51, help="timed calls per function")
    parser.add_argument("--output", help="also write the results, with the machine, as JSON")
    args = parser.parse_args(argv)

    print(machine_line())
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), oneDNN "
        f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default (on)')}; "
        f"median of {args.rounds} interleaved calls per function.\n"
    )
    print(
        "| shape | XLA | pass | Keras ms | ours ms | ours/Keras | copy ms | call ms "
        "| Keras % of copy bw | ours % of copy bw |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios: dict[tuple[bool, str], list[float]] = {}
    rows = []
    for jit_compile in (False, True):
        for shape in SHAPES:
            times, _ = time_interleaved(make_functions(shape, jit_compile), args.rounds)
            copy, call = times["copy"], times["call"]
            for kind, copies in (("train", 4.0), ("infer", 1.0)):
                theirs, ours = times[f"{kind} keras"], times[f"{kind} ours"]
                ratios.setdefault((jit_compile, kind), []).append(ours / theirs)
                rows.append(
                    {
                        "shape": shape,
                        "xla": jit_compile,
                        "pass": kind,
                        "keras_ms": theirs * 1e3,
                        "ours_ms": ours * 1e3,
                        "copy_ms": copy * 1e3,
                        "call_ms": call * 1e3,
                        "ours_copy_fraction": copy_fraction(copies, copy, ours, call),
                        "keras_copy_fraction": copy_fraction(copies, copy, theirs, call),
                    }
                )
                print(
                    f"| {shape} | {'on' if jit_compile else 'off'} | "
                    f"{'training fwd+bwd' if kind == 'train' else 'inference'} | "
                    f"{theirs * 1e3:.2f} | {ours * 1e3:.2f} | {ours / theirs:.2f} | "
                    f"{copy * 1e3:.2f} | {call * 1e3:.2f} | "
                    f"{100 * copy_fraction(copies, copy, theirs, call):.0f}% | "
                    f"{100 * copy_fraction(copies, copy, ours, call):.0f}% |",
                    flush=True,
                )
    print("\nGeometric mean of ours/Keras over the three shapes:")
    for (jit_compile, kind), values in ratios.items():
        print(f"  XLA {'on ' if jit_compile else 'off'} {kind}: {geometric_mean(values):.2f}")
    train_no_xla = geometric_mean(ratios[(False, "train")])
    train_xla = geometric_mean(ratios[(True, "train")])
    print(
        f"Goal, training without XLA <= 0.5x Keras: {'met' if train_no_xla <= 0.5 else 'NOT met'} "
        f"({train_no_xla:.2f}); with XLA no slower (<= 1.05x, timing noise): "
        f"{'met' if train_xla <= 1.05 else 'NOT met'} ({train_xla:.2f})"
    )
    if args.output:
        software = {"tensorflow": tf.__version__, "keras": keras.__version__}
        write_results(args.output, {"software": software, "rounds": args.rounds, "rows": rows})
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
