"""The Batch Normalization paper's MNIST network (§4.1).

"We used a very simple network, with a 28x28 binary image as input, and 3 fully-connected
hidden layers with 100 activations each. Each hidden layer computes y = g(Wu + b) with sigmoid
nonlinearity, and the weights W initialized to small random Gaussian values. The last hidden
layer is followed by a fully-connected layer with 10 activations (one per class) and
cross-entropy loss. [...] we added Batch Normalization to each hidden layer of the network."

Reference: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015, §4.1 and Figure 1.

Layer names are stable whatever the normalization, so an experiment can tap them (Figure 1(b,c)
plots the distribution of the last hidden layer's sigmoid input over training):

| layer | what it is |
|---|---|
| `flatten` | the input as a vector |
| `hidden_{i}_dense` | `Wu` (`Wu + b` without BN), i = 1, 2, 3 |
| `hidden_{i}_bn` | `BN(Wu)`; only with normalization on |
| `hidden_{i}_preactivation` | the sigmoid's input, `BN(Wu)` or `Wu + b` (an Identity layer) |
| `hidden_{i}_activation` | `g(...)`, the hidden layer's output |
| `predictions` | the 10-way classifier |

```python
model = models.paper_mlp()
tap = keras.Model(model.input, model.get_layer("hidden_3_preactivation").output)
```
"""

from __future__ import annotations

from typing import Any

import keras

from .building_blocks import validate_activation
from .scaffold import Build, builder, check_positive_int

DEFAULT_INPUT_SHAPE = (28, 28, 1)
# The paper gives no standard deviation for its "small random Gaussian values". 0.1 keeps the
# first layer's pre-activations (784 inputs in [0, 1], about 100 of them bright) at a standard
# deviation near 1, inside the sigmoid's sensitive range, and the hidden layers' below it.
DEFAULT_KERNEL_STDDEV = 0.1


def _check(arguments: dict[str, Any]) -> None:
    check_positive_int(arguments, "hidden_units")
    check_positive_int(arguments, "hidden_layers")
    if not arguments["kernel_stddev"] > 0:
        raise ValueError(
            f"kernel_stddev must be positive; received {arguments['kernel_stddev']!r}."
        )
    validate_activation(arguments["activation"], "activation")


@builder(
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=1,
    variants={
        "paper_mlp": dict(
            description="The BN paper's MNIST MLP (sec. 4.1): 3x100 sigmoid, BN before each sigmoid"
        )
    },
    check=_check,
    classes=10,
    flattens_input=True,
)
def paper_mlp(
    x: Any,
    build: Build,
    hidden_units: int = 100,
    hidden_layers: int = 3,
    activation: Any = "sigmoid",
    kernel_stddev: float = DEFAULT_KERNEL_STDDEV,
    seed: int | None = None,
) -> Any:
    """The BN paper's MNIST MLP: 3 fully-connected hidden layers of 100 sigmoid units (§4.1).

    Every weight matrix (hidden and output) starts from `RandomNormal(mean=0,
    stddev=kernel_stddev)`, 0.1 by default, biases from zeros. With normalization on, BN sits
    between `Wu` and the sigmoid and the hidden layer drops its bias (§3.2); the output layer
    is never normalized. 100,010 trainable parameters with BN (100,610 with its moving
    statistics), 99,710 without.

    Args:
        include_top: end with the `classes`-way classifier; without it, the model returns the
            last hidden layer's activations.
        input_shape: any fully known shape; it is flattened. Default `(28, 28, 1)`.
        pooling: must be None: the model has no spatial feature map to pool.
        normalization: `"batch_norm"` (bnzoo's layer), `"keras"` (Keras' layer) or `None`
            (the paper's baseline, `g(Wu + b)`).
        hidden_units: units per hidden layer.
        hidden_layers: number of hidden layers.
        activation: the hidden nonlinearity `g`; the paper's is the sigmoid.
        kernel_stddev: standard deviation of the Gaussian weight initialization.
        seed: seed of the initializers, for runs that must start from identical weights
            (e.g. with and without BN).

    Returns:
        A `keras.Model`.

    Example:

    ```python
    import models

    baseline = models.paper_mlp(normalization=None, seed=1)
    with_bn = models.paper_mlp(seed=1)
    ```
    """

    def initializer(index: int) -> keras.initializers.Initializer:
        # One seed per layer: the same seed in every layer would make their weights identical.
        layer_seed = None if seed is None else seed + index
        return keras.initializers.RandomNormal(mean=0.0, stddev=kernel_stddev, seed=layer_seed)

    x = keras.layers.Flatten(name="flatten")(x)
    for index in range(1, hidden_layers + 1):
        x = keras.layers.Dense(
            hidden_units,
            use_bias=build.normalization is None,
            kernel_initializer=initializer(index),
            name=f"hidden_{index}_dense",
        )(x)
        bn = build.norm(f"hidden_{index}_bn")
        if bn is not None:
            x = bn(x)
        x = keras.layers.Identity(name=f"hidden_{index}_preactivation")(x)
        x = keras.layers.Activation(activation, name=f"hidden_{index}_activation")(x)
    build.classifier_initializer = initializer(hidden_layers + 1)
    return x
