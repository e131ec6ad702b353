"""Models trained on the JAX backend export the same serving SavedModel as on TensorFlow: raw
uint8 images in, the model's jax2tf conversion inside, loadable with TensorFlow alone.

These tests run on the TensorFlow backend and start the JAX side in a subprocess with
`KERAS_BACKEND=jax`, the way a JAX user runs `train.py`; the backend of a process is fixed once
Keras is imported.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import unfinished_run_files

from bnzoo import evaluation
from bnzoo.data import load_dataset, preprocess_images
from bnzoo.run_folder import RunPaths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# Builds test_export's tiny conv-BN-ReLU model on JAX, exports it, and saves the images it was
# checked on with the JAX model's own logits (on the images preprocessed by bnzoo.data).
_EXPORT_ON_JAX = """
import sys
import keras
import numpy as np
from test_export import MEAN, MODEL_SIZE, RAW_SHAPE, STD, make_model
from bnzoo.data import preprocess_images
from bnzoo.export import export_serving_model

assert keras.backend.backend() == "jax", keras.backend.backend()
model = make_model()
export_serving_model(
    model, sys.argv[1], image_shape=RAW_SHAPE, mean=MEAN, std=STD, image_size=MODEL_SIZE
)
images = np.random.default_rng(0).integers(0, 256, (5, *RAW_SHAPE), dtype=np.uint8)
inputs = preprocess_images(images, mean=MEAN, std=STD, image_size=MODEL_SIZE).numpy()
logits = keras.ops.convert_to_numpy(model(inputs, training=False))
np.savez(sys.argv[2], images=images, logits=logits)
"""


def run_on_jax(command, cwd):
    result = subprocess.run(
        command,
        cwd=cwd,
        env={
            **os.environ,
            "KERAS_BACKEND": "jax",
            "PYTHONPATH": os.pathsep.join([ROOT, TESTS]),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def jax_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jax_export")
    path, reference = str(folder / "saved_model"), str(folder / "reference.npz")
    run_on_jax([sys.executable, "-c", _EXPORT_ON_JAX, path, reference], cwd=folder)
    with np.load(reference) as arrays:
        return path, arrays["images"], arrays["logits"]


@pytest.mark.slow
def test_jax_model_served_by_tensorflow_alone_equals_the_jax_model(
    jax_export, serve_with_tensorflow_only
):
    path, images, jax_logits = jax_export
    served = serve_with_tensorflow_only(path, images)
    np.testing.assert_allclose(served, jax_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_jax_export_has_the_same_signature_and_strictness(jax_export):
    path, images, jax_logits = jax_export
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["images"]
    assert inputs["images"].dtype == tf.uint8
    assert inputs["images"].shape.as_list() == [None, 28, 28, 1]
    assert sorted(signature.structured_outputs) == ["classes", "logits", "probabilities"]
    outputs = loaded.serving_default(images)
    np.testing.assert_allclose(outputs["logits"].numpy(), jax_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outputs["classes"].numpy(), jax_logits.argmax(axis=1))
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.serving_default(images.astype(np.float32) / 255)
    empty = loaded.serving_default(images[:0])
    assert tuple(empty["logits"].shape) == (0, 10) and tuple(empty["classes"].shape) == (0,)
    metadata = evaluation.locate_model(path)
    assert metadata.preprocessing == {"mean": [0.286], "std": [0.353], "image_size": [32, 32]}


@pytest.mark.slow
def test_train_py_on_jax_writes_every_artifact_and_metrics_describe_the_export(
    tmp_path, serve_with_tensorflow_only
):
    run_dir = str(tmp_path / "run")
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *("--train-split", "train[:256]", "--val-split", "train[256:320]"),
        *("--test-split", "test[:128]", "--epochs", "1", "--batch-size", "64"),
        *("--model-arg", "widths=[8,16]", "--output-dir", run_dir),
        # float32 on both sides: bfloat16 rounds differently in XLA (JAX) and in TensorFlow's
        # kernels, so the logits comparison below would measure rounding, not the export.
        "--no-mixed-precision",
    ]
    out = run_on_jax(command, cwd=tmp_path).stdout
    assert "test accuracy" in out
    paths = RunPaths(run_dir)
    assert unfinished_run_files(run_dir) == []
    with open(os.path.join(paths.saved_model, "assets.extra", "bnzoo.json")) as stream:
        assert json.load(stream)["keras_backend"] == "jax"

    # metrics.json (computed on JAX through the exported function) is what TensorFlow serves.
    with open(paths.metrics) as stream:
        recorded = json.load(stream)
    served = evaluation.evaluate_path(paths.saved_model)
    assert served["confusion_matrix"] == recorded["confusion_matrix"]
    assert served["loss"] == pytest.approx(recorded["loss"], rel=1e-5)

    # The JAX-trained weights, loaded from model.keras on TensorFlow, predict what is served.
    import layers  # noqa: F401  (bnzoo's BN layer, for loading model.keras here)

    test_ds, info = load_dataset("fashion_mnist", split="test[:32]")
    images = np.stack([image for image, _ in test_ds.as_numpy_iterator()])
    model = keras.models.load_model(paths.model)
    expected = keras.ops.convert_to_numpy(
        model(preprocess_images(images, mean=info.mean, std=info.std), training=False)
    )
    logits = serve_with_tensorflow_only(paths.saved_model, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
