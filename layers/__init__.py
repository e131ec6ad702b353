"""Keras layers of bnzoo: Batch Normalization as Ioffe & Szegedy (2015) define it, the paper's
inference statistics (Algorithm 2) for a trained model, and the BN layers of a model."""

from .batch_normalization import BatchNormalization
from .model_batch_norm import batch_norm_layers, set_batch_norm_synchronized
from .population_statistics import recompute_population_statistics

__all__ = [
    "BatchNormalization",
    "batch_norm_layers",
    "recompute_population_statistics",
    "set_batch_norm_synchronized",
]
