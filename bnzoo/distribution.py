"""How a training run is spread over devices and processes: choosing the mode, creating the
TensorFlow strategy or the JAX distribution, and splitting every global batch among them.

Three modes, one command line (`train.py --distribute`):

- `none`: one device.
- `data_parallel`: every local device of one host. TensorFlow: `tf.distribute.MirroredStrategy`
  over the local GPUs (or the logical CPUs when there is no GPU); JAX:
  `keras.distribution.DataParallel` over the local devices.
- `multi_worker`: several processes, usually on several hosts, each running the same command.
  TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy`, configured from `TF_CONFIG`; JAX:
  `keras.distribution.initialize()` from `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
  `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`, then `DataParallel`
  over every device of every process.
- `auto` picks `multi_worker` when the environment names more than one worker, `data_parallel`
  with more than one local accelerator, else `none`.

`--batch-size` is always the global batch. Every worker builds the same seeded input pipeline,
so all of them agree on the order of the examples, and keeps only its own share of each global
batch before preprocessing it (`keep_worker_share`). Global batch t is therefore examples
[t*B, (t+1)*B) of one shuffled stream whatever the number of workers and replicas: a run can
resume on another number of workers, and with synchronized BN a two-worker run computes what
one process computes. (Keras' and TensorFlow's automatic sharding split the *files* among
workers, falling back to every worker reading everything and keeping every n-th element when
there are fewer files than workers, as with most TFDS datasets; explicit sharding avoids both
the fallback and its warning.)

Worker 0 is the chief: the only process that touches the run folder. The others receive the
run's state from it (`bnzoo.training_loop`), so they need neither write access to the folder nor
a shared file system.

Nothing here initializes TensorFlow's or JAX's runtime before `start_distribution`: multi-worker
collectives must be configured before the runtime starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras

from bnzoo.collective_watchdog import TIMEOUT_MARKER, CollectiveWatchdog

#: What TensorFlow's coordination service waits for a worker's heartbeat before it declares the
#: worker dead and aborts every collective (TF 2.21's default, not configurable through a public
#: API). Measured on localhost: the surviving worker stops 8 s after `kill -9` of a non-chief
#: worker, immediately after `kill -9` of the chief (its connection closes).
TF_HEARTBEAT_TIMEOUT_SECONDS = 10
#: The same for JAX's distributed runtime (`jax.distributed.initialize`'s default).
JAX_HEARTBEAT_TIMEOUT_SECONDS = 100


@dataclasses.dataclass(frozen=True)
class DistributionPlan:
    """The mode a run uses and this process's place in it, decided from the command line and
    the environment alone (no runtime started).

    Attributes:
        mode: "none", "data_parallel" or "multi_worker".
        requested: what `--distribute` asked for ("auto" or one of the modes).
        reason: why `auto` chose `mode` (empty when the mode was asked for).
        backend: Keras' backend, "tensorflow" or "jax".
        num_workers: processes taking part (1 unless multi_worker).
        worker_index: this process's index; 0 is the chief.
        cluster_source: where the cluster was described: "TF_CONFIG", "Slurm" (TensorFlow's
            `SlurmClusterResolver`, when `srun` started the processes and TF_CONFIG is unset)
            or "KERAS_DISTRIBUTION" (JAX); empty for one process.
        addresses: TensorFlow: every worker's "host:port" in index order (from TF_CONFIG, or
            from Slurm once the cluster is resolved); JAX: the coordinator's (process 0's).
            Where the workers meet before their runtime starts (`bnzoo.rendezvous`).
        address_fields: where each of `addresses` was configured ("TF_CONFIG
            cluster.worker[1]"), for messages about it.
    """

    mode: str
    requested: str
    reason: str
    backend: str
    num_workers: int = 1
    worker_index: int = 0
    cluster_source: str = ""
    addresses: tuple[str, ...] = ()
    address_fields: tuple[str, ...] = ()

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


#: What TF_CONFIG looks like, for the messages about a malformed one.
TF_CONFIG_FORM = (
    '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
)


def _tf_config_workers(
    environ: Mapping[str, str],
) -> tuple[int, int, tuple[str, ...], tuple[str, ...]] | None:
    """(number of workers, this worker's index, every worker's "host:port" in index order, the
    TF_CONFIG field of each) from `TF_CONFIG`, or None when it is unset.

    MultiWorkerMirroredStrategy's cluster has an optional "chief" task and "worker" tasks; the
    chief (or worker 0 without one) comes first. Every field is checked here, before TensorFlow
    sees it: TensorFlow would take a string of addresses for a list of one-character
    addresses, `"index": true` for 1, and fail on a port that is not a number with a traceback.
    """
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        tf_config = json.loads(text)
    except ValueError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}); expected {TF_CONFIG_FORM}"
        ) from None
    if not isinstance(tf_config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object: {TF_CONFIG_FORM}, got {text[:80]}")
    cluster = tf_config.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ValueError(
            f'TF_CONFIG cluster must be an object such as {{"worker": ["host:port", ...]}}, '
            f"got {_json_excerpt(cluster)}"
        )
    other = sorted(set(cluster) - {"chief", "worker"})
    if other:
        raise ValueError(
            f"TF_CONFIG names {', '.join(other)} tasks; bnzoo trains with "
            "MultiWorkerMirroredStrategy, whose cluster has only 'chief' and 'worker' tasks"
        )
    chiefs = _tf_config_addresses(cluster, "chief")
    workers = _tf_config_addresses(cluster, "worker")
    if len(chiefs) > 1:
        raise ValueError(
            f"TF_CONFIG cluster.chief has {len(chiefs)} addresses; a cluster has at most one "
            "chief (put the others in cluster.worker)"
        )
    addresses = (*chiefs, *workers)
    fields = tuple(f"TF_CONFIG cluster.chief[{i}]" for i in range(len(chiefs))) + tuple(
        f"TF_CONFIG cluster.worker[{i}]" for i in range(len(workers))
    )
    for index, address in enumerate(addresses):
        first = addresses.index(address)
        if first != index:
            raise ValueError(
                f"{fields[index]} {address} is also {fields[first]}'s address: every task "
                "needs its own host:port"
            )
    task = tf_config.get("task", {})
    if not isinstance(task, dict):
        raise ValueError(
            f'TF_CONFIG task must be an object such as {{"type": "worker", "index": 0}}, got '
            f"{_json_excerpt(task)}"
        )
    task_type, task_index = task.get("type"), task.get("index", 0)
    if task_type not in ("chief", "worker"):
        raise ValueError(
            f'TF_CONFIG task.type is {_json_excerpt(task_type)}; expected "worker" (or '
            '"chief") with an index'
        )
    # bool is an int in Python, and JSON's true would silently be worker 1.
    if isinstance(task_index, bool) or not isinstance(task_index, int):
        raise ValueError(
            f"TF_CONFIG task.index must be an integer (this worker's position in "
            f"cluster.{task_type}), got {_json_excerpt(task_index)}"
        )
    tasks = len(addresses)
    index = task_index if task_type == "chief" else len(chiefs) + task_index
    if not 0 <= task_index < len(chiefs if task_type == "chief" else workers):
        raise ValueError(
            f"TF_CONFIG's task {task_type}:{task_index} is not in its cluster of {tasks} tasks"
        )
    return tasks, index, addresses, fields


def _tf_config_addresses(cluster: Mapping[str, Any], job: str) -> tuple[str, ...]:
    """The "host:port" addresses of `cluster[job]`, each checked."""
    addresses = cluster.get(job, [])
    if isinstance(addresses, str):
        raise ValueError(
            f"TF_CONFIG cluster.{job} is a string ({_json_excerpt(addresses)}); it must be a list "
            f'of "host:port" addresses, e.g. ["{addresses.split(",")[0].strip() or "host:port"}"]'
        )
    if not isinstance(addresses, list):
        raise ValueError(
            f'TF_CONFIG cluster.{job} must be a list of "host:port" addresses, got '
            f"{_json_excerpt(addresses)}"
        )
    for position, address in enumerate(addresses):
        check_address(address, f"TF_CONFIG cluster.{job}[{position}]")
    return tuple(addresses)


def check_address(address: Any, field: str) -> tuple[str, int]:
    """(host, port) of a "host:port" address (an IPv6 host in brackets, "[::1]:2222").

    Raises:
        ValueError: naming `field`, when `address` is not a string of that form or its port is
            not a number in 1-65535.
    """
    if not isinstance(address, str):
        raise ValueError(f'{field} must be a "host:port" string, got {_json_excerpt(address)}')
    host, colon, port = address.strip().rpartition(":")
    if not colon or not host:
        raise ValueError(f'{field} is "{address}", not "host:port"; add the port')
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f'{field} is "{address}": its port "{port}" is not a number in 1-65535')
    return host.strip("[]"), int(port)


def _json_excerpt(value: Any, limit: int = 80) -> str:
    """`value` as the JSON a user wrote, shortened for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _slurm_tasks(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(number of tasks, this task's rank) of a Slurm job step (`srun`), or None outside one."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    rank = environ.get("SLURM_PROCID")
    if not tasks or rank is None:
        return None
    try:
        return int(tasks), int(rank)
    except ValueError:
        return None


def _jax_processes(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(number of processes, this process's id) from `KERAS_DISTRIBUTION_*`, or None."""
    count = environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "").strip()
    if not count:
        return None
    try:
        processes = int(count)
        index = int(environ.get("KERAS_DISTRIBUTION_PROCESS_ID", "0"))
    except ValueError:
        raise ValueError(
            "KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID must be "
            f"integers, got {count!r} and {environ.get('KERAS_DISTRIBUTION_PROCESS_ID')!r}"
        ) from None
    if not 0 <= index < processes:
        raise ValueError(
            f"KERAS_DISTRIBUTION_PROCESS_ID={index} must be in [0, {processes}) "
            "(KERAS_DISTRIBUTION_NUM_PROCESSES)"
        )
    if processes > 1 and not environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "").strip():
        raise ValueError(
            "KERAS_DISTRIBUTION_JOB_ADDRESSES must name the coordinator (process 0) as "
            "host:port when KERAS_DISTRIBUTION_NUM_PROCESSES > 1"
        )
    return processes, index


def _jax_coordinator(environ: Mapping[str, str]) -> str:
    """Process 0's "host:port": the first of `KERAS_DISTRIBUTION_JOB_ADDRESSES` (Keras takes the
    first of a comma-separated list as the coordinator)."""
    address = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "").split(",")[0].strip()
    check_address(address, "KERAS_DISTRIBUTION_JOB_ADDRESSES")
    return address


def _local_accelerators(backend: str) -> int:
    if backend == "jax":
        import jax

        return sum(1 for device in jax.local_devices() if device.platform != "cpu")
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU")) + len(tf.config.list_physical_devices("TPU"))


def plan_distribution(
    requested: str = "auto", *, environ: Mapping[str, str] | None = None
) -> DistributionPlan:
    """Resolve `--distribute` against the environment.

    Raises:
        ValueError: `multi_worker` without a cluster in the environment, or a malformed one.
    """
    environ = os.environ if environ is None else environ
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        if requested not in ("auto", "none"):
            raise ValueError(
                f"--distribute {requested} needs the tensorflow or jax backend, not {backend!r}"
            )
        return DistributionPlan("none", requested, f"the {backend} backend", backend)
    addresses: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    if backend == "tensorflow":
        tf_config, variables = _tf_config_workers(environ), "TF_CONFIG"
        cluster = None
        if tf_config is not None:
            workers, index, addresses, fields = tf_config
            cluster = (workers, index)
    else:
        cluster = _jax_processes(environ)
        variables = "KERAS_DISTRIBUTION_*"
    source = variables if cluster else ""
    if backend == "tensorflow" and cluster is None:
        slurm = _slurm_tasks(environ)
        if slurm is not None and slurm[0] > 1:
            cluster, source, variables = slurm, "Slurm", "the Slurm job step"
    if backend == "jax" and cluster is not None:
        source = "KERAS_DISTRIBUTION"
        if cluster[0] > 1:
            addresses = (_jax_coordinator(environ),)
            fields = ("KERAS_DISTRIBUTION_JOB_ADDRESSES",)
    workers, index = cluster or (1, 0)
    if requested == "multi_worker":
        if cluster is None:
            raise ValueError(
                f"--distribute multi_worker needs the cluster in the environment ({variables} "
                "on the backend "
                f"{backend}); see docs/distributed.md, or use --distribute data_parallel"
            )
        return DistributionPlan(
            "multi_worker", requested, "", backend, workers, index, source, addresses, fields
        )
    if requested in ("none", "data_parallel"):
        if workers > 1:
            raise ValueError(
                f"--distribute {requested} runs one process, but {variables} has {workers} "
                "workers; use --distribute multi_worker (or auto), or unset it"
            )
        return DistributionPlan(requested, requested, "", backend)
    if requested != "auto":
        raise ValueError(
            f"--distribute must be auto, none, data_parallel or multi_worker, got {requested!r}"
        )
    if workers > 1:
        reason = f"{workers} workers in {variables}"
        return DistributionPlan(
            "multi_worker", requested, reason, backend, workers, index, source, addresses, fields
        )
    accelerators = _local_accelerators(backend)
    if accelerators > 1:
        return DistributionPlan(
            "data_parallel", requested, f"{accelerators} local accelerators", backend
        )
    reason = "one local accelerator" if accelerators == 1 else "no accelerator"
    return DistributionPlan("none", requested, reason, backend)


@dataclasses.dataclass
class Distribution:
    """A started distribution: the strategy (TensorFlow) or `keras.distribution` (JAX) and the
    numbers every other part of the run needs.

    Attributes:
        plan: the `DistributionPlan` it was started from.
        num_replicas: model replicas over all workers (devices, for JAX).
        local_replicas: replicas of this process.
        devices: this process's devices, as the backend names them.
        strategy: the `tf.distribute.Strategy` (TensorFlow; the default strategy for `none`).
        engine: "tf.distribute.MirroredStrategy" etc., for the opening line.
        collective_timeout: seconds a step may wait for the other workers (TensorFlow
            multi-worker; `waiting_for_workers`).
        watchdog: what enforces `collective_timeout` (None where nothing waits for another
            process's collectives that could be aborted).
    """

    plan: DistributionPlan
    num_replicas: int
    local_replicas: int
    devices: list[str]
    strategy: Any = None
    engine: str = ""
    collective_timeout: float = 600.0
    watchdog: CollectiveWatchdog | None = dataclasses.field(default=None, repr=False)
    #: Traced collective functions, made once per distribution (`share_from_chief`, ...).
    functions: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def is_chief(self) -> bool:
        return self.plan.is_chief

    @property
    def num_workers(self) -> int:
        return self.plan.num_workers

    @property
    def worker_index(self) -> int:
        return self.plan.worker_index

    def scope(self) -> contextlib.AbstractContextManager:
        """Where the model and optimizer must be created (the strategy's scope on TensorFlow)."""
        if self.strategy is not None:
            return self.strategy.scope()
        return contextlib.nullcontext()

    def waiting_for_workers(
        self, what: str, seconds: float | None = None
    ) -> contextlib.AbstractContextManager:
        """Where this worker may wait for the others: the run fails when the block (`what`, for
        the message: "a training step") lasts longer than `seconds` (`--collective-timeout`
        when None) or that long since the last `renew_wait()`. Free where nothing is watched.
        """
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.bounded(self.collective_timeout if seconds is None else seconds, what)

    def renew_wait(self) -> None:
        """The current `waiting_for_workers` block is making progress: restart its clock."""
        if self.watchdog is not None:
            self.watchdog.renew()

    def host_local(self) -> contextlib.AbstractContextManager:
        """Where the chief works alone (checkpoints, exports): on JAX, without the global
        `keras.distribution`, so that what Keras creates meanwhile (saving builds a throwaway
        optimizer; the inference copy of the model) lives on this process's devices. Created
        under a multi-process distribution, each new variable would wait for the other
        processes to agree on its value, which they never do while the chief works alone."""
        if self.plan.backend != "jax" or self.plan.mode == "none":
            return contextlib.nullcontext()
        return _without_keras_distribution()

    def per_replica_batch_size(self, global_batch_size: int) -> int:
        """`global_batch_size / num_replicas`, or a ValueError naming the fix."""
        replicas = self.num_replicas
        if global_batch_size % replicas:
            lower = global_batch_size - global_batch_size % replicas
            examples = f"{lower} or {lower + replicas}" if lower else f"{replicas}"
            raise ValueError(
                f"--batch-size {global_batch_size} is the global batch and must divide evenly "
                f"among the {replicas} replicas; use a multiple of {replicas} such as {examples}"
            )
        return global_batch_size // self.num_replicas

    @property
    def input_batches_per_worker(self) -> int:
        """How many input-pipeline batches each worker contributes to one global batch: one per
        local replica on TensorFlow (each replica dequeues its own), one per process on JAX
        (a process feeds its devices one array that `DataParallel` splits)."""
        return self.local_replicas if self.plan.backend == "tensorflow" else 1

    def input_batch_size(self, global_batch_size: int) -> int:
        """The batch size of one input-pipeline element: per replica on TensorFlow, per
        process on JAX."""
        per_replica = self.per_replica_batch_size(global_batch_size)
        return per_replica * (self.local_replicas // self.input_batches_per_worker)

    def describe(self, global_batch_size: int, sync_bn: bool) -> str:
        """The opening line's account of the distribution: mode, replicas, batch split, BN."""
        plan = self.plan
        chosen = f"{plan.mode} (auto: {plan.reason})" if plan.requested == "auto" else plan.mode
        parts = [f"distribute {chosen}"]
        if self.engine:
            parts.append(self.engine)
        if plan.num_workers > 1:
            role = "the chief" if plan.is_chief else "not the chief"
            parts.append(f"worker {plan.worker_index} of {plan.num_workers} ({role})")
        replicas = f"{self.num_replicas} replica{'' if self.num_replicas == 1 else 's'}"
        if self.num_replicas > 1:
            per_replica = self.per_replica_batch_size(global_batch_size)
            replicas += f", global batch {global_batch_size} = {per_replica} per replica"
        parts.append(replicas)
        if self.num_replicas > 1:
            parts.append(_batch_norm_note(self, per_replica, sync_bn))
        elif sync_bn:
            parts.append("--sync-bn changes nothing with one replica")
        return "; ".join(parts)


@contextlib.contextmanager
def _without_keras_distribution() -> Iterator[None]:
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def _batch_norm_note(distribution: Distribution, per_replica: int, sync_bn: bool) -> str:
    if distribution.plan.backend == "jax":
        note = "BN statistics over the global batch (a JAX DataParallel batch is one array)"
        if sync_bn:
            note += "; --sync-bn is a no-op here"
        return note
    if sync_bn:
        return "BN statistics synchronized over the global batch (--sync-bn)"
    return f"BN statistics per replica of {per_replica} examples (--sync-bn for global)"


# --- Starting one --------------------------------------------------------------------------------


def _tf_local_devices() -> list[str]:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]


_MIRRORED_STRATEGIES_CREATED = 0


def mirrored_strategy(devices: Sequence[str]):
    """A `tf.distribute.MirroredStrategy` over `devices` that does not collide with the other
    strategies of this process.

    Every MirroredStrategy numbers its collective operations from the same start, so a second
    strategy in one process (a second `train()` in a notebook, a test suite) reuses the first
    one's collective keys and TensorFlow aborts its all-reduces ("Shape mismatch in the
    collective instance 100"). Each strategy made here gets its own range of keys through
    `MirroredStrategy._collective_key_base`, TensorFlow's hook for exactly this (it is
    documented for tests); tests/test_distribution.py fails loudly if that stops working.
    """
    import tensorflow as tf

    global _MIRRORED_STRATEGIES_CREATED
    _MIRRORED_STRATEGIES_CREATED += 1
    previous = tf.distribute.MirroredStrategy._collective_key_base
    tf.distribute.MirroredStrategy._collective_key_base = 100_000 * _MIRRORED_STRATEGIES_CREATED
    try:
        return tf.distribute.MirroredStrategy(list(devices))
    finally:
        tf.distribute.MirroredStrategy._collective_key_base = previous


@contextlib.contextmanager
def keeping_sigterm_handler() -> Iterator[None]:
    """Keep this process's SIGTERM handler through the block.

    TensorFlow's coordination service (started by `MultiWorkerMirroredStrategy`) and JAX's
    distributed runtime (`jax.distributed.initialize`) install a C++ SIGTERM handler, a
    preemption notifier for TensorFlow's `PreemptionCheckpointHandler` and JAX's preemption
    sync, which only logs "SIGTERM caught" and lets the process go on training: a `kill` or a
    scheduler stopping the job would not stop a worker. bnzoo uses neither mechanism; the
    handler it had before stays (train.py's turns SIGTERM into exit status 143 with how to
    resume; without one, SIGTERM ends the process as usual).
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set signal handlers
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python, nothing to restore it with
            signal.signal(signal.SIGTERM, previous)


def _start_tensorflow(plan: DistributionPlan, collective_timeout: float) -> Distribution:
    import tensorflow as tf

    if plan.mode == "none":
        strategy = tf.distribute.get_strategy()
        device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        return Distribution(plan, 1, 1, [device], strategy)
    if plan.mode == "data_parallel":
        devices = _tf_local_devices()
        strategy = mirrored_strategy(devices)
        replicas = strategy.num_replicas_in_sync
        return Distribution(
            plan, replicas, replicas, devices, strategy, "tf.distribute.MirroredStrategy"
        )
    # No timeout_seconds: TensorFlow would start a thread per collective operation, sleeping
    # for the whole timeout (bnzoo.collective_watchdog); the watchdog below bounds the waits.
    options = tf.distribute.experimental.CommunicationOptions()
    resolver = None
    if plan.cluster_source == "Slurm":
        # The hosts come from `scontrol show hostnames`, ports from 8888 up, GPUs per task
        # from the node's GPUs and the tasks per node.
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
    try:
        with keeping_sigterm_handler():
            strategy = tf.distribute.MultiWorkerMirroredStrategy(
                cluster_resolver=resolver, communication_options=options
            )
    except tf.errors.UnknownError as error:
        if "gRPC server" not in str(error):
            raise
        # The port was free when the workers met (bnzoo.rendezvous), then taken.
        address = plan.addresses[plan.worker_index] if plan.addresses else "this worker's port"
        raise ValueError(
            f"worker {plan.worker_index} of {plan.num_workers}: TensorFlow could not listen on "
            f"{address}: another process took the port; free it and restart every worker"
        ) from None
    except RuntimeError as error:
        # TensorFlow can configure collectives only before its runtime starts.
        raise RuntimeError(
            "MultiWorkerMirroredStrategy must be created before TensorFlow runs any operation "
            f"in this process: start the run from a fresh process (train.py) ({error})"
        ) from error
    replicas = strategy.num_replicas_in_sync
    if replicas % plan.num_workers:
        raise ValueError(
            f"the {plan.num_workers} workers have {replicas} replicas in all, which is not the "
            "same number on every worker; give every worker the same devices"
        )
    local = replicas // plan.num_workers

    def abort(message: str) -> None:
        from tensorflow.python.eager import context

        # What MultiWorkerMirroredStrategy's own health check did on a lost peer: every
        # pending and later collective of this process fails with `message`.
        context.context().abort_collective_ops(tf.errors.DEADLINE_EXCEEDED, message)

    return Distribution(
        plan,
        replicas,
        local,
        _tf_local_devices()[:local],
        strategy,
        "tf.distribute.MultiWorkerMirroredStrategy",
        collective_timeout=collective_timeout,
        watchdog=CollectiveWatchdog(abort),
    )


def _with_slurm_addresses(plan: DistributionPlan) -> DistributionPlan:
    """`plan` with the Slurm job step's worker addresses, as TensorFlow's resolver makes them."""
    import tensorflow as tf

    spec = tf.distribute.cluster_resolver.SlurmClusterResolver().cluster_spec().as_dict()
    addresses = tuple(spec.get("worker", []))
    fields = tuple(f"the Slurm job step's task {index}" for index in range(len(addresses)))
    return dataclasses.replace(plan, addresses=addresses, address_fields=fields)


def _start_jax(plan: DistributionPlan) -> Distribution:
    import jax

    if plan.mode == "multi_worker":
        if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
            # CPU devices of different processes talk through gloo; without it JAX refuses any
            # computation that spans processes. GPUs and TPUs use their own collectives.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        with keeping_sigterm_handler():
            keras.distribution.initialize()
    if plan.mode == "none":
        keras.distribution.set_distribution(None)
        device = jax.local_devices()[0]
        return Distribution(plan, 1, 1, [str(device)])
    devices = jax.devices() if plan.mode == "multi_worker" else jax.local_devices()
    # The input pipeline shards the data itself (keep_worker_share); Keras' automatic sharding
    # would make every process preprocess every image first.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    )
    local = len(jax.local_devices())
    return Distribution(
        plan,
        len(devices),
        local,
        [str(device) for device in jax.local_devices()],
        engine="keras.distribution.DataParallel",
    )


@contextlib.contextmanager
def start_distribution(
    plan: DistributionPlan,
    *,
    collective_timeout: float = 600.0,
    identity: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[Distribution]:
    """Create the strategy (TensorFlow) or set the Keras distribution (JAX) for `plan`.

    With several workers, they first meet (`bnzoo.rendezvous.meet_other_workers`): each waits
    at most `collective_timeout` for the others, saying whom it waits for, and all of them stop
    with one line when their `identity` differs. On JAX the previous global
    `keras.distribution` is restored on exit. Must run before the backend's runtime has started
    when `plan.mode` is multi_worker.

    Args:
        plan: from `plan_distribution`.
        collective_timeout: seconds to wait for the other workers to start, and (TensorFlow
            multi-worker) that a step may wait for them (`Distribution.waiting_for_workers`).
        identity: the run's identity (`TrainConfig.identity()`), which every worker must share.
        log: where the lines about waiting for the other workers go.
    """
    if plan.mode == "multi_worker" and plan.num_workers > 1:
        from bnzoo.rendezvous import meet_other_workers

        if plan.cluster_source == "Slurm" and not plan.addresses:
            plan = _with_slurm_addresses(plan)
        meet_other_workers(plan, timeout=collective_timeout, identity=identity or {}, log=log)
    if plan.backend == "jax":
        previous = keras.distribution.distribution()
        try:
            yield _start_jax(plan)
        finally:
            keras.distribution.set_distribution(previous)
        return
    with contextlib.ExitStack() as stack:
        if plan.mode == "multi_worker":
            stack.enter_context(instance_keys_fixed_when_traced())
        distribution = _start_tensorflow(plan, collective_timeout)
        if distribution.watchdog is not None:
            stack.callback(distribution.watchdog.close)
        yield distribution


@contextlib.contextmanager
def instance_keys_fixed_when_traced() -> Iterator[None]:
    """Inside the block, a traced collective keeps the instance key it was traced with.

    By default (`CollectiveReplicaLauncher._prefer_unique_instance_key`), TensorFlow gives every
    *execution* of a traced collective a new instance key, and each worker's collective
    parameter resolver keeps a record per instance key for the life of the process (its
    `instance_table_` is never pruned): about 1.6 KB per collective, measured on localhost as
    16 MiB per 10,000 all-reduces, growing without end (a few MiB per epoch of plain_cnn;
    hundreds with --sync-bn on a large model). With the key fixed when the step is traced, the
    same records serve every step, and the measured growth is 0.

    Why TensorFlow prefers unique keys: workers that retrace a function at different times
    would number its collectives differently. bnzoo's workers trace the same functions in the
    same order (every worker runs the same loop over batches of the same shapes; only the
    chief's own work, which runs no collective, differs), which is also what unique keys,
    drawn from the same per-worker counter at each call, already require.
    """
    from tensorflow.python.distribute import cross_device_utils

    launcher = cross_device_utils.CollectiveReplicaLauncher
    previous = launcher._prefer_unique_instance_key
    launcher._prefer_unique_instance_key = False
    try:
        yield
    finally:
        launcher._prefer_unique_instance_key = previous


# --- Splitting the data --------------------------------------------------------------------------


def keep_worker_share(
    batches,
    *,
    num_workers: int,
    worker_index: int,
    batches_per_worker: int,
    steps: int | None = None,
):
    """This worker's share of a stream of input batches that every worker builds identically.

    The stream's consecutive groups of `num_workers * batches_per_worker` input batches form
    the global batches; worker w keeps the `batches_per_worker` batches at position w of each
    group. `steps` keeps only that many global batches (a training epoch's full ones).

    Applied to uint8 batches before preprocessing (`make_pipeline(select_batches=...)`), so a
    worker decodes every image but preprocesses and augments only its own.
    """
    if steps is not None:
        batches = batches.take(steps * num_workers * batches_per_worker)
    if num_workers == 1:
        return batches
    return (
        batches.batch(batches_per_worker, drop_remainder=True)
        .shard(num_workers, worker_index)
        .unbatch()
    )


def pad_to_whole_global_batches(batches, *, batch_size: int, num_examples: int, group: int):
    """Evaluation batches that every replica can run in lock-step: each input batch padded to
    `batch_size` with examples labelled -1, and all-padding batches appended up to a multiple
    of `group` (input batches per global batch). One-hot encoding turns label -1 into a zero
    vector, which gives padding the weight 0 in every metric.
    """
    import tensorflow as tf

    def pad(images, labels):
        missing = batch_size - tf.shape(images)[0]
        images = tf.pad(images, [[0, missing]] + [[0, 0]] * (images.shape.rank - 1))
        labels = tf.pad(labels, [[0, missing]], constant_values=-1)
        return images, labels

    batches = batches.map(pad)
    count = -(-num_examples // batch_size)
    extra = -count % group
    if extra:
        image_spec, label_spec = batches.element_spec
        filler = tf.data.Dataset.from_tensors(
            (
                tf.zeros([batch_size, *image_spec.shape[1:]], image_spec.dtype),
                tf.fill([batch_size], tf.constant(-1, label_spec.dtype)),
            )
        ).repeat(extra)
        batches = batches.concatenate(filler)
    return batches


def describe_collective_failure(error: BaseException, plan: DistributionPlan) -> str | None:
    """A one-line account of a lost worker, or None when `error` is something else."""
    text = " ".join(str(error).split())
    if TIMEOUT_MARKER in text:
        cause = text[text.index(TIMEOUT_MARKER) + len(TIMEOUT_MARKER) :].lstrip(": ")
        cause = cause.split(" (--collective-timeout)")[0]
        return (
            f"worker {plan.worker_index} of {plan.num_workers}: {cause} (--collective-timeout), "
            "so this one stops; restart every worker with the same command to resume after the "
            "last finished epoch, with a higher --collective-timeout if a worker is only slow"
        )
    markers = (
        "stopped sending heartbeats",
        "Connection reset by peer",
        "Socket closed",
        "Collective ops is aborted",
        "failed to connect",
        "Deadline Exceeded",
        "timed out",
        "unhealthy",
    )
    if not any(marker.lower() in text.lower() for marker in markers):
        return None
    return (
        f"worker {plan.worker_index} of {plan.num_workers}: another worker stopped or stopped "
        "answering, so this one stops too; restart every worker with the same command to "
        "resume after the last finished epoch"
    )


# --- Agreeing across workers and replicas ---------------------------------------------------------

#: Waits for the chief's own work (writing a checkpoint, exporting) get this long, not
#: `--collective-timeout`: how long that work takes depends on the model and the disk. A dead
#: chief is still detected at once (its connections close).
CHIEF_WAIT_TIMEOUT_SECONDS = 24 * 3600.0
#: What such a wait is called in the message when it runs out.
WAITING_FOR_THE_CHIEF = "waiting for worker 0 (the chief)"


def _tf_chief_values(distribution: Distribution, read_tensors):
    """Every replica gets the chief's (replica 0's) values of the tensors that `read_tensors()`
    returns, as float64: an all-reduce SUM to which only replica 0 contributes."""
    import tensorflow as tf

    strategy = distribution.strategy

    def replica_fn():
        context = tf.distribute.get_replica_context()
        is_source = tf.equal(context.replica_id_in_sync_group, 0)
        sent = [
            tf.where(is_source, tf.cast(t, tf.float64), tf.zeros_like(t, tf.float64))
            for t in read_tensors()
        ]
        return context.all_reduce(tf.distribute.ReduceOp.SUM, sent)

    with distribution.waiting_for_workers(WAITING_FOR_THE_CHIEF, CHIEF_WAIT_TIMEOUT_SECONDS):
        reduced = strategy.run(tf.function(replica_fn, autograph=False))
    return [strategy.experimental_local_results(value)[0] for value in reduced]


def share_from_chief(distribution: Distribution, values: Sequence[float]) -> list[float]:
    """The chief's `values` on every worker (the others pass placeholders of the same length).
    Waits for the chief as long as it takes; used to hand out what only the chief knows and as
    a barrier after the chief's own work."""
    import numpy as np

    if distribution.num_workers == 1:
        return [float(value) for value in values]
    vector = np.asarray(values, np.float64)
    if distribution.plan.backend == "jax":
        from jax.experimental import multihost_utils

        shared = multihost_utils.broadcast_one_to_all(vector, is_source=distribution.is_chief)
        return [float(value) for value in np.asarray(shared)]
    key = f"share_from_chief/{len(vector)}"
    share = distribution.functions.get(key)
    if share is None:
        import tensorflow as tf

        # One traced function per length, not one per call. Not one for every length: the
        # all-reduce keeps the instance key it was traced with (instance_keys_fixed_when_traced),
        # and TensorFlow refuses a second shape under the same key.
        strategy = distribution.strategy

        def replica_fn(vector):
            context = tf.distribute.get_replica_context()
            is_source = tf.equal(context.replica_id_in_sync_group, 0)
            sent = tf.where(is_source, vector, tf.zeros_like(vector))
            return context.all_reduce(tf.distribute.ReduceOp.SUM, sent)

        @tf.function(input_signature=[tf.TensorSpec([len(vector)], tf.float64)], autograph=False)
        def share(vector):
            return strategy.run(replica_fn, args=(vector,))

        distribution.functions[key] = share
    with distribution.waiting_for_workers(WAITING_FOR_THE_CHIEF, CHIEF_WAIT_TIMEOUT_SECONDS):
        shared = distribution.strategy.experimental_local_results(share(vector))[0]
    return [float(value) for value in shared.numpy()]


def broadcast_variables_from_chief(distribution: Distribution, variables: Sequence) -> None:
    """Give every worker the chief's values of `variables` (Keras variables: the model's and
    the optimizer's). Only the chief reads the checkpoint; this is how the others resume."""
    if distribution.num_workers == 1 or not variables:
        return
    import numpy as np

    if distribution.plan.backend == "jax":
        from jax.experimental import multihost_utils

        local = [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]
        shared = multihost_utils.broadcast_one_to_all(local, is_source=distribution.is_chief)
        for variable, value in zip(variables, shared, strict=True):
            variable.assign(np.asarray(value))
        return
    shared = _tf_chief_values(distribution, lambda: [v.value for v in variables])
    with distribution.scope():
        for variable, value in zip(variables, shared, strict=True):
            variable.assign(keras.ops.cast(value, variable.dtype))


def average_replica_local_variables(distribution: Distribution, model: keras.Model) -> int:
    """Average, over all replicas, the model's variables that each replica updates on its own.

    Keras' own BatchNormalization creates its moving statistics with aggregation "none": under
    tf.distribute every replica keeps its own moving averages, and a saved model would hold
    whichever replica saved it. bnzoo's layer uses aggregation "mean", which averages every
    update, so its replicas never differ. The moving average is linear, so averaging once per
    epoch gives exactly what averaging every update gives. Returns how many were averaged.
    """
    if distribution.num_replicas == 1 or distribution.plan.backend != "tensorflow":
        return 0
    import tensorflow as tf

    local = [
        v
        for v in model.non_trainable_variables
        if v.aggregation == "none" and keras.backend.standardize_dtype(v.dtype).startswith("float")
    ]
    if not local:
        return 0
    strategy = distribution.strategy
    key = f"average_replica_local_variables/{id(model)}"
    average = distribution.functions.get(key)
    if average is None:

        def replica_fn():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, [v.value for v in local])

        average = tf.function(lambda: strategy.run(replica_fn), autograph=False)
        distribution.functions[key] = average
    with distribution.waiting_for_workers("averaging the replicas' BN statistics"):
        averaged = average()
    with distribution.scope():
        for variable, value in zip(local, averaged, strict=True):
            variable.assign(strategy.experimental_local_results(value)[0])
    return len(local)
