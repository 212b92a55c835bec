# Set-up and the two main jobs. On Linux, MLX's CPU wheel links reference BLAS: preload OpenBLAS.
VENV ?= .venv
PY := $(VENV)/bin/python
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
UNAME := $(shell uname)
ifeq ($(UNAME),Linux)
  RUN := LD_PRELOAD=$(OPENBLAS)
endif

.PHONY: setup demo test lint bench-quick

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ "$(UNAME)" = Linux ] && [ ! -e $(OPENBLAS) ]; then \
	  apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup  ## serve the default small model (SmolLM2-135M-Instruct) on 127.0.0.1:8080
	$(RUN) $(VENV)/bin/mlxq serve

test: setup  ## the fast suite; `pytest -m slow` runs the long ones (fuzzing, big runs)
	$(RUN) $(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench-quick: setup  ## every benchmark in its quick form; results in bench/results/
	for b in decode prefill_hybrid serve quant_quality experts; do $(RUN) $(PY) bench/$$b.py --quick || exit 1; done
