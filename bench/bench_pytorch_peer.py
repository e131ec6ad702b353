"""BN-Inception's training step: bnzoo (Keras on TensorFlow) against the PyTorch peer.

The peer is what a user would pick for BN-Inception: Cadene's `pretrainedmodels.BNInception`
(the Caffe release converted to PyTorch) on PyTorch's CPU build. That package is not installed
here, so this script builds the same network in PyTorch from bnzoo's own table of Figure 5
(`models.bn_inception.CAFFE_MODULES`) with pretrainedmodels' layer choices: convolutions with a
bias followed by `BatchNorm2d` (epsilon 1e-5) and ReLU, ceil-mode max pools, average pools that
count their padding, global average pooling and a linear classifier. Before timing it checks
that the two networks have the same weights, shape for shape (the peer's convolution biases
aside, which BN makes redundant and bnzoo drops).

Both train on the same random batch with SGD + momentum and cross-entropy, timed interleaved in
one process in rotating order, wall time and CPU time of all threads:

- bnzoo: `model.train_on_batch` (what `fit()` runs per batch), float32, and mixed_bfloat16 with
  `--precisions float32,bfloat16`;
- PyTorch: zero_grad, forward, loss, backward, step, in NCHW and channels_last memory formats,
  float32, and bfloat16 autocast with `--precisions float32,bfloat16`.

PyTorch is optional: without `torch` the script says so and exits 0. Install the CPU build
(`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`, never a plain
`torch`, which brings CUDA libraries).

Usage: `.venv/bin/python bench/bench_pytorch_peer.py [--size 96] [--batch 32] [--rounds 5]
[--precisions float32,bfloat16] [--output results.json]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "bfloat16")
CLASSES = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="input height and width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    parser.add_argument(
        "--precisions", default="float32", help=f"comma-separated subset of {PRECISIONS}"
    )
    parser.add_argument("--output", help="also write the results, with the machine, as JSON")
    args = parser.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    for precision in args.precisions:
        if precision not in PRECISIONS:
            parser.error(f"--precisions: unknown {precision!r}; choose from {list(PRECISIONS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.size < 32 or args.size % 32:
        parser.error(f"--size must be a multiple of 32 (Caffe's padding), got {args.size}")
    return args


def torch_bn_inception(torch, modules, classes: int):
    """pretrainedmodels' BNInception in PyTorch, its modules from `modules` (Figure 5's rows)."""
    nn = torch.nn

    def conv(in_channels, out_channels, kernel, stride=1, padding=0):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding),
            nn.BatchNorm2d(out_channels, eps=1e-5),
            nn.ReLU(inplace=True),
        )

    class Inception(nn.Module):
        def __init__(self, module, in_channels):
            super().__init__()
            stride = module.stride
            self.branches = nn.ModuleList()
            if module.n1x1:
                self.branches.append(conv(in_channels, module.n1x1, 1))
            self.branches.append(
                nn.Sequential(
                    conv(in_channels, module.n3x3_reduce, 1),
                    conv(module.n3x3_reduce, module.n3x3, 3, stride, 1),
                )
            )
            self.branches.append(
                nn.Sequential(
                    conv(in_channels, module.n_double_3x3_reduce, 1),
                    conv(module.n_double_3x3_reduce, module.n_double_3x3, 3, 1, 1),
                    conv(module.n_double_3x3, module.n_double_3x3, 3, stride, 1),
                )
            )
            if module.pool == "max" and stride == 2:
                pool = nn.MaxPool2d(3, 2, ceil_mode=True)
            elif module.pool == "max":
                pool = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
            else:
                pool = nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True)
            self.branches.append(
                nn.Sequential(pool, conv(in_channels, module.pool_proj, 1))
                if module.pool_proj
                else pool
            )

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], 1)

    layers = [
        conv(3, 64, 7, 2, 3),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        conv(64, 64, 1),
        conv(64, 192, 3, 1, 1),
        nn.MaxPool2d(3, 2, ceil_mode=True),
    ]
    channels = 192
    for module in modules:
        layers.append(Inception(module, channels))
        channels = module.output_channels(channels)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def check_same_weights(torch, torch_model, keras_model) -> None:
    """The networks are the same if their weight shapes are, once the peer's conv biases (which
    bnzoo drops before BN) are set aside and PyTorch's layouts are transposed to Keras'."""

    def keras_layout(shape):
        if len(shape) == 4:  # OIHW -> HWIO
            return (shape[2], shape[3], shape[1], shape[0])
        if len(shape) == 2:  # (out, in) -> (in, out)
            return (shape[1], shape[0])
        return tuple(shape)

    nn = torch.nn
    theirs = []
    for module in torch_model.modules():
        if isinstance(module, nn.Conv2d):
            theirs.append(keras_layout(tuple(module.weight.shape)))
        elif isinstance(module, nn.BatchNorm2d):
            theirs += [tuple(module.weight.shape)] * 2
        elif isinstance(module, nn.Linear):
            theirs += [keras_layout(tuple(module.weight.shape)), tuple(module.bias.shape)]
    ours = [tuple(weight.shape) for weight in keras_model.trainable_weights]
    if sorted(theirs) != sorted(ours):
        raise SystemExit(
            f"bench_pytorch_peer: the PyTorch network differs from bnzoo's bn_inception "
            f"({len(theirs)} against {len(ours)} weights)"
        )


def bnzoo_steps(args, images, labels) -> dict:
    import keras

    import models

    steps = {}
    for precision in args.precisions:
        keras.mixed_precision.set_global_policy(
            "mixed_bfloat16" if precision == "bfloat16" else "float32"
        )
        try:
            model = models.create_model(
                "bn_inception", input_shape=(args.size, args.size, 3), classes=CLASSES
            )
        finally:
            keras.mixed_precision.set_global_policy("float32")
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
        )
        steps[f"bnzoo, {precision}"] = lambda m=model: m.train_on_batch(images, labels)
    return steps, model


def torch_steps(torch, args, images, labels, keras_model) -> dict:
    from models.bn_inception import CAFFE_MODULES

    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype("int64"))
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = {}
    for memory_format in ("NCHW", "channels_last"):
        model = torch_bn_inception(torch, CAFFE_MODULES, CLASSES)
        check_same_weights(torch, model, keras_model)
        inputs = x
        if memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for precision in args.precisions:

            def step(model=model, optimizer=optimizer, inputs=inputs, precision=precision):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                    loss = loss_fn(model(inputs), y)
                loss.backward()
                optimizer.step()
                return float(loss.detach())

            steps[f"PyTorch {memory_format}, {precision}"] = step
    return steps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import machine_line, write_results
    from timing import time_interleaved

    try:
        import torch
    except ImportError:
        print(
            "bench_pytorch_peer: skipped, torch is not importable (install the CPU build: "
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
        )
        return
    import keras
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, size=(args.batch,)).astype("int32")
    steps, keras_model = bnzoo_steps(args, images, labels)
    steps.update(torch_steps(torch, args, images, labels, keras_model))
    wall, cpu = time_interleaved(steps, args.rounds)

    reference = next(iter(steps))
    print(
        f"BN-Inception (Caffe's), {args.size}x{args.size}x3, batch {args.batch}, training step "
        f"with SGD + momentum; TensorFlow {tf.__version__} (Keras {keras.__version__}, no XLA), "
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads); median of "
        f"{args.rounds} interleaved steps; load average {os.getloadavg()[0]:.1f}.\n"
    )
    print(machine_line())
    print(f"| framework, precision | wall s | CPU s | wall vs {reference} |")
    print("|---|---:|---:|---:|")
    for name in steps:
        ratio = wall[name] / wall[reference]
        print(f"| {name} | {wall[name]:.3f} | {cpu[name]:.3f} | {ratio:.2f} |")
    if args.output:
        rows = [{"variant": name, "wall_s": wall[name], "cpu_s": cpu[name]} for name in steps]
        software = {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "torch": torch.__version__,
        }
        write_results(
            args.output,
            {
                "software": software,
                "size": args.size,
                "batch": args.batch,
                "rounds": args.rounds,
                "rows": rows,
            },
        )
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
