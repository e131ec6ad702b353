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

from models.building_blocks import (
    load_weights,
    model_input,
    normalization_layer,
    resolve_input_shape,
    resolve_normalization,
    validate_activation,
    validate_head_arguments,
    validate_input_shape,
    validate_weights,
)
from models.registry import register_model

DEFAULT_INPUT_SHAPE = (28, 28, 1)
# The paper gives no standard deviation for its "small random Gaussian values". 0.1 keeps the
# first layer's pre-activations (784 inputs in [0, 1], about 100 of them bright) at a standard
# deviation near 1, inside the sigmoid's sensitive range, and the hidden layers' below it.
DEFAULT_KERNEL_STDDEV = 0.1


def paper_mlp(
    include_top: bool = True,
    weights: str | None = None,
    input_tensor: Any = None,
    input_shape: tuple[int, ...] | None = None,
    pooling: str | None = None,
    classes: int = 10,
    classifier_activation: Any = "softmax",
    name: str = "paper_mlp",
    normalization: str | None = "batch_norm",
    bn_momentum: float = 0.99,
    bn_epsilon: float = 1e-3,
    hidden_units: int = 100,
    hidden_layers: int = 3,
    activation: Any = "sigmoid",
    kernel_stddev: float = DEFAULT_KERNEL_STDDEV,
    seed: int | None = None,
) -> keras.Model:
    """The BN paper's MNIST MLP: 3 fully-connected hidden layers of 100 sigmoid units (§4.1).

    Every weight matrix (hidden and output) starts from `RandomNormal(mean=0,
    stddev=kernel_stddev)`, 0.1 by default, biases from zeros. With normalization on, BN sits
    between `Wu` and the sigmoid and the hidden layer drops its bias (§3.2); the output layer
    is never normalized. 100,010 trainable parameters with BN (100,610 with its moving
    statistics), 99,710 without.

    Args:
        include_top: end with the `classes`-way classifier; without it, the model returns the
            last hidden layer's activations.
        weights: None, or the path of a `.weights.h5` file saved from the same architecture.
        input_tensor: optional Keras tensor to build the model on.
        input_shape: any fully known shape; it is flattened. Default `(28, 28, 1)`.
        pooling: must be None: the model has no spatial feature map to pool.
        classes: number of classes of the classifier.
        classifier_activation: activation of the classifier; `None` returns logits.
        name: the model's name.
        normalization: `"batch_norm"` (bnzoo's layer), `"keras"` (Keras' layer) or `None`
            (the paper's baseline, `g(Wu + b)`).
        bn_momentum: momentum of BN's moving statistics.
        bn_epsilon: BN's epsilon.
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
    normalization = resolve_normalization(normalization)
    weights = validate_weights(weights)
    if pooling is not None:
        raise ValueError(
            f"paper_mlp has no spatial feature map to pool; received pooling={pooling!r}. "
            "Pass pooling=None (include_top=False returns the last hidden layer's activations)."
        )
    validate_head_arguments(
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        model_name=name,
    )
    if not (isinstance(hidden_units, int) and hidden_units >= 1):
        raise ValueError(f"hidden_units must be a positive integer; got {hidden_units!r}.")
    if not (isinstance(hidden_layers, int) and hidden_layers >= 1):
        raise ValueError(f"hidden_layers must be a positive integer; got {hidden_layers!r}.")
    if not kernel_stddev > 0:
        raise ValueError(f"kernel_stddev must be positive; received {kernel_stddev!r}.")
    validate_activation(activation, "activation")

    input_shape = resolve_input_shape(input_tensor, input_shape)
    if input_shape is None:
        input_shape = DEFAULT_INPUT_SHAPE
    input_shape = tuple(input_shape)
    if not input_shape or any(size is None or size < 1 for size in input_shape):
        raise ValueError(
            f"paper_mlp flattens its input, so every dimension must be known and positive; "
            f"received input_shape={input_shape}. Pass e.g. {DEFAULT_INPUT_SHAPE}."
        )
    if len(input_shape) == 3:
        validate_input_shape(
            input_shape,
            default_shape=DEFAULT_INPUT_SHAPE,
            min_size=1,
            model_name=name,
            require_static=True,
        )
    image, inputs = model_input(input_tensor, input_shape)

    def initializer(index: int) -> keras.initializers.Initializer:
        # One seed per layer: the same seed in every layer would make their weights identical.
        layer_seed = None if seed is None else seed + index
        return keras.initializers.RandomNormal(mean=0.0, stddev=kernel_stddev, seed=layer_seed)

    x = keras.layers.Flatten(name="flatten")(image)
    for index in range(1, hidden_layers + 1):
        x = keras.layers.Dense(
            hidden_units,
            use_bias=normalization is None,
            kernel_initializer=initializer(index),
            name=f"hidden_{index}_dense",
        )(x)
        bn = normalization_layer(
            normalization, momentum=bn_momentum, epsilon=bn_epsilon, name=f"hidden_{index}_bn"
        )
        if bn is not None:
            x = bn(x)
        x = keras.layers.Identity(name=f"hidden_{index}_preactivation")(x)
        x = keras.layers.Activation(activation, name=f"hidden_{index}_activation")(x)

    if include_top:
        x = keras.layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer=initializer(hidden_layers + 1),
            dtype="float32",
            name="predictions",
        )(x)
    model = keras.Model(inputs, x, name=name)
    load_weights(model, weights)
    return model


register_model(
    "paper_mlp",
    default_input_shape=DEFAULT_INPUT_SHAPE,
    min_input_size=1,
    description="The BN paper's MNIST MLP (sec. 4.1): 3x100 sigmoid, BN before each sigmoid",
)(paper_mlp)
