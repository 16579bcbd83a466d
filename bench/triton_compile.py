"""JIT-faithful compile report of the Triton kernels, for sm_90a (H100/H200) and sm_80
(A100), on a machine with no GPU.

The backend's own launch code (lift_kernels/ops/triton_attention.py) runs on meta tensors of
the target shape; each kernel launch it makes is captured and replayed through Triton's own
JIT (`JITFunction.run(..., warmup=True)`, behind the kernel's heuristics) with a stand-in
driver that names the target GPU.  So the signature, the integer specialisations (unit
strides as constants, multiples of 16, pointer alignment), the constexprs and the compile
options are the ones the JIT builds on the GPU; only the launch is skipped.  Every
configuration of each autotuned kernel is compiled, also those the head-dim pruning drops.

Per compiled kernel the cubin gives: registers, stack (spill) bytes, spill stores and
reloads (STL/LDL in the SASS), spilled-value reloads inside the hot (innermost) loops (LDL
between a backward branch and its target), shared memory (Triton's dynamic allocation),
whether it launches (<= 227 KB on sm_90a, <= 163 KB on sm_80), and the tensor-core and
async-copy instruction counts (HGMMA = wgmma, HMMA = mma.sync, LDGSTS = cp.async,
UTMALDG = TMA load).

    python bench/triton_compile.py [--arch sm_90a sm_80] [--dtype bf16 fp16] [--head-dim 64 128]
                                   [--weights same fp32] [--kernel fwd dq ...] [--first]
                                   [--window LEFT] [--softcap CAP] [--varlen] [--json FILE]

--window/--softcap compile the windowed (causal, window_size=(LEFT, 0)) and soft-capped
specialisations instead of the plain ones, --varlen the packed-sequence one.

Run it without TRITON_INTERPRET (kernels are interpreted or compiled from the moment they
are defined).  Compiles are cached in Triton's cache directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Shared memory a block may use: 227 KB on sm_90, 163 KB on sm_80 (CUDA C Programming
# Guide, compute capabilities table).
ARCHS = {"sm_90a": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# The benchmark's shape (bench/gpu_check.sh): Llama-style GQA, 4096 tokens.
SHAPE = dict(batch=4, seq=4096, hq=32, hkv=8)


@dataclasses.dataclass
class Launch:
    """One kernel launch the backend made: the kernel object (autotuner, heuristics or jit
    function), its grid and its arguments."""
    name: str
    kernel: object
    grid: object
    args: tuple
    kwargs: dict


def capture(dtype="bf16", head_dim=128, weights="same", deterministic=False, bias=False,
            rope=True, window=-1, softcap=0.0, varlen=False, **shape):
    """The launches of one forward and one backward at the target shape, on meta tensors.
    varlen: the batch packed as B sequences of N tokens (cu_seqlens_q/k)."""
    import torch
    from lift_kernels import dispatch
    from lift_kernels.ops import triton_attention as ta

    shape = {**SHAPE, **shape}
    b, n, hq, hkv, d = shape["batch"], shape["seq"], shape["hq"], shape["hkv"], head_dim
    m, r = 2 * d, int(d ** 0.5)
    dt = getattr(torch, DTYPES[dtype])
    wdt = dt if weights == "same" else torch.float32
    meta = dict(device="meta")
    q = torch.empty(b, n, hq, d, dtype=dt, **meta)
    k, v = (torch.empty(b, n, hkv, d, dtype=dt, **meta) for _ in range(2))
    w1, w2 = torch.empty(hq, d, m, dtype=wdt, **meta), torch.empty(hq, m, d, dtype=wdt, **meta)
    g1, g2 = torch.empty(hq, d, r, dtype=wdt, **meta), torch.empty(hq, r, dtype=wdt, **meta)
    b1, b2, c1 = ((torch.empty(hq, m, dtype=wdt, **meta), torch.empty(hq, d, dtype=wdt, **meta),
                   torch.empty(hq, r, dtype=wdt, **meta)) if bias else (None, None, None))
    cos = sin = None
    if rope:
        cos, sin = dispatch.normalize_rope(torch.empty(n, d, **meta), torch.empty(n, d, **meta), b)
    packed = {}
    if varlen:
        q, k, v = (t.reshape(b * n, *t.shape[2:]) for t in (q, k, v))
        cos, sin = (None, None) if cos is None else (torch.empty(b * n, d, **meta),) * 2
        cu = torch.empty(b + 1, dtype=torch.int32, **meta)
        packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)

    launches = []
    names = ("gated_attention_fwd_kernel", "preprocess_kernel", "dkdv_kernel",
             "dkdv_kernel_tuned", "dq_kernel", "dq_kernel_tuned")
    saved = {name: getattr(ta, name) for name in names}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(Launch(self.name, saved[self.name], grid, args, kwargs))
            return launch

    try:
        for name in names:
            setattr(ta, name, Recorder(name))
        scale = d ** -0.5
        extras = dict(window_size=(window, -1), softcap=softcap, **packed)
        out, gate, lse, attn = ta.forward("triton", q, k, v, w1, b1, w2, b2, g1, c1, g2, cos,
                                          sin, True, scale, 3.0, 1.0, **extras)
        ta.backward("triton", torch.empty_like(out), None, q, k, v, w1, b1, w2, b2, g1, c1, g2,
                    cos, sin, gate, lse, attn, True, scale, 3.0, 1.0, deterministic, **extras)
    finally:
        for name, kernel in saved.items():
            setattr(ta, name, kernel)
    return launches


class _TargetDriver:
    """Stands in for the CUDA driver while compiling: it names the target GPU (one device id
    per architecture, so the JIT keeps one binder per target) and launches nothing."""

    def __init__(self, capability):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)
        self.capability = capability

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.capability

    def get_current_stream(self, device=None):
        return 0


def _kernel_kinds(launch):
    """(kind for configs(), jit-level kernel object, autotuner or None)."""
    from triton.runtime.autotuner import Autotuner
    kind = {"gated_attention_fwd_kernel": "fwd", "preprocess_kernel": "preprocess",
            "dkdv_kernel": "dkdv", "dkdv_kernel_tuned": "dkdv", "dq_kernel": "dq",
            "dq_kernel_tuned": "dq"}[launch.name]
    if isinstance(launch.kernel, Autotuner):
        return kind, launch.kernel.fn, launch.kernel
    return kind, launch.kernel, None


def compile_launch(launch, config, arch):
    """Compiles `launch` with `config` (a triton.Config, or None for the captured keywords)
    through the JIT for `arch`.  Returns the CompiledKernel."""
    from triton.runtime import driver
    kind, kernel, _ = _kernel_kinds(launch)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    previous = driver._active  # None without a GPU (reset_active() would raise)
    driver.set_active(_TargetDriver(ARCHS[arch][0]))
    try:
        return kernel.run(*launch.args, grid=launch.grid, warmup=True, **kwargs)
    finally:
        driver.set_active(previous)


def _tool(name):
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)],
                              capture_output=True, text=True, check=True).stdout
    return {key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK):(\d+)", text)}


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def analyse_sass(text: str) -> dict:
    """Counts in the SASS of one kernel.  A loop is a backward branch (BRA to a lower
    address) and the instructions from its target to it; the hot loops are the innermost
    ones (no other loop inside).  hot_loop_reloads counts LDL (local-memory loads: spilled
    values) inside them; the whole kernel's STL/LDL are spill stores/reloads anywhere."""
    instrs = []
    for addr, _, op, rest in _INSTR.findall(text):
        instrs.append((int(addr, 16), op, rest))
    loops = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target and int(target.group(1), 16) < addr:  # not the trailing self-branch
                loops.append((int(target.group(1), 16), addr))
    innermost = [(lo, hi) for lo, hi in loops
                 if not any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi
                            for lo2, hi2 in loops)]

    def count(prefix, lo=None, hi=None):
        return sum(1 for a, op, _ in instrs if op.startswith(prefix)
                   and (lo is None or lo <= a <= hi))

    return dict(
        loops=len(loops), hot_loops=len(innermost),
        hot_loop_reloads=sum(count("LDL", lo, hi) for lo, hi in innermost),
        hot_loop_spill_stores=sum(count("STL", lo, hi) for lo, hi in innermost),
        spill_stores=count("STL"), spill_reloads=count("LDL"),
        wgmma=count("HGMMA"), mma=count("HMMA"),
        async_copies=count("LDGSTS") + count("UTMALDG"))


def analyse(kernel, arch) -> dict:
    cubin = kernel.asm["cubin"]
    usage = resource_usage(cubin)
    shared = kernel.metadata.shared
    return dict(registers=usage.get("reg"), spill_bytes=usage.get("stack", 0), shared=shared,
                launchable=shared <= ARCHS[arch][1], **analyse_sass(sass(cubin)))


def rows_for(arch, dtype, head_dim, weights, first=False, deterministic=False, kinds=None,
             log=None, window=-1, softcap=0.0, varlen=False):
    """JSON rows for every kernel and configuration of one (arch, dtype, D, weights) case.
    `first`: only the configuration each kernel uses first (the untimed one in
    deterministic mode); `kinds`: only these kernels.  Row fields: kernel, mode, config (BLOCK_* keywords), warps,
    stages, rank (index in the list kept for this head dim, None if pruned away), window
    (left side, -1: none), softcap, varlen (packed sequences), and the fields of
    analyse()."""
    from lift_kernels.ops.triton_common import prune_configs
    rows = []
    launches = capture(dtype, head_dim, weights, deterministic=deterministic, window=window,
                       softcap=softcap, varlen=varlen)
    q = launches[0].args[0]
    for launch in launches:
        kind, _, tuner = _kernel_kinds(launch)
        if kinds is not None and kind not in kinds:
            continue
        if tuner is None:
            candidates = [(None, 0)]
        else:
            kept = prune_configs(kind, tuner.configs, {"Q": q}, HEAD_DIM=head_dim,
                                 WINDOWED=window >= 0)
            ranks = {repr(c.all_kwargs()): i for i, c in enumerate(kept)}
            candidates = [(c, ranks.get(repr(c.all_kwargs()))) for c in tuner.configs]
            if first:
                candidates = [(kept[0], 0)]
        for config, rank in candidates:
            start = time.time()
            kernel = compile_launch(launch, config, arch)
            fixed = {k: launch.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_H")
                     if k in launch.kwargs}
            tile = config.kwargs if config is not None else fixed
            row = dict(arch=arch, dtype=dtype, head_dim=head_dim, weights=weights,
                       triton=_triton_version(), kernel=kind,
                       mode="deterministic" if deterministic and kind in ("dkdv", "dq")
                       else "autotuned" if tuner is not None else "fixed",
                       window=window, softcap=softcap, varlen=varlen, config=tile,
                       warps=kernel.metadata.num_warps,
                       stages=kernel.metadata.num_stages, rank=rank,
                       **analyse(kernel, arch), compile_seconds=round(time.time() - start, 1))
            rows.append(row)
            if log:
                log(row)
    return rows


def _triton_version():
    import triton
    return triton.__version__


def tile_text(config) -> str:
    """BLOCK_M x BLOCK_N (x BLOCK_H)."""
    return "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_H") if k in config)


def kernel_text(row) -> str:
    """The kernel's name, with the window and soft-capping it was compiled for, if any."""
    features = []
    if row.get("window", -1) >= 0:
        features.append(f"window {row['window']}")
    if row.get("softcap"):
        features.append(f"softcap {row['softcap']:g}")
    if row.get("varlen"):
        features.append("packed")
    return row["kernel"] + (f" ({', '.join(features)})" if features else "")


def table_line(row) -> str:
    tile = tile_text(row["config"])
    rank = "-" if row["rank"] is None else str(row["rank"])
    return (f"{row['arch']:6s} {row['dtype']:4s} D={row['head_dim']:<3d} w={row['weights']:4s} "
            f"{kernel_text(row):10s} {row['mode'][:5]:5s} "
            f"{tile:>11s}/w{row['warps']}/s{row['stages']}"
            f" rank={rank:2s} regs={row['registers']:3d} stack={row['spill_bytes']:5d} "
            f"hot-LDL={row['hot_loop_reloads']:3d} LDL={row['spill_reloads']:3d} "
            f"smem={row['shared'] // 1024:3d}K {'ok ' if row['launchable'] else 'TOO BIG'} "
            f"wgmma={row['wgmma']:3d} mma={row['mma']:3d} async={row['async_copies']:3d}")


def markdown(rows) -> str:
    """The rows as a Markdown table (bench/RESULTS.md)."""
    lines = ["| triton | arch | dtype | D | weights | kernel | mode | tile | warps/stages | rank "
             "| regs | stack B | hot-loop LDL | LDL | smem KB | launches | wgmma | mma | async |",
             "|" + "---|" * 19]
    for r in rows:
        rank = "-" if r["rank"] is None else r["rank"]
        lines.append(
            f"| {r['triton']} | {r['arch']} | {r['dtype']} | {r['head_dim']} | {r['weights']} "
            f"| {kernel_text(r)} | {r['mode']} | {tile_text(r['config'])} "
            f"| {r['warps']}/{r['stages']}"
            f" | {rank} | {r['registers']} | {r['spill_bytes']} | {r['hot_loop_reloads']} "
            f"| {r['spill_reloads']} | {r['shared'] / 1024:.0f} | {'yes' if r['launchable'] else 'NO'}"
            f" | {r['wgmma']} | {r['mma']} | {r['async_copies']} |")
    return "\n".join(lines)


# Per kernel, the loop-invariant tile (a program keeps it on chip; a larger one means less
# traffic per FLOP) and the streamed one (a larger one, fewer loop trips).
_TILES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M"),
          "dq": ("BLOCK_M", "BLOCK_N")}


def suggest(rows):
    """triton_common.TUNED rebuilt from autotuned rows (one arch and dtype): per (kernel,
    head dim), the configurations that launch and reload no spilled value in a hot loop,
    larger resident tile first, then fewer spill reloads anywhere, then larger streamed
    tile, then less shared memory."""
    from lift_kernels.ops.triton_common import config_key
    import triton
    tuned = {}
    for row in rows:
        if row["mode"] != "autotuned" or row["hot_loop_reloads"] or not row["launchable"]:
            continue
        key = config_key(triton.Config(row["config"], num_warps=row["warps"],
                                       num_stages=row["stages"]))
        resident, streamed = (row["config"][k] for k in _TILES[row["kernel"]])
        rank = (-resident, row["spill_reloads"], -streamed, row["shared"])
        tuned.setdefault((row["kernel"], row["head_dim"]), []).append((rank, key))
    return {k: [key for _, key in sorted(v)] for k, v in sorted(tuned.items())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sm_90a", "sm_80"], choices=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--weights", nargs="+", default=["same", "fp32"],
                        choices=["same", "fp32"])
    parser.add_argument("--kernel", nargs="+", choices=["fwd", "preprocess", "dkdv", "dq"],
                        help="only these kernels (default: all)")
    parser.add_argument("--first", action="store_true",
                        help="only the configuration each kernel uses first, default and "
                             "deterministic mode")
    parser.add_argument("--window", type=int, default=-1, metavar="LEFT",
                        help="compile the sliding-window kernels, window_size=(LEFT, 0)")
    parser.add_argument("--softcap", type=float, default=0.0, metavar="CAP",
                        help="compile the soft-capped kernels")
    parser.add_argument("--varlen", action="store_true",
                        help="compile the packed-sequence kernels (cu_seqlens), the batch "
                             "packed as B sequences of N")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--suggest", nargs="+", metavar="JSON",
                        help="print triton_common.TUNED rebuilt from these row files and exit")
    parser.add_argument("--markdown", nargs="+", metavar="JSON",
                        help="print these row files as one Markdown table and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        rows = [r for f in args.markdown for r in json.loads(Path(f).read_text())]
        print(markdown(rows))
        return rows
    if args.suggest:
        rows = [r for f in args.suggest for r in json.loads(Path(f).read_text())]
        for key, configs in suggest(rows).items():
            print(f"    {key}: {configs},")
        return rows
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    rows, done = [], []

    def log(row):
        print(table_line(row), flush=True)
        done.append(row)
        if args.json:  # rewritten after every row, so a long run's partial rows are kept
            Path(args.json).write_text(json.dumps(done, indent=1))

    for arch in args.arch:
        for dtype in args.dtype:
            for d in args.head_dim:
                for weights in args.weights:
                    features = dict(window=args.window, softcap=args.softcap,
                                    varlen=args.varlen)
                    rows += rows_for(arch, dtype, d, weights, first=args.first,
                                     kinds=args.kernel, log=log, **features)
                    if args.first:
                        kinds = [k for k in args.kernel or ("dkdv", "dq") if k in ("dkdv", "dq")]
                        rows += rows_for(arch, dtype, d, weights, first=True,
                                         deterministic=True, kinds=kinds, log=log, **features)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
