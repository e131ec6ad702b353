"""Which Keras backends train.py trains on, and how it refuses the others.

train.py trains on TensorFlow and JAX (`bnzoo.training.TRAINING_BACKENDS`): its training loops,
multi-device training and SavedModel export exist for those two. On PyTorch it refuses before
any work, with one line that names the supported backends; bnzoo's layers and models still work
there (the `multi_backend` tests run on PyTorch in `make test`).
"""

import importlib.util

import pytest


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch (dev extra)")
def test_train_py_on_torch_refuses_before_any_work(run_script, tmp_path):
    run = tmp_path / "run"
    result = run_script.run(
        "train.py", "--output-dir", run, "--epochs", "1", env={"KERAS_BACKEND": "torch"}
    )
    line = run_script.error_line(result, 2)
    assert "train.py trains on the tensorflow or jax Keras backend, not 'torch'" in line
    assert "KERAS_BACKEND=jax" in line
    assert result.stdout == ""  # no run folder line, no data loaded, no model built
    assert not run.exists()


def test_check_backend_accepts_the_backend_the_tests_run_on():
    import keras

    from bnzoo.training import TRAINING_BACKENDS, check_backend

    assert keras.backend.backend() in TRAINING_BACKENDS
    check_backend()
