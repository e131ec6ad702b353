"""Timing for the benchmark scripts: every function once per round, in rotating order.

Rotating the order spreads a shared machine's slow moments (another process's burst, a clock
change) over all the functions instead of charging them to whichever ran then, and the median
over the rounds drops what remains. CPU time (all of the process' threads) is the load-robust
measure: on a shared machine a call's wall time includes waiting for a core, its CPU time mostly
does not.

Only the standard library: `serve_saved_models.py` imports this in a process that imports
nothing but TensorFlow.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def rotated(names: Sequence[Key], round_index: int) -> list[Key]:
    """`names` starting at position `round_index` (mod its length), wrapping around."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def time_interleaved(
    functions: Mapping[Key, Callable[[], object]], rounds: int, warmup: int = 2
) -> tuple[dict[Key, float], dict[Key, float]]:
    """Median wall and CPU seconds per call of each function.

    Each function is first called `warmup` times (tracing, compiling, warming caches), then once
    per round, the order rotating from round to round. A function must have finished its work
    when it returns: on a CPU the outputs of a `tf.function` or a SavedModel signature are.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    names = list(functions)
    wall: dict[Key, list[float]] = {name: [] for name in names}
    cpu: dict[Key, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            cpu_start, start = time.process_time(), time.perf_counter()
            functions[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return (
        {name: statistics.median(times) for name, times in wall.items()},
        {name: statistics.median(times) for name, times in cpu.items()},
    )
