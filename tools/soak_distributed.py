"""Soak train.py in every distribution mode and watch each process's threads, memory and open
files: they must stay flat once the run is warm.

Issue 15: two TensorFlow workers with `--sync-bn` grew by ~100 threads per step until the kernel
refused to start more (exit 134) after ~150 steps; short tests never noticed. This script runs
real `train.py` processes for hundreds of steps in each mode, samples `/proc/<pid>` (threads,
resident memory, open file descriptors) every `--interval` seconds, and judges each process with
`flatness_problems`:

- the samples are grouped by the epoch the process is in (from its `epoch N/M` lines);
- epoch 1 traces and builds everything and is not judged; the first half of the other epochs
  is the reference and the second half is judged;
- resident memory and open descriptors are held: the median of the judged samples must stay
  within the highest of the reference epochs' medians plus how far those moved among
  themselves (at least one descriptor, 1 % of resident memory). A buffer or descriptor kept
  per step or per epoch lifts the judged median above them;
- threads come and go with thread pools (tf.data's, XLA's, gRPC's), whose idle size wanders by
  tens of threads over minutes: no judged sample may exceed the reference samples' peak by
  more than the range a reference epoch spans (the median over those epochs). A thread kept
  per step, as in issue 15, climbs past it.

Checked against the samples of a 1,600-step run of every mode, each 8-epoch stretch of it
judged as a run of its own (33 per process, 297 in all), with leaks added to the samples: no
false alarm without a leak; a thread per step caught in every stretch, a descriptor per epoch
in 27-32 of 33 per process, 10 MiB per epoch in 28-32 of 33 (TensorFlow) and 18-25 (JAX), 3 MiB
per epoch in about half (TensorFlow).

glibc gives every thread that allocates its own arena and keeps freed memory there: with the
default allocator, resident memory climbs for the first ~12 epochs (about 8 MiB per epoch on
plain_cnn, whatever the steps per epoch; tf.data's threads are new each epoch) and then stays
flat, while Python's heap stays at 20 MiB. The processes therefore run with
`MALLOC_ARENA_MAX=2` (unless `--default-allocator`), so that resident memory is memory in use
and a few epochs suffice to judge it.

    python tools/soak_distributed.py                          # every mode, 8 epochs of 40 steps
    python tools/soak_distributed.py --modes tf_multi_worker_sync_bn --epochs 40
    python tools/soak_distributed.py --samples                # also print every sample

`tests/test_soak.py` runs it at its smallest useful size (marker `extended`). The numbers from a
long run are in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Each mode: backend, processes, extra environment, extra train.py arguments.
MODES = {
    "none": ("tensorflow", 1, {}, ["--distribute", "none"]),
    "tf_data_parallel": ("tensorflow", 1, {}, ["--distribute", "data_parallel"]),
    "tf_multi_worker": ("tensorflow", 2, {}, ["--distribute", "multi_worker"]),
    "tf_multi_worker_sync_bn": (
        "tensorflow",
        2,
        {},
        ["--distribute", "multi_worker", "--sync-bn"],
    ),
    "jax_data_parallel": (
        "jax",
        1,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        ["--distribute", "data_parallel"],
    ),
    "jax_multi_process": ("jax", 2, {}, ["--distribute", "multi_worker"]),
}

#: TensorFlow has no variable for logical devices: the data-parallel mode splits the CPU into two
#: logical devices (as tests/conftest.py does) before train.py's main runs.
_TWO_LOGICAL_CPUS = """
import sys
sys.path.insert(0, {root!r})
from bnzoo.cli import import_tensorflow_quietly, run_cli
import_tensorflow_quietly()
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
import train
sys.exit(run_cli(train.main, sys.argv[1:], prog="train.py"))
"""


@dataclasses.dataclass
class Sample:
    seconds: float
    epochs_done: int
    threads: int
    rss_mib: float
    fds: int


@dataclasses.dataclass
class WorkerTrace:
    """One process of a soak run: its samples and how it ended."""

    mode: str
    worker: int
    samples: list[Sample]
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def epochs(self) -> int:
        return max((sample.epochs_done for sample in self.samples), default=0)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _sample(pid: int) -> tuple[int, float, int] | None:
    """(threads, resident MiB, open file descriptors) of a live process, or None."""
    try:
        threads = rss = None
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    if threads is None or rss is None:
        return None
    return threads, rss, fds


def _epoch_lines(path: str) -> int:
    try:
        with open(path, errors="replace") as stream:
            return sum(1 for line in stream if line.startswith("epoch "))
    except OSError:
        return 0


def run_mode(
    mode: str,
    workdir: str,
    *,
    epochs: int = 8,
    train_examples: int = 1280,
    batch_size: int = 32,
    widths: Sequence[int] = (4, 8),
    interval: float = 0.2,
    timeout: float = 1800.0,
    default_allocator: bool = False,
    extra_args: Sequence[str] = (),
) -> list[WorkerTrace]:
    """Train one run in `mode` under `workdir` and sample every process until it ends.

    The run: plain_cnn of `widths` on Fashion-MNIST `train[:train_examples]`, `epochs` epochs of
    `train_examples // batch_size` steps, validated on 64 more examples (padded last batch),
    BN's population statistics recomputed every epoch, no test split. The defaults train 320
    steps. `default_allocator`: leave glibc's arenas unbounded (see the module docstring).
    """
    backend, count, extra_env, mode_args = MODES[mode]
    run_dir = os.path.join(workdir, f"{mode}-run")
    argv = [
        "--model",
        "plain_cnn",
        "--train-split",
        f"train[:{train_examples}]",
        "--val-split",
        f"train[{train_examples}:{train_examples + 64}]",
        "--test-split",
        "none",
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--model-arg",
        f"widths={json.dumps(list(widths))}",
        "--output-dir",
        run_dir,
        *mode_args,
        *extra_args,
    ]
    ports = _free_ports(count)
    processes = []
    for index in range(count):
        env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": backend, **extra_env}
        if not default_allocator:
            env["MALLOC_ARENA_MAX"] = "2"
        if count > 1 and backend == "tensorflow":
            cluster = {"worker": [f"localhost:{port}" for port in ports]}
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
        elif count > 1:
            env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = f"localhost:{ports[0]}"
            env["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(count)
            env["KERAS_DISTRIBUTION_PROCESS_ID"] = str(index)
        if mode == "tf_data_parallel":
            command = [sys.executable, "-c", _TWO_LOGICAL_CPUS.format(root=ROOT), *argv]
        else:
            command = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
        cwd = os.path.join(workdir, f"{mode}-worker{index}")
        os.makedirs(cwd, exist_ok=True)
        out, err = cwd + ".out", cwd + ".err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=lambda: os.nice(10),
            )
        processes.append((process, out, err))
    samples: list[list[Sample]] = [[] for _ in processes]
    start = time.monotonic()
    try:
        while any(process.poll() is None for process, _, _ in processes):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{mode}: still running after {timeout:g} s")
            for index, (process, out, _) in enumerate(processes):
                if process.poll() is not None:
                    continue
                values = _sample(process.pid)
                if values is not None:
                    elapsed = time.monotonic() - start
                    samples[index].append(Sample(elapsed, _epoch_lines(out), *values))
            time.sleep(interval)
    finally:
        for process, _, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
    traces = []
    for index, (process, out, err) in enumerate(processes):
        with open(out, errors="replace") as stdout, open(err, errors="replace") as stderr:
            traces.append(
                WorkerTrace(
                    mode, index, samples[index], process.returncode, stdout.read(), stderr.read()
                )
            )
    return traces


# --- Judging ------------------------------------------------------------------------------------

#: What is judged: the sample's field, its unit, the smallest change that counts as growth for
#: a given level (resident memory moves in allocator steps of a few MiB once warm, measured up
#: to 5 MiB, without anything being held: it is judged to 1 % of itself), and whether the
#: quantity is held (judged by its typical value) or comes and goes (judged by its peak).
QUANTITIES = (
    ("threads", "threads", lambda level: 1, False),
    ("rss_mib", "MiB resident", lambda level: 0.01 * level, True),
    ("fds", "open descriptors", lambda level: 1, True),
)


def epoch_windows(trace: WorkerTrace) -> dict[int, list[Sample]]:
    """The samples taken while each epoch trained (epoch index from 0), up to the last epoch's
    line (the final export afterwards is not part of the steady state)."""
    windows: dict[int, list[Sample]] = {}
    for sample in trace.samples:
        if sample.epochs_done < trace.epochs:
            windows.setdefault(sample.epochs_done, []).append(sample)
    return windows


def flatness_problems(trace: WorkerTrace) -> list[str]:
    """What grew after warm-up (see the module docstring); empty when the process was flat."""
    windows = epoch_windows(trace)
    epochs = sorted(epoch for epoch in windows if epoch >= 1)
    reference, judged = epochs[: len(epochs) // 2], epochs[len(epochs) // 2 :]
    if len(reference) < 2 or not judged:
        return [
            f"{trace.mode} worker {trace.worker}: too few epochs to judge ({len(epochs) + 1} "
            "sampled); run at least 5"
        ]
    problems = []
    who = f"{trace.mode} worker {trace.worker}"
    for name, unit, resolution, held in QUANTITIES:
        reference_values = [getattr(sample, name) for e in reference for sample in windows[e]]
        judged_values = [getattr(sample, name) for e in judged for sample in windows[e]]
        if held:
            # Memory and descriptors are held: the typical value of the judged epochs must stay
            # within the warm epochs' typical values, plus how far those moved among themselves.
            warm = [statistics.median(getattr(s, name) for s in windows[e]) for e in reference]
            bound = max(warm) + max(max(warm) - min(warm), resolution(max(warm)))
            value = statistics.median(judged_values)
            if value > bound:
                problems.append(
                    f"{who}: {unit} rose from a median of {min(warm):.0f}-{max(warm):.0f} per "
                    f"epoch in epochs {reference[0] + 1}-{reference[-1] + 1} to {value:.0f} in "
                    f"epochs {judged[0] + 1}-{judged[-1] + 1}"
                )
        else:
            # Threads come and go with thread pools, whose idle size wanders by tens: the
            # judged epochs must not go beyond the warm epochs' peak by more than one warm
            # epoch ranges over (a leak's own climb within an epoch included).
            peak = max(reference_values)
            ranges = [
                max(getattr(s, name) for s in windows[e])
                - min(getattr(s, name) for s in windows[e])
                for e in reference
            ]
            bound = peak + max(statistics.median(ranges), resolution(peak))
            if max(judged_values) > bound:
                problems.append(
                    f"{who}: {max(judged_values):.0f} {unit} in epochs {judged[0] + 1}-"
                    f"{judged[-1] + 1}, beyond the warm epochs' peak of {peak:.0f} by more "
                    f"than an epoch's range ({statistics.median(ranges):.0f})"
                )
    return problems


def summary(trace: WorkerTrace) -> list[str]:
    """One line per epoch: min-max of each quantity."""
    lines = []
    for epoch, window in sorted(epoch_windows(trace).items()):
        parts = []
        for name, unit, _, _ in QUANTITIES:
            values = [getattr(sample, name) for sample in window]
            parts.append(f"{unit} {min(values):.0f}-{max(values):.0f}")
        lines.append(
            f"{trace.mode} worker {trace.worker} epoch {epoch + 1} ({len(window)} samples, "
            f"{window[0].seconds:.0f}-{window[-1].seconds:.0f} s): " + ", ".join(parts)
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated; default all")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc arenas unbounded (resident memory then climbs for ~12 epochs)",
    )
    parser.add_argument("--samples", action="store_true", help="print every sample")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or args.epochs < 5:
        parser.error(
            f"unknown modes {unknown}; choose from {', '.join(MODES)}"
            if unknown
            else "--epochs must be at least 5 (warm-up, two reference epochs, two judged)"
        )
    steps = args.train_examples // args.batch_size
    print(f"{len(modes)} modes, {args.epochs} epochs of {steps} steps each", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="bnzoo-soak-") as temporary:
        workdir = args.workdir or temporary
        os.makedirs(workdir, exist_ok=True)
        for mode in modes:
            traces = run_mode(
                mode,
                workdir,
                epochs=args.epochs,
                train_examples=args.train_examples,
                batch_size=args.batch_size,
                interval=args.interval,
                default_allocator=args.default_allocator,
            )
            for trace in traces:
                if args.samples:
                    for sample in trace.samples:
                        print(
                            f"{mode} worker {trace.worker} {sample.seconds:8.1f} s epoch "
                            f"{sample.epochs_done + 1}: {sample.threads} threads, "
                            f"{sample.rss_mib:.0f} MiB, {sample.fds} fds"
                        )
                for line in summary(trace):
                    print(line)
                problems = flatness_problems(trace)
                if trace.returncode != 0:
                    problems.insert(
                        0,
                        f"{mode} worker {trace.worker}: exit status {trace.returncode}: "
                        + (trace.stderr.strip().splitlines() or [""])[-1],
                    )
                for problem in problems:
                    print(f"PROBLEM: {problem}")
                failed |= bool(problems)
                print(f"{mode} worker {trace.worker}: {'grew' if problems else 'flat'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
