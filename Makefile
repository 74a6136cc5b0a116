# `make test` and `make demo` install what they need into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint demo serve datagen-demo bench install

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so that nothing later resolves a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,dev,serve]'
	# libtpu for the TPU fit check (launch/aot.py) only, kept out of site-packages: where JAX finds it, every
	# program loads it and prints its start-up errors on a machine without a TPU. The version jax[tpu]==0.10.2 pins.
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/libtpu-aot 'libtpu==0.0.42.1'
	touch $(STAMP)

# Oracle sources, downloaded and never installed: pytorch-fid's FID Inception builds on torchvision's Inception
# blocks, and torchvision's wheel does not import beside the CPU torch; tests/pytorch_fid_oracle.py runs the two
# packages' Python files from these wheels.
ORACLE := $(VENV)/oracle-wheels/.downloaded
$(ORACLE): $(STAMP)
	$(PY) -m pip download -q --no-deps -d $(VENV)/oracle-wheels pytorch-fid==0.3.0 torchvision==0.28.0
	touch $(ORACLE)

install: $(STAMP) $(ORACLE)

lint: $(STAMP)
	$(PY) -m ruff check .

# two workers: most of the suite's time is XLA compiling on one core; --dist loadfile keeps each test file (and its
# module fixtures) on one worker. About 30 min on 2 cores (58 min of CPU).
PYTEST = $(PY) -m pytest -q -n 2 --dist loadfile --durations=30

test: $(STAMP) $(ORACLE) lint
	$(PYTEST) tests

test-fast: $(STAMP) $(ORACLE)
	$(PYTEST) -m "not slow" tests

demo: $(STAMP)
	$(PY) -m genllava_jax.demo --workdir=runs/demo

# the web demo on the model `make demo` trained: open http://localhost:7860
serve: $(STAMP)
	@test -f runs/demo/train/config.json || { echo "no trained demo model in runs/demo/train: run make demo first"; exit 1; }
	$(VENV)/bin/genllava-serve --workdir=runs/demo/train --max_new_tokens=12

# instruction data from the model `make demo` trained (genllava_jax/datagen/demo.py)
datagen-demo: $(STAMP)
	$(PY) -m genllava_jax.datagen.demo --workdir=runs/datagen --model=runs/demo/train

bench: $(STAMP)
	$(PY) bench/decode.py
	$(PY) bench/sample.py
	$(PY) bench/eval.py
	$(PY) bench/train_step.py
