# bnzoo: every target creates .venv when it is missing, so `make train` and
# `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_FILE := $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz
TRAIN_ARGS ?=
TEST_ARGS ?=
BENCH_ARGS ?=
EXPERIMENT_ARGS ?=
JAX_BENCH_ARGS ?= --precisions float32

.PHONY: setup data train test test-all bench lint format experiments exp2 exp2-diagnostics clean

# The stamp is remade when pyproject.toml changes, so new dependencies install.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST's original IDX files from Debian: the offline default dataset.
data: $(FASHION_MNIST_FILE)

$(FASHION_MNIST_FILE):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
	       "or pass --manual-dir DIR with the four IDX files." >&2; exit 1; \
	fi

train: setup data
	$(PY) train.py $(TRAIN_ARGS)

# `make test` stays within about 15 minutes on a 2-core CPU; `make test-all` adds the
# minutes-long multi-process tests (marker `extended`: killed workers, two JAX processes).
# Three passes: every test on TensorFlow, then the backend-agnostic subset (marker
# `multi_backend`: the layer, Algorithm 2, builders, weights, save/load) on JAX and on PyTorch.
TEST_SELECTION ?= not extended

test: setup data
	$(PY) -m pytest -m "$(TEST_SELECTION)" $(TEST_ARGS)
	KERAS_BACKEND=jax $(PY) -m pytest -m "multi_backend and ($(TEST_SELECTION))" $(TEST_ARGS)
	KERAS_BACKEND=torch $(PY) -m pytest -m "multi_backend and ($(TEST_SELECTION))" $(TEST_ARGS)

test-all: setup data
	$(PY) -m pytest $(TEST_ARGS)
	KERAS_BACKEND=jax $(PY) -m pytest -m multi_backend $(TEST_ARGS)
	KERAS_BACKEND=torch $(PY) -m pytest -m multi_backend $(TEST_ARGS)

# The layer alone, whole models (TensorFlow, then JAX in its own process), serving latency.
# More repetitions: make bench BENCH_ARGS="--rounds 21"; JAX in bfloat16 too:
# JAX_BENCH_ARGS="--precisions float32,mixed_bfloat16".
bench: setup
	$(PY) bench/bench_batch_normalization.py
	$(PY) bench/bench_models.py $(BENCH_ARGS)
	$(PY) bench/bench_models.py --backend jax $(JAX_BENCH_ARGS) $(BENCH_ARGS)
	$(PY) bench/bench_serving.py

# Every experiment, experiment 2's diagnostics included (about 2 h 15 min on a 2-core CPU under
# load; docs/RESULTS.md lists each one's runtime); EXPERIMENT_ARGS="--budget smoke" checks them
# all in a few minutes.
experiments: setup data
	$(PY) experiments/run_all.py $(EXPERIMENT_ARGS)

# Experiment 2 alone, the paper's headline (Figures 2 and 3): plain_cnn, then BN-Inception
# trained by the paper's recipes; about an hour. exp2-diagnostics: why its speed-up needs
# Inception's decay (about 45 minutes).
exp2: setup data
	$(PY) experiments/run_all.py --only exp2_learning_rates $(EXPERIMENT_ARGS)

exp2-diagnostics: setup data
	$(PY) experiments/run_all.py --only exp2_diagnostics $(EXPERIMENT_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
