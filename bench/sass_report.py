"""The SASS report of the CUDA kernels in lift_kernels._C, without a GPU.

For every kernel and architecture in the built module (cuobjdump -sass / -res-usage, from
the CUDA toolkit or Triton's bundled copy): registers, stack and local memory (spills),
local loads/stores, and the instruction counts that show the design: HMMA (tensor cores),
LDSM (ldmatrix), LDGSTS (cp.async), BAR (barriers), SHFL.BFLY (row reductions), MUFU.EX2.
`softmax_no_bar` says whether the row-max shuffles, the exponentials and the P V MMAs of the
online softmax lie between the same two barriers (no barrier inside the softmax).

    python bench/sass_report.py [--so PATH] [--json FILE]

tests/test_sass.py asserts the forward's and the backward's (dK/dV, dQ kernels) properties
from report().
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

COUNTED = ("HMMA", "LDSM", "LDGSTS", "BAR", "SHFL.BFLY", "MUFU.EX2", "LDL", "STL")


def cuobjdump() -> str | None:
    """cuobjdump from PATH, else Triton's bundled copy."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _opcode(line: str) -> str | None:
    # "        /*0120*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;"
    m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
    return m.group(1) if m else None


def _counts(opcodes: list[str]) -> dict:
    out = {}
    for name in COUNTED:
        out[name] = sum(1 for op in opcodes if op == name or op.startswith(name + "."))
    return out


def _softmax_without_barrier(opcodes: list[str]) -> bool:
    """Some barrier-free stretch holds row-max shuffles, then exponentials, then MMAs."""
    stage = 0
    for op in opcodes:
        if op.startswith("BAR"):
            stage = 0
        elif stage == 0 and op.startswith("SHFL.BFLY"):
            stage = 1
        elif stage == 1 and op.startswith("MUFU.EX2"):
            stage = 2
        elif stage == 2 and op.startswith("HMMA"):
            return True
    return False


def report(so: str | Path, tool: str | None = None) -> dict:
    """{arch: {kernel: {regs, stack, local, shared_static, counts..., softmax_no_bar}}}."""
    tool = tool or cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    sass = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True,
                          check=True).stdout
    usage = subprocess.run([tool, "-res-usage", str(so)], capture_output=True, text=True,
                           check=True).stdout
    result: dict = {}
    arch, kernel, ops = None, None, []

    def flush():
        if arch and kernel:
            entry = result.setdefault(arch, {}).setdefault(kernel, {})
            entry.update(_counts(ops))
            entry["softmax_no_bar"] = _softmax_without_barrier(ops)

    for line in sass.splitlines():
        m = re.search(r"code for (sm_\w+)", line)
        if m:
            flush()
            arch, kernel, ops = m.group(1), None, []
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            flush()
            kernel, ops = m.group(1), []
            continue
        op = _opcode(line)
        if op and kernel:
            ops.append(op)
    flush()

    arch = None
    lines = usage.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and arch and i + 1 < len(lines):
            res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1]))
            entry = result.setdefault(arch, {}).setdefault(m.group(1), {})
            entry.update(regs=int(res.get("REG", 0)), stack=int(res.get("STACK", 0)),
                         shared_static=int(res.get("SHARED", 0)),
                         local=int(res.get("LOCAL", 0)))
    return result


def short_name(kernel: str) -> str:
    """forward_kernel<FwdTraits<128, bfloat16_t>> from the mangled name."""
    base = next((n for n in ("forward_kernel", "preprocess_kernel", "dkdv_kernel", "dq_kernel")
                 if n in kernel), kernel[:40])
    dim = re.search(r"Li(\d+)E", kernel)
    dtype = "bf16" if "bfloat16" in kernel else "fp16" if ("half" in kernel or "__half" in kernel) else ""
    return f"{base} D={dim.group(1)} {dtype}".strip() if dim else f"{base} {dtype}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", help="the built _C module (default: lift_kernels._C's file)")
    parser.add_argument("--json", help="also write the report as JSON")
    args = parser.parse_args()
    so = args.so
    if so is None:
        from lift_kernels import _C
        so = _C.__file__
    rep = report(so)
    cols = ("regs", "stack", "local", "LDL", "STL", "HMMA", "LDSM", "LDGSTS", "BAR",
            "SHFL.BFLY", "MUFU.EX2")
    print(f"{'arch':<8} {'kernel':<28} " + " ".join(f"{c:>9}" for c in cols) + "  softmax w/o BAR")
    for arch in sorted(rep):
        for kernel in sorted(rep[arch], key=short_name):
            e = rep[arch][kernel]
            print(f"{arch:<8} {short_name(kernel):<28} " +
                  " ".join(f"{e.get(c, '-'):>9}" for c in cols) +
                  f"  {'yes' if e.get('softmax_no_bar') else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
