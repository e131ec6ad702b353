"""bnzoo's model zoo: builders and a registry, keras.applications-style.

Every builder takes `include_top, weights, input_tensor, input_shape, pooling, classes,
classifier_activation, name`, plus a normalization switch (`normalization="batch_norm"`,
`"keras"` or `None`, with `bn_momentum` and `bn_epsilon`) and its own options.

```python
import models

models.list_models()  # ['bn_inception', 'bn_inception_paper', 'bn_inception_slim', ...]
model = models.create_model("plain_cnn", input_shape=(32, 32, 3), classifier_activation=None)
features = models.bn_inception(include_top=False, pooling="avg", width_multiplier=0.5)
models.profile_model(model).multiply_adds
```

`python -m models` lists every registered model with its parameters, multiply-adds and default
input size; `python -m models NAME` prints one model's summary.
"""

# The trainer's learning-rate schedule lives inside the optimizer of every checkpoint it writes;
# importing it registers it with Keras, so `import layers, models` is enough to load any `.keras`
# file bnzoo writes (model.keras, checkpoints/last.keras, checkpoints/best.keras).
import bnzoo.optimization  # noqa: F401
from models.bn_inception import bn_inception
from models.building_blocks import (
    ModelProfile,
    count_multiply_adds,
    count_parameters,
    normalization_layer,
    profile_model,
)
from models.paper_mlp import paper_mlp
from models.plain_cnn import plain_cnn
from models.registry import (
    ModelSpec,
    create_model,
    get_model_spec,
    list_models,
    register_model,
)

__all__ = [
    "ModelProfile",
    "ModelSpec",
    "bn_inception",
    "count_multiply_adds",
    "count_parameters",
    "create_model",
    "get_model_spec",
    "list_models",
    "normalization_layer",
    "paper_mlp",
    "plain_cnn",
    "profile_model",
    "register_model",
]
