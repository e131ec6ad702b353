"""Train a bnzoo model into a run folder; rerunning the same command resumes it.

    python train.py                                   # plain_cnn + BN on Fashion-MNIST, offline
    python train.py --model bn_inception --epochs 30 --lr-schedule cosine
    python train.py --config run.yaml --lr 0.05       # flags override the YAML file
    python train.py --config runs/<run>/config.yaml   # repeat (or resume) a run from its folder
    python train.py --config runs/<run>/config.yaml --epochs 10   # train a finished run further

Everything happens in `bnzoo.training.train`; this script only parses the command line. See
`python train.py --help` and docs/training.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from bnzoo.cli import import_tensorflow_quietly, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from bnzoo.config import parse_train_args

    # Argument errors are reported before TensorFlow is imported: they answer instantly.
    config = parse_train_args(argv)
    import_tensorflow_quietly()
    from bnzoo.training import train

    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
