"""Keras layers of bnzoo: Batch Normalization as Ioffe & Szegedy (2015) define it, and the
paper's inference statistics (Algorithm 2) for a trained model."""

from .batch_normalization import BatchNormalization
from .population_statistics import recompute_population_statistics

__all__ = ["BatchNormalization", "recompute_population_statistics"]
