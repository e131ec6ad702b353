"""How long a worker may wait for the others (`--collective-timeout`), watched by one thread.

TensorFlow's own bound, `CommunicationOptions(timeout_seconds=...)`, starts a detached native
thread for every collective operation it launches, which sleeps for the whole timeout before it
checks whether the operation finished (`SchedNonBlockingClosureAfter` in TensorFlow's
collective executor: "TODO: Share the timeout watchdog thread among collectives"). A training
step of plain_cnn with `--sync-bn` launches about a hundred collectives (two all-reduces per BN
layer forward and backward, the gradients, the step's sums), so at the default 600 s each worker
kept about 100 × steps per second × 600 threads alive, and reached the kernel's thread limit
(`std::system_error ... Resource temporarily unavailable`, exit 134) within a few hundred steps.

Instead, the collectives run without TensorFlow's timeout, and the places where a worker waits
for the others (a training or evaluation step, a statistics pass, waiting for the chief) are
blocks bounded here: one thread for the whole run sleeps until the current block's deadline,
and when a block outlives it, aborts this process's collective operations (TensorFlow's
`abort_collective_ops`, which is what `MultiWorkerMirroredStrategy`'s own health check did);
the waiting step then fails with `TIMEOUT_MARKER` in its error.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

#: In the error that an expired block's collectives fail with (bnzoo.distribution recognizes it).
TIMEOUT_MARKER = "bnzoo collective timeout"


class CollectiveWatchdog:
    """Aborts the collectives of this process when a bounded block lasts too long.

    Args:
        abort: called once, from the watchdog's thread, with the message of the failure, when a
            block outlives its deadline; it must make the blocked call fail (TensorFlow:
            `context.abort_collective_ops`).

    Example:

    ```python
    watchdog = CollectiveWatchdog(abort)
    with watchdog.bounded(600.0, "a training step"):
        step()
    ```
    """

    def __init__(self, abort: Callable[[str], None]):
        self._abort = abort
        self._condition = threading.Condition()
        self._deadline: float | None = None
        self._seconds = 0.0
        self._what = ""
        self._thread: threading.Thread | None = None
        self._closed = False
        #: The message of the abort, once it happened.
        self.fired: str | None = None

    @contextlib.contextmanager
    def bounded(self, seconds: float, what: str) -> Iterator[None]:
        """Abort the collectives if the block (`what`, for the message) lasts over `seconds`.
        Blocks nest: the inner bound applies while it runs, the outer one again after it."""
        with self._condition:
            saved = (self._deadline, self._seconds, self._what)
            self._seconds, self._what = seconds, what
            self._deadline = time.monotonic() + seconds
            self._start_thread()
            self._condition.notify()
        try:
            yield
        finally:
            with self._condition:
                self._deadline, self._seconds, self._what = saved
                if self._deadline is not None:
                    # The outer block's clock restarts: its wait was interrupted by this one.
                    self._deadline = time.monotonic() + self._seconds
                self._condition.notify()

    def close(self) -> None:
        """Stop the thread (it is a daemon thread: a process may also just end)."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _start_thread(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._watch, name="bnzoo-collective-watchdog", daemon=True
            )
            self._thread.start()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                self.fired = (
                    f"{TIMEOUT_MARKER}: {self._what} waited more than {self._seconds:g} s for "
                    "the other workers (--collective-timeout)"
                )
                self._deadline = None
                break
        if self.fired is not None:
            self._abort(self.fired)
