"""train.py end to end on small slices of Fashion-MNIST: the run folder, both artifacts evaluated,
the SavedModel served without bnzoo, rerunning a finished run, and every bad input reported in
one line before the run folder is touched."""

import csv
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import unfinished_run_files

from bnzoo import evaluation
from bnzoo.cli import run_cli
from bnzoo.config import load_config
from bnzoo.data import load_dataset, preprocess_images
from bnzoo.run_folder import RunPaths, read_checkpoint_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = [
    "--train-split",
    "train[:512]",
    "--val-split",
    "train[512:640]",
    "--test-split",
    "test[:256]",
    "--epochs",
    "1",
    "--batch-size",
    "64",
]
TINY = [*SLICES, "--model-arg", "widths=[8,16]"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_cli(argv, capsys):
    status = run_cli(load_script("train").main, argv, prog="train.py")
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("e2e") / "run")
    status = run_cli(load_script("train").main, [*TINY, "--output-dir", path], prog="train.py")
    assert status == 0
    return path


@pytest.mark.slow
def test_run_folder_holds_every_artifact(run_dir):
    paths = RunPaths(run_dir)
    assert unfinished_run_files(run_dir) == []
    assert glob.glob(os.path.join(paths.logs, "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(paths.logs, "validation", "events.out.tfevents.*"))
    with open(paths.curves, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_history_has_one_row_per_epoch_matching_the_tensorboard_logs(run_dir):
    paths = RunPaths(run_dir)
    with open(paths.history, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["epoch"] for row in rows] == ["1"]
    scalars = {}
    for folder in ("train", "validation"):
        for path in glob.glob(os.path.join(paths.logs, folder, "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    scalars[(folder, value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert scalars[("train", "epoch_loss", 1)] == pytest.approx(float(rows[0]["loss"]))
    assert scalars[("validation", "epoch_accuracy", 1)] == pytest.approx(
        float(rows[0]["val_accuracy"])
    )
    assert scalars[("train", "epoch_learning_rate", 1)] == pytest.approx(
        float(rows[0]["learning_rate"])
    )
    assert read_checkpoint_state(paths.last_checkpoint)["history"][0]["loss"] == pytest.approx(
        float(rows[0]["loss"])
    )


@pytest.mark.slow
def test_saved_model_and_keras_model_evaluate_to_the_run_metrics(run_dir):
    with open(RunPaths(run_dir).metrics) as stream:
        recorded = json.load(stream)
    assert recorded["num_examples"] == 256 and recorded["split"] == "test[:256]"
    for path in (
        run_dir,
        os.path.join(run_dir, "saved_model"),
        os.path.join(run_dir, "model.keras"),
    ):
        metrics = evaluation.evaluate_path(path, batch_size=100)
        # The run's own record adds what training cost (bnzoo.training_compute).
        assert set(metrics) == set(recorded) - {"training_compute"}
        assert metrics["dataset"] == "fashion_mnist" and metrics["split"] == "test[:256]"
        assert metrics["confusion_matrix"] == recorded["confusion_matrix"], path
        assert metrics["accuracy"] == recorded["accuracy"]
        assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-5)


@pytest.mark.slow
def test_saved_model_in_a_tensorflow_only_process_predicts_like_the_keras_model(
    run_dir, serve_with_tensorflow_only
):
    import layers  # noqa: F401  (bnzoo's BN layer, for loading model.keras here)

    test_ds, info = load_dataset("fashion_mnist", split="test[:64]")
    images = np.stack([image for image, _ in test_ds.as_numpy_iterator()])
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    expected = keras.ops.convert_to_numpy(
        model(preprocess_images(images, mean=info.mean, std=info.std), training=False)
    )

    served = serve_with_tensorflow_only(os.path.join(run_dir, "saved_model"), images)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


LOAD_WITH_LAYERS_AND_MODELS_ONLY = """
import sys

import keras
import layers
import models

for path in sys.argv[1:]:
    model = keras.saving.load_model(path)
    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    steps = None if optimizer is None else int(keras.ops.convert_to_numpy(optimizer.iterations))
    print(path.rsplit("/", 1)[-1], type(optimizer).__name__, steps, model.count_params())
bnzoo_modules = sorted(name for name in sys.modules if name.split(".")[0] == "bnzoo")
print("bnzoo modules:", bnzoo_modules)
"""


@pytest.mark.slow
def test_every_keras_file_loads_in_user_code_that_imports_only_layers_and_models(run_dir):
    """A user's own script: `import keras, layers, models`, then load every .keras file the
    run wrote, the checkpoints with their optimizer state (and its learning-rate schedule)."""
    files = [
        os.path.join(run_dir, "model.keras"),
        os.path.join(run_dir, "checkpoints", "last.keras"),
        os.path.join(run_dir, "checkpoints", "best.keras"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_LAYERS_AND_MODELS_ONLY, *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    steps = read_checkpoint_state(files[1])["epoch"] * (512 // 64)
    assert lines[0].split()[:3] == ["model.keras", "NoneType", "None"]
    assert lines[1].split()[:3] == ["last.keras", "SGD", str(steps)]
    assert lines[2].split()[:3] == ["best.keras", "SGD", str(steps)]
    # Nothing of the trainer was imported by the user's script except the schedule's module.
    assert "bnzoo.training" not in lines[3]


@pytest.mark.slow
def test_evaluate_script_prints_a_table_and_writes_json_and_png(run_dir, tmp_path, capsys):
    output, figure = str(tmp_path / "m.json"), str(tmp_path / "cm.png")
    status = run_cli(
        load_script("evaluate").main,
        [os.path.join(run_dir, "saved_model"), "--output", output, "--confusion-matrix", figure],
        prog="evaluate.py",
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "top-5 accuracy" in out and "per-class accuracy:" in out and "T-shirt/top" in out
    with open(output) as stream, open(RunPaths(run_dir).metrics) as recorded:
        assert set(json.load(stream)) == set(json.load(recorded)) - {"training_compute"}
    assert os.path.getsize(figure) > 0


@pytest.mark.slow
def test_rerunning_a_finished_run_says_it_is_complete(run_dir, capsys):
    before = os.path.getmtime(os.path.join(run_dir, "model.keras"))
    status, out, _ = train_cli([*TINY, "--output-dir", run_dir], capsys)
    assert status == 0
    assert "is already complete (1 epoch; test accuracy" in out
    assert os.path.getmtime(os.path.join(run_dir, "model.keras")) == before


@pytest.mark.slow
def test_rerun_recreates_final_artifacts_lost_after_the_last_epoch(run_dir, tmp_path, capsys):
    """A kill during export: all epochs are checkpointed but saved_model/ and metrics.json are
    missing. The rerun trains nothing and re-creates them from checkpoints/last.keras."""
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    shutil.rmtree(os.path.join(copy, "saved_model"))
    os.remove(os.path.join(copy, "metrics.json"))
    status, out, err = train_cli([*TINY, "--output-dir", copy], capsys)
    assert status == 0, err
    assert "resuming" in out and not [
        line for line in out.splitlines() if line.startswith("epoch ")
    ]
    with (
        open(os.path.join(copy, "metrics.json")) as stream,
        open(os.path.join(run_dir, "metrics.json")) as original,
    ):
        recreated, recorded = json.load(stream), json.load(original)
    assert recreated["confusion_matrix"] == recorded["confusion_matrix"]
    with (
        open(os.path.join(copy, "history.csv")) as stream,
        open(os.path.join(run_dir, "history.csv")) as original,
    ):
        assert stream.read() == original.read()


@pytest.mark.slow
def test_a_run_folder_in_use_by_another_process_is_refused(run_dir, tmp_path, capsys):
    import fcntl

    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    os.remove(os.path.join(copy, "metrics.json"))  # unfinished, so train.py wants to work on it
    with open(os.path.join(copy, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        status, _, err = train_cli([*TINY, "--output-dir", copy], capsys)
    assert status == 1
    assert "is in use by another train.py process" in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(copy, "metrics.json"))


@pytest.mark.slow
def test_a_different_run_in_the_folder_is_refused_in_one_line(run_dir, capsys):
    status, _, err = train_cli([*TINY, "--lr", "0.05", "--output-dir", run_dir], capsys)
    assert status == 1
    assert err.count("\n") == 1
    assert "holds a different run (lr: 0.1 -> 0.05)" in err and "--overwrite" in err


@pytest.mark.slow
def test_a_finished_run_is_extended_by_raising_epochs_on_the_longer_schedule(
    run_dir, tmp_path, capsys
):
    copy = str(tmp_path / "copy")
    shutil.copytree(run_dir, copy)
    before = read_checkpoint_state(os.path.join(copy, "checkpoints", "last.keras"))["history"]
    status, out, err = train_cli([*TINY, "--epochs", "2", "--output-dir", copy], capsys)
    assert status == 0, err
    assert (
        f"{copy}: --epochs 1 -> 2; the learning-rate schedule from here on is the 2-epoch one"
        in out
    )
    assert f"resuming {copy} after epoch 1 of 2" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["2/2"]
    state = read_checkpoint_state(os.path.join(copy, "checkpoints", "last.keras"))
    assert state["history"][0] == before[0]  # epoch 1 is kept as it was
    # The 2-epoch cosine schedule ends at 0 after the last step, where the 1-epoch one ended.
    assert state["history"][1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)
    import layers  # noqa: F401
    import models  # noqa: F401

    checkpoint = keras.models.load_model(os.path.join(copy, "checkpoints", "last.keras"))
    assert int(checkpoint.optimizer.iterations) == 2 * (512 // 64)
    assert load_config(copy).epochs == 2  # config.yaml records the extension
    status, _, err = train_cli([*TINY, "--epochs", "1", "--output-dir", copy], capsys)
    assert status == 1 and "has already trained 2 epochs, more than --epochs 1" in err


@pytest.mark.slow
def test_a_runs_config_yaml_resumes_that_run_from_any_directory(
    run_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    config = os.path.relpath(os.path.join(run_dir, "config.yaml"))
    status, out, err = train_cli(["--config", config], capsys)
    assert status == 0, err
    assert "is already complete (1 epoch; test accuracy" in out
    assert os.listdir(tmp_path) == []  # no new run under ./runs


def mnist_files(folder, corrupt=False):
    """MNIST's four IDX files, written by hand: tiny, or with a wrong magic number."""
    import gzip
    import struct

    os.makedirs(folder, exist_ok=True)
    for prefix, count in (("train", 60000), ("t10k", 10000)):
        magic = 0x0803 if not corrupt else 0x0BAD
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as stream:
            stream.write(struct.pack(">IIII", magic, count, 28, 28))
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as stream:
            stream.write(struct.pack(">II", 0x0801, count))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["--model", "plain_cn"], 2, "plain_cnn"),
        (["--dataset", "fashion_mnst"], 1, "fashion_mnist"),
        (["--train-split", "train[:90"], 1, "train[:90"),
        (["--model", "bn_inception", "--image-size", "16"], 2, "16"),
        (["--train-split", "train[:32]"], 1, "fewer than --batch-size 64"),
        (
            ["--model-arg", "widht=[8]"],
            2,
            "plain_cnn_small has no option 'widht'; did you mean 'widths'?",
        ),
        (
            ["--model-arg", "widths=32"],
            2,
            "--model-arg widths=32: plain_cnn_small's widths takes a list of integers, e.g. "
            "widths=[16,32,64]",
        ),
        (
            ["--model-arg", "depth=true"],
            2,
            "plain_cnn_small's depth takes an integer or a list of integers, e.g. depth=2",
        ),
        (["--model-arg", "dropout_rate=2"], 2, "dropout_rate must be in [0, 1)"),
        (
            ["--image-size", "100000"],
            1,
            "--image-size 100000x100000: the input pipeline for batches of 64 images needs",
        ),
        # Which of the estimates refuses it depends on the machine; the unit tests pin each.
        (["--image-size", "3000"], 1, "--image-size 3000x3000: "),
        (["--model", "paper_mlp", "--image-size", "4000"], 1, "of available memory"),
        (["--dataset", "mnist", "--manual-dir", "{empty}", "--data-dir", "{data}"], 1, "mnist"),
        (
            ["--dataset", "mnist", "--manual-dir", "{corrupt}", "--data-dir", "{data}"],
            1,
            "train-images-idx3-ubyte.gz",
        ),
        (
            ["--distribute", "multi_worker"],
            1,
            "--distribute multi_worker needs the cluster in the environment (TF_CONFIG",
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-dataset",
        "malformed-split",
        "input-too-small",
        "split-smaller-than-batch",
        "unknown-model-arg",
        "model-arg-of-the-wrong-type",
        "model-arg-bool-for-int",
        "model-arg-the-builder-refuses",
        "input-batch-beyond-memory",
        "input-beyond-memory",
        "weights-and-pipeline-beyond-memory",
        "missing-data-files",
        "corrupt-data-files",
        "multi-worker-without-a-cluster",
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run_folder(argv, status, message, tmp_path, capsys):
    """Exit status 2 for a command line that is wrong by itself, 1 for one that fails on the
    data or the machine; either way one line, before the run folder exists."""
    replacements = {
        "{empty}": str(tmp_path / "empty"),
        "{data}": str(tmp_path / "tfds"),
        "{corrupt}": mnist_files(str(tmp_path / "corrupt"), corrupt=True),
    }
    os.makedirs(replacements["{empty}"])
    argv = [replacements.get(arg, arg) for arg in argv]
    output_dir = str(tmp_path / "run")
    actual, out, err = train_cli([*SLICES, *argv, "--output-dir", output_dir], capsys)
    assert actual == status, (out, err)
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    if status == 1 and "--image-size" in argv:
        assert "more than this machine's" in err
    assert not os.path.exists(output_dir)


@pytest.mark.slow
def test_model_args_of_a_config_file_are_checked_like_flags_in_a_real_process(tmp_path, run_script):
    (tmp_path / "run.yaml").write_text("model_args: {widths: 32}\nepochs: 1\n")
    result = run_script.run(
        "train.py", "--config", tmp_path / "run.yaml", "--output-dir", tmp_path / "run"
    )
    line = run_script.error_line(result, 2)
    assert "--model-arg widths=32: plain_cnn_small's widths takes a list of integers" in line
    assert os.listdir(tmp_path) == ["run.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, message",
    [("missing", "does not exist"), ("notes.txt", "is not a model"), (".", "is not a model")],
)
def test_evaluate_reports_a_path_that_is_not_a_model_in_one_line(name, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    status = run_cli(load_script("evaluate").main, [str(tmp_path / name)], prog="evaluate.py")
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_evaluate_script_error_is_one_line_on_stderr_in_a_real_process(tmp_path):
    """The whole process, TensorFlow's start-up logging included, prints just the one line."""
    (tmp_path / "notes.txt").write_text("hello")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), str(tmp_path / "notes.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"evaluate.py: error: {tmp_path / 'notes.txt'} is not a model: expected a .keras file "
        "(a zip archive), a .tflite file, a SavedModel folder or a bnzoo run folder"
    ]


def write_image_folder(root, sizes):
    """Three classes of RGB PNGs told apart by their dominant colour, at the given sizes."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name, colour in colours.items():
        os.makedirs(os.path.join(root, name))
        for index, (height, width) in enumerate(sizes):
            noise = rng.integers(-25, 25, (height, width, 3))
            image = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            tf.io.write_file(os.path.join(root, name, f"{index}.png"), tf.io.encode_png(image))
    return root


@pytest.mark.slow
def test_image_folder_of_varying_sizes_trains_exports_and_serves_any_size(tmp_path, capsys):
    sizes = [(20, 24), (24, 20), (22, 22), (26, 30)] * 3
    folder = write_image_folder(str(tmp_path / "images"), sizes)
    base = [
        "--dataset",
        f"image_folder:{folder}",
        "--train-split",
        "train[:24]",
        "--val-split",
        "none",
        "--test-split",
        "train[24:]",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--model-arg",
        "widths=[4,8]",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    status, _, err = train_cli(base, capsys)
    assert status == 1 and "vary in size; pass --image-size" in err
    assert not os.path.exists(tmp_path / "run")

    status, out, err = train_cli([*base, "--image-size", "16"], capsys)
    assert status == 0, err
    assert "(24 examples, varying sizes x3 -> 16x16x3): 1 epoch of 3 steps" in out
    with open(tmp_path / "run" / "metrics.json") as stream:
        metrics = json.load(stream)
    assert metrics["num_examples"] == 12
    assert metrics["class_names"] == ["blue", "green", "red"]

    serve = tf.saved_model.load(str(tmp_path / "run" / "saved_model")).signatures["serving_default"]
    assert serve.structured_input_signature[1]["images"].shape.as_list() == [None, None, None, 3]
    for height, width in ((20, 24), (40, 17)):
        outputs = serve(images=tf.zeros((2, height, width, 3), tf.uint8))
        assert outputs["probabilities"].shape == (2, 3)


@pytest.mark.slow
def test_the_readme_image_folder_command_trains_on_a_stated_stratified_split(tmp_path, capsys):
    """`python train.py --dataset image_folder:/data/flowers --image-size 64`, as the README
    prints it (made tiny): image folders default to a stratified 80/10/10 partition."""
    folder = write_image_folder(str(tmp_path / "flowers"), [(20, 24)] * 10)
    status, out, err = train_cli(
        [
            "--dataset",
            f"image_folder:{folder}",
            "--image-size",
            "16",
            *["--epochs", "1", "--batch-size", "24", "--model-arg", "widths=[4,8]"],
            *["--output-dir", str(tmp_path / "run")],
        ],
        capsys,
    )
    assert status == 0, err
    assert (
        f"on image_folder:{folder} train[:80%] (24 examples, 20x24x3 -> 16x16x3): 1 epoch of "
        "1 step; validating on train[80%:90%], testing on train[90%:] (image-folder slices are "
        "stratified by class" in out
    )
    with open(tmp_path / "run" / "metrics.json") as stream:
        metrics = json.load(stream)
    assert metrics["split"] == "train[90%:]"
    # Stratified: each of the three classes has exactly one of the three test images.
    assert [sum(row) for row in metrics["confusion_matrix"]] == [1, 1, 1]
    assert "top5_accuracy" not in metrics  # 3 classes: every prediction is in the top 5
    with open(tmp_path / "run" / "history.csv") as stream:
        row = next(csv.DictReader(stream))
    assert row["accuracy"] and row["top5_accuracy"] == "" and row["val_top5_accuracy"] == ""


@pytest.mark.slow
def test_a_default_split_too_small_for_a_tiny_image_folder_names_its_flag(tmp_path, capsys):
    folder = write_image_folder(str(tmp_path / "images"), [(8, 8)] * 2)  # 6 images
    status, _, err = train_cli(
        ["--dataset", f"image_folder:{folder}", "--batch-size", "2"]
        + ["--output-dir", str(tmp_path / "run")],
        capsys,
    )
    assert status == 1 and err.count("\n") == 1
    assert err.startswith("train.py: error: --val-split train[80%:90%]: split 'train[80%:90%]'")
    assert err.endswith("; or pass --val-split none to go without\n")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_an_image_folder_with_one_class_is_a_one_line_error(tmp_path, capsys):
    folder = str(tmp_path / "images")
    write_image_folder(folder, [(8, 8)] * 10)
    for name in ("green", "blue"):
        shutil.rmtree(os.path.join(folder, name))
    status, _, err = train_cli(
        ["--dataset", f"image_folder:{folder}", "--batch-size", "2"]
        + ["--output-dir", str(tmp_path / "run")],
        capsys,
    )
    assert status == 1 and err.count("\n") == 1
    assert f"image_folder:{folder} has 1 class (red); a classifier needs at least two" in err
    assert not os.path.exists(tmp_path / "run")


def damage(path, truncate):
    data = open(path, "rb").read()
    if truncate:
        data = data[: len(data) // 2]
    else:  # zeros inside the compressed pixel data: the header and the end are intact
        data = data[:100] + b"\0" * 16 + data[116:]
    with open(path, "wb") as stream:
        stream.write(data)


@pytest.mark.slow
@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "damaged-inside"])
def test_a_broken_image_is_named_and_the_failed_run_leaves_no_folder(truncate, tmp_path, capsys):
    """A truncated file is found when the folder is loaded; damage inside a complete file only
    when TensorFlow decodes it, in the first epoch: the run is then removed again, so the
    corrected command starts afresh."""
    folder = write_image_folder(str(tmp_path / "images"), [(12, 12)] * 8)
    broken = os.path.join(folder, "green", "3.png")
    damage(broken, truncate)
    status, out, err = train_cli(
        ["--dataset", f"image_folder:{folder}", "--batch-size", "8", "--epochs", "1"]
        + ["--model-arg", "widths=[4]", "--output-dir", str(tmp_path / "run")],
        capsys,
    )
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith(f"train.py: error: {broken}: ")
    assert "Invalid PNG data" in err and "remove or replace it" in err
    assert ("run folder:" in out) is not truncate  # truncation is caught before training
    assert not os.path.exists(tmp_path / "run")
