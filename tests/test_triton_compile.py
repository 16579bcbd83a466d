"""Ahead-of-time compilation of the Triton kernels for sm_90 (H100/H200) on a machine with no
GPU: Triton's front end, its NVIDIA backend and the ptxas bundled with triton turn each
kernel into a cubin, which catches what the interpreter cannot (constexpr rules, dot shapes
and layouts, shared-memory overflow) and reports registers and spills per configuration.

As a test (in a child process, because tests/conftest.py turns on the interpreter, and
triton decides per kernel at definition time): the four kernels, bf16, head dim 128, the
first configuration autotuning would try.  As a script, the resource table of the grid:

    python tests/test_triton_compile.py [--all]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _kernels():
    from lift_kernels.ops import triton_bwd, triton_fwd
    return {"fwd": triton_fwd.gated_attention_fwd_kernel.fn,
            "preprocess": triton_bwd.preprocess_kernel, "dkdv": triton_bwd.dkdv_kernel,
            "dq": triton_bwd.dq_kernel}


def compile_kernel(kind, dtype, head_dim, config, bias=True, rope=True, causal=True):
    """Compiles one kernel for sm_90a.  Returns (registers, spill bytes, shared bytes, s)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    heuristics = _kernels()[kind]
    jit = heuristics.fn
    tdt = getattr(torch, TORCH_DTYPES[dtype])
    pointers = {n: dtype for n in ("Q", "K", "V", "OUT", "ATTN", "DO", "DQ", "DK", "DV")}
    pointers.update({n: dtype for n in ("W1", "W2", "G1", "G2")})
    pointers.update({n: (dtype if bias else None) for n in ("B1", "B2", "C1")})
    pointers.update({n: ("fp32" if rope else None) for n in ("COS", "SIN")})
    pointers.update({n: "fp32" for n in ("GATE", "LSE", "DO_ATTN", "DW1", "DW2", "DG1", "DG2")})
    pointers.update({n: ("fp32" if bias else None) for n in ("DB1", "DB2", "DC1")})
    pointers["DGATE"] = "fp32"
    constants = dict(HEAD_DIM=head_dim, MEM_HIDDEN=2 * head_dim,
                     GATE_HIDDEN=int(head_dim ** 0.5), CAUSAL=causal, DETERMINISTIC=False,
                     **config.kwargs)
    fake = {n: (None if dt is None else torch.empty(0, dtype=tdt if dt == dtype else torch.float32,
                                                   device="meta"))
            for n, dt in pointers.items()}
    fake.update(constants)
    constants.update({name: fn(fake) for name, fn in heuristics.values.items()})
    signature, constexprs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if jit.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
        elif name in pointers:
            if pointers[name] is None:
                signature[name] = "constexpr"
                constexprs[(i,)] = None
            else:
                signature[name] = "*" + pointers[name]
        elif name in ("scale", "gate_scale", "gate_shift"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    start = time.time()
    kernel = triton.compile(ASTSource(jit, signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    seconds = time.time() - start
    registers, spills = _ptxas_report(kernel.asm["ptx"])
    return registers, spills, kernel.metadata.shared, seconds


def _ptxas_report(ptx):
    """(registers, spill store bytes) from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia import compiler
    ptxas = compiler.get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    return registers, spills


def _configs(kind, head_dim, dtype, first_only):
    from lift_kernels.ops.triton_common import configs, prune_by_head_dim
    if kind == "preprocess":
        import triton
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)]
    import torch
    q = torch.empty(0, dtype=getattr(torch, TORCH_DTYPES[dtype]), device="meta")
    kept = prune_by_head_dim(configs(kind), {"Q": q}, HEAD_DIM=head_dim)
    return kept[:1] if first_only else kept


def report(dtypes, head_dims, kinds, first_only):
    rows = []
    for dtype in dtypes:
        for d in head_dims:
            for kind in kinds:
                for config in _configs(kind, d, dtype, first_only):
                    regs, spills, shared, sec = compile_kernel(kind, dtype, d, config)
                    rows.append((kind, dtype, d, config, regs, spills, shared))
                    print(f"{kind:10s} {dtype:5s} D={d:3d} {str(config.kwargs):45s} "
                          f"warps={config.num_warps} stages={config.num_stages}: {regs:3d} regs, "
                          f"{spills:5d} B spilled, {shared:6d} B shared ({sec:.0f} s)", flush=True)
    return rows


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    done = subprocess.run([sys.executable, __file__, "--ci"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" regs,") == 4, done.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--all" in sys.argv:
        report(["bf16", "fp16", "fp32"], [32, 64, 96, 128, 256],
               ["fwd", "preprocess", "dkdv", "dq"], first_only=False)
    else:
        report(["bf16"], [128], ["fwd", "preprocess", "dkdv", "dq"], first_only=True)
