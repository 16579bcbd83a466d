"""Test session setup.

The shared harness (tests/helpers.py) is imported as a plain module.  Without a CUDA device
the Triton kernels run under Triton's interpreter on CPU tensors; triton.jit reads
TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module imports
lift_kernels (which imports its Triton backend)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

if os.environ.get("LIFT_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
