# One command per job.  `make demo` and `make test` set up .venv from nothing first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# The CuTe headers of the CUDA kernels; --no-deps: its Python dependencies are not needed.
CUTLASS := nvidia-cutlass==4.2.0.0

.PHONY: demo test test-compat build bench bench-quick gpu-check clean

# The virtual environment: reuses an importable torch, else installs the CPU build of
# $(TORCH) (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the importable torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install "setuptools>=70" "pybind11>=2.12" "cmake>=3.26" ninja
	$(PIP) install --no-deps $(CUTLASS)
	$(PIP) install -e ".[dev]" --no-build-isolation
	@touch $(STAMP)

# (Re)builds lift_kernels._C in place, incrementally (CMake cache under build/).
build: $(STAMP)
	$(PIP) install -e . --no-build-isolation --no-deps

# Writes out/demo.json and the gate heatmap out/demo.gates.png.
demo: build
	@mkdir -p out
	$(PY) -m lift_kernels demo --json out/demo.json

test: build
	$(PY) -m pytest -q tests

# The HF tests against the lowest transformers of the range pinned in pyproject.toml,
# installed with its own dependencies into a folder put first on PYTHONPATH (the venv keeps
# the newest).  Downloads about 60 MB once.
COMPAT_TRANSFORMERS := 5.0.0
COMPAT_DIR := build/compat-transformers-$(COMPAT_TRANSFORMERS)

test-compat: build
	@[ -f $(COMPAT_DIR)/.installed ] || { $(PIP) install --upgrade --target $(COMPAT_DIR) \
	  "transformers==$(COMPAT_TRANSFORMERS)" "huggingface-hub>=1,<2" "tokenizers>=0.22,<=0.23.0" \
	  && touch $(COMPAT_DIR)/.installed; }
	PYTHONPATH=$(COMPAT_DIR) $(PY) -m pytest -q tests/test_hf.py tests/test_hf_training.py \
	  -k "not convergence"

bench-quick: build
	$(PY) bench/kernels.py --quick

bench: build
	$(PY) bench/kernels.py

# On a GPU machine (python3 with torch, triton, transformers; nvcc): build, GPU tests,
# benchmarks, LIFT step; everything lands in bench/out/gpu_check.
gpu-check:
	bench/gpu_check.sh bench/out/gpu_check

clean:
	rm -rf build $(VENV) lift_kernels/_C*.so *.egg-info
