"""Write TFLite models from a finished run: `python -m bnzoo.export runs/<run>`.

    python -m bnzoo.export runs/<run>                        # model.tflite + model_int8.tflite
    python -m bnzoo.export runs/<run> --no-int8              # float32 only
    python -m bnzoo.export runs/<run> --calibration-images 2000
    python evaluate.py runs/<run>/model_int8.tflite          # score it like any artifact

The TFLite models take raw uint8 images like the run's SavedModel (see bnzoo/export/tflite.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from bnzoo.cli import import_tensorflow_quietly, run_cli
from bnzoo.options import ArgumentParser, positive_int


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bnzoo.export",
        description="Write model.tflite (float32) and model_int8.tflite (int8 post-training "
        "quantization, calibrated on training images) into a finished bnzoo run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN", help="a finished bnzoo run folder")
    parser.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the int8 model",
    )
    parser.add_argument(
        "--calibration-images",
        type=positive_int,
        default=1000,
        help="training images that calibrate the int8 ranges",
    )
    parser.add_argument("--data-dir", help="TFDS data directory (default: the run's)")
    parser.add_argument(
        "--manual-dir", help="folder with the original IDX files (default: the run's)"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback for errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bnzoo.export import tflite

    tflite.read_run(args.run_dir)  # a wrong folder is refused before TensorFlow loads
    # The converter reads TensorFlow graphs, and model.keras loads on any backend: this process
    # is TensorFlow's whatever KERAS_BACKEND the shell exports for training.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import_tensorflow_quietly()
    tflite.export_run(
        args.run_dir,
        int8=args.int8,
        calibration_images=args.calibration_images,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m bnzoo.export"))
