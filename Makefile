# The three commands of the README: make run (the study), make demo (offline, minutes on a CPU), make test.
# Each sets itself up from a fresh clone with only Python 3.11 and pip.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1

.PHONY: run demo test setup clean-demo sweep clean-sweep

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

# The stages run as forks of one process that has imported torch, open_clip and PEFT (clip_qlora/runtime/warm.py),
# so no stage pays for those imports (warm against cold: benchmarks/results/2026-12-01-nvidia-h200-study.md).
# Plain `dvc repro` runs the same stages, each cold.
# params.yaml is checked first: DVC deletes a stage's outputs before the stage could reject a bad value.
run: $(STAMP) .dvc
	$(PY) -m stages check
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m clip_qlora.runtime.warm -- $(BIN)/dvc repro

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m tools.demo . runs/demo

# A grid of variants on DVC's experiment queue, offline like the demo, in runs/sweep (a Git repo of its own).
# SWEEP_JOBS experiments at once; on a GPU machine each stage claims its own GPU (README: Sweeps over several GPUs).
# SWEEP_GRID='-S lora.r=2,4,8' replaces the default grid (tools/sweep.py: GRID).
SWEEP_JOBS ?= 2
SWEEP_GRID ?=
sweep: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m tools.sweep . runs/sweep --jobs $(SWEEP_JOBS) $(SWEEP_GRID)

# Test files run on TEST_WORKERS processes, each file whole in one of them (its module fixtures built once):
# the end-to-end pipeline file is the longest (about 4 minutes on its own, its first repro warm).
TEST_WORKERS ?= 2
test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-demo:
	rm -rf runs/demo

clean-sweep:
	rm -rf runs/sweep
