"""The Batch Normalization layers of a model: find them, and switch synchronized BN in place.

One definition of "a BN layer" for the whole project: `layers.BatchNormalization` and
`keras.layers.BatchNormalization` (with their subclasses), wherever they sit in the model.
Everything that treats BN layers specially (Algorithm 2's population statistics, freezing,
weight conversion, synchronized BN for multi-replica training) asks `batch_norm_layers`.
"""

from __future__ import annotations

import keras

from .batch_normalization import BatchNormalization

_BATCH_NORM_CLASSES = (BatchNormalization, keras.layers.BatchNormalization)


def batch_norm_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every BN layer of `model`, nested models and layers included, each once.

    BN layers are instances of `layers.BatchNormalization` or `keras.layers.BatchNormalization`
    (subclasses included). `model.layers` is only the top level, so a BN layer inside a nested
    model (a backbone in a classifier) or a custom block would be missed there; this walks
    every tracked sub-layer. A BN layer passed as `model` is returned itself.

    Args:
        model: a Keras model or layer, built or not.

    Returns:
        The BN layers depth first, each container's sub-layers in the order Keras tracks them
        (for functional and sequential models that of `model.layers`: data-flow order).

    Example:

    ```python
    import keras
    import layers

    backbone = keras.Sequential([keras.Input((8,)), layers.BatchNormalization()])
    model = keras.Sequential([backbone, keras.layers.BatchNormalization()])
    [layer.name for layer in layers.batch_norm_layers(model)]  # both, the nested one first
    ```
    """
    return [layer for layer in _depth_first(model) if isinstance(layer, _BATCH_NORM_CLASSES)]


def _depth_first(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """`model` and every sub-layer, each once, depth first in the order Keras tracks them.

    `Layer._flatten_layers(recursive=False)` lists the sub-layers a layer tracks as attributes
    (nested models included); Keras 3 has no public equivalent (`Model.layers` is one level
    deep). Its recursive form visits nested sub-layers in reverse order, which would name an
    inner model's last BN layer before its first.
    """
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(reversed(layer._flatten_layers(include_self=False, recursive=False)))
    return found


def set_batch_norm_synchronized(
    model: keras.layers.Layer, synchronized: bool
) -> list[keras.layers.Layer]:
    """Sets `synchronized` on every BN layer of `model`, in place; returns the layers changed.

    Synchronized BN (TensorFlow only) computes each training batch's statistics over the
    global batch of all replicas of a `tf.distribute` strategy, with two all-reduces per BN
    layer and step; unsynchronized, each replica normalizes with its own share, as the paper
    did (its 2015 multi-GPU training normalized per GPU). The model is not copied: weights,
    optimizer state and compiled metrics stay as they are. The layers read the setting when
    their call is traced, so switch before training starts, or `model.compile(...)` again
    after switching a model that `fit` has already traced.

    Switching back to `False` before `model.save(...)` writes a `.keras` file that loads on
    every backend (both Keras' layer and bnzoo's refuse `synchronized=True` outside
    TensorFlow).

    Args:
        model: a Keras model or layer; its BN layers are found by `batch_norm_layers`.
        synchronized: the new setting, `True` or `False`.

    Returns:
        The BN layers whose setting changed (empty when all already had it).

    Raises:
        ValueError: `synchronized` is not a bool; `True` outside the TensorFlow backend; or a
            layer cannot be synchronized (`virtual_batch_size` or `fused=True`). Then no
            layer is changed.
    """
    if not isinstance(synchronized, bool):
        raise ValueError(f"synchronized={synchronized!r} must be True or False.")
    if synchronized and keras.backend.backend() != "tensorflow":
        raise ValueError(
            "synchronized=True is only supported with the TensorFlow backend (it uses "
            f"tf.distribute); the backend is {keras.backend.backend()!r}."
        )
    changed = []
    for layer in batch_norm_layers(model):
        if layer.synchronized == synchronized:
            continue
        try:
            # bnzoo's layer checks the value in its setter; Keras' reads the attribute.
            layer.synchronized = synchronized
        except ValueError as error:
            for done in changed:
                done.synchronized = not synchronized
            raise ValueError(f"BN layer {layer.name!r}: {error}") from None
        changed.append(layer)
    return changed
