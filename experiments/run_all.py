"""Runs every experiment, one process each, then renders the results document.

``make experiments`` runs it.

Each script runs in its own Python process, so that one experiment's TensorFlow state (threads,
compiled functions, memory) cannot slow or change the next, and its runtime is its own.

    .venv/bin/python experiments/run_all.py                       # full budget, ~25 minutes
    .venv/bin/python experiments/run_all.py --budget smoke        # every script in seconds
    .venv/bin/python experiments/run_all.py --only exp3_sigmoid_cnn exp4_gradients
    .venv/bin/python experiments/run_all.py --update-docs         # also docs/results/, RESULTS.md

Without ``--update-docs`` the document is written to ``<output-root>/RESULTS.md``, so a local
run does not overwrite the committed docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from experiments import report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the paper's experiments and render their results document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--budget", choices=("smoke", "full"), default="full")
    parser.add_argument("--output-root", type=Path, default=report.RESULTS_ROOT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="+", choices=report.EXPERIMENTS, default=None, help="run only these"
    )
    parser.add_argument("--mnist-dir", default=None, help="MNIST's IDX files, for exp1")
    parser.add_argument("--manual-dir", default=None, help="Fashion-MNIST's IDX files")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="publish the runs to docs/results/ (JSON and plots) and render docs/RESULTS.md "
        "from it, instead of <output-root>/RESULTS.md",
    )
    return parser


def command(name: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs experiment ``name`` with ``args``' shared options."""
    argv = [
        sys.executable,
        str(REPO_ROOT / "experiments" / f"{name}.py"),
        "--budget",
        args.budget,
        "--seed",
        str(args.seed),
        "--output-dir",
        str(args.output_root / name),
    ]
    for flag, value in (("--manual-dir", args.manual_dir), ("--data-dir", args.data_dir)):
        if value:
            argv += [flag, value]
    if name == "exp1_mnist_mlp" and args.mnist_dir:
        argv += ["--mnist-dir", args.mnist_dir]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    failed = []
    for name in args.only or report.EXPERIMENTS:
        print(f"=== {name} ({args.budget}) ===", flush=True)
        started = time.perf_counter()
        returncode = subprocess.run(command(name, args), cwd=REPO_ROOT).returncode
        print(f"=== {name}: exit {returncode} after {time.perf_counter() - started:.0f} s ===")
        if returncode:
            failed.append(name)
    try:
        output = report.write_report(args.output_root, args.update_docs)
        print(f"run_all: wrote {output}")
    except (ValueError, FileNotFoundError) as error:
        print(f"run_all: could not render the report: {error}", file=sys.stderr)
        return 1
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
