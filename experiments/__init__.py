"""The Batch Normalization paper's experiments, reproducible in minutes on a CPU.

One script per experiment (``exp1_mnist_mlp.py`` ... ``exp5_layer_vs_keras.py``), the shared
``harness``, ``run_all.py`` (``make experiments``) and ``report.py``, which renders
docs/RESULTS.md from the scripts' JSON. See docs/RESULTS.md.
"""
