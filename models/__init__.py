"""bnzoo's model zoo: builders, a registry and pretrained weights, keras.applications-style.

Every builder takes `include_top, weights, input_tensor, input_shape, pooling, classes,
classifier_activation, name`, plus a normalization switch (`normalization="batch_norm"`,
`"keras"` or `None`, with `bn_momentum` and `bn_epsilon`) and its own options.

```python
import models

models.list_models()  # ['bn_inception', 'bn_inception_slim', 'inception_v1', ...]
model = models.create_model("plain_cnn", input_shape=(32, 32, 3), classifier_activation=None)
features = models.bn_inception(include_top=False, pooling="avg", weights="imagenet")
pyramid = models.create_feature_extractor("inception_v3", input_shape=(299, 299, 3))
models.profile_model(model).multiply_adds
```

`python -m models` lists every registered model with its parameters, multiply-adds, input size
and pretrained weights; `python -m models NAME` prints one model's summary.

Importing the package registers every builder and every Keras object a bnzoo `.keras` file can
hold; only `python -m models` defers that (and TensorFlow) until its arguments are parsed, so
`--help` answers at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "bn_inception": "models.bn_inception",
    "compact_cnn": "models.compact_cnn",
    "inception_v1": "models.inception_v1",
    "inception_v3": "models.inception_v3",
    "paper_mlp": "models.paper_mlp",
    "plain_cnn": "models.plain_cnn",
    "ModelProfile": "models.building_blocks",
    "count_multiply_adds": "models.building_blocks",
    "count_parameters": "models.building_blocks",
    "normalization_layer": "models.building_blocks",
    "profile_model": "models.building_blocks",
    "ModelSpec": "models.registry",
    "create_model": "models.registry",
    "get_model_spec": "models.registry",
    "list_models": "models.registry",
    "register_model": "models.registry",
    "WeightSet": "models.pretrained",
    "convert_weights": "models.pretrained",
    "get_weights": "models.pretrained",
    "list_weights": "models.pretrained",
    "create_feature_extractor": "models.features",
    "freeze_backbone": "models.features",
    "ImagePreprocessing": "models.preprocessing",
    "preprocess_input": "models.preprocessing",
}
#: Modules whose import registers builders (and their weights) in the registry.
BUILDER_MODULES = (
    "models.bn_inception",
    "models.compact_cnn",
    "models.inception_v1",
    "models.inception_v3",
    "models.paper_mlp",
    "models.plain_cnn",
)

__all__ = sorted(_EXPORTS)


def load_builders() -> None:
    """Import every builder module (registering its models) and bind the public names."""
    for module in BUILDER_MODULES:
        importlib.import_module(module)
    package = sys.modules[__name__]
    for name, module in _EXPORTS.items():
        if name not in package.__dict__:
            package.__dict__[name] = getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        load_builders()
        return sys.modules[__name__].__dict__[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module: a builder's name means the builder, never its module.

    `models.bn_inception` is both a submodule and the function it defines. Importing the
    submodule makes Python bind the module to the package attribute, which would hide the
    function; the eager `from models.bn_inception import bn_inception` of a classic `__init__`
    rebinds it right after. Here the import system's binding is ignored instead, so
    `models.bn_inception(...)` stays the builder whatever was imported first (the submodule
    itself is `sys.modules["models.bn_inception"]`).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# `import models` registers everything a `.keras` file written by bnzoo can refer to: the
# builders' own layers (GoogLeNet's LRN, the weights' input preprocessing) and the trainer's
# learning-rate schedule, which lives inside the optimizer of every checkpoint. So
# `import layers, models` is enough for `keras.saving.load_model` on any file bnzoo writes.
# This imports Keras and TensorFlow, so it is skipped only while `python -m models` locates its
# `__main__` (sys.argv[0] is "-m" then): that command parses its arguments first and answers
# `--help` without TensorFlow.
if sys.argv[:1] != ["-m"]:
    load_builders()
    import bnzoo.optimization  # noqa: E402, F401
