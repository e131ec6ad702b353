"""Pretrained weights: the PyTorch reader, the Caffe BN-Inception conversion, downloading and
caching, offline errors, preprocessing, and what users do with loaded weights (features,
frozen fine-tuning, export).

The Caffe BN-Inception fixture (tests/fixtures/bn_inception_pth) was written by
`tools/check_bn_inception_pth.py make` from Cadene's `pretrainedmodels` BNInception (PyTorch),
every channel count divided by 32, random weights and statistics, with `torch.save` in both of
its file layouts; `logits.npy` are that independent implementation's outputs on `images.npy`,
preprocessed as `pretrainedmodels` documents (BGR, 0-255, minus [104, 117, 128]).
"""

import dataclasses
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from rounding import network_gamma

import models
from models import pretrained
from models.pytorch_checkpoint import read_state_dict

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "bn_inception_pth"
NARROW = dict(width_multiplier=1 / 32, min_depth=1)
REPOSITORY = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURE / "images.npy"), np.load(FIXTURE / "logits.npy")


def reference_tolerance(model, expected):
    """PyTorch computed the reference logits, bnzoo computes them again in its own order: each
    is within network_gamma (1.6e-5 for NARROW's 70 layers, 1,990 terms per output) of the
    logits' scale, so they agree within twice that."""
    return 2 * network_gamma(model) * np.abs(expected).max()


def caffe_model(weights, **overrides):
    arguments = dict(
        input_shape=(128, 128, 3), classifier_activation=None, weights=weights, **NARROW
    )
    return models.bn_inception(**{**arguments, **overrides})


# ------------------------------------------------------------------------------------------
# Reading .pth files without PyTorch.
# ------------------------------------------------------------------------------------------


def test_both_torch_save_layouts_read_to_the_same_arrays():
    legacy = read_state_dict(FIXTURE / "bn_inception.pth")
    zipped = read_state_dict(FIXTURE / "bn_inception_zip.pth")
    assert list(legacy) == list(zipped)
    assert legacy["conv1_7x7_s2.weight"].shape == (2, 3, 7, 7)  # 64 / 32 filters, OIHW
    assert legacy["last_linear.weight"].shape == (1000, 32)
    for name in legacy:
        assert legacy[name].dtype == np.float32
        np.testing.assert_array_equal(legacy[name], zipped[name])


def test_reader_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "exploit.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load posix.system"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [100, 30_000])
def test_truncated_files_are_reported_not_misread(tmp_path, cut):
    data = (FIXTURE / "bn_inception.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) - cut])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        read_state_dict(path)


def test_a_file_that_is_not_pytorchs_is_a_value_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch file|not a readable"):
        read_state_dict(path)


# ------------------------------------------------------------------------------------------
# The Caffe BN-Inception conversion computes the PyTorch reference's function.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["bn_inception.pth", "bn_inception_zip.pth"])
def test_converted_pth_computes_the_reference_logits(reference, file):
    images, expected = reference
    model = caffe_model(str(FIXTURE / file), include_preprocessing=True)
    logits = keras.ops.convert_to_numpy(model(images.astype(np.float32), training=False))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=reference_tolerance(model, expected))
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_preprocess_input_is_the_layer_and_pretrainedmodels_convention(reference):
    images, expected = reference
    bgr = images[..., ::-1].astype(np.float32) - np.array([104, 117, 128], np.float32)
    np.testing.assert_array_equal(models.preprocess_input(images, "caffe"), bgr)
    layer = models.ImagePreprocessing("caffe")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images.astype("float32"))), bgr)
    model = caffe_model(str(FIXTURE / "bn_inception.pth"))
    logits = keras.ops.convert_to_numpy(model(bgr, training=False))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=reference_tolerance(model, expected))


def test_caffe_weights_refuse_a_model_with_tensorflow_padding():
    with pytest.raises(ValueError, match="padding='caffe' and bn_epsilon=1e-05"):
        caffe_model(str(FIXTURE / "bn_inception.pth"), padding="same")


def test_weights_of_another_width_are_a_value_error_naming_the_layer():
    with pytest.raises(ValueError, match="conv1_7x7_s2.*width_multiplier"):
        caffe_model(str(FIXTURE / "bn_inception.pth"), width_multiplier=1 / 16)


# ------------------------------------------------------------------------------------------
# weights="imagenet": download once, convert once, then load from Keras' cache.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def narrow_caffe_weights(monkeypatch, tmp_path):
    """bn_inception's weight set, pointed at the fixture through a file:// URL."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    source = tmp_path / "published" / "bn_inception-b69da7b23.pth"
    source.parent.mkdir()
    source.write_bytes((FIXTURE / "bn_inception.pth").read_bytes())
    real = pretrained.get_weights("bn_inception")
    narrow = dataclasses.replace(
        real,
        url=source.as_uri(),
        file_name=source.name,
        file_hash="b69da7b23",  # the fixture's sha256 prefix, PyTorch-style
        builder_arguments={**real.builder_arguments, **NARROW},
    )
    monkeypatch.setattr(
        pretrained, "_WEIGHTS", [w for w in pretrained._WEIGHTS if w is not real] + [narrow]
    )
    return source


def test_imagenet_weights_are_downloaded_converted_and_cached(
    narrow_caffe_weights, reference, tmp_path
):
    images, expected = reference
    model = caffe_model("imagenet", include_preprocessing=True)
    cache = tmp_path / "keras_home" / "models"
    assert (cache / "bn_inception-b69da7b23.pth").is_file()
    assert (cache / "bnzoo" / "bn_inception_imagenet.weights.h5").is_file()
    logits = keras.ops.convert_to_numpy(model(images.astype(np.float32), training=False))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=reference_tolerance(model, expected))

    # Later builds read the converted cache: neither the published file nor its copy is needed.
    narrow_caffe_weights.unlink()
    (cache / "bn_inception-b69da7b23.pth").unlink()
    features = caffe_model("imagenet", include_top=False, pooling="avg")
    assert features.output.shape == (None, 32)
    backbone = keras.Model(model.input, model.get_layer("avg_pool").output)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(features(models.preprocess_input(images, "caffe"))),
        keras.ops.convert_to_numpy(backbone(images.astype(np.float32))),
        rtol=1e-6,
        atol=1e-6,
    )


def test_a_corrupted_download_is_refused_and_removed(narrow_caffe_weights, tmp_path):
    narrow_caffe_weights.write_bytes(b"not the published file")
    with pytest.raises(ValueError, match="sha256 does not start with b69da7b23"):
        caffe_model("imagenet")
    assert not (tmp_path / "keras_home" / "models" / narrow_caffe_weights.name).exists()


def test_offline_imagenet_is_one_os_error_saying_how_to_pass_a_local_file(
    narrow_caffe_weights, monkeypatch
):
    # Port 9 (discard) on the loopback refuses at once: no network timeout to wait for.
    weight_set = pretrained.get_weights("bn_inception")
    monkeypatch.setattr(
        pretrained,
        "_WEIGHTS",
        [dataclasses.replace(weight_set, url="http://127.0.0.1:9/bn_inception-b69da7b23.pth")],
    )
    with pytest.raises(OSError) as caught:
        caffe_model("imagenet")
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot download" in message
    assert "weights='/path/to/bn_inception-b69da7b23.pth'" in message


def test_imagenet_with_other_arguments_names_what_to_change():
    with pytest.raises(ValueError, match="padding='same' \\(the weights need 'caffe'\\)"):
        models.bn_inception(weights="imagenet", padding="same")
    with pytest.raises(ValueError, match="1000-class classifier; received classes=10"):
        models.bn_inception(weights="imagenet", classes=10)
    with pytest.raises(ValueError, match="RGB"):
        models.bn_inception(weights="imagenet", input_shape=(224, 224, 1))
    with pytest.raises(ValueError, match="no pretrained weights 'imagenet21k'"):
        models.bn_inception(weights="imagenet21k")
    with pytest.raises(ValueError, match="has no pretrained weights"):
        models.plain_cnn(weights="imagenet")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.bn_inception(weights="missing.pth")


def test_every_model_lists_its_weights_with_reported_accuracy_and_preprocessing():
    listed = {(w.model, w.tag) for w in models.list_weights()}
    assert listed == {
        ("bn_inception", "imagenet"),
        ("bn_inception_slim", "imagenet"),
        ("inception_v3", "imagenet"),
        ("resnet50", "imagenet"),
        ("resnet101", "imagenet"),
        ("resnet152", "imagenet"),
    }
    caffe = models.get_weights("bn_inception")
    assert (caffe.top1, caffe.top5, caffe.preprocessing) == (73.524, 91.562, "caffe")
    assert models.get_weights("bn_inception_slim").classes == 1001
    assert models.get_weights("inception_v3").preprocessing == "inception"
    with pytest.raises(ValueError, match="'inception_v1' has no weights 'imagenet'"):
        models.get_weights("inception_v1")


# ------------------------------------------------------------------------------------------
# With weights loaded: features, frozen fine-tuning, export.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_model():
    return caffe_model(str(FIXTURE / "bn_inception.pth"), include_preprocessing=True, classes=1000)


def test_feature_extractor_returns_named_maps_at_each_stride():
    extractor = models.create_feature_extractor(
        "bn_inception",
        weights=str(FIXTURE / "bn_inception.pth"),
        input_shape=(128, 128, 3),
        **NARROW,
    )
    shapes = {key: tuple(value.shape) for key, value in extractor.output.items()}
    assert shapes == {
        "stride_4": (None, 32, 32, 6),
        "stride_8": (None, 16, 16, 10),
        "stride_16": (None, 8, 8, 19),
        "stride_32": (None, 4, 4, 32),
    }
    outputs = extractor(np.zeros((1, 128, 128, 3), "float32"))
    assert list(outputs) == ["stride_4", "stride_8", "stride_16", "stride_32"]


@pytest.mark.parametrize(
    "name, size, shapes",
    [
        ("inception_v1", 64, [(16, 16), (8, 8), (4, 4), (2, 2)]),
        ("inception_v3", 75, [(15, 15), (7, 7), (3, 3), (1, 1)]),
        ("bn_inception_slim", 64, [(16, 16), (8, 8), (4, 4), (2, 2)]),
    ],
)
def test_every_inception_names_its_stride_4_to_32_outputs(name, size, shapes):
    extractor = models.create_feature_extractor(
        name, input_shape=(size, size, 3), width_multiplier=0.05, min_depth=2
    )
    assert [tuple(t.shape[1:3]) for t in extractor.output.values()] == shapes


def test_feature_extractor_refuses_models_without_feature_maps_and_unknown_strides():
    with pytest.raises(ValueError, match="declares no feature maps.*inception_v3"):
        models.create_feature_extractor("plain_cnn")
    with pytest.raises(ValueError, match="strides=\\[64\\]"):
        models.create_feature_extractor("inception_v1", strides=(64,))


def test_frozen_backbone_keeps_bn_in_inference_mode_while_the_head_trains(pretrained_model):
    model = keras.models.clone_model(pretrained_model)
    model.set_weights(pretrained_model.get_weights())
    frozen = models.freeze_backbone(model)
    assert frozen == len([layer for layer in model.layers if layer.weights]) - 1
    assert [layer.name for layer in model.layers if layer.trainable_weights] == ["predictions"]
    images = np.random.default_rng(0).uniform(0, 255, (4, 128, 128, 3)).astype("float32")
    # Keras' rule: training=True does not switch a frozen BN to batch statistics.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images, training=True)),
        keras.ops.convert_to_numpy(model(images, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    bn = model.get_layer("inception_4a_1x1_bn")
    statistics = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    head = keras.ops.convert_to_numpy(model.get_layer("predictions").kernel).copy()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images, np.arange(4), epochs=1, verbose=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), statistics)
    assert not np.array_equal(
        keras.ops.convert_to_numpy(model.get_layer("predictions").kernel), head
    )

    partly = models.freeze_backbone(model, until="inception_4e_output")
    assert model.get_layer("inception_4e_3x3").trainable is False
    assert model.get_layer("inception_5a_1x1").trainable is True
    assert partly < frozen
    with pytest.raises(ValueError, match="until='inception_9z'"):
        models.freeze_backbone(model, until="inception_9z")


def test_saved_model_with_preprocessing_serves_the_pretrained_function(
    pretrained_model, reference, tmp_path
):
    import tensorflow as tf

    images, expected = reference
    path = str(tmp_path / "saved_model")
    pretrained_model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)  # keep it alive: its variables die with it
    served = reloaded.serve(tf.constant(images.astype(np.float32))).numpy()
    tolerance = reference_tolerance(pretrained_model, expected)
    np.testing.assert_allclose(served, expected, rtol=0, atol=tolerance)


# ------------------------------------------------------------------------------------------
# `python -m models convert`.
# ------------------------------------------------------------------------------------------


def run_models_cli(*args, cwd, home):
    return subprocess.run(
        [sys.executable, "-m", "models", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY), "KERAS_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_convert_command_refuses_a_broken_file_in_one_line_and_leaves_nothing(tmp_path):
    broken = tmp_path / "bn_inception-52deb4733.pth"
    broken.write_bytes((FIXTURE / "bn_inception.pth").read_bytes()[:5000])
    destination = tmp_path / "out" / "bn_inception.weights.h5"
    result = run_models_cli(
        "convert", "bn_inception", str(broken), str(destination), cwd=tmp_path, home=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "truncated" in result.stderr
    assert not destination.exists() and not destination.parent.exists()

    result = run_models_cli(
        "convert", "inception_v1", str(broken), str(destination), cwd=tmp_path, home=tmp_path
    )
    assert result.returncode == 2
    assert "'inception_v1' has no weights 'imagenet'" in result.stderr
