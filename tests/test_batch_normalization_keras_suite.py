"""Keras' own BatchNormalization tests, run against layers.BatchNormalization.

The drop-in claim, checked by Keras' maintainers' tests rather than ours: Keras ships its test
file with the package (`keras/src/layers/normalization/batch_normalization_test.py`), and here
every test in it runs with `layers.BatchNormalization` in place of Keras' class, unchanged and
not copied. The file reaches the layer as `layers.BatchNormalization` through its module-level
`layers` (`keras.src.layers`); for the duration of each test that name is a view of
`keras.src.layers` whose `BatchNormalization` is ours (everything else, e.g. `Masking` and
`Input`, stays Keras').

It runs under `pytest` (TensorFlow) and `KERAS_BACKEND=jax` / `KERAS_BACKEND=torch pytest -m
multi_backend`.
"""

import importlib

import keras
import pytest

import layers as bnzoo_layers

pytestmark = pytest.mark.multi_backend

KERAS_TEST_MODULE = "keras.src.layers.normalization.batch_normalization_test"
keras_tests = importlib.import_module(KERAS_TEST_MODULE)


class _KerasLayersWithOurBatchNormalization:
    """`keras.src.layers`, except that `BatchNormalization` is bnzoo's."""

    BatchNormalization = bnzoo_layers.BatchNormalization

    def __getattr__(self, name):
        return getattr(keras.src.layers, name)


@pytest.fixture(autouse=True)
def _our_batch_normalization_in_keras_tests(monkeypatch):
    monkeypatch.setattr(keras_tests, "layers", _KerasLayersWithOurBatchNormalization())


class TestKerasBatchNormalizationSuiteOnOurLayer(keras_tests.BatchNormalizationTest):
    """Every test of Keras' `BatchNormalizationTest`, inherited, on our class."""


def test_the_suite_reaches_our_class_and_is_complete():
    # Guards against the substitution silently testing Keras' class, or a Keras upgrade that
    # moves or empties the file: Keras 3.15 has 10 test methods (33 cases with parameters).
    assert keras_tests.layers.BatchNormalization is bnzoo_layers.BatchNormalization
    assert keras_tests.layers.Masking is keras.layers.Masking
    names = [n for n in dir(TestKerasBatchNormalizationSuiteOnOurLayer) if n.startswith("test_")]
    assert len(names) >= 33, names
