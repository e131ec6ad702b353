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

A model is one module of this package, found by importing them all: its `@scaffold.builder`
registers it, and the package exposes the builder under its function name. Importing the
package therefore imports Keras (and its backend) and registers every Keras object a bnzoo
`.keras` file can hold (BN, GoogLeNet's LRN, the weights' input preprocessing), so
`import layers, models` is enough for `keras.saving.load_model`; nothing of `bnzoo` is imported.
Only `python -m models` defers that until its arguments are parsed, so `--help` answers at once.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
from typing import Any

#: The library's public names -> the module of this package that defines each. The builders
#: are public too, under their function names (`models.bn_inception`); they need no entry.
_API = {
    "ModelProfile": "profiling",
    "count_multiply_adds": "profiling",
    "count_parameters": "profiling",
    "profile_model": "profiling",
    "normalization_layer": "building_blocks",
    "ModelSpec": "registry",
    "create_model": "registry",
    "get_model_spec": "registry",
    "list_models": "registry",
    "register_model": "registry",
    "WeightSet": "pretrained",
    "convert_weights": "pretrained",
    "get_weights": "pretrained",
    "list_weights": "pretrained",
    "create_feature_extractor": "features",
    "freeze_backbone": "features",
    "ImagePreprocessing": "preprocessing",
    "preprocess_input": "preprocessing",
}

__all__ = sorted(_API)
_loaded = False


def load_builders() -> None:
    """Import every module of the package (which registers its models), then bind the public
    names: the library's, and each builder defined here under its function name. Once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = sys.modules[__name__]
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):  # __main__ and private helpers define no models
            importlib.import_module(f"{__name__}.{module.name}")
    for name, module in _API.items():
        package.__dict__.setdefault(name, getattr(sys.modules[f"{__name__}.{module}"], name))
    registry = sys.modules[f"{__name__}.registry"]
    for spec in registry._REGISTRY.values():
        builder = spec.builder
        if builder.__module__.startswith(f"{__name__}.") and builder.__name__ not in _API:
            package.__dict__[builder.__name__] = builder
            if builder.__name__ not in __all__:
                __all__.append(builder.__name__)
    __all__.sort()


def __getattr__(name: str) -> Any:
    # Reached before `load_builders` ran (`python -m models`), or for a name that is not public:
    # loading binds every public name in the module's namespace.
    if not _loaded and not name.startswith("__"):
        load_builders()
        return getattr(sys.modules[__name__], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package module: a builder's name means the builder, never its module.

    `models.bn_inception` is both a submodule and the function it defines. Importing the
    submodule makes Python bind the module to the package attribute, which would hide the
    function; here that binding is ignored once the builder is bound, so
    `models.bn_inception(...)` stays the builder whatever was imported first (the submodule
    itself is `sys.modules["models.bn_inception"]`).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        bound = self.__dict__.get(name)
        if isinstance(value, types.ModuleType) and callable(bound):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# `import models` registers everything a `.keras` file written by bnzoo can refer to: the
# builders' own layers (GoogLeNet's LRN, the weights' input preprocessing); checkpoints hold a
# plain Keras optimizer. So `import layers, models` is enough for `keras.saving.load_model` on
# any file bnzoo writes.
# This imports Keras and TensorFlow, so it is skipped only while `python -m models` locates its
# `__main__` (sys.argv[0] is "-m" then): that command parses its arguments first and answers
# `--help` without TensorFlow.
if sys.argv[:1] != ["-m"]:
    load_builders()
