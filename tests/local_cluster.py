"""Clusters of worker processes on localhost, for the tests that start several: free ports and
each worker's environment, with the cluster as its backend reads it (TF_CONFIG on TensorFlow,
KERAS_DISTRIBUTION_* on JAX)."""

import contextlib
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(count):
    """`count` ports that were free a moment ago (each bound once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def worker_environment(ports, index, backend="tensorflow", **extra):
    """The environment of worker `index` of the cluster on localhost `ports`: this checkout
    importable, the Keras backend, the cluster, then `extra` variables."""
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": backend}
    if backend == "tensorflow":
        cluster = {"worker": [f"localhost:{port}" for port in ports]}
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
    else:
        env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = f"localhost:{ports[0]}"
        env["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(len(ports))
        env["KERAS_DISTRIBUTION_PROCESS_ID"] = str(index)
    env.update(extra)
    return env


@contextlib.contextmanager
def python_workers(code, *args, cwd, count=2, **extra):
    """`count` processes running `python -c code args`, the workers of one TensorFlow cluster on
    localhost (`extra`: more environment variables), their output piped as text. Killed on exit.
    """
    ports = free_ports(count)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=cwd,
            env=worker_environment(ports, index, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(count)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()
