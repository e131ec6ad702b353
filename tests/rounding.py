"""Rounding-error bounds that the tests' tolerances are derived from.

Two computations of the same sum in floating point agree only up to rounding, and how they round
depends on the order of the additions, which differs between CPUs: oneDNN and Eigen pick their
kernels by instruction set (8 float32 lanes with AVX2, 16 with AVX-512, tiles with AMX), so a
reduction over `n` values is split and combined differently on each. A tolerance is sound on
every CPU only if it bounds the rounding error of *any* order, which the standard analysis does
(N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM 2002, §2.2, §3.1,
§4.2):

- a float32 sum or dot product of `n` terms, in any order, has an absolute error at most
  `gamma(n) * sum(|x_i|)`, with `gamma(n) = n u / (1 - n u)` and `u` the unit roundoff
  (`2**-24` for float32). Two orders then differ by at most twice that.
- that worst case needs every rounding error to push the same way. Rounding errors behave like
  independent zero-mean variables, and then `probable_gamma(n)` = `lam * sqrt(n) * u` bounds the
  error with probability at least `1 - 2 exp(-lam**2 / 2)` (N. J. Higham and T. Mary, "A New
  Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019,
  Theorem 2.4): with the default `lam = 6`, all but about 3 in 10^8 cases.

The error scales with `sum(|x_i|)`, not with the result: a mean near 0 of values of size 1 is
known to about `gamma(n)` *absolutely*, not relatively. Tolerances on such results belong on the
scale of the values summed (`atol`), which is what `error_scale` gives for BN's statistics.
"""

from __future__ import annotations

import math

import numpy as np

#: Unit roundoff `u` (half the distance from 1 to the next number) of each format.
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,  # 8 significand bits
}
#: Standard deviations of headroom for `probable_gamma`: P(exceeded) <= 2 exp(-18) = 3e-8.
PROBABLE_LAMBDA = 6.0


def unit_roundoff(dtype: str = "float32") -> float:
    """`u` of `dtype`: the relative error of rounding one value to it."""
    return UNIT_ROUNDOFF[str(dtype)]


def gamma(n: int, dtype: str = "float32") -> float:
    """Worst-case relative error (to `sum(|x_i|)`) of a sum of `n` terms in any order:
    Higham's `gamma_n = n u / (1 - n u)`."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma({n}) is unbounded in {dtype}: n u = {nu:.3g} >= 1")
    return nu / (1 - nu)


def probable_gamma(n: int, dtype: str = "float32", lam: float = PROBABLE_LAMBDA) -> float:
    """Relative error (to `sum(|x_i|)`) of a sum of `n` terms that independent rounding errors
    exceed with probability at most `2 exp(-lam**2 / 2)` (Higham & Mary 2019, Theorem 2.4:
    `exp(lam sqrt(n) u + n u**2 / (1 - u)) - 1`)."""
    u = unit_roundoff(dtype)
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def error_scale(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """The root mean square `sqrt(variance + mean**2)` of values with this mean and variance:
    their mean's rounding error is relative to it (`sum(|x_i|) / n` is at most this), not to
    the mean itself, which may be near 0."""
    return np.sqrt(np.asarray(variance, np.float64) + np.asarray(mean, np.float64) ** 2)


def dot_product_lengths(model) -> list[int]:
    """The length of the sums each layer of `model` computes: a convolution's window x input
    channels, a dense layer's inputs, a pooling average's window; nested models are walked."""
    import keras

    lengths = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            lengths += dot_product_lengths(layer)
        elif isinstance(layer, keras.layers.Dense):
            lengths.append(int(layer.kernel.shape[0]))
        elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
            lengths.append(math.prod(layer.input.shape[1:-1]))
        elif isinstance(layer, keras.layers.AveragePooling2D):
            lengths.append(math.prod(layer.pool_size))
        elif isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            lengths.append(math.prod(layer.kernel_size))
        elif isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
            lengths += [math.prod(layer.kernel_size), int(layer.pointwise_kernel.shape[-2])]
        elif hasattr(layer, "kernel_size") and hasattr(layer, "kernel"):
            lengths.append(math.prod(layer.kernel.shape[:-1]))
    return lengths


def network_gamma(model, dtype: str = "float32") -> float:
    """Relative error (to the outputs' scale) of `model`'s forward pass computed in another
    order: every output is a sum over the network's roundings, at most one per term of each
    dot product on its path, so the roundings of all its dot products together bound it.

    Counting every layer (not only one input-to-output path) over-counts a branching network;
    treating an error's effect downstream as at most its size is what BN's normalized
    activations make reasonable, not a proof. For a network the deterministic `gamma` is
    hopeless (tens of thousands of terms); the probable bound is the meaningful one."""
    return probable_gamma(sum(dot_product_lengths(model)), dtype)
