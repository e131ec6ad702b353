"""Where the workers of a multi-worker run meet before their runtime starts: a bounded wait that
says whom it waits for, honours Ctrl-C and SIGTERM, and refuses workers started differently.

TensorFlow's `MultiWorkerMirroredStrategy` and JAX's `jax.distributed.initialize` wait for the
other workers inside one native call that holds Python's global interpreter lock: a worker
whose peer never starts prints nothing, runs no Python signal handler (Ctrl-C and `kill` do
nothing; only `kill -9` stops it) and gives up only after TensorFlow's hour or JAX's five
minutes, JAX with a fatal abort. So the workers meet here first, in plain Python, and start
their runtime only once all of them are there:

- the chief (worker 0) listens on its own address, the one its runtime binds next (TensorFlow:
  its TF_CONFIG or Slurm address; JAX: the coordinator's), which also proves the port free;
- every other worker checks that its own runtime port is free, connects to the chief and sends
  a hello: its index, the cluster as it sees it and the run's identity
  (`TrainConfig.identity()`, the options that make two runs the same run);
- when every worker has said hello, the chief compares them and answers every worker either
  "go" or the one line that says which option differs and its value on each worker, so that
  every worker fails with the same message instead of ~45 s later in a collective, as "another
  worker stopped answering".

The wait is bounded by `--collective-timeout`; after a few seconds it prints which workers it
waits for, then again every minute. A peer that dies between this meeting and its runtime's
start is still waited for by the runtime itself (TensorFlow's or JAX's own register timeout).

One line of JSON each way; a line longer than `MAX_MESSAGE_BYTES` or not of the expected form
is a stranger's and its connection is closed.
"""

from __future__ import annotations

import errno
import json
import logging
import select
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bnzoo.distribution_plan import DistributionPlan, check_address

logger = logging.getLogger(__name__)

#: Bumped when the hello changes: workers of different bnzoo versions do not meet.
PROTOCOL = 1
#: A hello holds the run's identity: a few kilobytes. Anything longer is not a bnzoo worker.
MAX_MESSAGE_BYTES = 1 << 20
#: The first "waiting for" line comes after this long: workers started together meet sooner.
FIRST_NOTICE_SECONDS = 5.0
#: Then a reminder this often.
NOTICE_INTERVAL_SECONDS = 60.0
#: Connections that have not said hello yet, at most (the oldest are dropped).
MAX_PENDING = 256
#: How often the waits wake up to retry a connection: also how promptly a signal is handled.
POLL_SECONDS = 0.25


class _Clock:
    """The meeting's deadline and when to say again whom it waits for."""

    def __init__(self, timeout: float):
        self.start = time.monotonic()
        self.timeout = timeout
        self._next_notice = self.start + FIRST_NOTICE_SECONDS

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def expired(self) -> bool:
        return self.elapsed >= self.timeout

    def remaining(self, cap: float = POLL_SECONDS) -> float:
        return max(0.0, min(cap, self.timeout - self.elapsed))

    def notice_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_notice:
            return False
        self._next_notice = now + NOTICE_INTERVAL_SECONDS
        return True

    def describe(self) -> str:
        if self.elapsed < FIRST_NOTICE_SECONDS + 1:
            return f"up to {self.timeout:g} s, --collective-timeout"
        return f"{self.elapsed:.0f} s of at most {self.timeout:g}, --collective-timeout"


def meet_other_workers(
    plan: DistributionPlan,
    *,
    timeout: float,
    identity: Mapping[str, Any],
) -> None:
    """Return once every worker of `plan` has started with the same run identity.

    Must run before the backend's distributed runtime starts (it binds the runtime's ports to
    find them free, then releases them). Does nothing for a single worker.

    Args:
        plan: the multi-worker plan; `plan.addresses` names where the chief listens.
        timeout: seconds to wait for the other workers (`--collective-timeout`).
        identity: this worker's run identity, a JSON-able mapping of option name to value.

    Raises:
        ValueError: a port is in use, the other workers did not all come in time, or a worker
            was started with other options or another cluster (one line, the same on every
            worker).
    """
    if plan.num_workers < 2:
        return
    hello = {
        "bnzoo_rendezvous": PROTOCOL,
        "worker": plan.worker_index,
        "workers": plan.num_workers,
        "cluster": list(plan.addresses) if plan.backend == "tensorflow" else [],
        "identity": dict(identity),
    }
    clock = _Clock(timeout)
    if plan.is_chief:
        _gather_as_chief(plan, hello, clock)
    else:
        _report_to_chief(plan, hello, clock)


# --- Addresses -----------------------------------------------------------------------------------


def _field(plan: DistributionPlan, index: int) -> str:
    """Where worker `index`'s address was configured ("TF_CONFIG cluster.worker[1]")."""
    if index < len(plan.address_fields):
        return plan.address_fields[index]
    return f"worker {index}'s address"


def _worker(plan: DistributionPlan, index: int) -> str:
    """ "worker 1 (localhost:2223)", "worker 0 (the chief) at ..." for the messages."""
    text = f"worker {index}"
    if index == 0:
        text += " (the chief)"
    if plan.backend == "tensorflow" and index < len(plan.addresses):
        text += f" at {plan.addresses[index]}"
    elif index == 0 and plan.addresses:
        text += f" at {plan.addresses[0]}"
    return text


def _me(plan: DistributionPlan) -> str:
    return f"worker {plan.worker_index} of {plan.num_workers}"


def _bind(plan: DistributionPlan, index: int, *, listen: bool) -> socket.socket:
    """A socket bound to worker `index`'s runtime port on every interface, as the runtime's gRPC
    server binds it (listening when `listen`); a ValueError naming the address and where it was
    configured when something else holds the port."""
    address = plan.addresses[index]
    field = _field(plan, index)
    _, port = check_address(address, field)
    dual_stack = socket.has_dualstack_ipv6()
    sock = socket.socket(socket.AF_INET6 if dual_stack else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR, as gRPC sets it: a connection of an earlier run in TIME_WAIT does not
        # hold the port, a process listening on it does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("", port))
        if listen:
            sock.listen(128)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(
                f"{field} is {address}, but port {port} is already in use on this host: stop "
                "what holds it (a worker of an earlier run?) or give this worker another port"
            ) from None
        raise ValueError(
            f"{field} is {address}, but this host cannot listen on port {port} "
            f"({error.strerror or error}); choose another port"
        ) from None
    return sock


# --- One line of JSON each way --------------------------------------------------------------------


class _Connection:
    """A non-blocking socket that reads newline-terminated JSON objects of bounded size."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._buffer = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_messages(self) -> list[dict[str, Any]]:
        """The complete messages that have arrived; marks the connection closed on EOF, on an
        error and on anything that is not a bounded JSON object per line."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.close()
            return []
        self._buffer += data
        messages = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                self.close()
                return messages
            messages.append(message)
        if len(self._buffer) > MAX_MESSAGE_BYTES:
            self.close()
        return messages

    def send(self, message: Mapping[str, Any]) -> bool:
        """Send one message; False when the peer is gone."""
        data = json.dumps(message).encode() + b"\n"
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(5.0)
            self.sock.sendall(data)
            self.sock.setblocking(False)
            return True
        except OSError:
            self.close()
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


# --- The chief ------------------------------------------------------------------------------------


def _gather_as_chief(plan: DistributionPlan, hello: dict, clock: _Clock) -> None:
    listener = _bind(plan, 0, listen=True)
    pending: list[_Connection] = []  # connected, no hello yet
    hellos: dict[int, tuple[_Connection, dict[str, Any]]] = {}
    try:
        while True:
            for index in [i for i, (conn, _) in hellos.items() if conn.closed]:
                del hellos[index]  # that worker stopped: wait for it again
            pending = [conn for conn in pending if not conn.closed]
            missing = [i for i in range(1, plan.num_workers) if i not in hellos]
            if not missing:
                break
            if clock.expired:
                names = ", ".join(_worker(plan, i) for i in missing)
                message = (
                    f"{_me(plan)}: {names} did not start within {clock.timeout:g} s "
                    "(--collective-timeout); start every worker with the same command, or "
                    "raise --collective-timeout"
                )
                _answer(hellos, {"error": f"worker 0 (the chief) gave up: {message}"})
                raise ValueError(message)
            if clock.notice_due():
                names = ", ".join(_worker(plan, i) for i in missing)
                logger.info(
                    f"{_me(plan)} (the chief): waiting for {names} to start ({clock.describe()})"
                )
            waiting = [listener, *pending, *_open_connections(hellos)]
            readable, _, _ = select.select(waiting, [], [], clock.remaining())
            for ready in readable:
                if ready is listener:
                    try:
                        sock, _ = listener.accept()
                    except OSError:
                        continue
                    # Strangers that connect and say nothing must not pile up.
                    pending = [*pending[-(MAX_PENDING - 1) :], _Connection(sock)]
                    continue
                if ready.closed:
                    continue
                for message in ready.read_messages():
                    _take_hello(plan, ready, message, hellos)
        error = _differences(plan, hello, {i: h for i, (_, h) in hellos.items()})
        _answer(hellos, {"error": error} if error else {"go": True})
        if error:
            raise ValueError(error)
        _await_close(list(c for c, _ in hellos.values()), deadline=time.monotonic() + 5.0)
    except KeyboardInterrupt:
        # The workers that came would otherwise wait for the chief until their own timeout.
        _answer(
            hellos,
            {
                "error": f"{_me(plan)} (the chief) was stopped by a signal while the workers "
                "met; start every worker again"
            },
        )
        raise
    finally:
        for conn in pending:
            conn.close()
        for conn, _ in hellos.values():
            conn.close()
        listener.close()


def _open_connections(hellos: Mapping[int, tuple[_Connection, Any]]) -> list[_Connection]:
    return [conn for conn, _ in hellos.values() if not conn.closed]


def _take_hello(
    plan: DistributionPlan,
    conn: _Connection,
    message: Mapping[str, Any],
    hellos: dict[int, tuple[_Connection, dict[str, Any]]],
) -> None:
    index = message.get("worker")
    if (
        message.get("bnzoo_rendezvous") != PROTOCOL
        or isinstance(index, bool)
        or not isinstance(index, int)
        or not isinstance(message.get("identity"), dict)
    ):
        conn.close()  # not a bnzoo worker of this version
        return
    if not 0 < index < plan.num_workers or message.get("workers") != plan.num_workers:
        error = (
            f"worker {index} was started as one of {message.get('workers')} workers, worker 0 "
            f"(the chief) as one of {plan.num_workers}: give every worker the same cluster"
        )
        conn.send({"error": error})
        _answer(hellos, {"error": error})
        raise ValueError(error)
    previous = hellos.get(index)
    if previous is not None and previous[0] is not conn and _still_open(previous[0]):
        error = (
            f"two processes started as worker {index}: give every worker its own index "
            f"({_index_source(plan)})"
        )
        conn.send({"error": error})
        _answer(hellos, {"error": error})
        raise ValueError(error)
    hellos[index] = (conn, dict(message))


def _still_open(conn: _Connection) -> bool:
    """Whether `conn`'s peer is still there (a restarted worker's old connection may have closed
    without this process having read its end yet)."""
    if not conn.closed:
        readable, _, _ = select.select([conn], [], [], 0)
        if readable:
            conn.read_messages()
    return not conn.closed


def _index_source(plan: DistributionPlan) -> str:
    if plan.backend == "jax":
        return "KERAS_DISTRIBUTION_PROCESS_ID"
    return "TF_CONFIG task.index" if plan.cluster_source == "TF_CONFIG" else "SLURM_PROCID"


def _answer(hellos: Mapping[int, tuple[_Connection, Any]], message: Mapping[str, Any]) -> None:
    for conn, _ in hellos.values():
        if not conn.closed:
            conn.send(message)


def _await_close(connections: Sequence[_Connection], deadline: float) -> None:
    """Wait (briefly) for the workers to close first, so that the closed connections' TIME_WAIT
    lies on their side and not on the port that the chief's runtime binds next."""
    open_connections = [conn for conn in connections if not conn.closed]
    while open_connections and time.monotonic() < deadline:
        readable, _, _ = select.select(open_connections, [], [], POLL_SECONDS)
        for conn in readable:
            conn.read_messages()
        open_connections = [conn for conn in open_connections if not conn.closed]


def _differences(
    plan: DistributionPlan, own: Mapping[str, Any], hellos: Mapping[int, Mapping[str, Any]]
) -> str | None:
    """The one line that says how the workers' hellos differ, or None when they agree."""
    everyone = {0: own, **hellos}
    clusters = {index: hello.get("cluster") for index, hello in everyone.items()}
    if len({json.dumps(cluster) for cluster in clusters.values()}) > 1:
        differing = [i for i, cluster in clusters.items() if cluster != clusters[0]]
        return (
            f"the workers were given different clusters: worker 0 (the chief) "
            f"{json.dumps(clusters[0])}, "
            + ", ".join(f"worker {i} {json.dumps(clusters[i])}" for i in differing)
            + f"; give every worker the same {plan.cluster_source or 'cluster'}"
        )
    identities = {index: hello["identity"] for index, hello in everyone.items()}
    keys = sorted(set().union(*identities.values()))
    parts = []
    for key in keys:
        values = {index: identity.get(key) for index, identity in identities.items()}
        if len({json.dumps(value, sort_keys=True) for value in values.values()}) > 1:
            shown = ", ".join(
                f"{_shown(value)} on worker {index}" for index, value in sorted(values.items())
            )
            parts.append(f"{_option(key)} is {shown}")
    if not parts:
        return None
    return (
        "the workers were started with different options: "
        + "; ".join(parts)
        + ". Start every worker with the same command"
    )


def _option(key: str) -> str:
    return "--model-arg" if key == "model_args" else "--" + key.replace("_", "-")


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


# --- The other workers ----------------------------------------------------------------------------


def _report_to_chief(plan: DistributionPlan, hello: dict, clock: _Clock) -> None:
    # Our own runtime port must be free (TensorFlow; on JAX only process 0 listens). Held until
    # the chief says go, so that nothing takes it meanwhile.
    own = None
    if plan.backend == "tensorflow":
        own = _bind(plan, plan.worker_index, listen=False)
    chief = plan.addresses[0]
    host, port = check_address(chief, _field(plan, 0))
    connected_once = False
    try:
        while True:
            if clock.expired:
                break
            conn = _connect(host, port, clock)
            if conn is None:
                if clock.notice_due():
                    logger.info(
                        f"{_me(plan)}: waiting for {_worker(plan, 0)} to start ({clock.describe()})"
                    )
                continue
            connected_once = True
            try:
                if not conn.send(hello):
                    continue
                reply = _await_reply(plan, conn, clock)
            finally:
                conn.close()
            if reply is None:
                continue  # the chief went away: wait for it again
            if "error" in reply:
                raise ValueError(" ".join(str(reply["error"]).split())[:2000])
            return
        if connected_once:
            raise ValueError(
                f"{_me(plan)}: the other workers did not all start within {clock.timeout:g} s "
                f"(--collective-timeout); {_worker(plan, 0)} says which: start every worker "
                "with the same command, or raise --collective-timeout"
            )
        raise ValueError(
            f"{_me(plan)}: {_worker(plan, 0)} did not answer within {clock.timeout:g} s "
            "(--collective-timeout); start it with the same command, or raise "
            "--collective-timeout"
        )
    finally:
        if own is not None:
            own.close()


def _connect(host: str, port: int, clock: _Clock) -> _Connection | None:
    """A connection to the chief, or None (after a short pause) while it is not listening."""
    try:
        sock = socket.create_connection((host, port), timeout=max(clock.remaining(2.0), 0.1))
    except OSError:
        time.sleep(clock.remaining())
        return None
    return _Connection(sock)


def _await_reply(plan: DistributionPlan, conn: _Connection, clock: _Clock) -> dict[str, Any] | None:
    """The chief's answer, or None when the connection closed or time ran out."""
    while not clock.expired:
        if clock.notice_due():
            logger.info(
                f"{_me(plan)}: {_worker(plan, 0)} is up; waiting for the other workers to start "
                f"({clock.describe()})"
            )
        readable, _, _ = select.select([conn], [], [], clock.remaining())
        if readable:
            for message in conn.read_messages():
                if "go" in message or "error" in message:
                    return message
            if conn.closed:
                return None
    return None
