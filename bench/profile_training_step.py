"""Where a training step's time goes: BN's share of a model's step, and a per-op profile.

Builds one model three times (bnzoo's BatchNormalization, `keras.layers.BatchNormalization`,
no normalization) and answers, in one process with interleaved measurements:

1. **Wall and CPU time** (untraced, `train_on_batch`, medians) of the three variants, next to two
   references built from the same model's BN input shapes: *BN alone*, our layer's training
   forward + backward (gradients for x, gamma, beta and the moving-statistics update) on every
   one of the model's BN shapes in one `tf.function`, without the convolutions; and *copy floor*,
   four plain copies of each of those tensors, the memory traffic BN cannot avoid in training
   without fusing into the convolutions (forward: read x for the statistics, read x and write y;
   backward: read dy and x for the reductions, read dy and x and write dx).
2. **Per-op profile**: one `train_on_batch` of every variant per round, traced with
   `tf.profiler.experimental`; the trace (XSpace protobuf) is read directly and each op's time on
   TensorFlow's executor threads is grouped into categories (conv, BN kernels, ReLU, ...).
3. **Our BN layers one by one**: values, path (fused kernel or keras.ops), forward and
   backward time, which shows where the small-tensor threshold `_FUSED_MIN_VALUES` sits.

CPU time (all threads of the process) is the load-robust measure on a shared machine, where a
step's wall time includes waiting for a core. Op times are summed over the executor's inter-op
threads, so with two inter-op threads they add up to more than the wall time;
`--inter-op-threads 1` makes them additive.

Usage: `.venv/bin/python bench/profile_training_step.py [--size 96 --batch 32 --rounds 7]`
(about 6 minutes for BN-Inception on an idle 2-core CPU).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from machine import machine_line  # noqa: E402
from timing import rotated, time_interleaved  # noqa: E402

import models  # noqa: E402
from layers import BatchNormalization  # noqa: E402

VARIANTS = {"ours": "batch_norm", "keras": "keras", "no BN": None}
CATEGORIES = (
    "conv forward",
    "conv backward",
    "BN kernels",
    "BN other ops",
    "ReLU",
    "pooling",
    "concat",
    "optimizer",
    "other",
)
_BN_SCOPE = re.compile(r"_bn(_\d+)?/")
# Keras names each model's optimizer scope "sgd", "sgd_1", ...
_OPTIMIZER_SCOPE = re.compile(r"(^|/)sgd(_\d+)?/")
_IGNORED_EVENTS = ("ThreadpoolListener", "ExecutorState")


def categorize(name: str, op_type: str) -> str:
    """The category of one executed op, from its node name and kernel type."""
    if "FusedBatchNorm" in op_type:
        return "BN kernels"
    # Before the BN scope: Grappler may name a convolution fused with BN after the BN node.
    if "Conv2D" in op_type or "DepthwiseConv" in op_type:
        return "conv backward" if "Backprop" in op_type else "conv forward"
    if _OPTIMIZER_SCOPE.search(name):
        return "optimizer"
    if _BN_SCOPE.search(name):
        return "BN other ops"
    if op_type in ("Relu", "ReluGrad"):
        return "ReLU"
    if "Pool" in op_type:
        return "pooling"
    if op_type == "ConcatV2" or (op_type == "Slice" and "_output" in name):
        return "concat"
    return "other"


def read_op_times(logdir: str) -> dict[str, float]:
    """Milliseconds per `node_name:kernel_type` executed on the executor threads of a trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as stream:
        space.ParseFromString(stream.read())
    times: dict[str, float] = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and not name.startswith(_IGNORED_EVENTS):
                    times[name] += event.duration_ps / 1e9
    return times


def bn_shapes(model: keras.Model, batch: int) -> list[tuple[int, ...]]:
    """The input shape of every BN layer of `model` for a batch of `batch` examples."""
    return [
        (batch, *layer.input.shape[1:])
        for layer in model.layers
        if isinstance(layer, (BatchNormalization, keras.layers.BatchNormalization))
    ]


def bn_alone_functions(shapes: list[tuple[int, ...]]) -> dict:
    """`tf.function`s running our BN's training step, and 4 copies, on every shape at once."""
    rng = np.random.default_rng(0)
    # In the compute dtype (bfloat16 under mixed_bfloat16), as the layers receive them in a model.
    dtype = keras.mixed_precision.global_policy().compute_dtype
    xs = [tf.constant(rng.normal(size=s), dtype=dtype) for s in shapes]
    dys = [tf.constant(rng.normal(size=s), dtype=dtype) for s in shapes]
    layers = [BatchNormalization() for _ in shapes]
    for layer, shape in zip(layers, shapes, strict=True):
        layer.build(shape)
    zero = tf.Variable(tf.zeros([], dtype))

    def bn_alone():
        results = []
        for layer, x, dy in zip(layers, xs, dys, strict=True):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            results.append(tape.gradient(y, [x, layer.gamma.value, layer.beta.value], dy))
        return results

    def copy_floor():
        return [x + zero for x in xs for _ in range(4)]

    return {
        "BN alone": tf.function(bn_alone, autograph=False),
        "copy floor": tf.function(copy_floor, autograph=False),
    }


def traced_step(model: keras.Model, x, y, logdir: str) -> dict[str, float]:
    tf.profiler.experimental.start(logdir)
    model.train_on_batch(x, y)
    tf.profiler.experimental.stop()
    return read_op_times(logdir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bn_inception", help="a registered model name")
    parser.add_argument("--size", type=int, default=96, help="input height and width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="timed and traced steps")
    parser.add_argument("--inter-op-threads", type=int, default=0, help="0: TensorFlow's default")
    parser.add_argument(
        "--precision", choices=("float32", "mixed_bfloat16"), default="float32", help="Keras policy"
    )
    args = parser.parse_args(argv)
    keras.mixed_precision.set_global_policy(args.precision)
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=(args.batch,)))
    built = {}
    for variant, normalization in VARIANTS.items():
        model = models.create_model(
            args.model,
            input_shape=(args.size, args.size, 3),
            classes=10,
            normalization=normalization,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
        )
        built[variant] = model
    shapes = bn_shapes(built["ours"], args.batch)

    # 1. Wall time, untraced.
    steps = {variant: (lambda m=m: m.train_on_batch(x, y)) for variant, m in built.items()}
    steps.update(bn_alone_functions(shapes))
    wall, cpu = (
        {name: seconds * 1e3 for name, seconds in medians.items()}
        for medians in time_interleaved(steps, args.rounds, warmup=3)
    )
    load = os.getloadavg()[0]

    # 2. Per-op profile, traced.
    per_category = {v: {c: [] for c in CATEGORIES} for v in VARIANTS}
    per_op: dict[str, list[float]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            for variant in rotated(list(VARIANTS), r):
                logdir = os.path.join(root, f"{variant.replace(' ', '_')}_{r}")
                sums = collections.Counter()
                for key, ms in traced_step(built[variant], x, y, logdir).items():
                    name, op_type = key.rsplit(":", 1)
                    sums[categorize(name, op_type)] += ms
                    if variant == "ours":
                        per_op[key].append(ms)
                for category in CATEGORIES:
                    per_category[variant][category].append(sums[category])

    values = sum(int(np.prod(s)) for s in shapes)
    print(
        f"{args.model} {args.size}x{args.size}, batch {args.batch}, {args.precision}, SGD with "
        "momentum, "
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, inter-op threads "
        f"{args.inter_op_threads or 'default'}, load average {load:.1f} (1 min); medians of "
        f"{args.rounds} interleaved steps.\n"
    )
    machine = machine_line()
    print(f"1. Time per training step ({len(shapes)} BN layers, {values:,} values):\n")
    print(machine)
    print("| step | wall ms | vs no BN | CPU ms (all threads) | vs no BN |")
    print("|---|---:|---:|---:|---:|")
    for name in steps:
        cells = []
        for times in (wall, cpu):
            reference = times["no BN"]
            share = 100 * times[name] / reference
            cells.append(f"{times[name]:.1f}")
            cells.append(f"{share - 100:+.1f}%" if name in VARIANTS else f"{share:.1f}% of it")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n2. Op time per category (ms per step, summed over inter-op threads):\n")
    print(machine)
    print("| category | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | share of ours |")
    print("|---|" + "---:|" * (len(VARIANTS) + 1))
    totals = {
        v: [sum(c[i] for c in per_category[v].values()) for i in range(args.rounds)]
        for v in VARIANTS
    }
    ours_total = statistics.median(totals["ours"])
    for category in CATEGORIES:
        cells = [statistics.median(per_category[v][category]) for v in VARIANTS]
        print(
            f"| {category} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + f" | {100 * cells[0] / ours_total:.1f}% |"
        )
    print(
        "| all ops | "
        + " | ".join(f"{statistics.median(totals[v]):.1f}" for v in VARIANTS)
        + " | 100% |"
    )
    print("\n3. Our BN layers (median ms per step; fused: FusedBatchNormV3, else keras.ops):\n")
    print(machine)
    print("| layer | values | path | forward ms | backward ms |")
    print("|---|---:|---|---:|---:|")
    bn_layers = [layer for layer in built["ours"].layers if isinstance(layer, BatchNormalization)]
    for layer, shape in zip(bn_layers, shapes, strict=True):
        scope = re.compile(rf"/{re.escape(layer.name)}(_\d+)?/")
        forward = backward = 0.0
        fused = False
        for key, samples in per_op.items():
            name, op_type = key.rsplit(":", 1)
            if scope.search(name):
                fused = fused or "FusedBatchNorm" in op_type
                if name.startswith("gradient_tape/"):
                    backward += statistics.median(samples)
                else:
                    forward += statistics.median(samples)
        print(
            f"| {layer.name} | {int(np.prod(shape))} | {'fused' if fused else 'keras.ops'} | "
            f"{forward:.2f} | {backward:.2f} |"
        )


if __name__ == "__main__":
    main()
