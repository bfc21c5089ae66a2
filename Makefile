# `make demo`: set up a virtual environment and optimize the MNIST model shipped in models/.
# `make test`: set up the same environment and run the test suite, then the slow suite (what CI runs, through .ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,tf,torch,models]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
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

clean:
	rm -rf $(VENV) out build *.egg-info
