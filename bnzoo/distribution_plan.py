"""Which distribution mode a run uses and this process's place in it, decided from the command
line and the environment alone: `TF_CONFIG`, Slurm's variables, `KERAS_DISTRIBUTION_*`, the local
accelerators. Nothing here starts TensorFlow's or JAX's runtime (multi-worker collectives must
be configured before it starts), so `bnzoo.rendezvous` can meet the other workers first and
`bnzoo.distribution` start the runtime after.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import keras


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
