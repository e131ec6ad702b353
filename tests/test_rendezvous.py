"""bnzoo.rendezvous: the workers of a multi-worker run meet in plain Python before their runtime
starts. Pure sockets and threads, no TensorFlow runtime: each test is a cluster of threads on
localhost ports. (tests/test_train_distributed.py runs train.py workers: signals, exit status.)"""

import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import types

import pytest
from local_cluster import free_ports

from bnzoo import rendezvous
from bnzoo.distribution_plan import DistributionPlan
from bnzoo.rendezvous import meet_other_workers

IDENTITY = {"model": "plain_cnn", "batch_size": 64, "model_args": {"widths": [8, 16]}}


def plans(count, backend="tensorflow"):
    addresses = tuple(f"localhost:{port}" for port in free_ports(count))
    fields = tuple(f"TF_CONFIG cluster.worker[{index}]" for index in range(count))
    if backend == "jax":
        addresses, fields = addresses[:1], ("KERAS_DISTRIBUTION_JOB_ADDRESSES",)
    source = "TF_CONFIG" if backend == "tensorflow" else "KERAS_DISTRIBUTION"
    return [
        DistributionPlan(
            "multi_worker", "multi_worker", "", backend, count, index, source, addresses, fields
        )
        for index in range(count)
    ]


class ThreadLines(logging.Handler):
    """The rendezvous' log lines, by the thread (the worker) that logged them."""

    def __init__(self):
        super().__init__()
        self.lines = {}

    def emit(self, record):
        self.lines.setdefault(record.threadName, []).append(record.getMessage())


@contextlib.contextmanager
def rendezvous_handler(handler):
    logger = logging.getLogger("bnzoo.rendezvous")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def meet(plans_and_identities, timeout=20.0, start_delays=None):
    """Every worker in its own thread; returns each one's outcome (None or the error text) and
    the lines it logged."""
    outcomes = [None] * len(plans_and_identities)

    def worker(position, plan, identity):
        time.sleep((start_delays or {}).get(position, 0.0))
        try:
            meet_other_workers(plan, timeout=timeout, identity=identity)
        except ValueError as error:
            outcomes[position] = str(error)

    threads = [
        threading.Thread(
            target=worker, args=(position, plan, identity), name=f"meet-{position}", daemon=True
        )
        for position, (plan, identity) in enumerate(plans_and_identities)
    ]
    with rendezvous_handler(ThreadLines()) as logged:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 30)
            assert not thread.is_alive(), "a worker never returned"
    return outcomes, [logged.lines.get(thread.name, []) for thread in threads]


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_workers_started_a_few_seconds_apart_meet(backend):
    cluster = plans(3, backend)
    outcomes, _ = meet([(plan, IDENTITY) for plan in cluster], start_delays={0: 0.5, 2: 1.0})
    assert outcomes == [None, None, None]


def test_workers_started_with_another_batch_size_all_stop_with_the_same_line():
    cluster = plans(3)
    other = {**IDENTITY, "batch_size": 32, "model_args": {"widths": [4, 8]}}
    outcomes, _ = meet([(cluster[0], IDENTITY), (cluster[1], other), (cluster[2], IDENTITY)])
    expected = (
        "the workers were started with different options: --batch-size is 64 on worker 0, 32 "
        'on worker 1, 64 on worker 2; --model-arg is {"widths": [8, 16]} on worker 0, '
        '{"widths": [4, 8]} on worker 1, {"widths": [8, 16]} on worker 2. Start every worker '
        "with the same command"
    )
    assert outcomes == [expected] * 3


def test_workers_given_different_clusters_all_stop():
    chief, worker = plans(2)
    # Its own port free (it binds it), the chief's the same, the list otherwise different.
    stranger = dataclasses.replace(worker, addresses=(*worker.addresses, "otherhost:2222"))
    outcomes, _ = meet([(chief, IDENTITY), (stranger, IDENTITY)])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith("the workers were given different clusters: worker 0 (the chief)")
    assert "otherhost:2222" in outcomes[0]


def test_a_chief_alone_says_whom_it_waits_for_then_gives_up(monkeypatch):
    # The meeting reads the test's clock, which advances 1/8 s per reading: the deadline is
    # checked against time the test counts, whatever this machine's speed or load.
    readings = []

    def monotonic():
        readings.append(1000.0 + 0.125 * len(readings))
        return readings[-1]

    monkeypatch.setattr(
        rendezvous, "time", types.SimpleNamespace(monotonic=monotonic, sleep=time.sleep)
    )
    monkeypatch.setattr(rendezvous, "FIRST_NOTICE_SECONDS", 0.2)
    chief, _ = plans(2)
    outcomes, logs = meet([(chief, IDENTITY)], timeout=1.5)
    waited = readings[-1] - readings[0]
    # It gives up at its first look at the clock past the deadline: not before it, and within
    # one turn of its loop (at most four readings: deadline, notice, its text, the wait) after.
    assert 1.5 <= waited < 1.5 + 4 * 0.125
    address = chief.addresses[1]
    assert outcomes == [
        f"worker 0 of 2: worker 1 at {address} did not start within 1.5 s "
        "(--collective-timeout); start every worker with the same command, or raise "
        "--collective-timeout"
    ]
    assert logs[0][0] == (
        f"worker 0 of 2 (the chief): waiting for worker 1 at {address} to start (up to 1.5 s, "
        "--collective-timeout)"
    )


def test_a_worker_alone_says_it_waits_for_the_chief_then_gives_up(monkeypatch):
    monkeypatch.setattr(rendezvous, "FIRST_NOTICE_SECONDS", 0.2)
    _, worker = plans(2)
    outcomes, logs = meet([(worker, IDENTITY)], timeout=1.5)
    chief = f"worker 0 (the chief) at {worker.addresses[0]}"
    assert outcomes == [
        f"worker 1 of 2: {chief} did not answer within 1.5 s (--collective-timeout); start it "
        "with the same command, or raise --collective-timeout"
    ]
    assert logs[0][0].startswith(f"worker 1 of 2: waiting for {chief} to start (up to 1.5 s")


def test_a_port_in_use_is_one_line_naming_the_tf_config_field_and_the_address():
    chief, worker = plans(2)
    _, port = worker.addresses[1].rsplit(":", 1)
    holder = socket.create_server(("", int(port)))
    try:
        outcomes, _ = meet([(worker, IDENTITY)], timeout=5)
    finally:
        holder.close()
    assert outcomes == [
        f"TF_CONFIG cluster.worker[1] is {worker.addresses[1]}, but port {port} is already in "
        "use on this host: stop what holds it (a worker of an earlier run?) or give this worker "
        "another port"
    ]


def test_strangers_on_the_port_are_ignored():
    """A port scanner or a health check connects to the chief's port and sends anything."""
    chief, worker = plans(2)
    host, port = chief.addresses[0].rsplit(":", 1)

    def stranger():
        time.sleep(0.3)
        for payload in (b"GET / HTTP/1.1\r\n\r\n", b"{}\n", b"x" * (2 << 20), b""):
            try:
                with socket.create_connection((host, int(port)), timeout=2) as sock:
                    sock.sendall(payload)
            except OSError:
                pass

    thread = threading.Thread(target=stranger, daemon=True)
    thread.start()
    outcomes, _ = meet([(chief, IDENTITY), (worker, IDENTITY)], start_delays={1: 1.0})
    thread.join()
    assert outcomes == [None, None]


def test_two_processes_started_as_the_same_worker_are_refused():
    chief, worker, _ = plans(3)
    outcomes, _ = meet([(chief, IDENTITY), (worker, IDENTITY), (worker, IDENTITY)], timeout=10)
    message = (
        "two processes started as worker 1: give every worker its own index (TF_CONFIG task.index)"
    )
    assert outcomes[0] == message
    assert message in outcomes[1:]


def test_a_worker_restarted_while_the_chief_waits_is_taken_again():
    """The first worker process goes away after its hello; its replacement is not a duplicate."""
    chief, worker, last = plans(3)
    host, port = chief.addresses[0].rsplit(":", 1)
    hello = {
        "bnzoo_rendezvous": rendezvous.PROTOCOL,
        "worker": 1,
        "workers": 3,
        "cluster": list(chief.addresses),
        "identity": IDENTITY,
    }

    def short_lived_worker():
        time.sleep(0.3)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(json.dumps(hello).encode() + b"\n")
            time.sleep(0.3)

    thread = threading.Thread(target=short_lived_worker, daemon=True)
    thread.start()
    outcomes, _ = meet(
        [(chief, IDENTITY), (worker, IDENTITY), (last, IDENTITY)],
        start_delays={1: 1.0, 2: 1.0},
    )
    thread.join()
    assert outcomes == [None, None, None]


def test_a_chief_stopped_by_a_signal_while_waiting_stops_the_workers_that_came(monkeypatch):
    monkeypatch.setattr(rendezvous, "FIRST_NOTICE_SECONDS", 1.0)
    chief, worker, _ = plans(3)
    interrupted = []

    class Interrupt(logging.Handler):  # Ctrl-C arriving while the chief waits for worker 2
        def emit(self, record):
            if record.threadName == "chief":
                raise KeyboardInterrupt

    def run_chief():
        try:
            meet_other_workers(chief, timeout=30, identity=IDENTITY)
        except KeyboardInterrupt:
            interrupted.append(True)

    thread = threading.Thread(target=run_chief, name="chief", daemon=True)
    with rendezvous_handler(Interrupt()):
        thread.start()
        started = time.monotonic()
        outcomes, _ = meet([(worker, IDENTITY)], timeout=30)
        thread.join(10)
    assert interrupted == [True]
    assert time.monotonic() - started < 10
    assert outcomes == [
        "worker 0 of 3 (the chief) was stopped by a signal while the workers met; start every "
        "worker again"
    ]
