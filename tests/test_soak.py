"""Hundreds of training steps in every distribution mode, with each process's threads, resident
memory and open file descriptors flat once warm (issue 15: two TensorFlow workers with
`--sync-bn` grew by ~100 threads per step and died after ~150 steps; the short distributed
tests never saw it).

Each mode trains 8 epochs of 40 steps (320 steps) of a tiny plain_cnn through the real
`train.py` processes; `tools/soak_distributed.py` samples `/proc/<pid>` and judges flatness
against the process's own warm epochs (its docstring says how). Run it longer by hand:
`python tools/soak_distributed.py --epochs 40`.
"""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_soak():
    spec = importlib.util.spec_from_file_location(
        "soak_distributed", os.path.join(ROOT, "tools", "soak_distributed.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


soak = load_soak()


def test_the_judge_passes_a_flat_process_and_catches_a_leak_per_step_and_per_epoch():
    """The judge itself, on synthetic traces: flat with the breathing of real processes
    (threads 15-97 within an epoch, as tf.data's iterators come and go), then one leaked
    thread per step, then one leaked descriptor per epoch."""

    def trace(thread_leak_per_step=0.0, fd_leak_per_epoch=0):
        samples, step = [], 0
        for epoch in range(8):
            for position in range(40):
                step += 1
                threads = 15 + (82 if position % 5 else 0) + int(thread_leak_per_step * step)
                rss = 800 + 15 * (position % 2)
                fds = 6 + position % 2 + fd_leak_per_epoch * epoch
                samples.append(soak.Sample(step, epoch, threads, rss, fds))
        samples.append(soak.Sample(step + 1, 8, 15, 800, 6))
        return soak.WorkerTrace("synthetic", 0, samples, 0, "", "")

    assert soak.flatness_problems(trace()) == []
    per_step = soak.flatness_problems(trace(thread_leak_per_step=1.0))
    assert any("the floor of threads rose" in problem for problem in per_step), per_step
    per_epoch = soak.flatness_problems(trace(fd_leak_per_epoch=1))
    assert any("the floor of open descriptors rose" in problem for problem in per_epoch)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("mode", list(soak.MODES))
def test_threads_memory_and_descriptors_stay_flat_over_hundreds_of_steps(mode, tmp_path):
    traces = soak.run_mode(mode, str(tmp_path), timeout=1500)
    for trace in traces:
        assert trace.returncode == 0, trace.stderr[-3000:]
        epoch_lines = [line for line in trace.stdout.splitlines() if line.startswith("epoch ")]
        assert len(epoch_lines) == 8, trace.stdout[-2000:]
        assert soak.flatness_problems(trace) == [], "\n".join(soak.summary(trace))
