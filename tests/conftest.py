"""Shared test setup.

The suite runs three times from `make test`: once on the TensorFlow backend (every test), then
with `KERAS_BACKEND=jax` and `KERAS_BACKEND=torch`, `-m multi_backend` (the backend-agnostic
subset). Tests that also hold on those backends carry `@pytest.mark.multi_backend` (markers are
declared in pyproject.toml); on JAX and PyTorch every other test is skipped here.
"""

import logging
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
#: `fused=None` takes TensorFlow's fused kernel where possible, `fused=False` the keras.ops path;
#: on JAX and PyTorch both are the keras.ops path, so a test parametrized by it runs once.
FUSED = [None, False] if BACKEND == "tensorflow" else [None]


def value(tensor):
    """A NumPy copy of a backend tensor or Keras variable."""
    # Not keras.ops.convert_to_numpy on the variable: it calls np.array(), which warns in NumPy 2.
    if isinstance(tensor, keras.Variable):
        tensor = tensor.value
    # keras.ops.convert_to_numpy detaches PyTorch tensors that require a gradient.
    return np.array(keras.ops.convert_to_numpy(tensor))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: For multi_backend tests of train.py's training loop: it runs on TensorFlow and JAX, and
#: train.py refuses the other backends (`bnzoo.training.TRAINING_BACKENDS`).
training_backends_only = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="train.py's training loops are TensorFlow's and JAX's; it refuses PyTorch",
)

if BACKEND == "tensorflow":
    import tensorflow as tf

    # Synchronized BN is tested under a MirroredStrategy over two logical CPU devices. Logical
    # devices can only be configured before TensorFlow initializes its runtime, so it happens
    # here, once, before any test touches a tensor.
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-only test; backend is {BACKEND}")
    for item in items:
        if "multi_backend" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate_keras_state():
    """Every test starts from float32 and a fresh Keras session, whatever the last one set.

    Without `free_memory`: Keras would run a full `gc.collect()` before every test, about a
    second each once the session holds hundreds of traced graphs (minutes over the suite);
    Python's own collector still frees the cycles."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.clear_session(free_memory=False)
    yield
    keras.mixed_precision.set_global_policy("float32")


def wait_until(condition, processes, failure, output, timeout=300):
    """Poll `condition()` until it holds while every one of `processes` runs. Fails with
    `failure` after `timeout` seconds, or with `output()` (what they printed) when one ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(process.poll() is None for process in processes), output()
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def unfinished_run_files(run_dir):
    """What keeps `run_dir` from being a finished run with a test split: each artifact missing
    from it, and each temporary file of a write that never completed, in it or in checkpoints/.
    Empty for a finished run."""
    from bnzoo.run_folder import RunPaths

    paths = RunPaths(str(run_dir))
    artifacts = (
        paths.config,
        paths.history,
        paths.last_checkpoint,
        paths.best_checkpoint,
        paths.model,
        os.path.join(paths.saved_model, "saved_model.pb"),
        paths.metrics,
        paths.curves,
    )
    missing = [path for path in artifacts if not os.path.exists(path)]
    return missing + [
        os.path.join(folder, name)
        for folder in (paths.run_dir, paths.checkpoints)
        if os.path.isdir(folder)
        for name in os.listdir(folder)
        if ".tmp-" in name or ".old-" in name
    ]


@pytest.fixture
def logged_lines(caplog):
    """What bnzoo logs during the test (train.py's progress lines): a function that returns the
    messages of the `bnzoo` loggers' records so far, at `level` and above (INFO by default)."""
    caplog.set_level(logging.INFO, logger="bnzoo")

    def lines(level=logging.INFO):
        return [
            record.getMessage()
            for record in caplog.records
            if record.name.split(".")[0] == "bnzoo" and record.levelno >= level
        ]

    return lines


@pytest.fixture(scope="session")
def mirrored_strategy():
    """A MirroredStrategy over the two logical CPUs, one for the whole session: strategies
    created one after another in a process reuse collective instance keys, and TensorFlow then
    mismatches their all-reduces."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def fuse_small_tensors(monkeypatch):
    """Let `fused=None` take TensorFlow's fused kernel for the tiny tensors tests use.

    In production `fused=None` keeps inputs under 100,000 values on the keras.ops path, where
    the kernel's fixed cost makes it slower; the layer's tests need `fused=None` to exercise the
    kernel itself on small, exactly checkable inputs.
    """
    from layers import _fused

    monkeypatch.setattr(_fused, "MIN_VALUES", 0)


_TENSORFLOW_ONLY_SERVING = """
import sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
images = tf.io.parse_tensor(tf.io.read_file(sys.argv[2]), tf.uint8)
tf.io.write_file(sys.argv[3], tf.io.serialize_tensor(serve(images=images)["logits"]))
project = [m for m in sys.modules if m.split(".")[0] in ("bnzoo", "layers", "models")]
assert not project, project
"""


@pytest.fixture
def serve_with_tensorflow_only(tmp_path):
    """Runs a SavedModel's serving signature in a subprocess that imports only TensorFlow.

    The subprocess starts outside the repository with an empty PYTHONPATH, so bnzoo's packages
    are not even importable: this is serving code as users write it. Returns a function
    `serve(saved_model_path, uint8_images) -> logits` (NumPy).
    """
    import subprocess
    import sys

    import numpy as np
    import tensorflow as tf

    def serve(saved_model_path, images):
        inputs, outputs = str(tmp_path / "images.pb"), str(tmp_path / "logits.pb")
        tf.io.write_file(inputs, tf.io.serialize_tensor(tf.constant(np.asarray(images))))
        command = [sys.executable, "-c", _TENSORFLOW_ONLY_SERVING, str(saved_model_path)]
        result = subprocess.run(
            [*command, inputs, outputs],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "3"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return tf.io.parse_tensor(tf.io.read_file(outputs), tf.float32).numpy()

    return serve


class ScriptRunner:
    """Runs the repository's scripts (`train.py`, `evaluate.py`) in a subprocess, the way a
    user does, and checks their error contract.

    `run("train.py", "--lr", "inf")` returns the `CompletedProcess`; `error_line(result, 2)`
    asserts the exit status and that stderr is exactly one `train.py: error: ...` line without a
    traceback, and returns that line.
    """

    root = ROOT

    def run(self, script, *argv, cwd=None, timeout=300, env=None):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, script), *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or ROOT,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        )

    @staticmethod
    def error_line(result, status, script="train.py"):
        assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"{script}: error: "), lines[0]
        assert "Traceback" not in result.stderr
        return lines[0]


@pytest.fixture
def run_script():
    """A `ScriptRunner`: the scripts run in a real process, with one-line error checks."""
    return ScriptRunner()
