"""Kernel microbenchmarks: every gated-memory attention backend against reference, torch,
SDPA alone and (CUDA) FlexAttention.  The same program as `lift-kernels bench`; the
harness is lift_kernels/benchmark.py.

    python bench/kernels.py --quick                       # CPU: about 2 minutes on 2 cores
    python bench/kernels.py --json b.json --csv b.csv --plot b.png
    python bench/kernels.py --device cuda --sweep gpu-target --backends sdpa,torch,triton
"""

import sys

from lift_kernels.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
