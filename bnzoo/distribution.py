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
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras

from bnzoo.collective_watchdog import TIMEOUT_MARKER, CollectiveWatchdog
from bnzoo.distribution_plan import DistributionPlan, plan_distribution

__all__ = ["DistributionPlan", "plan_distribution"]  # decided in bnzoo.distribution_plan


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
        when None). Free where nothing is watched.
        """
        if self.watchdog is None:
            return contextlib.nullcontext()
        return self.watchdog.bounded(self.collective_timeout if seconds is None else seconds, what)

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
    """
    if plan.mode == "multi_worker" and plan.num_workers > 1:
        from bnzoo.rendezvous import meet_other_workers

        if plan.cluster_source == "Slurm" and not plan.addresses:
            plan = _with_slurm_addresses(plan)
        meet_other_workers(plan, timeout=collective_timeout, identity=identity or {})
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
