"""Benchmark a run's deployable artifacts: SavedModel vs TFLite float32 vs TFLite int8.

For each artifact it reports the size on disk, the batch-1 latency (one uint8 test image in,
all three outputs out, preprocessing included: what an app pays per photo), and the accuracy
on the run's full test split through `bnzoo.evaluation` (the metrics of `evaluate.py`).

Latency is timed interleaved in one process, so all artifacts see the same machine state: each
round calls every artifact once, on the same image, in rotating order; the table shows the
median and the 90th percentile over the rounds, after untimed warm-up calls. TensorFlow and
LiteRT get the same number of CPU threads (`--threads`, default 1: a phone's big core, and the
honest comparison on a shared machine).

Usage, after `python -m bnzoo.export runs/<run>` wrote the TFLite files:

    python bench/bench_deployment.py runs/<run> [--rounds 500] [--threads 1] [--output r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The script runs from bench/; make the repository importable without an editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402

ARTIFACTS = {
    "SavedModel": "saved_model",
    "TFLite float32": "model.tflite",
    "TFLite int8": "model_int8.tflite",
}


def size_on_disk(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN")
    parser.add_argument("--rounds", type=int, default=500, help="timed batch-1 calls per artifact")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for TF and LiteRT")
    parser.add_argument("--output", help="also write the results as JSON")
    args = parser.parse_args(argv)

    import tensorflow as tf

    # Thread pools must be sized before TensorFlow starts its runtime.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    from bnzoo.data import load_dataset
    from bnzoo.evaluation import evaluate_path, locate_model
    from bnzoo.export.tflite import tflite_serving_function

    paths = {name: os.path.join(args.run_dir, file) for name, file in ARTIFACTS.items()}
    missing = [path for path in paths.values() if not os.path.exists(path)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run python -m bnzoo.export {args.run_dir} first")
    source = locate_model(args.run_dir)
    load_start = os.getloadavg()

    test_ds, _ = load_dataset(
        source.defaults["dataset"],
        split="test[:64]",
        data_dir=source.defaults.get("data_dir"),
        manual_dir=source.defaults.get("manual_dir"),
    )
    images = [image[None] for image, _ in test_ds.as_numpy_iterator()]
    signature = tf.saved_model.load(paths["SavedModel"]).signatures["serving_default"]
    servers = {
        "SavedModel": lambda image: signature(images=tf.constant(image)),
        "TFLite float32": tflite_serving_function(
            paths["TFLite float32"], num_threads=args.threads
        ),
        "TFLite int8": tflite_serving_function(paths["TFLite int8"], num_threads=args.threads),
    }
    names = list(servers)
    for image in images[:20]:  # warm-up: tracing, delegate set-up, caches
        for serve in servers.values():
            serve(image)
    seconds = {name: [] for name in names}
    for round_index in range(args.rounds):
        image = images[round_index % len(images)]
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            outputs = servers[name](image)
            int(outputs["classes"][0])  # the answer is on the host
            seconds[name].append(time.perf_counter() - start)

    results = {}
    for name in names:
        metrics = evaluate_path(paths[name])
        times = sorted(seconds[name])
        results[name] = {
            "path": paths[name],
            "bytes": size_on_disk(paths[name]),
            "latency_ms_median": 1000 * statistics.median(times),
            "latency_ms_p90": 1000 * times[int(0.9 * (len(times) - 1))],
            "accuracy": metrics["accuracy"],
            "loss": metrics["loss"],
            "split": metrics["split"],
            "num_examples": metrics["num_examples"],
        }
    machine = describe_machine()
    conditions = {
        "machine": machine.as_dict(),
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_start": [round(value, 2) for value in load_start],
        "load_average_end": [round(value, 2) for value in os.getloadavg()],
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }
    try:
        import ai_edge_litert

        conditions["ai_edge_litert"] = ai_edge_litert.__version__
    except ImportError:  # pragma: no cover
        pass

    reference = results["SavedModel"]
    print(machine.describe())
    print(
        f"{args.run_dir}: {reference['split']} ({reference['num_examples']} images), "
        f"batch-1 latency over {args.rounds} interleaved rounds, {args.threads} thread(s)"
    )
    print("| artifact | size | batch-1 latency median (p90) | test accuracy | vs SavedModel |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in results.items():
        delta = 100 * (result["accuracy"] - reference["accuracy"])
        print(
            f"| {name} | {result['bytes'] / 1e6:.2f} MB | {result['latency_ms_median']:.3f} ms "
            f"({result['latency_ms_p90']:.3f} ms) | {100 * result['accuracy']:.2f} % | "
            f"{delta:+.2f} points |"
        )
    print(
        "load average "
        f"{conditions['load_average_start'][0]} -> {conditions['load_average_end'][0]}; "
        f"TensorFlow {conditions['tensorflow']}, LiteRT {conditions.get('ai_edge_litert')}"
    )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as stream:
            json.dump({"conditions": conditions, "results": results}, stream, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
