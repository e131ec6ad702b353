"""Evaluate a trained model: a SavedModel folder, a `.keras` or `.tflite` file, or a run folder.

    python evaluate.py runs/<run>                     # the run's dataset and test split
    python evaluate.py runs/<run>/saved_model --output metrics.json --confusion-matrix cm.png
    python evaluate.py model.keras --dataset fashion_mnist --split "train[90%:]"
    python evaluate.py runs/<run>/model_int8.tflite   # after python -m bnzoo.export runs/<run>

Prints loss, accuracy, top-5 accuracy, per-class accuracy, the confusion matrix and the
throughput; `--output` writes the same metrics as JSON (the schema of a run's metrics.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from bnzoo.cli import (
    EXIT_STATUS_HELP,
    UsageError,
    check_output_file,
    import_tensorflow_quietly,
    run_cli,
)
from bnzoo.config import TrainConfig
from bnzoo.options import ArgumentParser, non_empty, optional, positive_int

#: `--bn-statistics-batches` default: train.py's.
STATISTICS_BATCHES = TrainConfig.default("bn_statistics_batches")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a SavedModel folder, a .keras or .tflite file or a bnzoo run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument(
        "path",
        metavar="PATH",
        type=non_empty,
        help="SavedModel folder, .keras or .tflite file, or run folder",
    )
    parser.add_argument(
        "--dataset",
        type=non_empty,
        help="TFDS name or image_folder:/path (default: the run's dataset, else fashion_mnist)",
    )
    parser.add_argument(
        "--split", type=non_empty, help="TFDS split (default: the run's test split, else test)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--data-dir", type=optional(str), help="TFDS data directory")
    parser.add_argument(
        "--manual-dir", type=optional(str), help="folder with the original IDX files"
    )
    parser.add_argument(
        "--output", metavar="FILE.json", type=non_empty, help="write the metrics as JSON"
    )
    parser.add_argument(
        "--confusion-matrix",
        metavar="FILE.png",
        type=non_empty,
        help="write the confusion matrix as a PNG",
    )
    group = parser.add_argument_group("batch normalization's statistics")
    group.add_argument(
        "--bn-statistics-split",
        metavar="SPLIT",
        type=non_empty,
        help="before scoring, recompute BN's inference statistics as the paper's population "
        "statistics (Algorithm 2) over training images of this split, e.g. 'train[:90%%]'; "
        "needs a .keras model or a run folder (its model.keras). The file is not changed",
    )
    group.add_argument(
        "--bn-statistics-batches",
        type=positive_int,
        help=f"batches the recomputed statistics average over (default {STATISTICS_BATCHES})",
    )
    group.add_argument(
        "--bn-statistics-batch-size",
        type=positive_int,
        help="images per batch for the statistics, the paper's m (default: the run's "
        "--batch-size, else 128)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback for errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.bn_statistics_split:
        for flag, value in (
            ("--bn-statistics-batches", args.bn_statistics_batches),
            ("--bn-statistics-batch-size", args.bn_statistics_batch_size),
        ):
            if value is not None:
                raise UsageError(
                    f"{flag} has no effect without --bn-statistics-split (the training split "
                    "to recompute BN's statistics on); add it or drop the option"
                )
    # Where the results go is checked before minutes of evaluation, not after.
    if args.output:
        check_output_file(args.output, "--output")
    if args.confusion_matrix:
        check_output_file(args.confusion_matrix, "--confusion-matrix")
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--confusion-matrix needs matplotlib: pip install matplotlib")
    from bnzoo import evaluation

    # A path that is not a model, or not one whose statistics can be recomputed, fails before
    # TensorFlow loads.
    source = evaluation.locate_model(args.path)
    if args.bn_statistics_split:
        evaluation.keras_model_for_recompute(args.path, source)
    import_tensorflow_quietly()
    from bnzoo.data import naming_undecodable_images

    with naming_undecodable_images():
        metrics = evaluation.evaluate_path(
            args.path,
            dataset=args.dataset,
            split=args.split,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
            bn_statistics_split=args.bn_statistics_split,
            bn_statistics_batches=args.bn_statistics_batches or STATISTICS_BATCHES,
            bn_statistics_batch_size=args.bn_statistics_batch_size,
        )
    print(evaluation.format_metrics_table(metrics))
    if args.output:
        print(f"wrote {evaluation.save_metrics_json(metrics, args.output)}")
    if args.confusion_matrix:
        print(f"wrote {evaluation.save_confusion_matrix_png(metrics, args.confusion_matrix)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
