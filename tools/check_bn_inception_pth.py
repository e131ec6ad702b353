"""Check bnzoo's BN-Inception `.pth` conversion against an independent implementation.

The reference is Cadene's `pretrainedmodels` BNInception (PyTorch), imported at check time from
a snapshot of its repository (never copied into this one). Two steps, in two environments:

1. `make`, with PyTorch (not a bnzoo dependency; any venv with `torch` and `numpy`):

       python tools/check_bn_inception_pth.py make SNAPSHOT OUTPUT [--width-divisor 32]

   builds `pretrainedmodels.models.bninception.BNInception` from SNAPSHOT (a checkout, or a
   bare git repository read with `git show`), gives every parameter and BN statistic random
   values (conv biases and running means included, so that the bias folding is exercised),
   and writes to OUTPUT: `bn_inception.pth` (`torch.save` legacy layout, like the published
   2017 file) and `bn_inception_zip.pth` (the zip layout of PyTorch >= 1.6), `images.npy`
   (random RGB uint8 images) and `logits.npy` (the reference's logits on those images,
   preprocessed exactly as `pretrainedmodels` documents: BGR, 0-255, minus [104, 117, 128]).
   `--width-divisor D` divides every channel count by D (all of BN-Inception's are multiples
   of 32, so the concatenations still add up): D=32 gives the small fixture in
   tests/fixtures/, D=1 the real network.

2. `compare`, in bnzoo's environment (no PyTorch):

       python tools/check_bn_inception_pth.py compare OUTPUT [--width-divisor 32]

   converts both files with bnzoo's reader (`models.bn_inception(weights=...)`), runs the
   images through the model with `include_preprocessing=True`, and prints the largest absolute
   and relative differences to the reference logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import types

SOURCE_PATH = "pretrainedmodels/models/bninception.py"
MEAN_BGR = (104.0, 117.0, 128.0)


def _reference_source(snapshot: str) -> str:
    checkout = os.path.join(snapshot, SOURCE_PATH)
    if os.path.isfile(checkout):
        with open(checkout, encoding="utf-8") as stream:
            return stream.read()
    return subprocess.run(
        ["git", "--git-dir", snapshot, "show", f"HEAD:{SOURCE_PATH}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def make(snapshot: str, output: str, width_divisor: int, seed: int, batch: int, size: int) -> None:
    import numpy as np
    import torch

    module = types.ModuleType("bninception_reference")
    module.__file__ = os.path.join(snapshot, SOURCE_PATH)
    exec(compile(_reference_source(snapshot), module.__file__, "exec"), module.__dict__)

    def narrow(channels: int) -> int:
        if channels == 3:  # the RGB input
            return 3
        assert channels % width_divisor == 0, channels
        return channels // width_divisor

    class NarrowNN(types.SimpleNamespace):
        """`torch.nn` with every channel count divided: the reference code runs unchanged."""

        def __getattr__(self, name):
            return getattr(torch.nn, name)

        @staticmethod
        def Conv2d(in_channels, out_channels, *args, **kwargs):  # noqa: N802 - torch's name
            return torch.nn.Conv2d(narrow(in_channels), narrow(out_channels), *args, **kwargs)

        @staticmethod
        def BatchNorm2d(channels, *args, **kwargs):  # noqa: N802
            return torch.nn.BatchNorm2d(narrow(channels), *args, **kwargs)

        @staticmethod
        def Linear(in_features, out_features, *args, **kwargs):  # noqa: N802
            return torch.nn.Linear(narrow(in_features), out_features, *args, **kwargs)

    module.nn = NarrowNN()
    torch.manual_seed(seed)
    network = module.BNInception(num_classes=1000).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            shape = tensor.shape
            if name.endswith("running_var"):
                value = torch.rand(shape, generator=generator) * 1.5 + 0.5
            elif name.endswith("_bn.weight"):
                value = torch.rand(shape, generator=generator) * 0.5 + 0.75
            elif name.endswith(".weight") and tensor.dim() == 4:
                fan_in = shape[1] * shape[2] * shape[3]
                value = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
            elif name.endswith(".weight"):
                value = torch.randn(shape, generator=generator) / shape[1] ** 0.5
            else:  # biases, BN betas, running means
                value = torch.randn(shape, generator=generator) * 0.1
            tensor.copy_(value)

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    bgr = images[..., ::-1].astype(np.float32) - np.asarray(MEAN_BGR, np.float32)
    with torch.no_grad():
        logits = network(torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2))))

    os.makedirs(output, exist_ok=True)
    state = {k: v for k, v in network.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(
        state, os.path.join(output, "bn_inception.pth"), _use_new_zipfile_serialization=False
    )
    torch.save(state, os.path.join(output, "bn_inception_zip.pth"))
    np.save(os.path.join(output, "images.npy"), images)
    np.save(os.path.join(output, "logits.npy"), logits.numpy())
    print(f"wrote {output}: torch {torch.__version__}, logits {tuple(logits.shape)}")


def compare(output: str, width_divisor: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    import models

    images = np.load(os.path.join(output, "images.npy"))
    expected = np.load(os.path.join(output, "logits.npy")).astype(np.float64)
    for file in ("bn_inception.pth", "bn_inception_zip.pth"):
        model = models.bn_inception(
            weights=os.path.join(output, file),
            input_shape=images.shape[1:],
            width_multiplier=1.0 / width_divisor,
            min_depth=1,
            classifier_activation=None,
            include_preprocessing=True,
        )
        logits = np.asarray(model(images.astype(np.float32), training=False), np.float64)
        difference = np.abs(logits - expected)
        scale = np.abs(expected).max()
        print(
            f"{file}: max |difference| {difference.max():.3g}, logits up to "
            f"{scale:.3g} (relative {difference.max() / scale:.3g}), "
            f"same top-1: {bool((logits.argmax(1) == expected.argmax(1)).all())}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write the reference files (needs torch)")
    make_parser.add_argument("snapshot", help="pretrained-models.pytorch checkout or git dir")
    make_parser.add_argument("output")
    make_parser.add_argument("--width-divisor", type=int, default=32)
    make_parser.add_argument("--seed", type=int, default=0)
    make_parser.add_argument("--batch", type=int, default=2)
    make_parser.add_argument("--size", type=int, default=224)
    compare_parser = commands.add_parser("compare", help="compare bnzoo's conversion (no torch)")
    compare_parser.add_argument("output")
    compare_parser.add_argument("--width-divisor", type=int, default=32)
    args = parser.parse_args()
    if args.command == "make":
        make(args.snapshot, args.output, args.width_divisor, args.seed, args.batch, args.size)
    else:
        compare(args.output, args.width_divisor)


if __name__ == "__main__":
    if importlib.util.find_spec("numpy") is None:
        sys.exit("numpy is required")
    main()
