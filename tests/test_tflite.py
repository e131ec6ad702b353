"""TFLite export: raw uint8 images in like the SavedModel, float32 equal to the Keras model, int8
quantized throughout and close to float32, `python -m bnzoo.export` on a run folder, and
`evaluate.py` scoring `.tflite` files like every other artifact."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from test_export import MEAN, MODEL_SIZE, RAW_SHAPE, STD, make_model

from bnzoo import evaluation
from bnzoo.cli import run_cli
from bnzoo.data import load_dataset, preprocess_images
from bnzoo.export import tflite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = [
    *("--train-split", "train[:512]", "--val-split", "none", "--test-split", "test[:256]"),
    *("--epochs", "1", "--batch-size", "64", "--model-arg", "widths=[8,16]"),
    # float32, so the float TFLite model is the served model exactly (a mixed-precision model is
    # rebuilt in float32 for TFLite; test_mixed_precision_* covers that).
    "--no-mixed-precision",
]
PREPROCESSING = {"image_shape": RAW_SHAPE, "mean": MEAN, "std": STD, "image_size": MODEL_SIZE}


def fashion_mnist_images(split):
    dataset, _ = load_dataset("fashion_mnist", split=split)
    return np.stack([image for image, _ in dataset.as_numpy_iterator()])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny conv-BN-ReLU model as float32 and int8 TFLite files, its Keras logits on 64 test
    images, and those images."""
    folder = tmp_path_factory.mktemp("tflite")
    model = make_model()
    calibration = fashion_mnist_images("train[:200]")
    paths = {
        "float32": tflite.export_tflite(
            model, folder / "model.tflite", **PREPROCESSING, metadata={"dataset": "fashion_mnist"}
        ),
        "int8": tflite.export_tflite(
            model,
            folder / "model_int8.tflite",
            **PREPROCESSING,
            quantization="int8",
            calibration_images=np.split(calibration, 4),
        ),
    }
    images = fashion_mnist_images("test[:64]")
    inputs = preprocess_images(images, mean=MEAN, std=STD, image_size=MODEL_SIZE)
    logits = keras.ops.convert_to_numpy(model(inputs, training=False))
    return paths, images, logits


def ops_of(path):
    interpreter = tflite._interpreter_class()(model_path=path)
    tensors = interpreter.get_tensor_details()
    return [
        (op["op_name"], [tensors[i]["dtype"] for i in op["inputs"] if i >= 0])
        for op in interpreter._get_ops_details()
    ]


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_signature_takes_raw_uint8_images_like_the_saved_model(converted, quantization):
    interpreter = tflite._interpreter_class()(model_path=converted[0][quantization])
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["classes", "logits", "probabilities"]}
    }
    runner = interpreter.get_signature_runner("serving_default")
    (images,) = runner.get_input_details().values()
    assert images["dtype"] == np.uint8
    assert images["shape_signature"].tolist() == [-1, 28, 28, 1]
    outputs = runner.get_output_details()
    assert outputs["logits"]["dtype"] == outputs["probabilities"]["dtype"] == np.float32
    assert outputs["classes"]["dtype"] == np.int64


def test_float32_model_equals_the_keras_model_with_preprocessing_and_bn_folded(converted):
    paths, images, expected_logits = converted
    outputs = tflite.tflite_serving_function(paths["float32"])(images)
    np.testing.assert_allclose(outputs["logits"], expected_logits, rtol=1e-4, atol=1e-4)
    softmax = np.exp(expected_logits) / np.exp(expected_logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"], softmax, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(outputs["classes"], expected_logits.argmax(axis=1))
    # The converter folds BN (moving statistics, gamma, beta) into the convolution.
    names = [name for name, _ in ops_of(paths["float32"])]
    assert "CONV_2D" in names and "RSQRT" not in names and "BATCH_NORM" not in str(names)


def test_int8_model_computes_every_layer_in_int8(converted):
    ops = ops_of(converted[0]["int8"])
    layers_ops = [(name, dtypes) for name, dtypes in ops if name in ("CONV_2D", "FULLY_CONNECTED")]
    assert [name for name, _ in layers_ops] == ["CONV_2D", "FULLY_CONNECTED"]
    for _, (activations, weights, *_) in layers_ops:
        assert activations == np.int8 and weights == np.int8
    # Raw pixels in; the one float32 tensor is the cast pixels, quantized before normalizing.
    assert [name for name, dtypes in ops if np.float32 in dtypes] == ["QUANTIZE"]


def test_int8_model_stays_close_to_the_float_model(converted):
    paths, images, expected_logits = converted
    logits = tflite.tflite_serving_function(paths["int8"])(images)["logits"]
    spread = expected_logits.max() - expected_logits.min()
    assert np.abs(logits - expected_logits).max() < 0.05 * spread
    assert (logits.argmax(axis=1) == expected_logits.argmax(axis=1)).mean() >= 0.9


@pytest.mark.parametrize("quantization", ["float32", "int8"])
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_any_batch_size_is_served(converted, quantization, batch):
    paths, images, expected_logits = converted
    outputs = tflite.tflite_serving_function(paths[quantization])(images[:batch])
    assert outputs["logits"].shape == (batch, 10) and outputs["classes"].shape == (batch,)
    np.testing.assert_array_equal(outputs["classes"], expected_logits[:batch].argmax(axis=1))


@pytest.mark.parametrize(
    "bad_images",
    [
        np.full((2, *RAW_SHAPE), 0.5, np.float32),
        np.full((2, *RAW_SHAPE), 300, np.int64),
        np.zeros((2, 32, 32, 1), np.uint8),
        np.zeros(RAW_SHAPE, np.uint8),
    ],
    ids=["float32", "int64", "32x32", "rank3"],
)
def test_wrong_dtype_or_shape_is_refused(converted, bad_images):
    serve = tflite.tflite_serving_function(converted[0]["int8"])
    with pytest.raises(ValueError, match="expected uint8 images of shape"):
        serve(bad_images)
    # LiteRT's own signature runner refuses a wrong dtype too, for apps that skip bnzoo.
    runner = tflite._interpreter_class()(model_path=converted[0]["int8"]).get_signature_runner()
    if bad_images.dtype != np.uint8:
        with pytest.raises(ValueError, match="expected type UINT8"):
            runner(images=bad_images)


def test_metadata_travels_inside_the_flatbuffer(converted):
    metadata = tflite.read_tflite_metadata(converted[0]["float32"])
    assert metadata["input"] == {"name": "images", "dtype": "uint8", "shape": [None, 28, 28, 1]}
    assert metadata["preprocessing"] == {"mean": [0.286], "std": [0.353], "image_size": [32, 32]}
    assert metadata["quantization"] == "float32" and metadata["dataset"] == "fashion_mnist"
    assert tflite.read_tflite_metadata(converted[0]["int8"])["quantization"] == "int8"


def test_mixed_precision_model_converts_to_a_float32_graph(converted):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = make_model()
    keras.mixed_precision.set_global_policy("float32")
    blob = tflite.convert_to_tflite(model, **PREPROCESSING)
    interpreter = tflite._interpreter_class()(model_content=blob)
    dtypes = {detail["dtype"] for detail in interpreter.get_tensor_details()}
    assert not {np.float16} & dtypes and not [d for d in dtypes if "bfloat16" in str(d)]
    logits = interpreter.get_signature_runner()(images=converted[1])["logits"]
    # make_model() seeds its weights: the same weights as the float32 reference.
    np.testing.assert_allclose(logits, converted[2], rtol=1e-4, atol=1e-4)


def test_conversion_arguments_are_checked_up_front():
    model = make_model()
    with pytest.raises(ValueError, match="needs calibration_images"):
        tflite.convert_to_tflite(model, **PREPROCESSING, quantization="int8")
    with pytest.raises(ValueError, match="quantization must be one of float32, int8"):
        tflite.convert_to_tflite(model, **PREPROCESSING, quantization="int4")


# --- From a run folder, through the command lines ------------------------------------------------


def run_script(args, **kwargs):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **kwargs.pop("env", {})},
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def train_in_process(argv):
    spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return run_cli(script.main, argv, prog="train.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny finished run exported to TFLite by the command line, from a shell whose
    KERAS_BACKEND is jax (the export runs on TensorFlow whatever the training backend)."""
    path = str(tmp_path_factory.mktemp("tflite_run") / "run")
    assert train_in_process([*TINY_RUN, "--output-dir", path]) == 0
    export = run_script(
        ["-m", "bnzoo.export", path, "--calibration-images", "128"], env={"KERAS_BACKEND": "jax"}
    )
    assert export.returncode == 0, export.stderr[-2000:]
    assert export.stderr == ""
    lines = export.stdout.splitlines()
    assert lines[0].startswith(f"wrote {path}/model.tflite (") and lines[0].endswith("float32)")
    assert lines[1].endswith("int8, calibrated on 128 images of fashion_mnist train[:512])")
    return path


@pytest.mark.slow
def test_export_cli_writes_both_models_with_the_run_metadata(run_dir):
    float_path = os.path.join(run_dir, "model.tflite")
    int8_path = os.path.join(run_dir, "model_int8.tflite")
    assert not [name for name in os.listdir(run_dir) if ".tmp-" in name]
    metadata = tflite.read_tflite_metadata(int8_path)
    with open(os.path.join(run_dir, "saved_model", "assets.extra", "bnzoo.json")) as stream:
        saved_model = json.load(stream)
    assert metadata["preprocessing"] == saved_model["preprocessing"]
    assert metadata["class_names"] == saved_model["class_names"]
    assert metadata["calibration"] == {"images": 128, "split": "train[:512]", "seed": 42}
    assert tflite.read_tflite_metadata(float_path)["quantization"] == "float32"


@pytest.mark.slow
def test_evaluate_scores_tflite_files_like_the_saved_model(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as stream:
        recorded = json.load(stream)
    float_metrics = evaluation.evaluate_path(os.path.join(run_dir, "model.tflite"))
    assert set(float_metrics) == set(recorded) - {"training_compute"}  # the run's own record
    assert float_metrics["split"] == "test[:256]"  # the run's test split, from config.yaml
    assert float_metrics["confusion_matrix"] == recorded["confusion_matrix"]
    assert float_metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-4)
    int8_metrics = evaluation.evaluate_path(os.path.join(run_dir, "model_int8.tflite"))
    assert abs(int8_metrics["accuracy"] - recorded["accuracy"]) <= 0.03  # 8 of 256 images


@pytest.mark.slow
def test_a_tflite_file_copied_out_of_its_run_knows_its_dataset(run_dir, tmp_path, capsys):
    copy = str(tmp_path / "phone.tflite")
    shutil.copy(os.path.join(run_dir, "model_int8.tflite"), copy)
    source = evaluation.locate_model(copy)
    assert source.kind == "tflite" and source.run_dir is None
    assert source.defaults["dataset"] == "fashion_mnist"
    assert source.defaults["split"] == "test[:256]"


@pytest.mark.slow
def test_retraining_a_run_removes_tflite_models_of_the_previous_model(run_dir, tmp_path, capsys):
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    os.remove(os.path.join(copy, "metrics.json"))  # the final artifacts are written again
    assert train_in_process([*TINY_RUN, "--output-dir", copy]) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "rerun python -m bnzoo.export" in out
    assert not os.path.exists(os.path.join(copy, "model.tflite"))
    assert not os.path.exists(os.path.join(copy, "model_int8.tflite"))


def _one_line_error(result, *fragments):
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_evaluate_refuses_files_that_are_not_tflite_models_in_one_line(run_dir, tmp_path):
    text = tmp_path / "notes.tflite"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.tflite"
    with open(os.path.join(run_dir, "model.tflite"), "rb") as stream:
        truncated.write_bytes(stream.read(4000))
    _one_line_error(
        run_script(["evaluate.py", str(text)]), "notes.tflite is not a TFLite model", "TFL3"
    )
    _one_line_error(
        run_script(["evaluate.py", str(truncated)]), "truncated.tflite is a damaged TFLite model"
    )


@pytest.mark.slow
def test_export_cli_refuses_what_is_not_a_finished_run_in_one_line(run_dir, tmp_path):
    _one_line_error(
        run_script(["-m", "bnzoo.export", str(tmp_path / "missing")]), "missing does not exist"
    )
    _one_line_error(run_script(["-m", "bnzoo.export", str(tmp_path)]), "is not a bnzoo run folder")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(os.path.join(run_dir, "config.yaml"), unfinished)
    _one_line_error(run_script(["-m", "bnzoo.export", str(unfinished)]), "has no trained model yet")
    assert sorted(os.listdir(unfinished)) == ["config.yaml"]
    usage = run_script(["-m", "bnzoo.export", str(unfinished), "--calibration-images", "0"])
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
