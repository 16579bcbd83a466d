"""bench/gpu_check.sh and bench/gpu_check.py, the one-shot GPU check: its dry run on the CPU
end to end (so the script cannot rot before a GPU meets it), the gate's verdicts on a
backend made wrong on purpose, and the pack's limits (a few files, written even when the
run died early)."""

import json
import os
import re
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lift_kernels.benchmark import Shape

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_check():
    return runpy.run_path(str(ROOT / "bench" / "gpu_check.py"), run_name="not_main")


def test_usage_errors():
    for args in ([], ["--dry"], ["out", "--wet"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
        assert done.returncode == 2 and "usage" in done.stderr, args


def test_pack_of_an_empty_run_is_three_files(gpu_check, tmp_path):
    """A run killed before any step ended still gets a summary and a tarball."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    gpu_check["pack"](work, out)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.json",
                                                     "summary.md"]
    assert "no result" in (out / "summary.md").read_text()


def _tiny_plan(fused):
    return dict(device="cpu", fused=fused, isolated=(), baselines=("sdpa",), gate_ns=(20,),
                timing_ns=(20,),
                lift_n=20, shape=lambda n: Shape(1, n, n, 4, 2, 16, "bfloat16"),
                timing=dict(warmup=0, max_repeats=1, min_repeats=1, target_ms=1.0, threads=1))


def test_gate_fails_a_wrong_backend_and_timing_skips_it(gpu_check, tmp_path, monkeypatch):
    """`cpu` with dk scaled by 1.05 (an error far below a bf16 output's but above the 2e-2
    limit) fails the gate and is not timed; the unperturbed `torch` passes."""
    plan = _tiny_plan(("cpu", "torch"))
    real = gpu_check["run_op"]

    def wrong_dk(backend, shape, t, dtype=None, expand_kv=False):
        out, gate, grads, s = real(backend, shape, t, dtype, expand_kv)
        if backend == "cpu":
            grads["k"] = grads["k"] * 1.05
        return out, gate, grads, s

    monkeypatch.setitem(gpu_check["phase_gate"].__globals__, "run_op", wrong_dk)
    gate = gpu_check["phase_gate"](plan, tmp_path, 120, plan["fused"])
    assert not gate["verdict"]["cpu"]["passed"] and "dk" in gate["verdict"]["cpu"]["reason"]
    assert gate["verdict"]["torch"]["passed"]
    cpu_rows = [r for r in gate["cases"] if r.get("backend") == "cpu"]
    assert {r["case"] for r in cpu_rows} == {"timed-N20", "lift-N20"}
    for r in cpu_rows:
        assert r["status"] == "fail" and r["worst"] == "dk" and r["errors"]["dk"] > 2e-2
        assert set(r["errors"]) >= {"out", "gate", "dq", "dk", "dv", "dw1", "dw2", "dg1", "dg2"}
    lift = next(r for r in cpu_rows if r["case"] == "lift-N20")
    assert {"db1", "db2", "dc1"} <= set(lift["errors"])  # all ten gradients
    timing = gpu_check["phase_timing"](plan, tmp_path, gate, budget_s=60)
    assert "cpu" in timing["skipped"]
    assert {r["backend"] for r in timing["rows"]} == {"sdpa", "torch"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the CPU timing forks")
def test_dry_run_end_to_end(tmp_path):
    """The whole plan on the CPU: every step runs and passes, OUT gets three files, and the
    summary holds the gate, the timing (longest sequence first), the profile and the
    tests' collection of the exact GPU selection."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, GC_WORK=str(work), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--dry"], capture_output=True,
                          text=True, env=env, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.json",
                                                     "summary.md"], log
    summary = json.loads((out / "summary.json").read_text())
    phases = {p["phase"]: p["status"] for p in summary["phases"]}
    assert set(phases) >= {"env", "build", "prewarm", "triton_tests", "cuda_tests", "memcheck",
                           "racecheck", "synccheck", "gate", "timing", "profile", "registers", "measure"}
    assert set(phases.values()) == {"ok"}, phases
    # The GPU selection, collected as the GPU run sees it (the GPU-only shapes are in it).
    for name, least in (("triton_tests", 10), ("cuda_tests", 10)):
        found = re.match(r"(\d+)(/\d+)? tests? collected", summary["tests"][name] or "")
        assert found and int(found.group(1)) >= least, summary["tests"]
    assert summary["gate"]["triton"]["passed"] and summary["gate"]["cpu"]["passed"]
    rows = [r for r in summary["timing_rows"] if r["pass"] == "fwd_bwd"]
    assert [r["Nq"] for r in rows] == sorted((r["Nq"] for r in rows), reverse=True)
    status = {(r["backend"], r["Nq"]): r["status"] for r in rows}
    for backend in ("sdpa", "torch", "triton", "cpu"):
        assert status[(backend, 24)] == "ok" and status[(backend, 16)] == "ok", status
    assert status[("cudnn", 24)] == "unsupported"
    assert set(summary["profile"]) == {"triton", "cpu"} and summary["profile"]["cpu"]
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert summary["sanitizer"][tool].startswith("dry:")
        assert "3 cases ran" in summary["sanitizer"][tool], summary["sanitizer"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        collected = tar.extractfile("gpu_check/triton_tests.log").read().decode()
    assert "test_matches_reference[gpu-" in collected
    assert names >= {"env.json", "env.log", "build.log", "prewarm.log", "triton_tests.log",
                     "cuda_tests.log", "memcheck.log", "racecheck.log", "synccheck.log", "measure.log",
                     "gate.json", "timing.json", "timing.txt", "profile.txt",
                     "triton_kernels.json", "phases.jsonl"}
    assert "Correctness gate" in (out / "summary.md").read_text()
