"""The benchmark harness (lift_kernels/benchmark.py, bench/kernels.py, bench/lift_step.py,
bench/varlen.py) in smoke mode: tiny sizes, they prove the harness works, they do not time
anything."""

import ast
import csv
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from lift_kernels import benchmark
from lift_kernels.benchmark import Shape, attention_flops, memory_flops

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("backend", "pass", "B", "Nq", "Nk", "Hq", "Hkv", "D", "dtype", "device", "ms",
            "tflops", "peak_mem_bytes", "device_name", "torch", "triton", "lift_kernels")
FAST = ["--warmup", "0", "--repeats", "2", "--min-repeats", "1", "--target-ms", "1",
        "--threads", "1"]


def test_attention_flops_hand_counts():
    # B=2, Hq=4, N=8, D=16: two matmuls of 2*N*N*D each per head -> 4*2*4*8*8*16 = 32768.
    full = Shape(2, 8, 8, 4, 2, 16, causal=False)
    assert attention_flops(full, "fwd") == 32768
    assert attention_flops(full, "bwd") == 81920  # 2.5x
    assert attention_flops(full, "fwd_bwd") == 114688
    causal = Shape(2, 8, 8, 4, 2, 16, causal=True)
    assert attention_flops(causal, "fwd") == 16384  # halved
    assert attention_flops(causal, "bwd") == 40960
    assert attention_flops(causal, "fwd_bwd") == 57344
    # Nq != Nk: 4 * 1 * 2 * 3 * 5 * 8
    assert attention_flops(Shape(1, 3, 5, 2, 1, 8, causal=False), "fwd") == 960


def test_memory_flops_hand_counts():
    # D=16 -> M=32, R=4.  Per token and head: 2*16*32 + 2*32*16 (memory) + 2*16*4 + 2*4
    # (gate) = 2184; B*Nq*Hq = 2*8*4 = 64 token-heads.
    shape = Shape(2, 8, 8, 4, 2, 16)
    assert (shape.mem_hidden, shape.gate_hidden) == (32, 4)
    assert memory_flops(shape, "fwd") == 64 * 2184 == 139776
    assert memory_flops(shape, "bwd") == 2 * 139776
    assert memory_flops(shape, "fwd_bwd") == 3 * 139776
    # Nk does not enter the memory MLP; D=64 -> M=128, R=8.
    assert memory_flops(Shape(1, 10, 99, 1, 1, 64), "fwd") == 10 * (4 * 64 * 128 + 2 * 64 * 8 + 16)


def test_ratios_are_computed_within_one_run():
    def row(backend, ms, mem, status="ok"):
        return {"backend": backend, "pass": "fwd_bwd", "status": status, "B": 1, "Nq": 4,
                "Nk": 4, "Hq": 1, "Hkv": 1, "D": 8, "dtype": "float32", "causal": True,
                "ms": ms, "peak_mem_bytes": mem}
    rows = [row("reference", 10.0, 400), row("torch", 4.0, 200), row("sdpa", 2.0, 100),
            row("cpu", 2.5, 110), row("triton", None, None, status="unsupported")]
    benchmark.add_ratios(rows)
    cpu = rows[3]
    assert cpu["speedup_vs_reference"] == pytest.approx(4.0)
    assert cpu["speedup_vs_torch"] == pytest.approx(1.6)
    assert cpu["time_over_sdpa"] == pytest.approx(1.25)
    assert cpu["mem_over_sdpa"] == pytest.approx(1.1)
    assert rows[4]["speedup_vs_reference"] is None


@pytest.fixture
def restore_threads(monkeypatch):
    """main(--threads N) sets torch's threads and OMP_NUM_THREADS: undo both afterwards."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(threads)


def test_quick_cli_writes_rows_json_csv_and_plot(tmp_path, capsys, restore_threads):
    paths = {k: tmp_path / f"bench.{k}" for k in ("json", "csv", "png")}
    code = benchmark.main(["--sweep", "smoke", "--device", "cpu", *FAST,
                           "--json", str(paths["json"]), "--csv", str(paths["csv"]),
                           "--plot", str(paths["png"])])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads(paths["json"].read_text())
    rows, env = data["rows"], data["environment"]
    backends = benchmark.default_backends("cpu")
    assert {"reference", "torch", "sdpa"} <= set(backends)
    assert len(rows) == len(benchmark.SWEEPS["smoke"]) * len(backends) * 3
    for key in ("device_name", "torch", "lift_kernels", "date", "threads"):
        assert env[key] not in (None, "")
    for r in rows:
        assert set(REQUIRED) <= set(r)
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] >= 0
        assert r["device"] == "cpu"
    for name in backends:
        assert name in printed
    assert "x ref" in printed and "t/sdpa" in printed
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert set(REQUIRED) <= set(table[0]) and len(table) == len(rows)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_memory_sees_the_reference_score_matrix():
    # The reference materialises [B, Hq, N, N] float32 scores: 4 * 256 * 256 * 4 B = 1 MiB.
    shape = Shape(1, 256, 256, 4, 1, 16)
    rows = benchmark.run_benchmark([shape], ["reference"], "cpu", warmup=0, max_repeats=1,
                                   min_repeats=1, target_ms=1, threads=1, log=lambda _: None)
    peak = {r["pass"]: r["peak_mem_bytes"] for r in rows}
    assert peak["fwd"] >= 4 * 256 * 256 * 4
    assert peak["fwd_bwd"] >= peak["fwd"]


def test_a_backend_that_cannot_run_gets_a_row():
    shape = benchmark.SWEEPS["smoke"][0]
    rows = benchmark.run_benchmark([shape], ["flex", "cuda"], "cpu", warmup=0, max_repeats=1,
                                   min_repeats=1, target_ms=1, threads=1, log=lambda _: None)
    assert len(rows) == 6
    for r in rows:
        assert r["status"] == "unsupported" and r["note"] and r["ms"] is None


def test_time_budget_skips_with_a_row():
    shapes = benchmark.SWEEPS["smoke"]
    rows = benchmark.run_benchmark(shapes, ["sdpa"], "cpu", warmup=0, max_repeats=1,
                                   min_repeats=1, target_ms=1, time_budget_s=0.0,
                                   log=lambda _: None)
    assert rows and all(r["status"] == "skipped" for r in rows)


def test_kernels_script_is_the_cli():
    script = runpy.run_path(str(ROOT / "bench" / "kernels.py"), run_name="not_main")
    assert script["main"] is benchmark.main


@pytest.fixture(scope="module")
def lift_step():
    return runpy.run_path(str(ROOT / "bench" / "lift_step.py"), run_name="not_main")


def test_count_segments(lift_step):
    count = lift_step["count_segments"]
    assert count(8192, 2048, 768) == 9  # starts 0, 768, ..., 6144 (ends at 8192)
    assert count(2048, 2048, 768) == 1 and count(100, 2048, 768) == 1
    assert count(2049, 2048, 768) == 2 and count(2816, 2048, 768) == 2
    assert count(2817, 2048, 768) == 3


def test_lift_step_smoke(lift_step, tmp_path, monkeypatch, capsys, restore_threads):
    pytest.importorskip("transformers")
    import lift_kernels.hf.patch as patch

    # The step must run the op's fast path (no mask): the exact fallback would time
    # something else, so here it fails the run.
    def no_fallback(*args, **kwargs):
        raise AssertionError("the benchmark took the exact (masked) attention path")
    monkeypatch.setattr(patch, "_exact_attention", no_fallback)
    out = tmp_path / "lift_step.json"
    assert lift_step["main"](["--smoke", "--device", "cpu", "--threads", "1",
                              "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {"reference", "torch"} <= {r["backend"] for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["segment_step_ms"] > 0 and r["qa_step_ms"] > 0
        assert r["segments"] == 7 and r["absorb_s"] > 0 and r["peak_bytes"] > 0
    assert "absorb s" in capsys.readouterr().out


def test_varlen_bench_smoke(tmp_path, capsys, restore_threads):
    """bench/varlen.py at tiny sizes: every row runs and is written (no timing claims)."""
    import lift_kernels

    if "cpu" not in lift_kernels.available_backends("cpu"):
        pytest.skip("lift_kernels._C is not built")
    script = runpy.run_path(str(ROOT / "bench" / "varlen.py"), run_name="not_main")
    out = tmp_path / "varlen.json"
    assert script["main"](["--sequences", "3", "--min-len", "5", "--max-len", "70",
                           "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                           "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["rows"]] == [
        "packed", "loop", "torch packed", "packed, equal", "rectangle, equal"]
    assert all(r["fwd_bwd_ms"] > 0 for r in data["rows"])
    assert data["info"]["total"] == sum(data["info"]["lengths"]) and data["info"]["slots"] == 3
    assert "rectangle, equal" in capsys.readouterr().out


# What bench/gpu_check.sh runs may import: the GPU machine has python3 with torch, triton,
# transformers (safetensors and packaging come with it) and nothing promised beyond;
# matplotlib only inside a try/except ImportError (no plot then).
GPU_CHECK_FILES = ("bench/*.py", "lift_kernels/*.py", "lift_kernels/ops/*.py",
                   "lift_kernels/hf/*.py")
ALLOWED = {"torch", "triton", "transformers", "safetensors", "packaging", "lift_kernels"}
GUARDED = {"matplotlib"}


def _imports(tree):
    """(top-level module, guarded by except ImportError) for every absolute import."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "Exception")
                for h in node.handlers):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) in guarded


def test_gpu_check_imports_only_what_the_gpu_machine_has():
    bad = []
    for pattern in GPU_CHECK_FILES:
        for path in ROOT.glob(pattern):
            if path.name in ("cli.py", "__main__.py") or path.name.startswith("demo"):
                continue  # not run by the GPU check
            for top, guarded in _imports(ast.parse(path.read_text())):
                if top in sys.stdlib_module_names or top in ALLOWED:
                    continue
                if top in GUARDED and guarded:
                    continue
                bad.append(f"{path.relative_to(ROOT)}: {top}{'' if guarded else ' (unguarded)'}")
    assert not bad, bad


def test_gpu_check_script_parses():
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_many_documents_benchmark_smoke(tmp_path, capsys, restore_threads):
    """bench/many.py in smoke mode: both sides of absorbing and of asking run, the JSON
    holds their figures, and packed answers equal one-call-per-question answers."""
    script = runpy.run_path(str(ROOT / "bench" / "many.py"), run_name="not_main")
    results = script["main"](["--smoke", "--json", str(tmp_path / "many.json")])
    saved = json.loads((tmp_path / "many.json").read_text())
    assert saved["answers_identical"] is True
    for side in ("one_by_one", "together"):
        absorbed = saved["absorb"][side]
        assert absorbed["tokens"] > 0 and absorbed["tokens_per_second"] > 0
        assert saved["ask"][side]["questions_per_second"] > 0
    # The same documents and schedule on both sides: the same trained tokens and steps.
    assert saved["absorb"]["one_by_one"]["tokens"] == saved["absorb"]["together"]["tokens"]
    assert saved["absorb"]["together"]["optimiser_steps"] == 2
    assert saved["absorb"]["one_by_one"]["optimiser_steps"] == 4
    assert results["absorb_speedup"] == pytest.approx(saved["absorb_speedup"])
    assert "together / one by one" in capsys.readouterr().out
