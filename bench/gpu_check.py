"""The Python half of bench/gpu_check.sh, the one-shot GPU check (issue 11).  Each
subcommand is one phase of the script; all of them write into the work folder WORK.

    gpu_check.py env WORK [--dry]                     versions and device -> env.json
    gpu_check.py prewarm --worker I --workers P [--dry]
                 compile worker I's share of every Triton autotuning configuration
    gpu_check.py measure WORK OUT [--dry] [--phases gate,timing,registers,profile]
                 the correctness gate, the timing, Triton registers, a profiler pass
    gpu_check.py gate-child WORK --backends B[,B] --budget-s S [--dry]
                 the gate of backends that could crash the process, for `measure`
    gpu_check.py sanitize-target [--dry]              the tiny run compute-sanitizer wraps
    gpu_check.py pack WORK OUT                        summary.md, summary.json, gpu_check.tar.gz

--dry is the same plan on the CPU at tiny shapes (Triton's interpreter, the `cpu` backend
standing in for `cuda`), so CI runs every line of it.  `pack` and the summary use only
the standard library: they still report when torch cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Norm-relative limit of a 16-bit backend against the float32 run (STYLE.md: bf16 <= 2e-2).
TOLERANCE = 2e-2
GRAD_NAMES = ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")
PACK_NAME = "gpu_check.tar.gz"
# Issue 11's targets for `triton` at the longest timed sequence.
TARGET_TIME_OVER_SDPA = 1.25
TARGET_FWD_TFLOPS = 400.0


# ----------------------------------------------------------------------------- the plan

def make_plan(dry: bool) -> dict:
    """Every shape and contender of a run.  GPU: the Triton/CUDA issues' benchmark shape
    (B=4, Hq=32, Hkv=8, D=128, bf16, causal).  Dry: tiny shapes that Triton's interpreter
    runs in seconds, and `cpu` standing in for `cuda`.  `isolated`: gated in a child
    process (run_gate says why)."""
    from lift_kernels.benchmark import Shape

    if dry:
        # Two batch elements: with one, a bf16 weight gradient sums so few tokens that its
        # rounding error comes near the limit (triton's dg2 1.5e-2 at B=1, N=16).
        def shape(n, batch=2):
            return Shape(batch, n, n, 2, 1, 16, "bfloat16")
        return dict(device="cpu", fused=("triton", "cpu"), isolated=("cpu",),
                    baselines=("sdpa", "cudnn", "torch"),
                    gate_ns=(16, 24), timing_ns=(24, 16), shape=shape, lift_n=16,
                    timing=dict(warmup=0, max_repeats=1, min_repeats=1, target_ms=1.0,
                                threads=1))

    def shape(n, batch=4):
        return Shape(batch, n, n, 32, 8, 128, "bfloat16")
    return dict(device="cuda", fused=("triton", "cuda"), isolated=("cuda",),
                baselines=("sdpa", "cudnn", "torch"),
                gate_ns=(4096, 16384), timing_ns=(16384, 4096), shape=shape, lift_n=4096,
                timing=dict(warmup=1, max_repeats=10, min_repeats=3, target_ms=150.0,
                            threads=None))


def gate_cases(plan) -> list:
    """(name, shape, variant) in run order.  'timed' is exactly what the timing runs (bf16
    weights, no biases, as in Llama); 'lift' is LIFT's HF case with all ten gradients
    (biases, as in Qwen2, and the float32 memory weights the HF integration keeps)."""
    first, *rest = plan["gate_ns"]
    cases = [(f"timed-N{first}", plan["shape"](first), "timed"),
             (f"lift-N{plan['lift_n']}", plan["shape"](plan["lift_n"]), "lift")]
    cases += [(f"timed-N{n}", plan["shape"](n), "timed") for n in rest]
    return cases


# ----------------------------------------------------------------------------- small tools

def _write_json(path, data) -> None:
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def record_phase(work, name, status, seconds, note="") -> None:
    """One line of WORK/phases.jsonl (the shell's phases append there too)."""
    with open(Path(work) / "phases.jsonl", "a") as f:
        f.write(json.dumps({"phase": name, "status": status, "seconds": round(seconds, 1),
                            "note": note}) + "\n")


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def triton_objects() -> tuple:
    """({name: (Autotuner, name of the kernel it tunes)}, {kernel name: JITFunction}) of
    every Triton kernel the package's modules define, found by walking their globals (so
    renamed or added kernels are found too); empty without triton.  Under the interpreter
    the kernels are InterpretedFunctions: autotuners only."""
    try:
        from triton.runtime.autotuner import Autotuner, Heuristics
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}, {}
    tuners, jits = {}, {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("lift_kernels.ops.triton") or mod is None:
            continue
        for attr, obj in vars(mod).items():
            inner = obj
            while isinstance(inner, (Autotuner, Heuristics)):
                inner = inner.fn
            name = getattr(inner, "__name__", attr)
            if isinstance(obj, Autotuner):
                tuners.setdefault(f"{mod_name.rsplit('.', 1)[1]}.{attr}", (obj, name))
            if isinstance(inner, JITFunction):
                jits.setdefault(name, inner)
    return tuners, jits


def _config_dict(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def autotune_choices() -> dict:
    """{autotuned kernel: {key: chosen configuration}} as the autotuners hold them now."""
    tuners, _ = triton_objects()
    return {name: {str(key): _config_dict(cfg) for key, cfg in tuner.cache.items()}
            for name, (tuner, _) in tuners.items()}


# ----------------------------------------------------------------------------- env

def cmd_env(args) -> int:
    """Versions, device, tools: env.json (benchmark.environment plus what this check uses)."""
    import importlib.metadata as md
    import shutil

    import torch
    from lift_kernels import benchmark

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA device (run with --dry on a CPU machine)")
        return 2
    env = benchmark.environment(device)
    packages = {}
    for name in ("torch", "triton", "transformers", "numpy", "pytest", "pytest-xdist",
                 "pybind11", "cmake", "ninja", "setuptools"):
        try:
            packages[name] = md.version(name)
        except md.PackageNotFoundError:
            packages[name] = None
    env["packages"] = packages
    env["tools"] = {t: shutil.which(t) for t in ("nvcc", "nvidia-smi", "compute-sanitizer",
                                                  "cuobjdump", "ncu")}
    env["cpu_count"] = os.cpu_count()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    _write_json(Path(args.work) / "env.json", env)
    print(json.dumps(env, indent=1, default=str))
    return 0


# ----------------------------------------------------------------------------- inputs

def gate_inputs(shape, variant, device, seed) -> dict:
    """Detached random inputs of one gate case: benchmark.make_inputs' tensors plus, for
    'lift', biases, float32 weights and an upstream gradient for the gate output.  'timed'
    gets none (dgate None), as the timing's calls: the gate's gradient is a specialisation
    of the dq kernel, autotuned apart."""
    import torch
    from lift_kernels.benchmark import make_inputs

    t = {k: v.detach() for k, v in make_inputs(shape, device, seed).items()}
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    m, r = shape.mem_hidden, shape.gate_hidden
    for name in ("b1", "b2", "c1"):
        t[name] = None
    if variant == "lift":
        for name in ("w1", "w2", "g1", "g2"):
            t[name] = t[name].float()
        for name, size in (("b1", m), ("b2", shape.head_dim), ("c1", r)):
            t[name] = 0.1 * torch.randn(shape.hq, size, generator=gen, device=device)
    t["dgate"] = None
    if variant == "lift":
        t["dgate"] = torch.randn(shape.batch, shape.nq, shape.hq, generator=gen, device=device)
    return t


def run_op(backend, shape, t, dtype=None, expand_kv=False, deterministic=False) -> tuple:
    """Forward and backward through the public op: (out, gate, {name: grad}, seconds).
    `dtype` runs on copies in that dtype; `expand_kv` repeats each kv head for its query
    heads (autograd sums the gradients back), so that SDPA needs no GQA support."""
    import torch
    import lift_kernels

    leaves = {n: (None if t[n] is None else
                  (t[n] if dtype is None else t[n].to(dtype)).clone().requires_grad_(True))
              for n in GRAD_NAMES}
    args = dict(leaves)
    if expand_kv:
        group = shape.hq // shape.hkv
        args["k"] = leaves["k"].repeat_interleave(group, dim=2)
        args["v"] = leaves["v"].repeat_interleave(group, dim=2)
    device = t["q"].device.type
    _sync(device)
    start = time.perf_counter()
    out, gate = lift_kernels.gated_memory_attention(
        *(args[n] for n in GRAD_NAMES), cos=t["cos"], sin=t["sin"], causal=shape.causal,
        return_gate=True, backend=backend, deterministic=deterministic)
    if t["dgate"] is None:
        out.backward(t["dout"].to(out.dtype))
    else:
        torch.autograd.backward((out, gate), (t["dout"].to(out.dtype), t["dgate"]))
    _sync(device)
    seconds = time.perf_counter() - start
    grads = {n: (None if leaves[n] is None else leaves[n].grad) for n in GRAD_NAMES}
    return out.detach(), gate.detach(), grads, seconds


def _oracle(shape, t) -> tuple:
    """The float32 run: the `torch` backend (SDPA + MLPs) on float32 copies, kv heads
    expanded, TF32 off; on CUDA SDPA's memory-efficient kernel (O(N) memory: the math
    fallback would need N x N scores, 137 GB at N=16384)."""
    import contextlib

    import torch

    kernel = contextlib.nullcontext()
    if t["q"].is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with kernel:
            return run_op("torch", shape, t, dtype=torch.float32, expand_kv=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float32 (sums of squares reduced as a tree)."""
    expected = expected.float()
    diff = (actual.float() - expected).norm().item()
    denom = expected.norm().item()
    return diff / denom if denom else diff


def compare(out, gate, grads, ref) -> dict:
    """{tensor: norm-relative error or 'non-finite' or 'missing'} against the oracle."""
    import torch

    ref_out, ref_gate, ref_grads, _ = ref
    errors = {}
    for name, a, b in [("out", out, ref_out), ("gate", gate, ref_gate)] + [
            (f"d{n}", grads[n], ref_grads[n]) for n in GRAD_NAMES]:
        if b is None:
            continue
        if a is None or a.shape != b.shape:
            errors[name] = "missing" if a is None else f"shape {tuple(a.shape)}"
        elif not bool(torch.isfinite(a).all()):
            errors[name] = "non-finite"
        else:
            errors[name] = rel_err(a, b)
    return errors


# ----------------------------------------------------------------------------- gate

def phase_gate(plan, work, budget_s, backends, calibrate=True, name="gate") -> dict:
    """Output, gate and every gradient (through the gate output too in the 'lift' case)
    of each of `backends` (and, with `calibrate`,
    `torch` in the same dtype, to show what its rounding alone gives) against the float32
    run, at the timed shapes with the configurations autotuning picks there.  Each fused
    case runs twice: the first call (autotuning and its hooks included) and a second one
    (what the timing repeats).  A backend that fails any case is not timed.  Writes
    WORK/<name>.json after every case."""
    import torch

    started = time.monotonic()
    result = {"tolerance": TOLERANCE, "oracle": "torch backend, float32, kv heads expanded",
              "cases": [], "verdict": {}}
    path = Path(work) / f"{name}.json"
    contenders = tuple(dict.fromkeys((*backends, *(("torch",) if calibrate else ()))))
    for case_index, (case, shape, variant) in enumerate(gate_cases(plan)):
        if time.monotonic() - started > budget_s:
            result["cases"].append({"case": case, "status": "skipped",
                                    "note": f"gate budget of {budget_s:.0f} s spent"})
            continue
        t = gate_inputs(shape, variant, plan["device"], seed=100 + case_index)
        try:
            ref = _oracle(shape, t)
        except Exception as err:  # no oracle: this case proves nothing either way
            result["cases"].append({"case": case, "status": "oracle-error",
                                    "note": f"{type(err).__name__}: {err}"[:400]})
            _write_json(path, result)
            continue
        for backend in contenders:
            runs = ("first", "second") if backend in backends else ("first",)
            for which in runs:
                row = {"case": case, "backend": backend, "run": which, "N": shape.nq,
                       "variant": variant, "shape": shape.label()}
                try:
                    out, gate, grads, seconds = run_op(backend, shape, t)
                except NotImplementedError as err:
                    row.update(status="unsupported", note=str(err)[:400])
                except Exception as err:  # a crash is a failed case, not the end of the run
                    row.update(status="error", note=f"{type(err).__name__}: {err}"[:400])
                else:
                    errors = compare(out, gate, grads, ref)
                    bad = {k: v for k, v in errors.items()
                           if not isinstance(v, float) or v > TOLERANCE}
                    numeric = {k: v for k, v in errors.items() if isinstance(v, float)}
                    worst = max(numeric, key=numeric.get) if numeric else None
                    row.update(status="fail" if bad else "pass", seconds=round(seconds, 3),
                               errors=errors, worst=worst,
                               max_err=numeric.get(worst) if worst else None,
                               note="; ".join(f"{k}: {v}" for k, v in bad.items()))
                    del out, gate, grads
                result["cases"].append(row)
                _write_json(path, result)
                if row["status"] == "unsupported":
                    break
        del ref, t
        if plan["device"] == "cuda":
            torch.cuda.empty_cache()
    for backend in backends:
        rows = [r for r in result["cases"] if r.get("backend") == backend]
        failed = [r for r in rows if r["status"] in ("fail", "error")]
        if failed:
            verdict = {"passed": False, "reason": "; ".join(
                f"{r['case']} ({r['run']}): {r['status']} {r.get('note', '')}"[:200]
                for r in failed)}
        elif rows and all(r["status"] == "unsupported" for r in rows):
            verdict = {"passed": False, "reason": f"unavailable: {rows[0]['note']}"}
        elif not rows:
            verdict = {"passed": False, "reason": "not gated (gate budget spent)"}
        else:
            verdict = {"passed": True, "gated_ns": sorted({r["N"] for r in rows
                                                           if r["status"] == "pass"})}
        result["verdict"][backend] = verdict
    result["autotune"] = autotune_choices()
    result["seconds"] = round(time.monotonic() - started, 1)
    _write_json(path, result)
    return result


def run_gate(plan, work, budget_s) -> dict:
    """The gate of every fused backend into gate.json.  The isolated ones (`cuda`, whose
    kernels have never met a GPU: one illegal address poisons the CUDA context of the whole
    process, and with it the timing of every backend) run first in a child process; the
    others here, since the autotuning they trigger is what the timing then uses."""
    import subprocess

    started = time.monotonic()
    isolated = [b for b in plan["fused"] if b in plan["isolated"]]
    child, note = {"cases": [], "verdict": {}}, ""
    if isolated:
        limit = budget_s / 3
        cmd = [sys.executable, str(Path(__file__).resolve()), "gate-child", str(work),
               "--backends", ",".join(isolated), "--budget-s", str(limit)]
        if plan["device"] == "cpu":
            cmd.append("--dry")
        try:
            done = subprocess.run(cmd, timeout=limit + 60, capture_output=True, text=True)
            print(done.stdout[-3000:] + done.stderr[-3000:], flush=True)
            note = "" if done.returncode == 0 else f"exit code {done.returncode}"
        except subprocess.TimeoutExpired:
            note = f"killed after {limit + 60:.0f} s"
        child = _read_json(Path(work) / "gate_child.json") or child
    result = phase_gate(plan, work, budget_s - (time.monotonic() - started),
                        [b for b in plan["fused"] if b not in isolated])
    result["cases"] = child["cases"] + result["cases"]
    for backend in isolated:
        verdict = child["verdict"].get(backend)
        if verdict is None or note:
            last = child["cases"][-1]["case"] if child["cases"] else "its first case"
            verdict = {"passed": False, "reason": f"the gate's child process failed "
                                                  f"({note or 'no verdict'}) after {last}"}
        result["verdict"][backend] = verdict
    result["seconds"] = round(time.monotonic() - started, 1)
    _write_json(Path(work) / "gate.json", result)
    return result


# ----------------------------------------------------------------------------- timing

def phase_timing(plan, work, gate, budget_s) -> dict:
    """SDPA flash (the lower bound), cuDNN attention, `torch` and every fused backend that
    passed the gate, longest sequence first, through lift_kernels.benchmark (CUDA events,
    medians, FlashAttention's FLOP convention).  timing.json is rewritten after each case."""
    from lift_kernels import benchmark

    verdicts = gate.get("verdict", {})
    fused = [b for b in plan["fused"] if verdicts.get(b, {}).get("passed")]
    skipped = {b: verdicts.get(b, {}).get("reason", "no gate result") for b in plan["fused"]
               if b not in fused}
    shapes = [plan["shape"](n) for n in plan["timing_ns"]]
    env = benchmark.environment(plan["device"], plan["timing"]["threads"])
    path = Path(work) / "timing.json"
    ungated = {b: [n for n in plan["timing_ns"]
                   if n not in verdicts.get(b, {}).get("gated_ns", [])] for b in fused}

    def save(rows):
        _write_json(path, {"environment": env, "rows": rows, "skipped": skipped,
                           "ungated_ns": ungated})

    save([])
    opts = dict(plan["timing"])
    threads = opts.pop("threads")
    rows = benchmark.run_benchmark(
        shapes, [*plan["baselines"], *fused], plan["device"], time_budget_s=budget_s,
        threads=threads, env=env, log=lambda line: print(line, flush=True), on_case=save,
        **opts)
    save(rows)
    (Path(work) / "timing.txt").write_text(benchmark.format_table(rows, env) + "\n")
    return {"rows": rows, "skipped": skipped}


# ----------------------------------------------------------------------------- profile

def _kernel_table(prof, device) -> list:
    """Per-kernel rows of a profile: self device time on CUDA (the GPU kernels), self CPU
    time of the operators on the CPU."""
    from torch.autograd import DeviceType

    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "calls": e.count, "self_ms": us / 1e3})
    rows.sort(key=lambda r: -r["self_ms"])
    total = sum(r["self_ms"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = 100.0 * r["self_ms"] / total
    return rows


def phase_profile(plan, work, gate, budget_s) -> dict:
    """One torch.profiler pass (forward + backward, after a warm-up) per fused backend
    that passed the gate, at the longest timed sequence: profile.json and profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    started = time.monotonic()
    shape = plan["shape"](plan["timing_ns"][0])
    activities = [ProfilerActivity.CPU]
    if plan["device"] == "cuda":
        activities.append(ProfilerActivity.CUDA)
    result, lines = {}, []
    for backend in plan["fused"]:
        if not gate.get("verdict", {}).get(backend, {}).get("passed"):
            result[backend] = {"status": "skipped", "note": "did not pass the gate"}
            continue
        if time.monotonic() - started > budget_s:
            result[backend] = {"status": "skipped", "note": "profile budget spent"}
            continue
        t = gate_inputs(shape, "timed", plan["device"], seed=7)
        run_op(backend, shape, t)
        with profile(activities=activities) as prof:
            _, _, _, seconds = run_op(backend, shape, t)
        rows = _kernel_table(prof, plan["device"])
        total = sum(r["self_ms"] for r in rows)
        result[backend] = {"status": "ok", "shape": shape.label(), "wall_ms": seconds * 1e3,
                           "kernel_ms": total, "kernels": rows[:40]}
        lines += [f"{backend}: {shape.label()}, forward + backward, wall {seconds * 1e3:.1f} ms, "
                  f"{'GPU kernels' if plan['device'] == 'cuda' else 'CPU operators'} "
                  f"{total:.1f} ms", f"{'self ms':>9} {'%':>6} {'calls':>6}  name"]
        lines += [f"{r['self_ms']:>9.3f} {r['pct']:>6.1f} {r['calls']:>6}  {r['name'][:110]}"
                  for r in rows[:25]]
        lines.append("")
        del t
    _write_json(Path(work) / "profile.json", result)
    (Path(work) / "profile.txt").write_text("\n".join(lines) + "\n")
    return result


# ----------------------------------------------------------------------------- registers

def phase_registers(plan, work) -> dict:
    """Registers, spills, shared memory of every Triton kernel this process compiled and
    loaded (the autotuner loads each configuration it times), with the configuration
    autotuning chose marked: triton_kernels.json."""
    tuners, jits = triton_objects()
    chosen = {}
    for tuner, kernel in tuners.values():
        chosen.setdefault(kernel, []).extend(_config_dict(c) for c in tuner.cache.values())
    kernels = []
    for name, jit in jits.items():
        caches = getattr(jit, "device_caches", None)
        if caches is None:  # the interpreter compiles nothing
            continue
        for cache in list(caches.values()):
            for compiled in list(cache[0].values()):
                if hasattr(compiled, "metadata"):  # a launch hook may have cached None
                    kernels.append(_compiled_row(name, jit, compiled, chosen.get(name, [])))
    note = ("" if kernels else
            "no compiled Triton kernels in this process (the interpreter runs them)"
            if plan["device"] == "cpu" else "no compiled Triton kernels in this process")
    result = {"kernels": kernels, "autotune": autotune_choices(), "note": note}
    _write_json(Path(work) / "triton_kernels.json", result)
    return result


def _compiled_row(name, jit, compiled, chosen) -> dict:
    """One compiled kernel: its constexpr tile sizes, warps, stages, shared memory,
    registers and spills (loading it first if only compiled), and whether its configuration
    is autotuning's choice for some key of its kernel (`chosen`)."""
    constants = {}
    src = getattr(compiled, "src", None)
    for key, value in (getattr(src, "constants", None) or {}).items():
        index = key[0] if isinstance(key, tuple) else key
        arg = jit.arg_names[index] if isinstance(index, int) else str(index)
        if isinstance(value, (int, float, bool, str)) and arg.isupper():
            constants[arg] = value
    meta = compiled.metadata
    row = {"kernel": name, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
           "shared": meta.shared, "constants": constants}
    try:
        compiled._init_handles()
        row.update(n_regs=compiled.n_regs, n_spills=compiled.n_spills, launchable=True)
    except Exception as err:  # e.g. OutOfResources: more shared memory than the device has
        row.update(n_regs=None, n_spills=None, launchable=False,
                   note=f"{type(err).__name__}: {err}"[:200])
    row["chosen"] = any(all(constants.get(k) == v for k, v in cfg.items()
                            if k not in ("num_warps", "num_stages"))
                        and cfg["num_warps"] == meta.num_warps
                        and cfg["num_stages"] == meta.num_stages for cfg in chosen)
    return row


# ----------------------------------------------------------------------------- measure

# Registers before the profile: reading them cannot fail, a profiled run can.
PHASES = ("gate", "timing", "registers", "profile")


def cmd_measure(args) -> int:
    """The GPU-exclusive phases in one process (the autotuning the gate does is what the
    timing uses), each time-boxed, each writing its files and the pack as it ends."""
    import torch

    plan = make_plan(args.dry)
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA device")
        return 2
    if args.dry:
        torch.set_num_threads(1)
    work, out = Path(args.work), Path(args.out)
    budgets = dict(gate=args.gate_s, timing=args.timing_s, profile=args.profile_s)
    gate = _read_json(work / "gate.json") or {}
    failed = False
    for phase in args.phases:
        start = time.monotonic()
        print(f"=== {phase} ({time.strftime('%H:%M:%S')})", flush=True)
        try:
            if phase == "gate":
                gate = run_gate(plan, work, budgets["gate"])
                bad = [b for b, v in gate["verdict"].items() if not v["passed"]]
                status = "ok" if not bad else "FAILED: " + ", ".join(bad)
            elif phase == "timing":
                timing = phase_timing(plan, work, gate, budgets["timing"])
                errors = [r for r in timing["rows"] if r["status"] == "error"]
                status = "ok" if not errors else f"FAILED: {len(errors) // 3} cases"
            elif phase == "profile":
                phase_profile(plan, work, gate, budgets["profile"])
                status = "ok"
            else:
                phase_registers(plan, work)
                status = "ok"
        except Exception as err:  # one phase's crash must not cost the others' results
            import traceback
            traceback.print_exc()
            status = f"FAILED: {type(err).__name__}: {err}"[:300]
        failed |= status != "ok"
        seconds = time.monotonic() - start
        print(f"=== {phase}: {status} in {seconds:.0f} s", flush=True)
        record_phase(work, phase, status, seconds)
        pack(work, out)
    return 1 if failed else 0


def cmd_gate_child(args) -> int:
    """run_gate's child: the gate of --backends alone, into gate_child.json."""
    import torch

    if args.dry:
        torch.set_num_threads(1)
    phase_gate(make_plan(args.dry), args.work, args.budget_s, args.backends, calibrate=False,
               name="gate_child")
    return 0


# ----------------------------------------------------------------------------- prewarm

def cmd_prewarm(args) -> int:
    """Compiles this worker's share (every P-th) of each autotuned kernel's configurations
    at the gate's specialisations, without timing them, into Triton's on-disk cache: P
    workers compile in parallel while the extension builds, and the gate's autotuning
    then loads binaries instead of compiling them one after another (about 5 s each).
    Autotuning results are not cached, only the binaries."""
    import torch
    from triton.runtime.autotuner import Autotuner

    plan = make_plan(args.dry)
    compiled = []

    def compile_share(self, *call_args, **kwargs):
        self.nargs = dict(zip(self.arg_names, call_args))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        share = configs[args.worker::args.workers] or configs[:1]
        ret = None
        for config in share:
            start = time.monotonic()
            try:
                ret = self.fn.run(*call_args, **kwargs, **config.all_kwargs())
                status = "ok"
            except Exception as err:  # autotuning meets (and skips) it again
                status = f"{type(err).__name__}: {str(err)[:120]}"
            compiled.append(f"{self.base_fn.__name__} {config}: {status} "
                            f"({time.monotonic() - start:.1f} s)")
            print(f"worker {args.worker}: {compiled[-1]}", flush=True)
        return ret

    Autotuner.run = compile_share
    for variant in ("timed", "lift"):
        shape = plan["shape"](plan["lift_n"])
        t = gate_inputs(shape, variant, plan["device"], seed=0)
        run_op("triton", shape, t)
        del t
        if plan["device"] == "cuda":
            torch.cuda.empty_cache()
    print(f"worker {args.worker}: {len(compiled)} configurations compiled or loaded")
    return 0


# ----------------------------------------------------------------------------- sanitizer

def cmd_sanitize_target(args) -> int:
    """Small cases through the `cuda` backend (`cpu` with --dry), forward and backward:
    the program compute-sanitizer runs (memcheck, racecheck, synccheck).  Ragged sizes, GQA
    and MQA, Nq != Nk (rows that see no key), biases, both head dims, deterministic mode;
    the backward's dK/dV kernel streams several query tiles of several heads per key block
    (its two-stage pipeline) and its dQ kernel several key blocks."""
    import torch
    from lift_kernels.benchmark import Shape

    device, backend = ("cpu", "cpu") if args.dry else ("cuda", "cuda")
    cases = [(Shape(1, 70, 70, 4, 2, 64, "bfloat16"), "lift", False),
             (Shape(2, 33, 80, 4, 1, 128, "float16"), "timed", False),
             (Shape(1, 90, 40, 2, 2, 64, "bfloat16"), "lift", True)]
    for shape, variant, deterministic in cases:
        t = gate_inputs(shape, variant, device, seed=3)
        try:
            out, gate, grads, _ = run_op(backend, shape, t, deterministic=deterministic)
        except NotImplementedError as err:
            print(f"sanitize-target: the {backend} backend cannot run here: {err}")
            return 3
        finite = all(bool(torch.isfinite(x).all()) for x in
                     [out, gate] + [g for g in grads.values() if g is not None])
        print(f"sanitize-target: {backend} {shape.label()} {variant}"
              f"{' deterministic' if deterministic else ''}: {'finite' if finite else 'NON-FINITE'}")
        if not finite:
            return 4
    return 0


# ----------------------------------------------------------------------------- summary

def _last_match(path, pattern):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if re.search(pattern, line):
            return line.strip().strip("=").strip()
    return None


def _sanitizer_result(path):
    """compute-sanitizer's verdict line and how many of the target's cases finished."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    parts = [line.strip() for line in lines if line.startswith(("dry:", "compute-sanitizer:"))]
    parts += [line.replace("=========", "").strip() for line in lines if "ERROR SUMMARY" in line]
    cases = sum(line.startswith("sanitize-target: ") and line.endswith("finite")
                for line in lines)
    bad = [line for line in lines if line.startswith("sanitize-target: ")
           and not line.endswith(": finite")]
    return "; ".join(parts + [f"{cases} cases ran"] + bad)


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def summarize(work) -> tuple:
    """(summary dict, markdown) from whatever the phases wrote so far."""
    work = Path(work)
    env = _read_json(work / "env.json") or {}
    phases = []
    try:
        phases = [json.loads(line) for line in (work / "phases.jsonl").read_text().splitlines()
                  if line.strip()]
    except (OSError, ValueError):
        pass
    gate = _read_json(work / "gate.json") or {}
    timing = _read_json(work / "timing.json") or {}
    profile = _read_json(work / "profile.json") or {}
    kernels = _read_json(work / "triton_kernels.json") or {}
    tests = {name: _last_match(work / f"{name}.log",
                               r"\d+ (passed|failed|skipped|errors?|tests? collected)|"
                               r"no tests ran|collected")
             for name in ("triton_tests", "cuda_tests")}
    sanitizer = {tool: _sanitizer_result(work / f"{tool}.log")
                 for tool in ("memcheck", "racecheck", "synccheck")}

    md = [f"# gpu_check {env.get('date', '?')}", "",
          f"{env.get('device_name', '?')}; torch {env.get('torch', '?')}, triton "
          f"{env.get('triton', '?')}, python {env.get('python', '?')}, commit "
          f"{env.get('git_commit', '?')}", "", "| phase | status | s |", "|---|---|---|"]
    md += [f"| {p['phase']} | {p['status']} | {p['seconds']} |" for p in phases]
    md += ["", "## Tests", ""] + [f"- {k}: {v or 'no result'}" for k, v in tests.items()]

    md += ["", f"## Correctness gate (norm-relative error vs {gate.get('oracle', 'float32')}, "
               f"limit {gate.get('tolerance', TOLERANCE)})", "",
           "| case | backend | run | status | max err | worst | s |", "|---|---|---|---|---|---|---|"]
    for r in gate.get("cases", []):
        md.append(f"| {r['case']} | {r.get('backend', '-')} | {r.get('run', '-')} | "
                  f"{r['status']} | {_fmt(r.get('max_err'), '.2e')} | {r.get('worst') or '-'} | "
                  f"{r.get('seconds', '-')} |")
    for backend, v in gate.get("verdict", {}).items():
        md.append(f"- {backend}: {'PASSED' if v['passed'] else 'FAILED: ' + v['reason']}")

    rows = timing.get("rows", [])
    md += ["", "## Timing (median ms; TF/s in FlashAttention's convention; fwd+bwd time over "
               "SDPA flash's, speedup over torch)", "",
           "| N | backend | status | fwd ms | bwd ms | f+b ms | fwd TF/s | f+b TF/s | "
           "f+b / sdpa | x torch | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cases = {}
    for r in rows:
        cases.setdefault((r["Nq"], r["backend"]), {})[r["pass"]] = r
    for (n, backend), r in cases.items():
        f, b, fb = r.get("fwd", {}), r.get("bwd", {}), r.get("fwd_bwd", {})
        peak = fb.get("peak_mem_bytes")
        md.append(f"| {n} | {backend} | {f.get('status')} {f.get('note', '')[:60]} | "
                  f"{_fmt(f.get('ms'))} | {_fmt(b.get('ms'))} | {_fmt(fb.get('ms'))} | "
                  f"{_fmt(f.get('tflops'))} | {_fmt(fb.get('tflops'))} | "
                  f"{_fmt(fb.get('time_over_sdpa'), '.2f')} | "
                  f"{_fmt(fb.get('speedup_vs_torch'), '.2f')} | "
                  f"{_fmt(peak / 2**30 if peak is not None else None)} |")
    for backend, why in timing.get("skipped", {}).items():
        md.append(f"- {backend} not timed: {why}")
    for backend, ns in timing.get("ungated_ns", {}).items():
        if ns:
            md.append(f"- {backend} timed but not gated at N = {ns} (gate budget)")
    targets = []
    if rows:
        longest = max(r["Nq"] for r in rows)
        tri = cases.get((longest, "triton"), {})
        if tri.get("fwd_bwd", {}).get("status") == "ok":
            ratio, tf = tri["fwd_bwd"].get("time_over_sdpa"), tri["fwd"].get("tflops")
            targets = [{"target": f"triton f+b / sdpa-flash <= {TARGET_TIME_OVER_SDPA} at "
                                  f"N={longest}", "value": ratio,
                        "met": ratio is not None and ratio <= TARGET_TIME_OVER_SDPA},
                       {"target": f"triton fwd >= {TARGET_FWD_TFLOPS:.0f} TFLOP/s at "
                                  f"N={longest}", "value": tf,
                        "met": tf is not None and tf >= TARGET_FWD_TFLOPS}]
    md += [f"- target {t['target']}: {_fmt(t['value'])} -> {'MET' if t['met'] else 'missed'}"
           for t in targets]

    md += ["", "## Profile (forward + backward, top kernels by self time)", ""]
    for backend, p in profile.items():
        if p.get("status") != "ok":
            md.append(f"- {backend}: {p.get('status')} ({p.get('note', '')})")
            continue
        md.append(f"- {backend}: {p['shape']}, wall {p['wall_ms']:.1f} ms, kernels "
                  f"{p['kernel_ms']:.1f} ms")
        md += [f"  - {k['self_ms']:.3f} ms ({k['pct']:.0f}%, {k['calls']} calls) "
               f"{k['name'][:90]}" for k in p["kernels"][:6]]

    md += ["", "## Triton kernels loaded (chosen configurations)", ""]
    chosen = [k for k in kernels.get("kernels", []) if k.get("chosen")]
    md += [f"- {k['kernel']} {k['constants']} warps {k['num_warps']} stages {k['num_stages']}: "
           f"{k['n_regs']} regs, {k['n_spills']} spills, {k['shared']} B shared" for k in chosen]
    if kernels.get("note"):
        md.append(f"- {kernels['note']}")
    if kernels.get("kernels"):
        md.append(f"- {len(kernels['kernels'])} compiled kernels in triton_kernels.json")

    md += ["", "## compute-sanitizer (cuda backend, tiny shapes)", ""]
    md += [f"- {k}: {v or 'no result'}" for k, v in sanitizer.items()]
    md += ["", f"Everything else: {PACK_NAME} (logs, gate.json, timing.json, profile.txt, "
               "triton_kernels.json, cuda_resources.txt)."]
    summary = {"env": env, "phases": phases, "tests": tests, "gate": gate.get("verdict", {}),
               "gate_cases": gate.get("cases", []), "timing_rows": rows,
               "timing_skipped": timing.get("skipped", {}), "targets": targets,
               "profile": {b: p.get("kernels", [])[:10] for b, p in profile.items()},
               "triton_chosen": chosen, "sanitizer": sanitizer}
    return summary, "\n".join(md) + "\n"


def pack(work, out) -> None:
    """OUT gets summary.md, summary.json and one tarball of WORK: three files, so the
    device's limit on returned files (8) holds however many logs the phases wrote.  Each
    is replaced atomically: a run killed at any moment leaves the last complete set."""
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, md = summarize(work)
    _write_json(out / "summary.json", summary)
    tmp = out / f"summary.md.{os.getpid()}.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "summary.md")
    tmp = out / f"{PACK_NAME}.{os.getpid()}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.is_file() and not path.name.endswith(".tmp"):
                tar.add(path, arcname=f"gpu_check/{path.name}")
    os.replace(tmp, out / PACK_NAME)


def cmd_pack(args) -> int:
    pack(args.work, args.out)
    if args.print:
        print((Path(args.out) / "summary.md").read_text())
    return 0


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("work")
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("gate-child")
    p.add_argument("work")
    p.add_argument("--backends", type=lambda s: s.split(","), required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("prewarm")
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("measure")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--dry", action="store_true")
    p.add_argument("--phases", type=lambda s: s.split(","), default=list(PHASES))
    p.add_argument("--gate-s", type=float, default=60.0, help="gate budget (s)")
    p.add_argument("--timing-s", type=float, default=55.0, help="timing budget (s)")
    p.add_argument("--profile-s", type=float, default=20.0, help="profile budget (s)")
    p = sub.add_parser("sanitize-target")
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("pack")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--print", action="store_true", help="print summary.md")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "phases", None):
        unknown = [p for p in args.phases if p not in PHASES]
        if unknown:
            print(f"error: unknown phase(s) {unknown}; choose from {PHASES}", file=sys.stderr)
            return 2
    return {"env": cmd_env, "prewarm": cmd_prewarm, "measure": cmd_measure,
            "gate-child": cmd_gate_child,
            "sanitize-target": cmd_sanitize_target, "pack": cmd_pack}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
