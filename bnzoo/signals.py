"""SIGINT and SIGTERM as exceptions, raised where Python can deliver them.

The command line (`bnzoo.cli.run_cli`) turns Ctrl-C and `kill` into `KeyboardInterrupt` and
`Terminated` while a script runs; code that must not be cut short mid-write
(`bnzoo.atomic_files`, checkpoint callbacks) holds them back with `interruptions_deferred`, and
the training loop asks `raise_if_interrupted` after every step. No TensorFlow here: the scripts
install the handlers before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs (a
    `kill`, a job scheduler's timeout) and the user reads how to continue."""


#: The interruptions that signals asked for while `signals_raise_interruptions` is active.
_RECEIVED: list[type[KeyboardInterrupt]] = []
#: How many `interruptions_deferred` blocks are running (they nest).
_DEFERRED_DEPTH = [0]


@contextlib.contextmanager
def signals_raise_interruptions() -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM `Terminated` (main
    thread only; elsewhere Python cannot handle signals and the defaults stay), and each is
    remembered for `raise_if_interrupted`.

    Python drops an exception raised inside a garbage-collection callback or a `__del__` method
    ("Exception ignored in ..." and a traceback on stderr): a signal that arrives there would be
    lost, and the run would go on. Measured: Ctrl-C 0.1-0.3 s after train.py's opening line, on
    a loaded machine, landed in JAX's garbage-collection callback in 5 of 12 tries (Keras
    imports JAX when it is installed, whatever the backend). So there the handler only records
    the interruption, and the training loop calls `raise_if_interrupted` after every step.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        interruption = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        _RECEIVED.append(interruption)
        # Raised in a finalizer, the exception would be dropped with an "Exception ignored"
        # traceback on stderr; recorded instead, `raise_if_interrupted` raises it after the step.
        if not _DEFERRED_DEPTH[0] and not _inside_finalizer(frame):
            raise interruption()

    previous = {
        number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for number, handler_before in previous.items():
            signal.signal(number, handler_before)
        _RECEIVED.clear()


def _inside_finalizer(frame) -> bool:
    """Whether `frame` runs in a garbage-collection callback or a `__del__` method, where Python
    drops exceptions."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def interruptions_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM's interruption until the block has finished, then raise it.

    For writes that must finish once started: an exception raised inside a library's callback
    (h5py writing a `.keras` archive through a Python file object, for one) can come out as
    that library's own error, an `OSError` instead of the interruption, and the user would read
    a failure where they asked for a stop. An interruption that arrives here waits for the end
    of the block (a checkpoint save: well under a second), and a block that fails on its own
    raises its own error. Nested blocks raise at the end of the outermost one.
    """
    _DEFERRED_DEPTH[0] += 1
    try:
        yield
    finally:
        _DEFERRED_DEPTH[0] -= 1
    if not _DEFERRED_DEPTH[0]:
        raise_if_interrupted()


def raise_if_interrupted() -> None:
    """Raise the interruption a signal asked for (see `signals_raise_interruptions`), in case
    Python swallowed it; nothing happens when no signal came."""
    if _RECEIVED:
        raise _RECEIVED[-1]()
