# The three commands of the README: make run (the study), make demo (offline, minutes on a CPU), make test.
# Each sets itself up from a fresh clone with only Python 3.11 and pip.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1

.PHONY: run demo test setup clean-demo

setup: $(STAMP)

# torch/torchvision pinned to the pair this machine's pip serves from local disk; the rest from pyproject.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.dvc:
	$(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false

run: $(STAMP) .dvc
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m clip_qlora.demo . runs/demo

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m pytest -q

clean-demo:
	rm -rf runs/demo
