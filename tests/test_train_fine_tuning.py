"""train.py --weights / --freeze-backbone: fine-tuning the narrow BN-Inception fixture on a small
RGB image folder that the tests write.

The source weights are tests/fixtures/bn_inception_pth (Cadene's BN-Inception with every channel
count divided by 32; see tests/test_models_pretrained.py), read from the .pth file, from the
`imagenet` tag pointed at a file:// copy of it, or from a bnzoo .keras model.
"""

import dataclasses
import os
import pathlib
import re

import keras
import numpy as np
import pytest

import models
from bnzoo.cli import EXIT_USAGE, EXIT_USER_ERROR, run_cli
from bnzoo.config import parse_train_args
from bnzoo.export import read_export_metadata
from bnzoo.training import train
from models import bn_inception_weights, pretrained
from models.pytorch_checkpoint import read_state_dict

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "bn_inception_pth" / "bn_inception.pth"
NARROW = dict(width_multiplier=1 / 32, min_depth=1)
SIZE = 32  # bn_inception's smallest input (MIN_INPUT_SIZE), which Caffe's padding accepts
TINY = [
    "--model",
    "bn_inception",
    "--model-arg",
    "width_multiplier=0.03125",
    "--model-arg",
    "min_depth=1",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--bn-statistics-batches",
    "2",
    "--no-mixed-precision",
]


def write_image_folder(root, channels=3, per_class=20):
    """Two classes of noisy images around a red and a blue colour (gray levels for 1 channel)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.normal(colour[:channels], 40, (SIZE, SIZE, channels))
            image = np.clip(pixels, 0, 255).astype(np.uint8)
            Image.fromarray(image[..., 0] if channels == 1 else image).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("rgb") / "images")


def fine_tune(folder, output_dir, *argv):
    config = parse_train_args(
        [*TINY, "--dataset", f"image_folder:{folder}", "--output-dir", str(output_dir), *argv]
    )
    return train(config)


def train_status(argv, capsys):
    """train.py's main in this process: (exit status, stdout, stderr)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train", pathlib.Path(__file__).parent.parent / "train.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    status = run_cli(script.main, argv, prog="train.py")
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def weights_status(folder, weights, run_dir, capsys, *argv):
    """train.py on `folder` with `--weights weights`: (exit status, stdout, stderr)."""
    return train_status(
        [
            *TINY,
            "--dataset",
            f"image_folder:{folder}",
            "--weights",
            str(weights),
            "--output-dir",
            str(run_dir),
            *argv,
        ],
        capsys,
    )


def layer_arrays(model, name):
    return [keras.ops.convert_to_numpy(v) for v in model.get_layer(name).weights]


def assert_same_layer_weights(model, source, name):
    ours, theirs = layer_arrays(model, name), layer_arrays(source, name)
    assert len(ours) == len(theirs), name
    for mine, original in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(mine, original, name)


@pytest.fixture
def narrow_imagenet(monkeypatch, tmp_path):
    """bn_inception's `imagenet` weight set pointed at a file:// copy of the fixture, with
    Keras' cache in tmp_path (as in tests/test_models_pretrained.py)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    source = tmp_path / "published" / "bn_inception-b69da7b23.pth"
    source.parent.mkdir()
    source.write_bytes(FIXTURE.read_bytes())
    real = pretrained.get_weights("bn_inception")
    narrow = dataclasses.replace(
        real,
        url=source.as_uri(),
        file_name=source.name,
        file_hash="b69da7b23",
        builder_arguments={**real.builder_arguments, **NARROW},
    )
    monkeypatch.setattr(
        pretrained, "_WEIGHTS", [w for w in pretrained._WEIGHTS if w is not real] + [narrow]
    )
    return source


# ------------------------------------------------------------------------------------------
# Released weights (.pth), frozen backbone, export.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_pth_run(rgb_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pth") / "run"
    fine_tune(rgb_folder, run_dir, "--weights", str(FIXTURE), "--freeze-backbone")
    return run_dir


@pytest.mark.slow
def test_frozen_pth_backbone_is_the_converted_checkpoint_after_training(frozen_pth_run):
    run_dir = frozen_pth_run
    trained = keras.models.load_model(run_dir / "model.keras", compile=False)
    reference = models.bn_inception(include_top=False, input_shape=(SIZE, SIZE, 3), **NARROW)
    converted = bn_inception_weights.from_caffe_state_dict(str(FIXTURE), reference)
    backbone = [
        layer.name for layer in trained.layers if layer.weights and layer.name != "predictions"
    ]
    assert set(backbone) == set(converted) - {"predictions"}  # the 1000-class head stays out
    for name in backbone:  # kernels, gamma, beta and BN's moving statistics, exactly
        layer = trained.get_layer(name)
        for variable in layer.weights:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), converted[name][variable.name], name
            )
    # Independently of the converter: PyTorch's OIHW kernel is Keras' HWIO one.
    state = read_state_dict(FIXTURE)
    np.testing.assert_array_equal(
        layer_arrays(trained, "conv1_7x7_s2")[0],
        state["conv1_7x7_s2.weight"].transpose(2, 3, 1, 0),
    )
    # The classifier is train.py's, for the folder's 2 classes, and it trained.
    kernel, bias = layer_arrays(trained, "predictions")
    assert kernel.shape == (32, 2) and np.abs(bias).max() > 0
    assert trained.get_layer("preprocessing").mode == "caffe"


@pytest.mark.slow
def test_released_weights_export_serves_uint8_images_like_the_keras_model(
    frozen_pth_run, rgb_folder, serve_with_tensorflow_only
):
    from PIL import Image

    run_dir = frozen_pth_run
    metadata = read_export_metadata(run_dir / "saved_model")
    assert metadata["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    assert metadata["preprocessing"]["std"] == pytest.approx([1 / 255] * 3)
    images = np.stack(
        [np.asarray(Image.open(path)) for path in sorted(rgb_folder.glob("class_*/1*.png"))]
    )
    served = serve_with_tensorflow_only(run_dir / "saved_model", images)
    trained = keras.models.load_model(run_dir / "model.keras", compile=False)
    expected = keras.ops.convert_to_numpy(trained(images.astype("float32"), training=False))
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# The imagenet tag, partial freezing, Algorithm 2 and resuming.
# ------------------------------------------------------------------------------------------


PARTLY_FROZEN_IMAGENET = (
    *("--weights", "imagenet", "--freeze-backbone", "--freeze-until", "inception_4e_output"),
)


@pytest.mark.slow
def test_imagenet_tag_partly_frozen_keeps_frozen_statistics_and_resumes_without_the_source(
    narrow_imagenet, rgb_folder, tmp_path, logged_lines
):
    run_dir = tmp_path / "run"
    fine_tune(rgb_folder, run_dir, *PARTLY_FROZEN_IMAGENET)
    lines = logged_lines()
    out = "\n".join(lines)
    assert "initialized 138 layers of bn_inception from bn_inception weights 'imagenet'" in out
    assert "the classifier (predictions, 2 classes) starts random" in out
    frozen = re.search(r"froze (\d+) layers up to inception_4e_output \((\d+) BN layers", out)
    assert frozen and 0 < int(frozen[2]) < int(frozen[1]) < 138, out
    source = models.bn_inception(
        include_top=False, weights="imagenet", input_shape=(SIZE, SIZE, 3), **NARROW
    )
    trained = keras.models.load_model(run_dir / "model.keras", compile=False)
    # Frozen: Algorithm 2 (--bn-statistics population, the default) left their statistics.
    for name in ("conv1_7x7_s2_bn", "inception_4e_double_3x3_2_bn"):
        assert_same_layer_weights(trained, source, name)
    # After inception_4e: trained, and their statistics recomputed on the folder's images.
    moving_mean = trained.get_layer("inception_5b_1x1_bn").moving_mean
    assert not np.array_equal(
        keras.ops.convert_to_numpy(moving_mean),
        keras.ops.convert_to_numpy(source.get_layer("inception_5b_1x1_bn").moving_mean),
    )

    # Resuming (one more epoch) reads the checkpoint, not the weights: they are gone now.
    narrow_imagenet.unlink()
    for path in (tmp_path / "keras_home").rglob("*"):
        if path.is_file():
            path.unlink()
    result = fine_tune(rgb_folder, run_dir, *PARTLY_FROZEN_IMAGENET, "--epochs", "2")
    assert (result.resumed_from_epoch, result.epochs_completed) == (1, 2)
    assert not [line for line in logged_lines()[len(lines) :] if "initialized" in line]
    resumed = keras.models.load_model(run_dir / "model.keras", compile=False)
    assert_same_layer_weights(resumed, source, "conv1_7x7_s2")


def test_offline_tag_is_the_one_line_os_error_and_leaves_nothing(
    narrow_imagenet, monkeypatch, rgb_folder, tmp_path, capsys
):
    weight_set = pretrained.get_weights("bn_inception")
    monkeypatch.setattr(
        pretrained,
        "_WEIGHTS",
        [dataclasses.replace(weight_set, url="http://127.0.0.1:9/bn_inception-b69da7b23.pth")],
    )
    run_dir = tmp_path / "run"
    status, _, err = train_status(
        [
            *TINY,
            "--dataset",
            f"image_folder:{rgb_folder}",
            "--weights",
            "imagenet",
            "--output-dir",
            str(run_dir),
        ],
        capsys,
    )
    assert status == EXIT_USER_ERROR
    assert err.count("\n") == 1 and "cannot download" in err and "/path/to/" in err
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------
# A bnzoo .keras model as the source.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_keras_model_source_gets_a_new_classifier_and_keeps_the_dataset_normalization(
    rgb_folder, tmp_path, logged_lines
):
    source = models.bn_inception(
        input_shape=(SIZE, SIZE, 3), classes=5, classifier_activation=None, **NARROW
    )
    source.save(tmp_path / "five_classes.keras")
    run_dir = tmp_path / "run"
    fine_tune(
        rgb_folder, run_dir, "--weights", str(tmp_path / "five_classes.keras"), "--freeze-backbone"
    )
    out = "\n".join(logged_lines())
    assert "initialized 138 layers" in out and "(predictions, 2 classes) starts random" in out
    trained = keras.models.load_model(run_dir / "model.keras", compile=False)
    for name in ("conv1_7x7_s2", "conv1_7x7_s2_bn", "inception_5b_pool_proj_bn"):
        assert_same_layer_weights(trained, source, name)
    preprocessing = read_export_metadata(run_dir / "saved_model")["preprocessing"]
    assert preprocessing["mean"] == pytest.approx([0.5] * 3)  # an image folder's default
    assert not any(layer.name == "preprocessing" for layer in trained.layers)


# ------------------------------------------------------------------------------------------
# Mistakes: one line, exit status 2, nothing written.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_missing_weights_file_exits_2_before_anything_is_written(tmp_path, run_script):
    result = run_script.run(
        "train.py",
        *TINY,
        "--dataset",
        f"image_folder:{tmp_path / 'nowhere'}",
        "--weights",
        "missing/bn_inception.pth",
        "--output-dir",
        tmp_path / "run",
        cwd=tmp_path,
    )
    line = run_script.error_line(result, EXIT_USAGE)
    assert f"--weights {tmp_path}/missing/bn_inception.pth: no such file or folder" in line
    assert os.listdir(tmp_path) == []


def test_grayscale_images_with_rgb_weights_exit_2(tmp_path, capsys):
    gray = write_image_folder(tmp_path / "gray", channels=1, per_class=8)
    status, _, err = weights_status(gray, FIXTURE, tmp_path / "run", capsys)
    assert status == EXIT_USAGE and err.count("\n") == 1
    assert "needs 3-channel (RGB) images" in err and "1-channel ones" in err
    assert not (tmp_path / "run").exists()


def test_a_keras_model_of_another_architecture_exits_2(rgb_folder, tmp_path, capsys):
    other = models.create_model("plain_cnn", input_shape=(SIZE, SIZE, 3), classes=2)
    other.save(tmp_path / "plain.keras")
    status, _, err = weights_status(rgb_folder, tmp_path / "plain.keras", tmp_path / "run", capsys)
    assert status == EXIT_USAGE and err.count("\n") == 1
    assert "not the same architecture as bn_inception" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras', before it fails
def test_a_weights_h5_file_of_other_classes_says_what_to_pass_instead(rgb_folder, tmp_path, capsys):
    models.bn_inception(input_shape=(SIZE, SIZE, 3), classes=5, **NARROW).save_weights(
        tmp_path / "five.weights.h5"
    )
    status, _, err = weights_status(
        rgb_folder, tmp_path / "five.weights.h5", tmp_path / "run", capsys
    )
    assert status == EXIT_USAGE and err.count("\n") == 1
    assert "loads only into the same model with the same classes" in err
    assert not (tmp_path / "run").exists()


def test_freeze_until_an_unknown_layer_names_close_ones(rgb_folder, tmp_path, capsys):
    status, _, err = weights_status(
        rgb_folder,
        FIXTURE,
        tmp_path / "run",
        capsys,
        *("--freeze-backbone", "--freeze-until", "inception_4e_outptu"),
    )
    assert status == EXIT_USAGE
    assert "--freeze-until inception_4e_outptu: bn_inception has no such layer" in err
    assert "did you mean 'inception_4e_output'" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# The same on JAX (train.py in a subprocess; the model.keras it writes is read back here).
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.extended
def test_on_jax_a_partly_frozen_pth_run_keeps_the_frozen_layers_and_trains_the_rest(
    rgb_folder, tmp_path, run_script
):
    run_dir = tmp_path / "run"
    result = run_script.run(
        "train.py",
        *TINY,
        *("--dataset", f"image_folder:{rgb_folder}", "--output-dir", run_dir),
        *("--weights", FIXTURE, "--freeze-backbone", "--freeze-until", "inception_4e_output"),
        cwd=tmp_path,
        timeout=600,
        env={"KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "froze 110 layers" in result.stdout

    trained = keras.models.load_model(run_dir / "model.keras", compile=False)
    reference = models.bn_inception(include_top=False, input_shape=(SIZE, SIZE, 3), **NARROW)
    converted = bn_inception_weights.from_caffe_state_dict(str(FIXTURE), reference)
    names = [layer.name for layer in trained.layers]
    stop = names.index("inception_4e_output")
    frozen = [n for n in names[: stop + 1] if trained.get_layer(n).weights]
    later = [n for n in names[stop + 1 :] if trained.get_layer(n).weights and n != "predictions"]
    assert len(frozen) == 110 and later
    for name in frozen:  # kernels and BN statistics exactly the source's
        for variable in trained.get_layer(name).weights:
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), converted[name][variable.name], name
            )
    changed = [
        name
        for name in later
        if any(
            not np.array_equal(keras.ops.convert_to_numpy(v), converted[name][v.name])
            for v in trained.get_layer(name).weights
        )
    ]
    assert changed == later  # every trainable module after 4e moved (weights or statistics)
