# `make demo`: set up a virtual environment with the core only and optimize the MNIST model shipped in models/.
# `make test`: add the extras the tests need and run the test suite, then the slow suite (what CI runs, through .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# Two stamps: the core (the demo: no TensorFlow or torch, under a minute) and the test extras on top of it.
# `make demo` then `make test` installs the extras; `make test` then `make demo` installs nothing more.
CORE_STAMP := $(VENV)/.installed-core
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-real clean

# --no-compile: byte-compiling every installed module (all of sympy, onnx's test data scripts) took longer than
# the demo. Python compiles what is imported on first use instead, and caches it, unless PYTHONDONTWRITEBYTECODE is
# set (as on the project's development machine): then every command compiled its imports again, 2.0 of its 2.6 s
# start-up. So what a run imports is imported once here with the cache on.
WARM_IMPORTS := import onnxopt.cli, onnxopt.goal, onnxopt.html_report, onnxruntime.quantization; \
	from onnxopt import registry; [registry.get_pass(name) for name in registry.BUILTIN_PASSES]
$(CORE_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile -e .
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "$(WARM_IMPORTS)"
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(PIP) -e ".[dev,tf,torch,models,images,text,ray]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(CORE_STAMP)
	mkdir -p out
	$(BIN)/onnxopt run models/tiny_mlp/tiny_mlp.onnx --passes prune,quant \
		--data models/tiny_mlp/calib.npz --eval models/tiny_mlp/eval.npz \
		--latency -o out/tiny_mlp.opt.onnx --report out/tiny_mlp.report.json

test: setup
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# `make bench MNIST=DIR`: the whole comparison (bench/run.py: onnxopt vs onnxslim, onnxruntime, onnxsim) into bench/results/
MNIST ?= ../shared/data/mnist
bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/run.py --mnist $(MNIST) --out-dir bench/results
	$(BIN)/python bench/stats_memory.py

# `make bench-real SHARED=DIR`: real models with task metrics (bench/real.py: ImageNet, CIFAR-10, STS-B, photographs;
# onnxopt vs onnxruntime, onnxsim, onnxslim) into bench/results/real.md and real.png; under 90 minutes on 2 cores.
SHARED ?= ../shared
bench-real: setup
	$(PIP) -e ".[bench,text,images]"
	$(BIN)/python bench/real.py --shared $(SHARED) --out-dir bench/results

clean:
	rm -rf $(VENV) out build *.egg-info
