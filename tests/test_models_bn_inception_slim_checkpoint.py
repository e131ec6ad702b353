"""TF-slim's inception_v2 checkpoint loads into `bn_inception_slim` and computes slim's function.

The published `inception_v2_2016_08_28.tar.gz` cannot be downloaded here, so the test writes a
checkpoint of the same kind: a TF1 (V1 format, like the 2016 release) checkpoint whose variable
names and shapes are typed in from TF-slim's `nets/inception_v2.py` (not derived from bnzoo's
module tables), narrowed with slim's own `depth_multiplier` rule, with random values. The
expected logits come from an independent implementation of slim's network on `tf.nn` ops that
reads the checkpoint by slim's names: SAME padding, BN as
`(x - moving_mean) / sqrt(moving_variance + 0.001) + beta` (slim's `batch_norm_scale=False`), a
separable stem with a bias and no BN (slim's arg scope normalizes `conv2d` only), a 7×7 VALID
average pool (global here), a 1×1 convolution to 1001 logits.
"""

import os

import numpy as np
import pytest

import models

tf = pytest.importorskip("tensorflow")

MULTIPLIER, MIN_DEPTH, SIZE, CLASSES = 0.1, 8, 64, 1001


def depth(filters):
    return max(int(filters * MULTIPLIER), MIN_DEPTH)


# TF-slim nets/inception_v2.py: (scope, 1x1, 3x3 reduce, 3x3, double reduce, double, pool, proj);
# 1x1 == 0 marks the stride-2 modules (Branch_0: 3x3, Branch_1: double 3x3, Branch_2: max pool).
SLIM_MODULES = [
    ("Mixed_3b", 64, 64, 64, 64, 96, "avg", 32),
    ("Mixed_3c", 64, 64, 96, 64, 96, "avg", 64),
    ("Mixed_4a", 0, 128, 160, 64, 96, "max", 0),
    ("Mixed_4b", 224, 64, 96, 96, 128, "avg", 128),
    ("Mixed_4c", 192, 96, 128, 96, 128, "avg", 128),
    ("Mixed_4d", 160, 128, 160, 128, 160, "avg", 96),
    ("Mixed_4e", 96, 128, 192, 160, 192, "avg", 96),
    ("Mixed_5a", 0, 128, 192, 192, 256, "max", 0),
    ("Mixed_5b", 352, 192, 320, 160, 224, "avg", 128),
    ("Mixed_5c", 352, 192, 320, 192, 224, "max", 128),
]


def slim_variables(rng):
    """{slim variable name: value} of a narrowed inception_v2 with 1001 classes."""
    variables = {}

    def conv(scope, kernel, cin, cout):
        variables[f"InceptionV2/{scope}/weights"] = rng.normal(
            0, (2.0 / (kernel * kernel * cin)) ** 0.5, (kernel, kernel, cin, cout)
        )
        variables[f"InceptionV2/{scope}/BatchNorm/beta"] = rng.normal(0, 0.1, cout)
        variables[f"InceptionV2/{scope}/BatchNorm/moving_mean"] = rng.normal(0, 0.2, cout)
        variables[f"InceptionV2/{scope}/BatchNorm/moving_variance"] = rng.uniform(0.5, 2, cout)
        return cout

    multiplier = min(int(depth(64) / 3), 8)
    variables["InceptionV2/Conv2d_1a_7x7/depthwise_weights"] = rng.normal(
        0, 0.2, (7, 7, 3, multiplier)
    )
    variables["InceptionV2/Conv2d_1a_7x7/pointwise_weights"] = rng.normal(
        0, 0.3, (1, 1, 3 * multiplier, depth(64))
    )
    variables["InceptionV2/Conv2d_1a_7x7/biases"] = rng.normal(0, 0.1, depth(64))
    channels = conv("Conv2d_2b_1x1", 1, depth(64), depth(64))
    channels = conv("Conv2d_2c_3x3", 3, channels, depth(192))
    for scope, n1, n3r, n3, ndr, nd, _, proj in SLIM_MODULES:
        if n1:
            outputs = conv(f"{scope}/Branch_0/Conv2d_0a_1x1", 1, channels, depth(n1))
            conv(f"{scope}/Branch_1/Conv2d_0a_1x1", 1, channels, depth(n3r))
            outputs += conv(f"{scope}/Branch_1/Conv2d_0b_3x3", 3, depth(n3r), depth(n3))
            conv(f"{scope}/Branch_2/Conv2d_0a_1x1", 1, channels, depth(ndr))
            conv(f"{scope}/Branch_2/Conv2d_0b_3x3", 3, depth(ndr), depth(nd))
            outputs += conv(f"{scope}/Branch_2/Conv2d_0c_3x3", 3, depth(nd), depth(nd))
            outputs += conv(f"{scope}/Branch_3/Conv2d_0b_1x1", 1, channels, depth(proj))
        else:
            conv(f"{scope}/Branch_0/Conv2d_0a_1x1", 1, channels, depth(n3r))
            outputs = conv(f"{scope}/Branch_0/Conv2d_1a_3x3", 3, depth(n3r), depth(n3))
            conv(f"{scope}/Branch_1/Conv2d_0a_1x1", 1, channels, depth(ndr))
            conv(f"{scope}/Branch_1/Conv2d_0b_3x3", 3, depth(ndr), depth(nd))
            outputs += conv(f"{scope}/Branch_1/Conv2d_1a_3x3", 3, depth(nd), depth(nd)) + channels
        channels = outputs
    variables["InceptionV2/Logits/Conv2d_1c_1x1/weights"] = rng.normal(
        0, channels**-0.5, (1, 1, channels, CLASSES)
    )
    variables["InceptionV2/Logits/Conv2d_1c_1x1/biases"] = rng.normal(0, 0.1, CLASSES)
    variables["global_step"] = np.int64(1000)
    return {
        name: np.asarray(value, np.float32 if name != "global_step" else np.int64)
        for name, value in variables.items()
    }


def write_v1_checkpoint(variables, path):
    """A TF1 Saver checkpoint in the V1 single-file format of slim's 2016 releases."""
    with tf.Graph().as_default():
        for name, value in variables.items():
            tf.compat.v1.get_variable(name, initializer=value)
        saver = tf.compat.v1.train.Saver(write_version=tf.compat.v1.train.SaverDef.V1)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return saver.save(session, path, write_meta_graph=False)


def slim_reference_logits(variables, images):
    """slim's inception_v2 forward pass (is_training=False) on tf.nn ops."""
    v = variables

    def conv(x, scope, stride=1):
        y = tf.nn.conv2d(x, v[f"InceptionV2/{scope}/weights"], stride, "SAME")
        bn = f"InceptionV2/{scope}/BatchNorm/"
        y = (y - v[bn + "moving_mean"]) / np.sqrt(v[bn + "moving_variance"] + 0.001)
        return tf.nn.relu(y + v[bn + "beta"])

    x = tf.nn.separable_conv2d(
        images,
        v["InceptionV2/Conv2d_1a_7x7/depthwise_weights"],
        v["InceptionV2/Conv2d_1a_7x7/pointwise_weights"],
        [1, 2, 2, 1],
        "SAME",
    )
    x = tf.nn.relu(x + v["InceptionV2/Conv2d_1a_7x7/biases"])
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    x = conv(conv(x, "Conv2d_2b_1x1"), "Conv2d_2c_3x3")
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for scope, n1, *_, pool, _ in SLIM_MODULES:
        if n1:
            b0 = conv(x, f"{scope}/Branch_0/Conv2d_0a_1x1")
            b1 = conv(conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1"), f"{scope}/Branch_1/Conv2d_0b_3x3")
            b2 = conv(x, f"{scope}/Branch_2/Conv2d_0a_1x1")
            b2 = conv(
                conv(b2, f"{scope}/Branch_2/Conv2d_0b_3x3"), f"{scope}/Branch_2/Conv2d_0c_3x3"
            )
            pool_op = tf.nn.avg_pool2d if pool == "avg" else tf.nn.max_pool2d
            b3 = conv(pool_op(x, 3, 1, "SAME"), f"{scope}/Branch_3/Conv2d_0b_1x1")
            x = tf.concat([b0, b1, b2, b3], 3)
        else:
            b0 = conv(x, f"{scope}/Branch_0/Conv2d_0a_1x1")
            b0 = conv(b0, f"{scope}/Branch_0/Conv2d_1a_3x3", stride=2)
            b1 = conv(x, f"{scope}/Branch_1/Conv2d_0a_1x1")
            b1 = conv(b1, f"{scope}/Branch_1/Conv2d_0b_3x3")
            b1 = conv(b1, f"{scope}/Branch_1/Conv2d_1a_3x3", stride=2)
            x = tf.concat([b0, b1, tf.nn.max_pool2d(x, 3, 2, "SAME")], 3)
    # slim: AvgPool kernel min(7, map size), VALID; the map is 2x2 at 64x64 inputs.
    x = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    logits = tf.nn.conv2d(x, v["InceptionV2/Logits/Conv2d_1c_1x1/weights"], 1, "VALID")
    return (logits + v["InceptionV2/Logits/Conv2d_1c_1x1/biases"])[:, 0, 0, :].numpy()


@pytest.fixture(scope="module")
def slim_checkpoint(tmp_path_factory):
    rng = np.random.default_rng(0)
    variables = slim_variables(rng)
    path = write_v1_checkpoint(
        variables, str(tmp_path_factory.mktemp("slim") / "inception_v2.ckpt")
    )
    images = rng.integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    inputs = images.astype(np.float32) / 127.5 - 1.0  # slim's inception preprocessing
    return path, variables, images, slim_reference_logits(variables, inputs)


def build(weights, **overrides):
    arguments = dict(
        input_shape=(SIZE, SIZE, 3),
        width_multiplier=MULTIPLIER,
        min_depth=MIN_DEPTH,
        classifier_activation=None,
        weights=weights,
    )
    return models.create_model("bn_inception_slim", **{**arguments, **overrides})


def test_slim_checkpoint_computes_slims_logits_including_background(slim_checkpoint):
    path, _, images, expected = slim_checkpoint
    model = build(path, classes=1001, include_preprocessing=True)
    logits = model.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_1000_class_model_drops_slims_background_class(slim_checkpoint):
    path, _, images, expected = slim_checkpoint
    model = build(path, classes=1000)
    logits = model.predict(images.astype(np.float32) / 127.5 - 1.0, verbose=0)
    np.testing.assert_allclose(
        logits, expected[:, 1:], rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_v2_checkpoints_load_the_same(slim_checkpoint, tmp_path):
    path, variables, images, _ = slim_checkpoint
    prefix = str(tmp_path / "model.ckpt-1000")
    names = list(variables)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[variables[name] for name in names],
    )
    v1, v2 = build(path), build(prefix + ".index")
    for a, b in zip(v1.weights, v2.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_slim_weights_refuse_a_model_with_caffe_conventions(slim_checkpoint):
    path = slim_checkpoint[0]
    with pytest.raises(ValueError, match="padding='same'.*bn_epsilon=0.001"):
        models.bn_inception(
            weights=path,
            stem="separable",
            module_table="slim",
            bn_scale=False,
            normalize_stem=False,
            input_shape=(SIZE, SIZE, 3),
            width_multiplier=MULTIPLIER,
            min_depth=MIN_DEPTH,
            classes=1001,
        )


def test_convert_command_writes_a_weights_file_that_loads(slim_checkpoint, tmp_path, monkeypatch):
    path, _, images, expected = slim_checkpoint
    # The weight set's architecture is full width; convert the narrow fixture through the same
    # code with the weight set's arguments narrowed.
    from models import pretrained

    weight_set = pretrained.get_weights("bn_inception_slim")
    narrow = pretrained.WeightSet(
        **{
            **{f: getattr(weight_set, f) for f in weight_set.__dataclass_fields__},
            "builder_arguments": {
                **weight_set.builder_arguments,
                "width_multiplier": MULTIPLIER,
                "min_depth": MIN_DEPTH,
                "input_shape": (SIZE, SIZE, 3),
            },
        }
    )
    monkeypatch.setattr(pretrained, "_WEIGHTS", [narrow])
    destination = str(tmp_path / "inception_v2.weights.h5")
    models.convert_weights("bn_inception_slim", path, destination)
    assert os.path.isfile(destination) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    model = build(destination, classes=1001)
    logits = model.predict(images.astype(np.float32) / 127.5 - 1.0, verbose=0)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
