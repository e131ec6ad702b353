"""The model registry: pick models by name, timm-style.

A builder is registered under one or more names, each with its own default keyword arguments
(a *variant*). `create_model(name, **kwargs)` calls the builder with the variant's defaults,
overridden by `kwargs`. Example:

```python
import models

models.list_models("bn_inception*")  # ['bn_inception', 'bn_inception_slim']
model = models.create_model("plain_cnn", input_shape=(32, 32, 3), classes=10)
```
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import types
from collections.abc import Callable, Mapping
from typing import Any

import keras

_REGISTRY: dict[str, ModelSpec] = {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model name.

    Attributes:
        name: the registered name (also the default `name` of the built model).
        builder: the function that builds the model; `create_model` calls it.
        default_input_shape: `(height, width, channels)` the variant is meant for.
        min_input_size: the smallest height/width the builder accepts with the variant's
            defaults; a trainer pads or resizes smaller images up to it.
        default_kwargs: the variant's keyword arguments for `builder` (read-only).
        description: one line for listings.
        feature_layers: `{stride: layer name}`: the last layer at each output stride (input
            size over feature map size), for `create_feature_extractor`; a tuple of names
            means the first one the built model has. Empty for models without feature maps.
    """

    name: str
    builder: Callable[..., keras.Model]
    default_input_shape: tuple[int, int, int]
    min_input_size: int
    default_kwargs: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False, compare=False
    )
    description: str = ""
    feature_layers: Mapping[int, str | tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False, compare=False
    )


def register_model(
    name: str | None = None,
    *,
    default_input_shape: tuple[int, int, int],
    min_input_size: int,
    description: str = "",
    feature_layers: Mapping[int, str | tuple[str, ...]] | None = None,
    **default_kwargs: Any,
) -> Callable[[Callable[..., keras.Model]], Callable[..., keras.Model]]:
    """Decorator registering a builder under `name` (default: the function's name).

    Stack it, or call it on an already defined builder, to register variants: the same builder
    under other names with other defaults.

    ```python
    @models.register_model(default_input_shape=(32, 32, 3), min_input_size=8)
    def my_cnn(include_top=True, ..., widths=(16, 32)):
        ...

    models.register_model("my_cnn_wide", default_input_shape=(32, 32, 3), min_input_size=8,
                          widths=(64, 128))(my_cnn)
    ```

    Args:
        name: the registry name; defaults to the builder's `__name__`.
        default_input_shape: `(height, width, channels)` the variant is meant for.
        min_input_size: the smallest height/width the builder accepts with these defaults.
        description: one line for `python -m models`.
        feature_layers: `{stride: layer name}` of the model's feature maps (see `ModelSpec`).
        **default_kwargs: the variant's defaults for the builder's keyword arguments.

    Raises:
        ValueError: if the name is already registered to another builder or other defaults.
    """

    def decorator(builder: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        spec = ModelSpec(
            name=name or builder.__name__,
            builder=builder,
            default_input_shape=tuple(default_input_shape),
            min_input_size=int(min_input_size),
            default_kwargs=types.MappingProxyType(dict(default_kwargs)),
            description=description or _first_docstring_line(builder),
            feature_layers=types.MappingProxyType(dict(feature_layers or {})),
        )
        existing = _REGISTRY.get(spec.name)
        if existing is not None and (
            _qualified_name(existing.builder) != _qualified_name(builder)
            or dict(existing.default_kwargs) != default_kwargs
        ):
            raise ValueError(
                f"A model named {spec.name!r} is already registered (to "
                f"{_qualified_name(existing.builder)}). Register yours under another name."
            )
        _REGISTRY[spec.name] = spec
        return builder

    return decorator


def _qualified_name(builder: Callable[..., Any]) -> str:
    # By name rather than identity, so that reloading a builder's module (a notebook's
    # importlib.reload) re-registers it instead of failing.
    return f"{builder.__module__}.{builder.__qualname__}"


def _first_docstring_line(builder: Callable[..., Any]) -> str:
    doc = (builder.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _load_builders() -> None:
    # `python -m models` imports the builder modules only once its arguments are parsed (see
    # models/__init__.py); asking the registry anything loads them, so it answers the same
    # whatever was imported before.
    from . import load_builders

    load_builders()


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the fnmatch `pattern` (e.g. `"bn_*"`), sorted."""
    _load_builders()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` registered under `name`.

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    _load_builders()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}."
    )


def create_model(name: str, **kwargs: Any) -> keras.Model:
    """Build the model registered under `name`.

    The variant's defaults are applied first and `kwargs` override them. The built model is
    named after the registry entry; since `name` is this function's first argument, pass
    `model_name=` to call it something else.

    Args:
        name: a name from `list_models()`.
        **kwargs: builder arguments (`input_shape`, `classes`, `normalization`, ...).

    Returns:
        The built (uncompiled) `keras.Model`.
    """
    spec = get_model_spec(name)
    arguments = {"name": spec.name, **spec.default_kwargs}
    if "model_name" in kwargs:
        arguments["name"] = kwargs.pop("model_name")
    arguments.update(kwargs)
    return spec.builder(**arguments)
