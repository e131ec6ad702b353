"""Benchmark bnzoo's training step: per-replica vs synchronized BN, and Algorithm 2's cost.

Times, interleaved in one process so that every variant sees the same machine state:

- one device: `bnzoo.training_loop.TensorFlowLoop` under the default strategy;
- two replicas, BN per replica (the paper's and Keras' default);
- two replicas, synchronized BN (`--sync-bn`: two extra all-reduces per BN layer and step);

each as the median time of a training step of `plain_cnn` (or `--model`) at the global batch
`--batch-size`, on synthetic data held in memory (no input pipeline), after a warm-up. Without
GPUs the replicas are two logical CPU devices sharing the machine's cores: the ratio sync /
per-replica then measures the all-reduces and the unfused BN path that synchronization needs,
not a speed-up from a second device.

It also times `layers.recompute_population_statistics` over `--statistics-batches` batches
(what `train.py --bn-statistics population` runs after every epoch), as a fraction of an epoch
of `--steps-per-epoch` training steps.

Usage: `.venv/bin/python bench/bench_training_step.py [--rounds N] [--model plain_cnn]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

if not tf.config.list_physical_devices("GPU"):
    # Two logical CPUs must be configured before TensorFlow's runtime starts.
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from machine import machine_line  # noqa: E402

from bnzoo.config import TrainConfig  # noqa: E402
from bnzoo.distribution import Distribution, DistributionPlan, mirrored_strategy  # noqa: E402
from bnzoo.optimization import build_loss, build_optimizer  # noqa: E402
from bnzoo.training import build_model  # noqa: E402
from bnzoo.training_loop import TensorFlowLoop  # noqa: E402
from layers import recompute_population_statistics, set_batch_norm_synchronized  # noqa: E402


def distributions() -> dict[str, Distribution]:
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    devices = gpus or [device.name for device in tf.config.list_logical_devices("CPU")]
    plan = DistributionPlan("none", "none", "", "tensorflow")
    one = Distribution(plan, 1, 1, devices[:1], tf.distribute.get_strategy())
    plan = DistributionPlan("data_parallel", "data_parallel", "", "tensorflow")
    two = Distribution(plan, 2, 2, devices[:2], mirrored_strategy(devices[:2]))
    return {"one device": one, "2 replicas, per-replica BN": two, "2 replicas, sync BN": two}


def make_variant(name: str, distribution: Distribution, args) -> tuple:
    config = TrainConfig(model=args.model, batch_size=args.batch_size, epochs=2)
    rng = np.random.default_rng(0)
    per_input = distribution.input_batch_size(args.batch_size)
    images = rng.normal(size=(per_input, 28, 28, 1)).astype("float32")
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, per_input)]
    with distribution.scope():
        keras.utils.set_random_seed(0)
        model = build_model(config, (28, 28, 1), 10)
        if "sync" in name:
            set_batch_norm_synchronized(model, True)
        model.compile(optimizer=build_optimizer(config, model, 100), loss=build_loss(config))
        model.optimizer.build(model.trainable_variables)
    loop = TensorFlowLoop(model, distribution, build_loss(config, reduction=None), args.batch_size)
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat().cache()
    iterator = iter(distribution.strategy.distribute_datasets_from_function(lambda _: batches))

    def step():
        sums = loop._train_step(iterator)
        distribution.strategy.experimental_local_results(sums)[0].numpy()

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="plain_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--statistics-batches", type=int, default=50)
    parser.add_argument("--steps-per-epoch", type=int, default=421)
    args = parser.parse_args()

    variants = {name: make_variant(name, d, args) for name, d in distributions().items()}
    times = {name: [] for name in variants}
    for _, step in variants.values():
        for _ in range(3):
            step()  # trace and warm up
    for _ in range(args.rounds):
        for name, (_, step) in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)

    model, _ = variants["one device"]
    rng = np.random.default_rng(1)
    images = rng.normal(size=(args.batch_size, 28, 28, 1)).astype("float32")
    data = tf.data.Dataset.from_tensors((images, np.zeros(args.batch_size))).repeat()
    recompute_population_statistics(model, data, steps=2)  # trace
    statistics_times = []
    for _ in range(max(3, args.rounds // 5)):
        start = time.perf_counter()
        recompute_population_statistics(model, data, steps=args.statistics_batches)
        statistics_times.append(time.perf_counter() - start)

    print(machine_line())
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}; {args.model}, global batch {args.batch_size}"
    )
    base = statistics.median(times["2 replicas, per-replica BN"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:30s} {median * 1e3:8.1f} ms/step   x{median / base:.2f} vs per-replica BN")
    step_time = statistics.median(times["one device"])
    seconds = statistics.median(statistics_times)
    epoch = step_time * args.steps_per_epoch
    print(
        f"  population statistics over {args.statistics_batches} batches: {seconds:.2f} s "
        f"= {seconds / args.statistics_batches * 1e3:.1f} ms/batch "
        f"({seconds / step_time / args.statistics_batches:.2f} training steps each), "
        f"{seconds / epoch:.1%} of an epoch of {args.steps_per_epoch} steps"
    )


if __name__ == "__main__":
    main()
