"""Backbones for other heads: multi-scale feature maps, and a frozen backbone for fine-tuning.

`create_feature_extractor(name)` is timm's `features_only=True` and kimm's feature keys by
stride: a model whose outputs are the last feature map at each requested output stride (input
size / map size), for detection, segmentation or metric-learning heads.

`freeze_backbone(model)` freezes every layer but the classifier head. By Keras' rule a layer
with `trainable=False` is also in inference mode: its BN layers normalize with their moving
statistics and never update them, in `fit()` and in `model(x, training=True)` alike, which is
what fine-tuning a pretrained network with small batches wants (Keras' transfer-learning
guide). Recompile the model after changing `trainable`.

```python
import models

pyramid = models.create_feature_extractor("bn_inception", weights="imagenet")
pyramid.output_shape  # {'stride_4': (None, 56, 56, 192), ..., 'stride_32': (None, 7, 7, 1024)}

model = models.create_model("bn_inception", weights="imagenet", classes=200, include_top=False,
                            pooling="avg")  # then your own head, or:
model = models.bn_inception(weights="imagenet")
models.freeze_backbone(model)  # only `predictions` trains; BN runs in inference mode
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras

from .registry import create_model, get_model_spec, list_models

#: Layers of the classifier head (`include_top=True`) that `freeze_backbone` leaves trainable.
HEAD_LAYERS = ("avg_pool", "max_pool", "dropout", "predictions")
DEFAULT_STRIDES = (4, 8, 16, 32)


def feature_layer_names(model: keras.Model, name: str) -> dict[int, str]:
    """`{stride: layer name}` of the registered model `name`, resolved on the built `model`."""
    spec = get_model_spec(name)
    present = {layer.name for layer in model.layers}
    resolved = {}
    for stride, candidates in spec.feature_layers.items():
        candidates = (candidates,) if isinstance(candidates, str) else tuple(candidates)
        layer = next((candidate for candidate in candidates if candidate in present), None)
        if layer is not None:
            resolved[stride] = layer
    return resolved


def create_feature_extractor(
    name: str, strides: Sequence[int] = DEFAULT_STRIDES, **kwargs: Any
) -> keras.Model:
    """A model returning the registered model's feature maps at the given output strides.

    Args:
        name: a registered model with feature maps (the Inception family, the ResNets).
        strides: output strides to return, from those the model declares (2, 4, 8, 16, 32).
        **kwargs: builder arguments (`weights`, `input_shape`, `normalization`, ...);
            `include_top` and `pooling` are fixed (no classifier, no pooling).

    Returns:
        A `keras.Model` whose output is a dict `{"stride_4": map, "stride_8": map, ...}` in the
        order of `strides`; its layers (and weights) are the backbone's own.

    Raises:
        ValueError: for a model without feature maps, an undeclared stride, or `include_top` /
            `pooling` arguments.
    """
    spec = get_model_spec(name)
    if not spec.feature_layers:
        with_features = [m for m in list_models() if get_model_spec(m).feature_layers]
        raise ValueError(
            f"{name!r} declares no feature maps; models with feature maps: "
            f"{', '.join(with_features)}."
        )
    strides = tuple(int(stride) for stride in _as_sequence(strides))
    unknown = [stride for stride in strides if stride not in spec.feature_layers]
    if unknown or not strides:
        raise ValueError(
            f"{name!r} has feature maps at strides {sorted(spec.feature_layers)}; received "
            f"strides={list(strides)}."
        )
    for argument in ("include_top", "pooling"):
        if kwargs.get(argument):
            raise ValueError(
                f"create_feature_extractor builds the backbone without a head; drop "
                f"{argument}={kwargs[argument]!r}."
            )
    kwargs.update(include_top=False, pooling=None)
    backbone = create_model(name, **kwargs)
    layers = feature_layer_names(backbone, name)
    outputs = {f"stride_{stride}": backbone.get_layer(layers[stride]).output for stride in strides}
    return keras.Model(backbone.inputs, outputs, name=f"{backbone.name}_features")


def _as_sequence(strides: Any) -> Iterable[Any]:
    return (strides,) if isinstance(strides, int) else strides


def freeze_backbone(
    model: keras.Model, *, until: str | None = None, head: Sequence[str] = HEAD_LAYERS
) -> int:
    """Freeze the backbone of `model` (`trainable=False`), leaving the classifier head trainable.

    Frozen BN layers run in inference mode (Keras' rule): they use and keep their moving
    statistics, so a pretrained backbone computes the same features in training as in
    evaluation. Recompile the model afterwards for `fit()` to see the change.

    Args:
        model: a zoo model (or any functional model).
        until: freeze only the layers up to and including this one (e.g.
            `"inception_4e_output"`, a layer every path goes through), and leave the later ones
            trainable: partial fine-tuning. None freezes every layer outside `head`.
        head: names of the layers that stay trainable.

    Returns:
        The number of frozen layers that hold weights.

    Raises:
        ValueError: if `until` is not a layer of `model`.
    """
    names = [layer.name for layer in model.layers]
    if until is not None and until not in names:
        raise ValueError(f"until={until!r} is not a layer of {model.name!r}.")
    model.trainable = True
    stop = names.index(until) if until is not None else len(names)
    frozen = 0
    for index, layer in enumerate(model.layers):
        freeze = index <= stop and layer.name not in head
        layer.trainable = not freeze
        frozen += bool(freeze and layer.weights)
    return frozen
