"""Serving latency of SavedModels, measured by a process that imports only TensorFlow.

`bench/bench_serving.py` runs this file in a subprocess with an empty PYTHONPATH, from outside
the repository, so that the measured process is what serving code looks like: it cannot import
bnzoo and needs no Keras custom objects. Usage:

    python serve_saved_models.py ROUNDS BATCH[,BATCH...] NAME=SAVED_MODEL_DIR ...

It loads every `serving_default` signature, warms each up, then calls them on random uint8
images of each batch size, once per round in rotating order, and prints one JSON object:
`{"latency_ms": {NAME: {BATCH: median}}, "cpu_ms": {...}, "fused_convolutions": {NAME: count},
...}`, the CPU time being that of all the process' threads. The fused
convolutions are counted in the graph the runtime executes after Grappler (partition graphs of a
`tf.compat.v1.Session`, as TensorFlow Serving runs a SavedModel).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from timing import time_interleaved  # noqa: E402  (this script's folder, bench/)


def fused_convolutions(path: str, images: np.ndarray) -> int:
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, [tf.saved_model.SERVING], path)
        signature = meta_graph.signature_def["serving_default"]
        run_metadata = tf.compat.v1.RunMetadata()
        session.run(
            signature.outputs["logits"].name,
            {signature.inputs["images"].name: images},
            options=tf.compat.v1.RunOptions(output_partition_graphs=True),
            run_metadata=run_metadata,
        )
    nodes = [node for graph_def in run_metadata.partition_graphs for node in graph_def.node]
    return sum(node.op.endswith("FusedConv2D") for node in nodes)


def main() -> None:
    rounds = int(sys.argv[1])
    batches = [int(b) for b in sys.argv[2].split(",")]
    paths = dict(argument.split("=", 1) for argument in sys.argv[3:])
    rng = np.random.default_rng(0)
    calls, fused = {}, {}
    for name, path in paths.items():
        serve = tf.saved_model.load(path).signatures["serving_default"]
        image_shape = serve.structured_input_signature[1]["images"].shape[1:]
        for batch in batches:
            images = tf.constant(rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8))
            calls[(name, batch)] = lambda serve=serve, images=images: serve(images=images)
        fused[name] = fused_convolutions(path, images.numpy()[:1])
    wall, cpu = time_interleaved(calls, rounds, warmup=3)
    project = sorted(m for m in sys.modules if m.split(".")[0] in ("bnzoo", "layers", "models"))
    latency: dict[str, dict[int, float]] = {}
    cpu_time: dict[str, dict[int, float]] = {}
    for name, batch in calls:
        latency.setdefault(name, {})[batch] = wall[(name, batch)] * 1e3
        cpu_time.setdefault(name, {})[batch] = cpu[(name, batch)] * 1e3
    print(
        json.dumps(
            {
                "latency_ms": latency,
                "cpu_ms": cpu_time,
                "fused_convolutions": fused,
                "tensorflow": tf.__version__,
                "project_modules_imported": project,
            }
        )
    )


if __name__ == "__main__":
    main()
