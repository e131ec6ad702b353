"""train.py beyond one process (issue 9): two TensorFlow workers on localhost (TF_CONFIG) train
one run folder and, with synchronized BN, compute what one process computes; a killed worker
stops the other within seconds and a restart resumes; data_parallel on the two logical CPUs of
conftest.py resumes on one device; JAX trains with two processes (gloo CPU collectives)."""

import csv
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import wait_until
from local_cluster import free_ports, python_workers, worker_environment
from rounding import error_scale, probable_gamma, unit_roundoff

from bnzoo.cli import run_cli
from bnzoo.config import TrainConfig
from bnzoo.run_folder import RunPaths, read_checkpoint_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "train_split": "train[:512]",
    "val_split": "train[512:600]",  # 88 examples: the last batch is padded
    "test_split": "test[:128]",
    "epochs": 2,
    "batch_size": 64,
    # No dropout: its masks depend on how the batch is split, BN's statistics must not.
    "model_args": {"widths": [8, 16], "dropout_rate": 0.0},
}


def argv_of(config_values, output_dir, *extra):
    argv = []
    for key, value in config_values.items():
        flag = "--" + key.replace("_", "-")
        if key == "model_args":
            for name, arg in value.items():
                argv += ["--model-arg", f"{name}={json.dumps(arg)}"]
        else:
            argv += [flag, str(value)]
    return [*argv, *extra, "--output-dir", output_dir]


def start_workers(argv, tmp_path, name, count=2, backend="tensorflow"):
    """`count` train.py processes forming one cluster on localhost, each in its own empty
    working directory; `argv` is every worker's arguments, or a list of each one's. Returns
    [(process, stdout path, stderr path, cwd)]."""
    argvs = argv if isinstance(argv[0], list) else [argv] * count
    ports = free_ports(count)
    workers = []
    for index in range(count):
        env = worker_environment(ports, index, backend)
        cwd = tmp_path / f"{name}-worker{index}"
        cwd.mkdir()
        out, err = cwd.parent / f"{name}-{index}.out", cwd.parent / f"{name}-{index}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "train.py"), *argvs[index]],
                cwd=cwd,
                env=env,
                stdout=stdout,
                stderr=stderr,
            )
        workers.append((process, out, err, cwd))
    return workers


def finish(workers, timeout=600):
    deadline = time.monotonic() + timeout
    for process, *_ in workers:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other, *_ in workers:
                other.kill()
            raise
    return [
        (process.returncode, out.read_text(), err.read_text()) for process, out, err, _ in workers
    ]


def history(run_dir):
    with open(RunPaths(run_dir).history, newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [{key: float(value) for key, value in row.items() if value} for row in rows]


def moving_statistics(path):
    import layers  # noqa: F401
    import models  # noqa: F401

    model = keras.models.load_model(path, compile=False)
    return {
        weight.path: keras.ops.convert_to_numpy(weight)
        for weight in model.weights
        if "moving_" in weight.path
    }


@pytest.mark.slow
def test_two_workers_with_sync_bn_compute_what_one_process_computes(tmp_path):
    """Same global batches (every worker keeps its half of each), same initial weights, BN over
    the global batch: the two-worker run's losses, accuracies and moving statistics are one
    process's up to float rounding. Only the chief writes, and only into the run folder."""
    from bnzoo.training import train

    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    # float32 on both sides: the comparison is about the all-reduce's rounding, which the
    # automatic bfloat16 policy of a CPU with AVX512-BF16 would drown.
    extra = ["--sync-bn", "--bn-statistics", "moving", "--no-mixed-precision"]
    workers = start_workers(argv_of(TINY, two, *extra), tmp_path, "sync")
    config = TrainConfig(
        **TINY,
        sync_bn=True,
        bn_statistics="moving",
        distribute="none",
        mixed_precision=False,
        output_dir=one,
    )
    train(config)
    (rc0, out0, err0), (rc1, out1, err1) = finish(workers)
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]

    assert "worker 0 of 2 (the chief); 2 replicas, global batch 64 = 32 per replica" in out0
    assert "BN statistics synchronized over the global batch (--sync-bn)" in out0
    assert "worker 1 of 2 (not the chief)" in out1 and "run folder" not in out1
    epoch_lines = [line for line in out0.splitlines() if line.startswith("epoch ")]
    assert [line.split("lr")[0] for line in epoch_lines] == [
        line.split("lr")[0] for line in out1.splitlines() if line.startswith("epoch ")
    ]

    expected, actual = history(one), history(two)
    assert [row["epoch"] for row in actual] == [1, 2]
    # Rounding differs (the one process runs TensorFlow's fused BN kernel, the workers two
    # all-reduces; each CPU sums in its own order), and each of the 16 SGD steps adds its share.
    # The largest sum of a step is BN's statistics over the global batch's 64 x 28 x 28 values,
    # known to probable_gamma(50,176) = 8.0e-5 of their scale; 16 steps: 1.3e-3. A broken
    # --sync-bn (statistics per replica) moves these by 2.5e-3 (loss) to 2.5e-2 (variance).
    tolerance = 16 * probable_gamma(64 * 28 * 28)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            [row[key] for row in actual],
            [row[key] for row in expected],
            rtol=tolerance,
            err_msg=key,
        )
    # The schedule is a float32 cosine of the same step count on both sides: a few roundings.
    np.testing.assert_allclose(
        [row["learning_rate"] for row in actual],
        [row["learning_rate"] for row in expected],
        rtol=8 * unit_roundoff("float32"),
    )
    # A logit pair within rounding of a tie may rank either way: one of the 88 examples.
    for key in ("accuracy", "val_accuracy"):
        np.testing.assert_allclose(
            [row[key] for row in actual], [row[key] for row in expected], atol=2 / 88, err_msg=key
        )
    reference = moving_statistics(os.path.join(one, "model.keras"))
    for name, value in moving_statistics(os.path.join(two, "model.keras")).items():
        if name.endswith("moving_mean"):
            # A mean's rounding error is relative to the values' scale, not to the mean: a
            # channel whose mean is near 0 is known to `tolerance` of its RMS, absolutely.
            variance = reference[name.replace("moving_mean", "moving_variance")]
            scale = error_scale(reference[name], variance)
            np.testing.assert_allclose(
                value / scale, reference[name] / scale, rtol=0, atol=tolerance, err_msg=name
            )
        else:
            np.testing.assert_allclose(value, reference[name], rtol=tolerance, err_msg=name)

    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    for _, _, _, cwd in workers:
        assert os.listdir(cwd) == [], cwd


@pytest.mark.slow
@pytest.mark.extended
def test_a_killed_worker_stops_the_other_in_seconds_and_a_restart_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    paths = RunPaths(run_dir)
    values = {**TINY, "train_split": "train[:1536]", "batch_size": 32, "test_split": "none"}
    argv = argv_of(values, run_dir)
    workers = start_workers(argv, tmp_path, "first")
    (chief, *_), (victim, *_) = workers
    try:
        wait_until(
            lambda: read_checkpoint_state(paths.last_checkpoint) is not None,
            [chief, victim],
            "the first epoch never finished",
            output=workers[0][2].read_text,
        )
        time.sleep(0.5)  # into the second epoch's 48 steps
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        chief.wait(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        for process, *_ in workers:
            if process.poll() is None:
                process.kill()
    assert read_checkpoint_state(paths.last_checkpoint)["epoch"] == 1, "killed too late"
    err = workers[0][2].read_text()
    assert chief.returncode == 1, err[-3000:]
    # TensorFlow's heartbeat timeout is 10 s; the rest is slack for a loaded machine.
    assert stopped_after < 60
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "train.py: error: worker 0 of 2: another worker stopped or stopped answering, so this "
        "one stops too; restart every worker with the same command to resume after the last "
        "finished epoch"
    )

    (rc0, out0, err0), (rc1, _, err1) = finish(start_workers(argv, tmp_path, "restart"))
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert f"resuming {run_dir} after epoch 1 of 2" in out0
    assert [line.split()[1] for line in out0.splitlines() if line.startswith("epoch ")] == ["2/2"]
    assert [row["epoch"] for row in history(run_dir)] == [1, 2]
    import layers  # noqa: F401
    import models  # noqa: F401

    checkpoint = keras.models.load_model(paths.last_checkpoint)
    assert int(checkpoint.optimizer.iterations) == 2 * 1536 // 32


@pytest.mark.slow
@pytest.mark.extended
def test_a_worker_lost_in_the_first_epoch_leaves_no_run_folder(tmp_path):
    """Issue 12's rule with issue 9's workers: a run that never committed an epoch leaves
    nothing that blocks the retry. The terminated worker says how to continue; the chief, the
    only writer, stops on the lost worker and removes the folder it created."""
    run_dir = str(tmp_path / "run")
    values = {**TINY, "train_split": "train[:1536]", "batch_size": 32, "test_split": "none"}
    workers = start_workers(argv_of(values, run_dir), tmp_path, "first")
    (chief, *_), (victim, victim_out, *_) = workers
    try:
        # Every worker prints the opening line just before its first epoch.
        wait_until(
            lambda: "training plain_cnn" in victim_out.read_text(),
            [chief, victim],
            "the first epoch never started",
            output=workers[0][2].read_text,
        )
        time.sleep(0.5)  # into the first epoch's 48 steps
        assert not os.path.exists(RunPaths(run_dir).last_checkpoint), "terminated too late"
        victim.send_signal(signal.SIGTERM)
        (rc0, out0, err0), (rc1, _, err1) = finish(workers, timeout=180)
    finally:
        for process, *_ in workers:
            if process.poll() is None:
                process.kill()
    assert rc1 == 143, err1[-3000:]
    assert err1.splitlines()[-1] == (
        "train.py: terminated; restarting every worker with the same command resumes after the "
        "last epoch that worker 0 committed"
    )
    assert rc0 == 1, err0[-3000:]
    assert err0.splitlines()[-1].startswith("train.py: error: worker 0 of 2: another worker")
    assert f"removed {run_dir}: the run stopped before finishing an epoch" in out0
    assert not os.path.exists(run_dir)


@pytest.mark.slow
@pytest.mark.extended
def test_a_terminated_jax_process_stops_at_once_with_how_to_continue(tmp_path):
    """JAX's distributed runtime swallows SIGTERM (its preemption notifier) and, at exit, waits
    5 minutes at a shutdown barrier that a process blocked in a collective never reaches. The
    terminated process keeps train.py's handler and ends at once with status 143; the others
    see it gone as after kill -9 (docs/distributed.md), which this test does not wait for."""
    run_dir = str(tmp_path / "run")
    values = {**TINY, "train_split": "train[:1536]", "batch_size": 32, "test_split": "none"}
    workers = start_workers(argv_of(values, run_dir), tmp_path, "jax", backend="jax")
    (chief, *_), (victim, victim_out, victim_err, _) = workers
    try:
        wait_until(
            lambda: "training plain_cnn" in victim_out.read_text(),
            [chief, victim],
            "the first epoch never started",
            output=victim_err.read_text,
        )
        time.sleep(0.5)
        victim.send_signal(signal.SIGTERM)
        victim.wait(timeout=30)
    finally:
        for process, *_ in workers:
            if process.poll() is None:
                process.kill()
    assert victim.returncode == 143, victim_err.read_text()[-3000:]
    assert victim_err.read_text().splitlines()[-1] == (
        "train.py: terminated; restarting every worker with the same command resumes after the "
        "last epoch that worker 0 committed"
    )


class StopAfterFirstEpoch(Exception):
    pass


class _StopAtFirstEpochLine(logging.Handler):
    """Stops the run from inside its epoch-1 line: a handler's exception reaches the caller."""

    def emit(self, record):
        if record.getMessage().startswith("epoch 1/2"):
            raise StopAfterFirstEpoch


@pytest.mark.slow
def test_a_data_parallel_run_resumes_on_one_device(tmp_path, logged_lines):
    """Two replicas train the first epoch; one device trains the second. The checkpoint holds
    no per-replica state, and the global batch (hence the data order) does not change."""
    from bnzoo.training import train

    run_dir = str(tmp_path / "run")
    config = TrainConfig(**TINY, distribute="data_parallel", output_dir=run_dir)
    stop = _StopAtFirstEpochLine()
    logging.getLogger("bnzoo").addHandler(stop)
    try:
        with pytest.raises(StopAfterFirstEpoch):
            train(config)
    finally:
        logging.getLogger("bnzoo").removeHandler(stop)
    lines = logged_lines()
    assert "distribute data_parallel; tf.distribute.MirroredStrategy; 2 replicas" in lines[1]
    assert read_checkpoint_state(RunPaths(run_dir).last_checkpoint)["epoch"] == 1

    result = train(TrainConfig(**TINY, distribute="none", output_dir=run_dir))
    resumed = logged_lines()[len(lines) :]
    assert resumed[0] == f"resuming {run_dir} after epoch 1 of 2"
    assert "distribute none; 1 replica" in resumed[1]
    assert (result.epochs_completed, result.resumed_from_epoch) == (2, 1)
    assert [row["epoch"] for row in history(run_dir)] == [1, 2]
    import models  # noqa: F401

    checkpoint = keras.models.load_model(RunPaths(run_dir).last_checkpoint)
    assert int(checkpoint.optimizer.iterations) == 2 * 512 // 64


@pytest.mark.slow
def test_a_batch_that_does_not_divide_among_replicas_is_one_line(tmp_path, capsys):
    train_script = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(train_script)
    train_script.loader.exec_module(module)
    output_dir = str(tmp_path / "run")
    argv = argv_of({**TINY, "batch_size": 63}, output_dir, "--distribute", "data_parallel")
    assert run_cli(module.main, argv, prog="train.py") == 1
    err = capsys.readouterr().err
    assert err == (
        "train.py: error: --batch-size 63 is the global batch and must divide evenly among the "
        "2 replicas; use a multiple of 2 such as 62 or 64\n"
    )
    assert not os.path.exists(output_dir)


@pytest.mark.slow
@pytest.mark.extended
def test_two_jax_processes_train_one_run_folder(tmp_path):
    """keras.distribution.initialize from KERAS_DISTRIBUTION_*, DataParallel over both
    processes' devices, gloo for the CPU collectives; only process 0 writes."""
    run_dir = str(tmp_path / "run")
    workers = start_workers(argv_of(TINY, run_dir), tmp_path, "jax", backend="jax")
    (rc0, out0, err0), (rc1, out1, err1) = finish(workers)
    assert (rc0, rc1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert "keras.distribution.DataParallel; worker 0 of 2 (the chief); 2 replicas" in out0
    assert "BN statistics over the global batch" in out0
    epochs = [
        [line.split("lr")[0] for line in out.splitlines() if line.startswith("epoch ")]
        for out in (out0, out1)
    ]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]
    paths = RunPaths(run_dir)
    for path in (paths.model, paths.metrics, os.path.join(paths.saved_model, "saved_model.pb")):
        assert os.path.exists(path), path
    assert [row["epoch"] for row in history(run_dir)] == [1, 2]
    for _, _, _, cwd in workers:
        assert os.listdir(cwd) == [], cwd


# --- Starting: waiting for the others, signals, bad TF_CONFIG, workers that disagree -------------


def wait_for_line(path, text, process, timeout=180):
    wait_until(
        lambda: text in path.read_text(),
        [process],
        f"never printed {text!r}",
        output=path.read_text,
        timeout=timeout,
    )


def lone_worker(tmp_path, name, *extra, index=0):
    """Worker `index` of a two-worker TF_CONFIG cluster whose other worker never starts."""
    run_dir = tmp_path / f"{name}-run"
    values = {**TINY, "epochs": 1, "test_split": "none"}
    ports = free_ports(2)
    env = worker_environment(ports, index)
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), *argv_of(values, str(run_dir))]
            + list(extra),
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    return process, out, err, run_dir, ports


@pytest.mark.slow
def test_a_worker_whose_peer_never_starts_says_so_and_gives_up_after_the_timeout(tmp_path):
    process, out, err, run_dir, ports = lone_worker(tmp_path, "lone", "--collective-timeout", "10")
    try:
        process.wait(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 1, err.read_text()[-3000:]
    assert err.read_text().splitlines() == [
        f"train.py: error: worker 0 of 2: worker 1 at localhost:{ports[1]} did not start within "
        "10 s (--collective-timeout); start every worker with the same command, or raise "
        "--collective-timeout"
    ]
    assert (
        f"worker 0 of 2 (the chief): waiting for worker 1 at localhost:{ports[1]} to start "
        "(up to 10 s, --collective-timeout)"
    ) in out.read_text().splitlines()
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, status, index, message",
    [
        (
            signal.SIGTERM,
            143,
            0,
            "train.py: terminated before the first epoch finished; nothing was kept, so "
            "restarting every worker with the same command starts the run again",
        ),
        (
            signal.SIGINT,
            130,
            1,
            "train.py: interrupted; restarting every worker with the same command resumes after "
            "the last epoch that worker 0 committed",
        ),
    ],
    ids=["sigterm-chief", "sigint-worker"],
)
def test_a_worker_waiting_for_its_peers_stops_on_a_signal(tmp_path, signum, status, index, message):
    """TensorFlow waits for the peers in a native call that holds the GIL: no Python signal
    handler ran there, and only kill -9 stopped such a worker."""
    process, out, err, run_dir, _ = lone_worker(tmp_path, "signal", index=index)
    try:
        wait_for_line(out, "waiting for worker", process)
        process.send_signal(signum)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == status, err.read_text()[-3000:]
    assert err.read_text().splitlines() == [message]
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_tf_config_whose_worker_list_is_a_string_is_one_line_and_exit_1(tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "KERAS_BACKEND": "tensorflow",
        "TF_CONFIG": json.dumps(
            {"cluster": {"worker": "localhost:2222"}, "task": {"type": "worker", "index": 0}}
        ),
    }
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *argv_of(TINY, str(run_dir))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        'train.py: error: TF_CONFIG cluster.worker is a string ("localhost:2222"); it must be a '
        'list of "host:port" addresses, e.g. ["localhost:2222"]'
    ]
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_port_in_use_is_one_line_naming_the_address(tmp_path):
    process, out, err, run_dir, ports = lone_worker(tmp_path, "port", index=1)
    holder = socket.create_server(("", ports[1]))
    try:
        process.wait(timeout=240)
    finally:
        process.kill()
        holder.close()
    assert process.returncode == 1, err.read_text()[-3000:]
    assert err.read_text().splitlines() == [
        f"train.py: error: TF_CONFIG cluster.worker[1] is localhost:{ports[1]}, but port "
        f"{ports[1]} is already in use on this host: stop what holds it (a worker of an earlier "
        "run?) or give this worker another port"
    ]


@pytest.mark.slow
def test_workers_started_with_different_batch_sizes_all_stop_at_once_naming_it(tmp_path):
    """They used to fail ~45 s into training as "another worker stopped answering"."""
    run_dir = str(tmp_path / "run")
    argvs = [argv_of(TINY, run_dir), argv_of({**TINY, "batch_size": 32}, run_dir)]
    (rc0, out0, err0), (rc1, out1, err1) = finish(
        start_workers(argvs, tmp_path, "mismatch"), timeout=300
    )
    message = (
        "train.py: error: the workers were started with different options: --batch-size is 64 "
        "on worker 0, 32 on worker 1. Start every worker with the same command"
    )
    assert (rc0, rc1) == (1, 1), err0[-3000:] + err1[-3000:]
    assert err0.splitlines() == [message]
    assert err1.splitlines() == [message]
    assert "training plain_cnn" not in out0 + out1
    assert not os.path.exists(run_dir)


_STUCK_PEER = """
import os, sys, time
from bnzoo.cli import import_tensorflow_quietly
import_tensorflow_quietly()
import tensorflow as tf
from bnzoo.distribution import (
    describe_collective_failure, plan_distribution, share_from_chief, start_distribution
)

plan = plan_distribution("multi_worker")
with start_distribution(plan, collective_timeout=float(sys.argv[1])) as cluster:
    share_from_chief(cluster, [1.0])  # both workers are there
    if cluster.worker_index == 1:
        time.sleep(120)  # alive (heartbeats go on) but never joins the next all-reduce
        os._exit(0)

    @tf.function
    def total():
        context = lambda: tf.distribute.get_replica_context()  # noqa: E731
        return cluster.strategy.run(lambda: context().all_reduce("sum", tf.constant(1.0)))

    start = time.monotonic()
    try:
        with cluster.waiting_for_workers("a training step"):
            total()
    except Exception as error:
        print(f"after {time.monotonic() - start:.1f} s:", describe_collective_failure(error, plan))
        sys.stdout.flush()
        os._exit(1)
    os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.extended
def test_a_step_that_waits_longer_than_the_collective_timeout_fails_with_one_line(tmp_path):
    """A peer that is alive (its heartbeats go on) but never joins the all-reduce: the watchdog
    aborts the collectives once --collective-timeout has passed."""
    with python_workers(_STUCK_PEER, "5", cwd=tmp_path) as processes:
        out, err = processes[0].communicate(timeout=300)
    assert processes[0].returncode == 1, err[-3000:]
    line = out.strip().splitlines()[-1]
    seconds = float(line.split()[1])
    # The bound, then the watchdog wakes and the abort reaches the collective: well under the
    # 10 s heartbeat timeout after which TensorFlow would call the peer dead.
    assert 5.0 <= seconds < 10.0, line
    assert line.endswith(
        "worker 0 of 2: a training step waited more than 5 s for the other workers "
        "(--collective-timeout), so this one stops; restart every worker with the same command "
        "to resume after the last finished epoch, with a higher --collective-timeout if a "
        "worker is only slow"
    )
