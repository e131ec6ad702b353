"""The scaffold every zoo builder stands on, so that a model file holds only its own network.

What kimm's `BaseModel` helpers and timm's registered entry points do, as one decorator. A
model file writes its network as a function from the (preprocessed) input tensor to the last
feature map, and `@builder(...)` turns it into the public builder:

```python
@builder(
    default_input_shape=(224, 224, 3),
    min_input_size=32,
    variants={"resnet50": dict(description="ResNet-50", blocks=(3, 4, 6, 3))},
    weights=[WeightSet(model="resnet50", tag="imagenet", ...)],
    architecture=("blocks", "width_multiplier", "normalization", "bn_epsilon"),
)
def resnet(x, build, blocks=(3, 4, 6, 3), width_multiplier=1.0, min_depth=8):
    \"\"\"ResNet (He et al., 2016). ... Args: blocks: ...\"\"\"
    x = build.conv(x, build.depth(64), 7, strides=2, padding=3, name="conv1")
    ...
    return x
```

The builder it returns takes `keras.applications`' arguments (`include_top, weights,
input_tensor, input_shape, pooling, classes, classifier_activation, name`), the normalization
switch (`normalization, bn_momentum, bn_epsilon`), `include_preprocessing` when the model has
pretrained weights, then the network's own options, and documents them all. A call:

1. checks every argument before building anything: the head (`pooling`, `classes`,
   `classifier_activation`), `normalization`, the options several networks share by name
   (`width_multiplier`, `min_depth`, `dropout_rate`), the network's own (`check`),
   `input_shape` as keras.applications does, and `weights` (`models.pretrained`);
2. makes the input (`input_tensor`, or a new `keras.Input`) and, with
   `include_preprocessing=True`, puts the weights' input convention in front;
3. runs the network with a `Build`: the checked arguments and the blocks bound to them;
4. adds the head: global average pooling, dropout and the float32 classifier
   (`include_top=True`), or the pooled or unpooled features;
5. loads the weights.

The decorator also registers each variant (`models.create_model(name)`), the weight sets (which
name their variant instead of restating its arguments) and the converters of other formats.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from . import pretrained
from .building_blocks import (
    conv_norm_act,
    normalization_layer,
    resolve_normalization,
    scaled_depth,
    validate_activation,
)
from .preprocessing import ImagePreprocessing, NoInputConventionError
from .registry import register_model

POOLINGS = (None, "avg", "max")

#: What a variant's entry holds besides builder defaults: registry metadata.
_VARIANT_METADATA = ("description",)


class Build:
    """One model under construction, as its network function sees it.

    Attributes:
        name: the model's name.
        input_shape: the checked input shape, without the batch axis.
        include_top: whether the scaffold will add the classifier.
        normalization: `"batch_norm"`, `"keras"` or None (already resolved).
        bn_momentum, bn_epsilon: BN's settings (a derived epsilon already filled in).
        classifier_initializer: the classifier's kernel initializer; Keras' default unless the
            network sets it (the BN paper's MLP starts every layer from the same Gaussian).
    """

    def __init__(self, arguments: Mapping[str, Any], input_shape: tuple[int | None, ...]):
        self.name: str = arguments["name"]
        self.input_shape = input_shape
        self.include_top: bool = arguments["include_top"]
        self.normalization: str | None = arguments["normalization"]
        self.bn_momentum: float = arguments["bn_momentum"]
        self.bn_epsilon: float = arguments["bn_epsilon"]
        self.classifier_initializer: Any = "glorot_uniform"
        self._width = (arguments.get("width_multiplier", 1.0), arguments.get("min_depth", 1))

    def conv(self, x: Any, filters: int, kernel_size: int | tuple[int, int], **options: Any):
        """`building_blocks.conv_norm_act` with this model's normalization settings (which
        `options` may override, e.g. `normalization=None` for a stem without BN)."""
        settings = dict(
            normalization=self.normalization,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        return conv_norm_act(x, filters, kernel_size, **{**settings, **options})

    def norm(self, name: str) -> keras.layers.Layer | None:
        """A BN layer with this model's settings, or None without normalization."""
        return normalization_layer(
            self.normalization, momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name
        )

    def depth(self, filters: int) -> int:
        """`filters` thinned by `width_multiplier` (TF-slim's rule, floored at `min_depth`)."""
        multiplier, min_depth = self._width
        return scaled_depth(filters, multiplier, min_depth)


#: A network function: `(input tensor, Build, **own options) -> last feature map`.
Network = Callable[..., Any]


def builder(
    *,
    default_input_shape: tuple[int | None, ...],
    min_input_size: int | Callable[[Mapping[str, Any]], int],
    variants: Mapping[str, Mapping[str, Any]],
    feature_layers: (
        Mapping[int, str | tuple[str, ...]]
        | Callable[[Mapping[str, Any]], Mapping[int, str | tuple[str, ...]]]
        | None
    ) = None,
    weights: Sequence[pretrained.WeightSet] = (),
    converters: Mapping[str, pretrained.Converter] | None = None,
    architecture: Sequence[str] = (),
    check: Callable[[dict[str, Any]], None] | None = None,
    classes: int = 1000,
    normalization: str | None = "batch_norm",
    bn_epsilon: float | None = 1e-3,
    flattens_input: bool = False,
) -> Callable[[Network], Callable[..., keras.Model]]:
    """Turn a network function into a registered zoo builder (see the module docstring).

    Args:
        default_input_shape: `(height, width, channels)` the network is meant for.
        min_input_size: the smallest height/width it accepts, or a function of the builder's
            arguments giving it (a network whose depth is an option).
        variants: `{registry name: defaults}`; each entry's `description` is the line
            `python -m models` shows, the rest are builder defaults. The first entry's name is
            the built model's default name.
        feature_layers: `{stride: layer name}` of the network's last layer at each output
            stride (`models.create_feature_extractor`), or a function of the arguments giving
            it.
        weights: the published weight sets, each naming its variant.
        converters: `{source format: converter}` for weight files that are not Keras files.
        architecture: the arguments that decide which weights fit a model.
        check: checks the network's own options before anything is built, given all the
            builder's arguments, and may fill in a default derived from others (a None
            epsilon from the padding convention).
        classes, normalization, bn_epsilon: the network's defaults for these shared arguments.
        flattens_input: the network flattens its input (an MLP): any rank, every size known,
            and no feature map to pool.
    """

    def decorate(network: Network) -> Callable[..., keras.Model]:
        family = _Family(
            network=network,
            default_input_shape=tuple(default_input_shape),
            min_input_size=min_input_size,
            architecture=tuple(architecture),
            check=check,
            flattens_input=flattens_input,
            has_weights=bool(weights),
        )
        # The network's own options: its parameters after the input tensor and the `Build`.
        own = list(inspect.signature(network).parameters.values())[2:]
        family.options = tuple(p.name for p in own)
        shared = _shared_parameters(
            name=next(iter(variants)),
            classes=classes,
            normalization=normalization,
            bn_epsilon=bn_epsilon,
            include_preprocessing=family.has_weights,
        )
        parameters = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in own]
        signature = inspect.Signature([*shared, *parameters], return_annotation=keras.Model)

        @functools.wraps(network)
        def build_model(*args: Any, **kwargs: Any) -> keras.Model:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return family.build(build_model, dict(bound.arguments))

        build_model.__signature__ = signature
        build_model.__annotations__ = {
            **{p.name: p.annotation for p in shared},
            **{p.name: p.annotation for p in own if p.annotation is not p.empty},
            "return": keras.Model,
        }
        family.signature = signature
        build_model.__doc__ = _document(
            network.__doc__ or "",
            signature,
            _shared_documentation(family, [w.tag for w in weights]),
        )

        def architecture_of(kwargs: Mapping[str, Any]) -> dict[str, Any]:
            arguments = family.defaults(kwargs)
            return {key: arguments[key] for key in family.architecture}

        for variant, entry in variants.items():
            defaults = {k: v for k, v in entry.items() if k not in _VARIANT_METADATA}
            arguments = family.defaults(defaults)
            register_model(
                variant,
                default_input_shape=family.default_input_shape,
                min_input_size=family.min_size(arguments),
                description=entry.get("description", ""),
                feature_layers=(
                    feature_layers(arguments) if callable(feature_layers) else feature_layers
                ),
                **defaults,
            )(build_model)
        pretrained.register_builder(
            build_model, architecture=architecture_of, converters=converters
        )
        for weight_set in weights:
            if weight_set.model not in variants:
                raise ValueError(
                    f"weight set {weight_set.tag!r} names {weight_set.model!r}, which is not a "
                    f"variant of {network.__name__} ({', '.join(variants)})."
                )
            pretrained.register_weights(weight_set)
        return build_model

    return decorate


def _shared_parameters(
    *,
    name: str,
    classes: int,
    normalization: str | None,
    bn_epsilon: float | None,
    include_preprocessing: bool,
) -> list[inspect.Parameter]:
    """keras.applications' arguments, the normalization switch, and `include_preprocessing`."""
    entries = [
        ("include_top", bool, True),
        ("weights", str | os.PathLike | None, None),
        ("input_tensor", Any, None),
        ("input_shape", tuple[int | None, ...] | None, None),
        ("pooling", str | None, None),
        ("classes", int, classes),
        ("classifier_activation", Any, "softmax"),
        ("name", str, name),
        ("normalization", str | None, normalization),
        ("bn_momentum", float, 0.99),
        ("bn_epsilon", float | None, bn_epsilon),
    ]
    if include_preprocessing:
        entries.append(("include_preprocessing", bool, False))
    return [
        inspect.Parameter(
            key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
        )
        for key, annotation, default in entries
    ]


def _shared_documentation(family: _Family, tags: Sequence[str]) -> dict[str, str]:
    """How the shared arguments are documented for `family`'s builder."""
    size = family.min_input_size
    smallest = f"at least {size}×{size}" if isinstance(size, int) else "at least the minimum"
    shape = (
        "any fully known shape (it is flattened)"
        if family.flattens_input
        else (f"`(height, width, channels)`, {smallest}")
    )
    weights = (
        f"None, a pretrained weight set ({', '.join(repr(tag) for tag in sorted(set(tags)))}: "
        "the one whose variant has these arguments), or the path of a weights file"
        if tags
        else "None, or the path of a `.weights.h5` file saved (`model.save_weights`) from the "
        "same architecture"
    )
    return {
        "include_top": "end with global average pooling and the `classes`-way classifier.",
        "weights": f"{weights}.",
        "input_tensor": "optional Keras tensor to build the model on.",
        "input_shape": f"{shape}; default `{family.default_input_shape}`.",
        "pooling": 'with `include_top=False`, `None` (the last feature map), `"avg"` or `"max"`.',
        "classes": "number of classes of the classifier.",
        "classifier_activation": "activation of the classifier; `None` returns logits.",
        "name": "the model's name.",
        "normalization": '`"batch_norm"` (bnzoo\'s layer), `"keras"` (Keras\' layer) or `None` '
        "(no BN: the convolutions and dense layers regain their bias).",
        "bn_momentum": "momentum of BN's moving statistics.",
        "bn_epsilon": "BN's epsilon.",
        "include_preprocessing": "start the model with the input convention of the weights "
        "these arguments build (`models.preprocessing`): it then takes RGB values in [0, 255].",
    }


def _document(docstring: str, signature: inspect.Signature, shared: Mapping[str, str]) -> str:
    """The network's docstring with every argument in its `Args:` section, in signature order:
    the network's own entries, and the shared arguments' unless the network documents one
    itself (a model-specific note)."""
    text = inspect.cleandoc(docstring)
    head, found, rest = text.partition("\nArgs:\n")
    if not found:
        return text
    lines = rest.split("\n")
    end = next(
        (i for i, line in enumerate(lines) if line.strip() and not line.startswith("    ")),
        len(lines),
    )
    entries: dict[str, list[str]] = {}
    for line in lines[:end]:
        match = re.match(r"    (\w+):", line)
        if match:
            entries[match.group(1)] = [line]
        elif entries and line.strip():
            entries[next(reversed(entries))].append(line)
    documented = []
    for name in signature.parameters:
        if name in entries:
            documented += entries[name]
        elif name in shared:
            documented.append(
                textwrap.fill(
                    f"{name}: {shared[name]}",
                    width=96,
                    initial_indent="    ",
                    subsequent_indent="        ",
                )
            )
    return "\n".join([head.rstrip(), "", "Args:", *documented, "", *lines[end:]]).rstrip() + "\n"


@dataclasses.dataclass
class _Family:
    """Everything `builder` knows about one network; `build` is what a builder call runs."""

    network: Network
    default_input_shape: tuple[int | None, ...]
    min_input_size: int | Callable[[Mapping[str, Any]], int]
    architecture: tuple[str, ...]
    check: Callable[[dict[str, Any]], None] | None
    flattens_input: bool
    has_weights: bool
    signature: inspect.Signature | None = None
    options: tuple[str, ...] = ()

    def defaults(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """`kwargs` completed with the builder's defaults, checked and derived values filled:
        the arguments a call with `kwargs` builds with."""
        bound = self.signature.bind_partial(**kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        self._check_options(arguments)
        return arguments

    def min_size(self, arguments: Mapping[str, Any]) -> int:
        size = self.min_input_size
        return int(size(arguments) if callable(size) else size)

    def _check_options(self, arguments: dict[str, Any]) -> None:
        """The arguments that need no input: the head, the normalization switch, the options
        networks share by name, then the network's own (`check`)."""
        name = arguments["name"]
        arguments["normalization"] = resolve_normalization(arguments["normalization"])
        pooling = arguments["pooling"]
        if self.flattens_input and pooling is not None:
            raise ValueError(
                f"{name} has no spatial feature map to pool; received pooling={pooling!r}. Pass "
                "pooling=None (include_top=False returns the last layer's activations)."
            )
        if pooling not in POOLINGS:
            raise ValueError(
                f"Unknown pooling={pooling!r} for {name}. Use None (the 4D feature map), "
                "'avg' (global average pooling) or 'max' (global max pooling)."
            )
        classes = arguments["classes"]
        if arguments["include_top"] and (not isinstance(classes, int) or classes < 1):
            raise ValueError(
                f"{name} with include_top=True needs classes to be a positive integer; "
                f"received classes={classes!r}."
            )
        validate_activation(arguments["classifier_activation"], "classifier_activation")
        _check_shared_options(arguments)
        if self.check is not None:
            self.check(arguments)

    def build(self, builder: Callable[..., keras.Model], arguments: dict[str, Any]):
        """Steps 1-5 of the module docstring."""
        self._check_options(arguments)
        name = arguments["name"]
        input_shape = self._input_shape(arguments)
        architecture = {key: arguments[key] for key in self.architecture}
        request = pretrained.resolve_weights(
            builder,
            arguments["weights"],
            arguments=architecture,
            include_top=arguments["include_top"],
            classes=arguments["classes"],
            input_channels=input_shape[-1],
            model_name=name,
        )
        image, inputs = model_input(arguments["input_tensor"], input_shape)
        if arguments.get("include_preprocessing"):
            image = _preprocessing_layer(builder, architecture, name)(image)

        build = Build(arguments, input_shape)
        x = self.network(image, build, **{key: arguments[key] for key in self.options})

        x = classification_head(
            x,
            include_top=arguments["include_top"],
            pooling=arguments["pooling"],
            classes=arguments["classes"],
            classifier_activation=arguments["classifier_activation"],
            dropout_rate=arguments.get("dropout_rate", 0.0),
            kernel_initializer=build.classifier_initializer,
        )
        model = keras.Model(inputs, x, name=name)
        pretrained.load_weights(
            model, request, builder=builder, include_top=arguments["include_top"]
        )
        return model

    def _input_shape(self, arguments: Mapping[str, Any]) -> tuple[int | None, ...]:
        name = arguments["name"]
        input_shape = arguments["input_shape"]
        if input_shape is None and arguments["input_tensor"] is not None:
            input_shape = tuple(arguments["input_tensor"].shape)[1:]
        if not self.flattens_input:
            return validate_input_shape(
                input_shape,
                default_shape=self.default_input_shape,
                min_size=self.min_size(arguments),
                model_name=name,
            )
        input_shape = tuple(self.default_input_shape if input_shape is None else input_shape)
        if not input_shape or any(size is None or size < 1 for size in input_shape):
            raise ValueError(
                f"{name} flattens its input, so every dimension must be known and positive; "
                f"received input_shape={input_shape}. Pass e.g. {self.default_input_shape}."
            )
        if len(input_shape) == 3:
            validate_input_shape(
                input_shape,
                default_shape=self.default_input_shape,
                min_size=1,
                model_name=name,
                require_static=True,
            )
        return input_shape


def _check_shared_options(arguments: Mapping[str, Any]) -> None:
    """Options several networks take, checked by name wherever they appear."""
    if "width_multiplier" in arguments and not arguments["width_multiplier"] > 0:
        raise ValueError(
            "width_multiplier must be positive; received "
            f"width_multiplier={arguments['width_multiplier']}."
        )
    min_depth = arguments.get("min_depth", 1)
    if not (isinstance(min_depth, int) and min_depth >= 1):
        raise ValueError(f"min_depth must be a positive integer; received min_depth={min_depth!r}.")
    dropout_rate = arguments.get("dropout_rate", 0.0)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1); received dropout_rate={dropout_rate}.")


def _preprocessing_layer(
    builder: Callable[..., Any], architecture: Mapping[str, Any], model_name: str
) -> keras.layers.Layer:
    """The `ImagePreprocessing` layer of the weights `architecture` builds.

    Raises:
        NoInputConventionError (a ValueError): when no pretrained weights have this
            architecture, so no preprocessing convention applies.
    """
    # The input convention does not depend on the width: narrow copies of a pretrained
    # architecture (tests, distillation) take the same inputs.
    matches = pretrained.matching_weights(builder, architecture, ignore=("width_multiplier",))
    if not matches:
        raise NoInputConventionError(
            f"include_preprocessing=True: no pretrained weights of {model_name} were trained "
            "with these arguments, so there is no input convention to include. Build with a "
            "weight set's arguments (`python -m models` lists them), or preprocess the inputs "
            "yourself and pass include_preprocessing=False."
        )
    return ImagePreprocessing(matches[0].preprocessing, name="preprocessing")


# --------------------------------------------------------------------------------------------
# keras.applications' input and head.
# --------------------------------------------------------------------------------------------


def validate_input_shape(
    input_shape: Sequence[int | None] | None,
    *,
    default_shape: tuple[int | None, ...],
    min_size: int,
    model_name: str,
    require_static: bool = False,
) -> tuple[int | None, ...]:
    """Check `input_shape` like keras.applications does and fill in the default.

    Args:
        input_shape: `(height, width, channels)`, or `None` for `default_shape`. Height and
            width may be `None` (any size) unless `require_static`.
        default_shape: the builder's default `(height, width, channels)`.
        min_size: the smallest height/width the architecture accepts.
        model_name: used in error messages.
        require_static: height and width must be known (a model that flattens its input).

    Returns:
        The validated shape as a tuple.
    """
    if keras.config.image_data_format() != "channels_last":
        raise ValueError(
            f"{model_name} is built channels-last, but keras.config.image_data_format() is "
            f"{keras.config.image_data_format()!r}. Call "
            "keras.config.set_image_data_format('channels_last') first."
        )
    if input_shape is None:
        return tuple(default_shape)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"{model_name} needs input_shape=(height, width, channels), three entries; "
            f"received input_shape={input_shape} with {len(input_shape)}. For a batch of "
            "grayscale images add the channel axis, e.g. (28, 28, 1)."
        )
    height, width, channels = input_shape
    if channels is None or not isinstance(channels, int) or channels < 1:
        raise ValueError(
            f"{model_name} needs a known, positive number of channels as the last entry of "
            f"input_shape; received input_shape={input_shape}."
        )
    for size in (height, width):
        if size is None:
            if require_static:
                raise ValueError(
                    f"{model_name} flattens its input, so height and width must be known; "
                    f"received input_shape={input_shape}. Pass e.g. {tuple(default_shape)}."
                )
            continue
        if not isinstance(size, int) or size < min_size:
            raise ValueError(
                f"{model_name} accepts inputs of at least {min_size}x{min_size}; received "
                f"input_shape={input_shape}. Resize or pad the images to {min_size} or more."
            )
    return input_shape


def model_input(
    input_tensor: Any, input_shape: tuple[int | None, ...], name: str = "input_layer"
) -> tuple[Any, Any]:
    """The tensor a builder starts from and the inputs its `keras.Model` is made of.

    As in keras.applications: with `input_tensor=None` a new `keras.Input`; with a Keras tensor,
    the model is built on top of it and its inputs are the tensor's source inputs, so the zoo
    model can be the tail of a larger graph.
    """
    if input_tensor is None:
        image = keras.Input(shape=input_shape, name=name)
        return image, image
    if not keras.backend.is_keras_tensor(input_tensor):
        # Keras 3 builds functional models on symbolic tensors only; a concrete array here is
        # almost always data passed where the model's input was meant.
        raise ValueError(
            f"input_tensor must be a Keras tensor (keras.Input(...) or a layer's output); "
            f"received a {type(input_tensor).__name__}. To run the model on data, build it "
            "first and call model(data) or model.predict(data)."
        )
    return input_tensor, keras.utils.get_source_inputs(input_tensor)


def classification_head(
    x: Any,
    *,
    include_top: bool,
    pooling: str | None,
    classes: int,
    classifier_activation: Any = "softmax",
    dropout_rate: float = 0.0,
    kernel_initializer: Any = "glorot_uniform",
) -> Any:
    """keras.applications' top: the classifier, or the (optionally pooled) features.

    With `include_top=True`: global average pooling (`avg_pool`, unless the features are
    already a vector), dropout when `dropout_rate > 0`, and the `predictions` Dense layer.
    `classifier_activation=None` gives logits, which is what a loss with `from_logits=True`
    wants.

    With `include_top=False`: the feature map itself (`pooling=None`), or its global average
    (`"avg"`) or maximum (`"max"`), for feature extraction.
    """
    if include_top:
        if len(x.shape) > 2:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate:
            x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
        # float32 whatever the global policy: under mixed precision the softmax (or the
        # logits fed to a cross-entropy) is where float16's range and precision hurt most.
        return keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer=kernel_initializer,
            dtype="float32",
            name="predictions",
        )(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def check_choice(arguments: Mapping[str, Any], key: str, choices: Mapping[str, str]) -> None:
    """Raise a ValueError naming `arguments[key]` unless it is one of `choices`
    (`{value: what it means}`), listing them."""
    value = arguments[key]
    if value not in choices:
        listed = " or ".join(f"{choice!r} ({meaning})" for choice, meaning in choices.items())
        raise ValueError(f"Unknown {key}={value!r}. Use {listed}.")


def check_positive_int(arguments: Mapping[str, Any], key: str, what: str = "") -> None:
    """Raise a ValueError naming `arguments[key]` unless it is a positive integer."""
    value = arguments[key]
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{key}{what} must be a positive integer; received {key}={value!r}.")
