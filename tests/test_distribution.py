"""bnzoo.distribution and the training loop's steps: which mode `--distribute` picks, how every
global batch is split among workers, and what Batch Normalization's statistics are on every
replica. Replicas are the two logical CPUs that conftest.py configures; JAX runs in a subprocess
with two host devices."""

import json
import os
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
from conftest import training_backends_only  # noqa: E402
from rounding import probable_gamma

from bnzoo.distribution import (
    Distribution,
    DistributionPlan,
    average_replica_local_variables,
    keep_worker_share,
    mirrored_strategy,
    pad_to_whole_global_batches,
    plan_distribution,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tf_config(workers, index, task_type="worker", chief=0):
    cluster = {"worker": [f"host{i}:2222" for i in range(workers)]}
    if chief:
        cluster["chief"] = ["chief0:2222"]
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


# --- Choosing the mode ---------------------------------------------------------------------------


def test_auto_picks_multi_worker_when_tf_config_names_several_workers():
    plan = plan_distribution("auto", environ={"TF_CONFIG": tf_config(3, 2)})
    assert (plan.mode, plan.num_workers, plan.worker_index, plan.is_chief) == (
        "multi_worker",
        3,
        2,
        False,
    )
    assert plan.reason == "3 workers in TF_CONFIG"


def test_a_chief_task_comes_first_and_is_the_chief():
    environ = {"TF_CONFIG": tf_config(2, 0, task_type="chief", chief=1)}
    chief = plan_distribution("auto", environ=environ)
    worker = plan_distribution("auto", environ={"TF_CONFIG": tf_config(2, 0, chief=1)})
    assert (chief.num_workers, chief.worker_index, chief.is_chief) == (3, 0, True)
    assert (worker.worker_index, worker.is_chief) == (1, False)


def test_auto_on_a_machine_without_accelerators_is_one_device():
    plan = plan_distribution("auto", environ={})
    assert (plan.mode, plan.reason, plan.num_workers) == ("none", "no accelerator", 1)


@pytest.mark.parametrize(
    "requested, environ, message",
    [
        ("multi_worker", {}, "--distribute multi_worker needs the cluster in the environment"),
        ("none", {"TF_CONFIG": tf_config(2, 0)}, "has 2 workers; use --distribute multi_worker"),
        ("auto", {"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid JSON"),
        ("auto", {"TF_CONFIG": tf_config(2, 5)}, "task worker:5 is not in its cluster of 2"),
    ],
    ids=["multi-worker-without-cluster", "none-with-cluster", "bad-json", "index-out-of-range"],
)
def test_an_impossible_distribution_is_a_value_error_naming_the_fix(requested, environ, message):
    with pytest.raises(ValueError, match=message):
        plan_distribution(requested, environ=environ)


def tf_config_of(cluster, task):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}


WORKER_0 = {"type": "worker", "index": 0}


@pytest.mark.parametrize(
    "environ, message",
    [
        (
            tf_config_of({"worker": "localhost:2222,localhost:2223"}, WORKER_0),
            'TF_CONFIG cluster.worker is a string ("localhost:2222,localhost:2223"); it must be '
            'a list of "host:port" addresses, e.g. ["localhost:2222"]',
        ),
        (
            tf_config_of({"worker": ["localhost:2222", "localhost:http"]}, WORKER_0),
            'TF_CONFIG cluster.worker[1] is "localhost:http": its port "http" is not a number '
            "in 1-65535",
        ),
        (
            tf_config_of({"worker": ["localhost:2222", "localhost:70000"]}, WORKER_0),
            'TF_CONFIG cluster.worker[1] is "localhost:70000": its port "70000" is not a number',
        ),
        (
            tf_config_of({"worker": ["localhost:2222", "localhost"]}, WORKER_0),
            'TF_CONFIG cluster.worker[1] is "localhost", not "host:port"; add the port',
        ),
        (
            tf_config_of({"worker": ["localhost:2222", 2223]}, WORKER_0),
            'TF_CONFIG cluster.worker[1] must be a "host:port" string, got 2223',
        ),
        (
            tf_config_of({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": True}),
            "TF_CONFIG task.index must be an integer (this worker's position in cluster.worker), "
            "got true",
        ),
        (
            tf_config_of({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": "1"}),
            "TF_CONFIG task.index must be an integer (this worker's position in cluster.worker), "
            'got "1"',
        ),
        (
            tf_config_of({"worker": ["a:1", "a:1"]}, WORKER_0),
            "TF_CONFIG cluster.worker[1] a:1 is also TF_CONFIG cluster.worker[0]'s address",
        ),
        (
            tf_config_of(["a:1", "b:1"], WORKER_0),
            'TF_CONFIG cluster must be an object such as {"worker": ',
        ),
        (
            tf_config_of({"worker": ["a:1"], "chief": ["b:1", "c:1"]}, WORKER_0),
            "TF_CONFIG cluster.chief has 2 addresses; a cluster has at most one chief",
        ),
        ({"TF_CONFIG": "[1, 2]"}, "TF_CONFIG must be a JSON object"),
        (tf_config_of({"worker": ["a:1"]}, "worker"), "TF_CONFIG task must be an object"),
    ],
    ids=[
        "worker-list-is-a-string",
        "port-not-a-number",
        "port-out-of-range",
        "no-port",
        "address-not-a-string",
        "index-true",
        "index-a-string",
        "same-address-twice",
        "cluster-a-list",
        "two-chiefs",
        "not-an-object",
        "task-a-string",
    ],
)
def test_a_malformed_tf_config_is_one_line_naming_the_field(environ, message):
    """TensorFlow would take a string for a list of one-character addresses, `true` for index
    1, and fail with a traceback on a port that is not a number."""
    with pytest.raises(ValueError) as caught:
        plan_distribution("auto", environ=environ)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_plan_keeps_every_worker_address_in_index_order():
    environ = tf_config_of(
        {"chief": ["c:1"], "worker": ["w0:1", "[::1]:2"]}, {"type": "worker", "index": 1}
    )
    plan = plan_distribution("auto", environ=environ)
    assert (plan.num_workers, plan.worker_index) == (3, 2)
    assert plan.addresses == ("c:1", "w0:1", "[::1]:2")
    assert plan.address_fields == (
        "TF_CONFIG cluster.chief[0]",
        "TF_CONFIG cluster.worker[0]",
        "TF_CONFIG cluster.worker[1]",
    )


def test_parameter_server_clusters_are_refused():
    environ = {
        "TF_CONFIG": json.dumps(
            {"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}
        )
    }
    with pytest.raises(ValueError, match="names ps tasks"):
        plan_distribution("auto", environ=environ)


def test_srun_tasks_are_workers_when_tf_config_is_unset():
    environ = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "8"}
    plan = plan_distribution("auto", environ=environ)
    assert (plan.mode, plan.num_workers, plan.worker_index) == ("multi_worker", 4, 1)
    assert (plan.cluster_source, plan.reason) == ("Slurm", "4 workers in the Slurm job step")
    single = plan_distribution("auto", environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert single.mode == "none"
    with_tf_config = plan_distribution("auto", environ={**environ, "TF_CONFIG": tf_config(2, 0)})
    assert (with_tf_config.cluster_source, with_tf_config.num_workers) == ("TF_CONFIG", 2)


@pytest.mark.multi_backend
def test_jax_processes_come_from_the_keras_distribution_variables():
    from bnzoo.distribution_plan import _jax_processes

    environ = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "4",
        "KERAS_DISTRIBUTION_PROCESS_ID": "3",
    }
    assert _jax_processes(environ) == (4, 3)
    assert _jax_processes({}) is None
    with pytest.raises(ValueError, match="must name the coordinator"):
        _jax_processes({"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"})


@pytest.mark.multi_backend
def test_the_jax_coordinator_must_be_host_and_port():
    environ = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": "1",
    }
    from bnzoo.distribution_plan import _jax_coordinator

    with pytest.raises(ValueError, match='KERAS_DISTRIBUTION_JOB_ADDRESSES is "10.0.0.1", not'):
        _jax_coordinator(environ)
    environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = "10.0.0.1:1234,10.0.0.2:1234"
    assert _jax_coordinator(environ) == "10.0.0.1:1234"


def mirrored(replicas=2):
    import tensorflow as tf

    devices = [device.name for device in tf.config.list_logical_devices("CPU")][:replicas]
    plan = DistributionPlan("data_parallel", "data_parallel", "", "tensorflow")
    return Distribution(plan, replicas, replicas, devices, mirrored_strategy(devices))


def test_strategies_made_one_after_another_in_a_process_do_not_mix_up_their_all_reduces():
    """A second train() in one process makes a second MirroredStrategy; TensorFlow would abort
    its all-reduces for reusing the first one's collective keys."""
    import tensorflow as tf

    for size in (6, 2, 3):
        strategy = mirrored().strategy

        @tf.function
        def all_reduce(strategy=strategy, size=size):
            return strategy.run(
                lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.ones([size]))
            )

        np.testing.assert_array_equal(
            strategy.experimental_local_results(all_reduce())[0].numpy(), np.full(size, 2.0)
        )


def test_the_global_batch_must_divide_among_the_replicas():
    distribution = mirrored()
    assert distribution.per_replica_batch_size(64) == 32
    with pytest.raises(ValueError, match="--batch-size 63 is the global batch .* multiple of 2"):
        distribution.per_replica_batch_size(63)


# --- Splitting the data --------------------------------------------------------------------------


@pytest.mark.multi_backend
@pytest.mark.parametrize("workers, per_worker", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_every_worker_keeps_its_own_part_of_every_global_batch(workers, per_worker):
    """Global batch t is the same examples whatever the number of workers and replicas: the
    t-th `workers * per_worker` input batches of one stream that every worker builds alike."""
    import tensorflow as tf

    per_replica, steps = 3, 4
    stream = tf.data.Dataset.range(1000).batch(per_replica, drop_remainder=True)
    shares = [
        list(
            keep_worker_share(
                stream,
                num_workers=workers,
                worker_index=index,
                batches_per_worker=per_worker,
                steps=steps,
            ).as_numpy_iterator()
        )
        for index in range(workers)
    ]
    global_batch = workers * per_worker * per_replica
    for step in range(steps):
        seen = np.concatenate(
            [share[step * per_worker + j] for share in shares for j in range(per_worker)]
        )
        np.testing.assert_array_equal(
            seen, np.arange(step * global_batch, (step + 1) * global_batch)
        )
    assert all(len(share) == steps * per_worker for share in shares)


@pytest.mark.multi_backend
def test_evaluation_padding_fills_whole_global_batches_with_label_minus_one():
    import tensorflow as tf

    examples = tf.data.Dataset.from_tensor_slices(
        (np.arange(10, dtype=np.uint8)[:, None], np.arange(10, dtype=np.int64))
    ).batch(4)
    padded = list(
        pad_to_whole_global_batches(examples, batch_size=4, num_examples=10, group=4)
        .map(lambda images, labels: (images, labels))
        .as_numpy_iterator()
    )
    labels = np.concatenate([batch_labels for _, batch_labels in padded])
    assert len(padded) == 4 and all(images.shape == (4, 1) for images, _ in padded)
    np.testing.assert_array_equal(labels[:10], np.arange(10))
    assert (labels[10:] == -1).all() and labels.size == 16


# --- BN statistics on every replica --------------------------------------------------------------


def batch_norm_model(kind, synchronized):
    import layers

    layer_class = layers.BatchNormalization if kind == "bnzoo" else keras.layers.BatchNormalization
    inputs = keras.Input((1,))
    x = layer_class(momentum=0.0, synchronized=synchronized, name="bn")(inputs)
    outputs = keras.layers.Dense(2, kernel_initializer="ones")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


def train_on_zeros_and_tens(distribution, model):
    """One step of the training loop in which replica 0 is fed zeros and replica 1 tens."""
    import tensorflow as tf

    from bnzoo.training_loop import TensorFlowLoop

    labels = np.eye(2, dtype="float32")[[0, 1, 0, 1]]

    def make_batches():
        # Consecutive elements go to consecutive replicas.
        return tf.data.Dataset.from_tensor_slices(
            (np.array([[[0.0]] * 4, [[10.0]] * 4], "float32"), np.stack([labels, labels]))
        )

    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    TensorFlowLoop(model, distribution, loss, global_batch_size=8).train_epoch(make_batches, 1)


@pytest.mark.parametrize("synchronized", [False, True], ids=["per-replica", "synchronized"])
@pytest.mark.parametrize("kind", ["bnzoo", "keras"])
def test_every_replica_ends_with_the_same_moving_statistics(kind, synchronized):
    """Replica 0 is fed zeros and replica 1 tens (momentum 0: the moving statistics are the
    last step's). Per replica, each normalizes its own constant batch (variance 0) and the
    replicas agree on the mean of their statistics; synchronized, both use the global batch's
    (mean 5, variance 25). bnzoo's layer agrees at every step (aggregation "mean"); Keras'
    layer keeps one value per replica (aggregation "none") until the loop averages them."""
    distribution = mirrored()
    with distribution.scope():
        model = batch_norm_model(kind, synchronized)
    train_on_zeros_and_tens(distribution, model)
    average_replica_local_variables(distribution, model)

    bn = model.get_layer("bn")
    expected_mean, expected_variance = (5.0, 25.0) if synchronized else (5.0, 0.0)
    for variable, expected in (
        (bn.moving_mean, expected_mean),
        (bn.moving_variance, expected_variance),
    ):
        values = [
            np.asarray(value)
            for value in distribution.strategy.experimental_local_results(variable.value)
        ]
        assert len(values) == 2
        np.testing.assert_array_equal(values[0], values[1])
        np.testing.assert_allclose(values[0], [expected], rtol=1e-6, err_msg=variable.path)


def test_keras_batch_norm_replicas_differ_until_averaged():
    """Why `average_replica_local_variables` exists: without it a saved model would hold the
    moving statistics of whichever replica saved it."""
    distribution = mirrored()
    with distribution.scope():
        model = batch_norm_model("keras", synchronized=False)
    train_on_zeros_and_tens(distribution, model)
    bn = model.get_layer("bn")
    values = distribution.strategy.experimental_local_results(bn.moving_mean.value)
    assert [float(np.asarray(v)[0]) for v in values] == [0.0, 10.0]
    assert average_replica_local_variables(distribution, model) == 2


def test_evaluation_counts_every_example_once_and_ignores_padding():
    """Accuracy and loss over a split of 10 examples on 2 replicas with batches of 4 (padded to
    16), against NumPy."""
    import tensorflow as tf

    from bnzoo.training_loop import TensorFlowLoop

    distribution = mirrored()
    with distribution.scope():
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3)).astype("float32")
    y = rng.integers(0, 3, 10)

    def make_batches():
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
        batches = pad_to_whole_global_batches(batches, batch_size=2, num_examples=10, group=2)
        return batches.map(lambda images, labels: (images, tf.one_hot(labels, 3)))

    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    logs = TensorFlowLoop(model, distribution, loss, global_batch_size=4).evaluate(make_batches)
    logits = keras.ops.convert_to_numpy(model(x))
    log_probabilities = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert logs["loss"] == pytest.approx(-log_probabilities[np.arange(10), y].mean(), rel=1e-5)
    assert logs["accuracy"] == pytest.approx((logits.argmax(1) == y).mean())
    assert logs["top5_accuracy"] == 1.0


@pytest.mark.multi_backend
@training_backends_only
@pytest.mark.parametrize("num_classes", [5, 6])
def test_top5_accuracy_is_reported_only_with_more_than_five_classes(num_classes):
    """With 5 classes or fewer every prediction is in the top 5: the loop leaves top-5 out of
    its logs (history.csv then leaves the column empty), as `build_metrics` does for Keras."""
    import tensorflow as tf

    from bnzoo.distribution import start_distribution
    from bnzoo.training_loop import make_training_loop

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype("float32")
    y = rng.integers(0, num_classes, 12)

    def make_batches():
        return tf.data.Dataset.from_tensor_slices((x, tf.one_hot(y, num_classes))).batch(4)

    with start_distribution(plan_distribution("none")) as distribution:
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(num_classes)(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.0))  # the weights stay as they are
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        loop = make_training_loop(model, distribution, loss, 4, num_classes=num_classes)
        training = loop.train_epoch(make_batches, 3)
        evaluation = loop.evaluate(make_batches)
    logits = keras.ops.convert_to_numpy(model(x))
    rank = (logits > logits[np.arange(12), y][:, None]).sum(1)
    for logs in (training, evaluation):
        assert logs["accuracy"] == pytest.approx((logits.argmax(1) == y).mean())
        if num_classes > 5:
            assert logs["top5_accuracy"] == pytest.approx((rank < 5).mean())
        else:
            assert "top5_accuracy" not in logs


JAX_TWO_DEVICES = """
import json, sys
import numpy as np
import jax, keras
import layers
from bnzoo.distribution import plan_distribution, start_distribution
from bnzoo.training_loop import JaxLoop

results = {"devices": len(jax.devices())}
with start_distribution(plan_distribution("data_parallel")) as distribution:
    results["replicas"] = distribution.num_replicas
    inputs = keras.Input((1,))
    x = layers.BatchNormalization(momentum=0.0, name="bn")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    loop = JaxLoop(model, distribution, loss, global_batch_size=8)
    import tensorflow as tf
    images = np.array([[0.0]] * 4 + [[10.0]] * 4, "float32")  # device 0: zeros, device 1: tens
    labels = np.eye(2, dtype="float32")[[0, 1] * 4]
    loop.train_epoch(lambda: tf.data.Dataset.from_tensors((images, labels)), 1)
    bn = model.get_layer("bn")
    results["moving_mean"] = float(keras.ops.convert_to_numpy(bn.moving_mean)[0])
    results["moving_variance"] = float(keras.ops.convert_to_numpy(bn.moving_variance)[0])

# train.py's run on both devices and on one: the same global batches, BN over the global batch.
import logging.handlers
from bnzoo.config import TrainConfig
from bnzoo.run_folder import read_history_csv
from bnzoo.training import train

for mode in ("data_parallel", "none"):
    lines = logging.handlers.BufferingHandler(capacity=1000)  # keeps the records it is given
    logging.getLogger("bnzoo").addHandler(lines)
    logging.getLogger("bnzoo").setLevel(logging.INFO)
    config = TrainConfig(
        train_split="train[:256]", val_split="train[256:300]", test_split=None, epochs=1,
        batch_size=64, model_args={"widths": [4, 8]}, distribute=mode,
        output_dir=f"{sys.argv[1]}/{mode}", mixed_precision=False,  # an equivalence: float32
    )
    train(config)
    logging.getLogger("bnzoo").removeHandler(lines)
    rows = read_history_csv(f"{sys.argv[1]}/{mode}/history.csv")
    results[mode] = {"line": lines.buffer[1].getMessage(), "history": rows}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_jax_data_parallel_normalizes_over_the_global_batch(tmp_path):
    """Under keras.distribution.DataParallel the batch is one array sharded over the devices,
    so BN's batch statistics are the global batch's even without synchronization: device 0
    fed zeros and device 1 tens give mean 5 and variance 25. And train.py on both host devices
    computes what it computes on one."""
    result = subprocess.run(
        [sys.executable, "-c", JAX_TWO_DEVICES, str(tmp_path)],
        cwd=ROOT,
        env={
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONPATH": ROOT,
            "KERAS_BACKEND": "jax",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert (values["devices"], values["replicas"]) == (2, 2)
    assert values["moving_mean"] == pytest.approx(5.0)
    assert values["moving_variance"] == pytest.approx(25.0)
    parallel, single = values["data_parallel"], values["none"]
    assert "keras.distribution.DataParallel; 2 replicas, global batch 64 = 32" in parallel["line"]
    assert "BN statistics over the global batch" in parallel["line"]
    # Sharding changes only the order of the sums. The largest per step is BN's statistics over
    # 64 x 28 x 28 values, known to probable_gamma(50,176) = 8e-5 of their scale; 4 steps add
    # up to 3.2e-4. Accuracies are counts: a logit pair within rounding of a tie may flip one
    # of the 256 training or 44 validation examples.
    history, reference = parallel["history"][0], single["history"][0]
    for key in ("loss", "val_loss"):
        assert history[key] == pytest.approx(reference[key], rel=4 * probable_gamma(64 * 28 * 28))
    assert history["accuracy"] == pytest.approx(reference["accuracy"], abs=1 / 256)
    assert history["val_accuracy"] == pytest.approx(reference["val_accuracy"], abs=1 / 44)


@pytest.mark.parametrize("kind", ["bnzoo", "keras"])
def test_sync_bn_switches_the_model_in_place_and_the_export_drops_it(kind):
    """`--sync-bn` switches the built model's BN layers to synchronized in place (same weights,
    same optimizer); `model.keras` is written without `synchronized`, which Keras refuses on
    JAX."""
    from bnzoo.training import inference_copy
    from layers import set_batch_norm_synchronized

    model = batch_norm_model(kind, synchronized=False)
    bn = model.get_layer("bn")
    bn.moving_mean.assign([3.0])
    assert set_batch_norm_synchronized(model, True) == [bn] and bn.synchronized
    assert set_batch_norm_synchronized(model, True) == []
    exported = inference_copy(model)
    assert not exported.get_layer("bn").synchronized and bn.synchronized
    assert float(keras.ops.convert_to_numpy(exported.get_layer("bn").moving_mean)[0]) == 3.0


# --- Bounding the waits for the other workers ----------------------------------------------------


class Aborts:
    """A watchdog's abort callback that records its messages."""

    def __init__(self):
        self.messages = []
        self.called = threading.Event()

    def __call__(self, message):
        self.messages.append(message)
        self.called.set()


def test_a_block_that_outlives_its_bound_aborts_once_with_what_waited():
    from bnzoo.collective_watchdog import TIMEOUT_MARKER, CollectiveWatchdog

    aborts = Aborts()
    watchdog = CollectiveWatchdog(aborts)
    with watchdog.bounded(0.2, "a training step"):
        assert aborts.called.wait(5)
    watchdog.close()
    assert aborts.messages == [
        f"{TIMEOUT_MARKER}: a training step waited more than 0.2 s for the other workers "
        "(--collective-timeout)"
    ]


def test_blocks_that_end_in_time_never_abort_and_share_one_thread():
    """The point of the watchdog: TensorFlow's own timeout starts a thread per collective."""
    from bnzoo.collective_watchdog import CollectiveWatchdog

    aborts = Aborts()
    watchdog = CollectiveWatchdog(aborts)
    threads_before = threading.active_count()
    for _ in range(2000):
        with watchdog.bounded(0.5, "a training step"):
            pass
    assert threading.active_count() == threads_before + 1
    time.sleep(0.7)  # past the bound of every block above
    watchdog.close()
    assert aborts.messages == []
    assert threading.active_count() == threads_before


def test_an_inner_bound_applies_while_it_runs_and_the_outer_one_after_it():
    from bnzoo.collective_watchdog import CollectiveWatchdog

    aborts = Aborts()
    watchdog = CollectiveWatchdog(aborts)
    with watchdog.bounded(0.4, "the statistics pass"):
        with watchdog.bounded(3600.0, "waiting for worker 0 (the chief)"):
            time.sleep(0.6)  # longer than the outer bound, shorter than the inner one
        assert aborts.messages == []
        assert aborts.called.wait(5)  # the outer bound again, from the inner block's end
    watchdog.close()
    assert "the statistics pass waited more than 0.4 s" in aborts.messages[0]


def test_a_collective_timeout_is_one_line_that_says_what_waited():
    from bnzoo.collective_watchdog import TIMEOUT_MARKER
    from bnzoo.distribution import describe_collective_failure

    plan = DistributionPlan("multi_worker", "multi_worker", "", "tensorflow", 2, 1, "TF_CONFIG")
    error = RuntimeError(
        "Collective ops is aborted by: "
        f"{TIMEOUT_MARKER}: a training step waited more than 30 s for the other workers "
        "(--collective-timeout)\nAdditional GRPC error information: ..."
    )
    assert describe_collective_failure(error, plan) == (
        "worker 1 of 2: a training step waited more than 30 s for the other workers "
        "(--collective-timeout), so this one stops; restart every worker with the same command "
        "to resume after the last finished epoch, with a higher --collective-timeout if a "
        "worker is only slow"
    )


def test_collective_instance_keys_are_fixed_when_traced_inside_a_multi_worker_run():
    """TensorFlow's hook that keeps worker memory flat (bnzoo.distribution
    .instance_keys_fixed_when_traced): fails loudly if a TensorFlow release renames it."""
    import tensorflow as tf
    from tensorflow.python.distribute import collective_util, cross_device_utils

    from bnzoo.distribution import instance_keys_fixed_when_traced

    launcher = cross_device_utils.CollectiveReplicaLauncher(
        group_key=1,
        group_size=1,
        collective_keys=cross_device_utils.CollectiveKeys(),
        device="/cpu:0",
        options=collective_util.Options(),
    )
    assert tf.executing_eagerly() and launcher._use_unique_instance_key()
    with instance_keys_fixed_when_traced():
        assert not launcher._use_unique_instance_key()
    assert launcher._use_unique_instance_key()
