"""Keras layers of bnzoo: Batch Normalization as Ioffe & Szegedy (2015) define it."""

from layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]
