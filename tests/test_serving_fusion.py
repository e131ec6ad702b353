"""The exported serving graph runs each conv-BN-ReLU block as one fused convolution.

On TensorFlow's CPU serving path Batch Normalization costs nothing at inference only because
Grappler's remapper folds Conv2D + FusedBatchNormV3 + Relu into one `_FusedConv2D` (oneDNN's
rewrite then names it `_MklNativeFusedConv2D` or `_MklFusedConv2D`). Our layer emits
FusedBatchNormV3 in inference so that this happens; a change that breaks it (an op between the
convolution and BN, a keras.ops fallback) would silently add three passes over every activation.

The graph checked is the one the runtime executes: the SavedModel is loaded into a
`tf.compat.v1.Session`, as TensorFlow Serving loads it, and `RunOptions(output_partition_graphs=
True)` returns the partition graphs after Grappler and TensorFlow's graph rewrites.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

RAW_SHAPE = (12, 12, 1)
MEAN, STD = (0.3,), (0.35,)


def export_with_random_statistics(tmp_path, model, name, image_size=None):
    """Give every BN layer non-trivial weights, export `model`; returns (path, images, logits)."""
    from bnzoo.data import preprocess_images
    from bnzoo.export import export_serving_model
    from layers import BatchNormalization

    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, (BatchNormalization, keras.layers.BatchNormalization)):
            layer.set_weights(
                [
                    rng.uniform(0.2, 3.0, w.shape).astype("float32")
                    if "variance" in w.path or "gamma" in w.path
                    else rng.normal(0.0, 0.5, w.shape).astype("float32")
                    for w in layer.weights
                ]
            )
    path = str(tmp_path / name)
    export_serving_model(
        model, path, image_shape=RAW_SHAPE, mean=MEAN, std=STD, image_size=image_size
    )
    images = rng.integers(0, 256, (5, *RAW_SHAPE), dtype=np.uint8)
    inputs = preprocess_images(images, mean=MEAN, std=STD, image_size=image_size)
    expected = keras.ops.convert_to_numpy(model(inputs, training=False))
    return path, images, expected


def exported_plain_cnn(tmp_path, normalization):
    """A small plain_cnn (4 conv-BN-ReLU blocks) with non-trivial BN weights, exported."""
    import models

    keras.utils.set_random_seed(3)
    model = models.plain_cnn(
        input_shape=RAW_SHAPE,
        widths=(4, 8),
        normalization=normalization,
        dropout_rate=0.0,
        classifier_activation=None,
    )
    return export_with_random_statistics(tmp_path, model, f"saved_model_{normalization}")


def run_serving_graph(path, images):
    """Serve `images` from a Session; returns (executed graph nodes, logits)."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, [tf.saved_model.SERVING], path)
        signature = meta_graph.signature_def["serving_default"]
        run_metadata = tf.compat.v1.RunMetadata()
        logits = session.run(
            signature.outputs["logits"].name,
            {signature.inputs["images"].name: images},
            options=tf.compat.v1.RunOptions(output_partition_graphs=True),
            run_metadata=run_metadata,
        )
    nodes = []
    for partition in run_metadata.partition_graphs:
        nodes.extend(partition.node)
        # Functions the runtime did not inline run from the partition's library.
        for function in partition.library.function:
            nodes.extend(function.node_def)
    return nodes, logits


def fused_convolutions(nodes):
    return [node for node in nodes if node.op.endswith("FusedConv2D")]


@pytest.mark.slow
def test_serving_graph_fuses_every_conv_bn_relu_block_into_one_convolution(tmp_path):
    path, images, expected = exported_plain_cnn(tmp_path, "batch_norm")
    nodes, logits = run_serving_graph(path, images)

    fused = fused_convolutions(nodes)
    assert len(fused) == 4, sorted(node.op for node in nodes)
    for node in fused:
        assert list(node.attr["fused_ops"].list.s) == [b"FusedBatchNorm", b"Relu"], node
    left_over = [node.op for node in nodes if "BatchNorm" in node.op or node.op == "Relu"]
    assert left_over == []
    # The fused graph computes what the Keras model computes.
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_keras_batch_normalization_is_not_fused_which_the_check_detects(tmp_path):
    """Keras' layer computes inference BN as x * a + b: the remapper has no pattern for it, so
    the convolutions stay plain and BN and ReLU run as separate ops (3 more passes each)."""
    path, images, expected = exported_plain_cnn(tmp_path, "keras")
    nodes, logits = run_serving_graph(path, images)

    assert fused_convolutions(nodes) == []
    ops = [node.op for node in nodes]
    assert sum(op.endswith("Conv2D") for op in ops) == 4
    assert ops.count("Relu") == 4
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_static_batch_of_one_still_fuses(tmp_path):
    """At batch 1 every activation is under the training size threshold; inference must still
    give Grappler the kernel to fold into the convolutions."""
    import models

    keras.utils.set_random_seed(3)
    model = models.plain_cnn(input_shape=RAW_SHAPE, widths=(4, 8), dropout_rate=0.0)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        tf.function(
            lambda images: {"logits": model(images, training=False)},
            input_signature=[tf.TensorSpec([1, *RAW_SHAPE], tf.float32, name="images")],
        ),
    )
    path = str(tmp_path / "saved_model_batch_1")
    archive.write_out(path, verbose=False)
    nodes, _ = run_serving_graph(path, np.zeros((1, *RAW_SHAPE), np.float32))
    assert len(fused_convolutions(nodes)) == 4, sorted(node.op for node in nodes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bn_inception", "bn_inception_slim"])
def test_both_bn_inception_readings_serve_every_bn_fused(tmp_path, name):
    """Each reading's own BN settings (Caffe's epsilon 1e-5; slim's BN without gamma) must keep
    the fused kernel, or BN-Inception's 69 blocks lose their fusion."""
    import models
    from layers import BatchNormalization

    keras.utils.set_random_seed(3)
    model = models.create_model(
        name,
        input_shape=(32, 32, 1),
        classes=10,
        width_multiplier=0.25,
        classifier_activation=None,
    )
    path, images, expected = export_with_random_statistics(tmp_path, model, name, (32, 32))
    nodes, logits = run_serving_graph(path, images)

    normalizations = [layer for layer in model.layers if isinstance(layer, BatchNormalization)]
    fused = [
        node
        for node in fused_convolutions(nodes)
        if list(node.attr["fused_ops"].list.s) == [b"FusedBatchNorm", b"Relu"]
    ]
    assert len(fused) == len(normalizations) > 60
    assert [node.op for node in nodes if "BatchNorm" in node.op] == []
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
