"""The serving SavedModel: raw uint8 images in, the same answers as the Keras model out, loadable
without bnzoo, and strict about what it accepts."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from bnzoo.data import preprocess_images
from bnzoo.export import export_serving_model, read_export_metadata, serving_function

RAW_SHAPE = (28, 28, 1)  # Fashion-MNIST as the dataset delivers it
MODEL_SIZE = (32, 32)  # a model that needs padding, like bn_inception
MEAN, STD = (0.286,), (0.353,)


def make_model():
    """A tiny conv net with bnzoo's BN whose moving statistics are far from their initial 0/1,
    so that inference must really use them for the outputs to agree."""
    import layers

    keras.utils.set_random_seed(1)
    inputs = keras.Input((*MODEL_SIZE, 1))
    x = keras.layers.Conv2D(4, 3, strides=2)(inputs)
    x = layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(x))
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 4).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.2, 3.0, 4).astype("float32"))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model()
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    export_serving_model(
        model,
        path,
        image_shape=RAW_SHAPE,
        mean=MEAN,
        std=STD,
        image_size=MODEL_SIZE,
        metadata={"dataset": "fashion_mnist", "class_names": [str(i) for i in range(10)]},
    )
    images = np.random.default_rng(0).integers(0, 256, (7, *RAW_SHAPE), dtype=np.uint8)
    expected = model(preprocess_images(images, mean=MEAN, std=STD, image_size=MODEL_SIZE))
    return path, images, keras.ops.convert_to_numpy(expected)


def test_signature_takes_uint8_images_named_images_and_returns_three_outputs(exported):
    path, _, _ = exported
    signature = tf.saved_model.load(path).signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["images"]
    assert inputs["images"].dtype == tf.uint8
    assert inputs["images"].shape.as_list() == [None, *RAW_SHAPE]
    outputs = signature.structured_outputs
    assert sorted(outputs) == ["classes", "logits", "probabilities"]
    assert outputs["probabilities"].dtype == tf.float32
    assert outputs["classes"].dtype == tf.int64


def test_outputs_equal_the_keras_model_on_preprocessed_images(exported):
    path, images, expected_logits = exported
    outputs = tf.saved_model.load(path).signatures["serving_default"](images=images)
    np.testing.assert_allclose(outputs["logits"].numpy(), expected_logits, rtol=1e-5, atol=1e-5)
    softmax = np.exp(expected_logits) / np.exp(expected_logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), softmax, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected_logits.argmax(axis=1))


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_any_batch_size_is_served(exported, batch):
    path, images, expected_logits = exported
    outputs = tf.saved_model.load(path).signatures["serving_default"](images=images[:batch])
    np.testing.assert_allclose(
        outputs["logits"].numpy(), expected_logits[:batch], rtol=1e-5, atol=1e-5
    )


def test_loads_in_a_process_that_imports_only_tensorflow(exported, serve_with_tensorflow_only):
    """No bnzoo, no Keras custom objects: the subprocess cannot even import the project."""
    path, images, expected_logits = exported
    logits = serve_with_tensorflow_only(path, images)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_keras_tfsm_layer_gives_the_same_outputs(exported):
    path, images, expected_logits = exported
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    outputs = layer(images)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs["logits"]), expected_logits, rtol=1e-5, atol=1e-5
    )


# Every kind of input a Python caller can pass that is not uint8 raw pixels. Each used to be
# converted silently somewhere: scaled floats become black images (0.5 -> 0), int64 wraps
# modulo 256 (300 -> 44).
NOT_UINT8 = {
    "numpy_float32_scaled": lambda: np.full((2, *RAW_SHAPE), 0.5, np.float32),
    "numpy_float64_raw": lambda: np.full((2, *RAW_SHAPE), 200.0),
    "numpy_int64": lambda: np.full((2, *RAW_SHAPE), 300, np.int64),
    "numpy_int32_in_range": lambda: np.full((2, *RAW_SHAPE), 7, np.int32),
    "list_of_floats": lambda: np.full((2, *RAW_SHAPE), 0.5).tolist(),
    "tensor_float32": lambda: tf.fill((2, *RAW_SHAPE), 0.5),
    "tensor_int64": lambda: tf.fill((2, *RAW_SHAPE), tf.constant(300, tf.int64)),
}
WRONG_SHAPE = {
    "rank3": lambda: np.zeros(RAW_SHAPE, np.uint8),  # one image without its batch axis
    "32x32": lambda: np.zeros((2, 32, 32, 1), np.uint8),  # the model's size, not the dataset's
    "rgb": lambda: np.zeros((2, 28, 28, 3), np.uint8),  # RGB for a grayscale model
}


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported[0])


@pytest.mark.parametrize(
    "make_input", [*NOT_UINT8.values(), *WRONG_SHAPE.values()], ids=[*NOT_UINT8, *WRONG_SHAPE]
)
def test_loaded_attribute_refuses_anything_but_uint8_images(loaded, make_input):
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.serving_default(make_input())
    with pytest.raises(ValueError, match="Could not find matching concrete function"):
        loaded.serving_default(images=make_input())


@pytest.mark.parametrize(
    "make_input", [*NOT_UINT8.values(), *WRONG_SHAPE.values()], ids=[*NOT_UINT8, *WRONG_SHAPE]
)
def test_tfsm_layer_refuses_anything_but_uint8_images(exported, make_input):
    layer = keras.layers.TFSMLayer(exported[0], call_endpoint="serving_default")
    with pytest.raises(ValueError):
        layer(make_input())


@pytest.mark.parametrize(
    "make_input",
    [NOT_UINT8["tensor_float32"], NOT_UINT8["tensor_int64"], *WRONG_SHAPE.values()],
    ids=["tensor_float32", "tensor_int64", *WRONG_SHAPE],
)
def test_signature_refuses_tensors_of_another_dtype_or_shape(loaded, make_input):
    signature = loaded.signatures["serving_default"]
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError)):
        signature(images=tf.constant(make_input()))


def test_signature_casts_numpy_before_the_graph_runs_as_the_docs_warn(loaded):
    """TensorFlow's Python binding converts a NumPy argument to the signature's dtype
    (tf.TensorSpec.cast, NumPy's unsafe cast) before any exported op sees it, so no SavedModel
    can refuse it there. The docs send Python callers to `loaded.serving_default`, which refuses
    it (above). This pins the caveat: if TensorFlow starts refusing, the docs must change."""
    scaled = np.full((2, *RAW_SHAPE), 0.5, np.float32)
    signature = loaded.signatures["serving_default"]
    served = signature(images=scaled)["logits"].numpy()
    black = signature(images=np.zeros((2, *RAW_SHAPE), np.uint8))["logits"].numpy()
    np.testing.assert_array_equal(served, black)


def test_a_list_of_ints_out_of_uint8_range_wraps_in_the_callers_tensorflow_as_the_docs_warn(
    loaded,
):
    """A nested Python list has no dtype: TensorFlow's `convert_to_tensor` makes it uint8 in the
    caller, wrapping 300 to 44 and -1 to 255, before the restored function sees it. The docs
    (training.md, serving) say so; this pins the caveat so the docs change if TensorFlow does."""
    wrapped = loaded.serving_default(np.full((1, *RAW_SHAPE), 300).tolist())["logits"].numpy()
    as_44 = loaded.serving_default(np.full((1, *RAW_SHAPE), 44, np.uint8))["logits"].numpy()
    np.testing.assert_array_equal(wrapped, as_44)


@pytest.mark.parametrize("images", ["numpy", "tensor", "list"])
def test_every_path_serves_uint8_images_as_numpy_tensor_or_list(exported, loaded, images):
    path, raw, expected_logits = exported
    value = {"numpy": raw, "tensor": tf.constant(raw), "list": raw.tolist()}[images]
    outputs = [loaded.serving_default(value), loaded.signatures["serving_default"](images=value)]
    if images != "list":  # Keras layers take arrays and tensors, not nested lists
        layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
        outputs.append(layer(value))
    for output in outputs:
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(output["logits"]), expected_logits, rtol=1e-5, atol=1e-5
        )


def test_an_empty_batch_gives_empty_outputs_on_every_path(exported, loaded):
    path, _, _ = exported
    empty = np.zeros((0, *RAW_SHAPE), np.uint8)
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    for outputs in (
        loaded.serving_default(empty),
        loaded.signatures["serving_default"](images=tf.constant(empty)),
        layer(empty),
    ):
        assert tuple(outputs["logits"].shape) == (0, 10)
        assert tuple(outputs["probabilities"].shape) == (0, 10)
        assert tuple(outputs["classes"].shape) == (0,)


def test_serving_function_refuses_other_dtypes_in_process():
    serve = serving_function(
        make_model(), image_shape=RAW_SHAPE, mean=MEAN, std=STD, image_size=MODEL_SIZE
    )
    with pytest.raises(ValueError, match="expects uint8"):
        serve(np.full((2, *RAW_SHAPE), 0.5, np.float32))


def test_export_records_its_preprocessing_and_metadata(exported):
    path, _, _ = exported
    metadata = read_export_metadata(path)
    assert metadata["input"] == {"name": "images", "dtype": "uint8", "shape": [None, 28, 28, 1]}
    assert metadata["preprocessing"] == {"mean": [0.286], "std": [0.353], "image_size": [32, 32]}
    assert metadata["dataset"] == "fashion_mnist"


def test_export_replaces_an_existing_folder_and_leaves_no_temporary_files(tmp_path):
    path = str(tmp_path / "saved_model")
    os.makedirs(path)
    with open(os.path.join(path, "stale.txt"), "w") as stream:
        stream.write("from an older export")
    export_serving_model(
        make_model(), path, image_shape=RAW_SHAPE, mean=MEAN, std=STD, image_size=MODEL_SIZE
    )
    assert os.listdir(tmp_path) == ["saved_model"]
    assert not os.path.exists(os.path.join(path, "stale.txt"))
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    with open(os.path.join(path, "assets.extra", "bnzoo.json")) as stream:
        assert json.load(stream)["signature"] == "serving_default"


@pytest.mark.parametrize("stage", ["writing", "renaming"])
def test_an_interrupted_export_keeps_the_previous_one_and_no_temporary_folder(
    tmp_path, monkeypatch, stage
):
    """A Ctrl-C (or the CLI's SIGTERM exception) while the new SavedModel is written, or between
    moving the old one aside and renaming the new one in, leaves the previous export in place."""
    import bnzoo.export.saved_model as saved_model

    path = str(tmp_path / "saved_model")
    os.makedirs(path)
    with open(os.path.join(path, "previous.txt"), "w") as stream:
        stream.write("the previous export")
    if stage == "writing":
        monkeypatch.setattr(
            saved_model.json, "dump", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        )
    else:
        real_replace = os.replace

        def replace(source, destination):
            if ".tmp-" in os.fspath(source):
                raise KeyboardInterrupt()
            real_replace(source, destination)

        monkeypatch.setattr(saved_model.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_serving_model(
            make_model(), path, image_shape=RAW_SHAPE, mean=MEAN, std=STD, image_size=MODEL_SIZE
        )
    assert os.listdir(tmp_path) == ["saved_model"]
    assert os.listdir(path) == ["previous.txt"]


def test_mixed_precision_model_serves_float32_outputs(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = make_model()
    keras.mixed_precision.set_global_policy("float32")
    serve = serving_function(
        model, image_shape=RAW_SHAPE, mean=MEAN, std=STD, image_size=MODEL_SIZE
    )
    outputs = serve(tf.zeros((2, *RAW_SHAPE), tf.uint8))
    assert outputs["logits"].dtype == tf.float32
    assert outputs["probabilities"].dtype == tf.float32
