"""The Triton kernels compiled as the JIT compiles them on an H100/H200 (sm_90a), on a machine
with no GPU, through bench/triton_compile.py: the configuration each kernel uses first (and
the one deterministic mode uses, untimed) must launch (shared memory) and reload no spilled
value inside its hot loops, at the benchmark's shape, bf16, head dims 64 and 128, and so must
the sliding-window, soft-capped specialisation and the packed-sequence one at head dim 128.

Run in a child process: tests/conftest.py turns on the interpreter, and triton decides per
kernel at definition time.  `make test-triton-lane` runs this file again under Triton 3.6
(the child inherits PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_sass_analysis_finds_reloads_in_the_innermost_loop():
    from triton_compile import analyse_sass
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDL R2, [R1] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   LDL R3, [R1+0x4] ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R6.64] ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   STL [R1+0x8], R4 ;
        /*0070*/              @!P1 BRA 0x10 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
    """
    counts = analyse_sass(sass)
    assert counts == dict(loops=2, hot_loops=1, hot_loop_reloads=1, hot_loop_spill_stores=0,
                          spill_stores=1, spill_reloads=2, wgmma=1, mma=0, async_copies=1)


def _first_configs_sm90(tmp_path, head_dims, *options):
    """The rows of bench/triton_compile.py --first at bf16 for sm_90a; skips without
    Triton's NVIDIA backend."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "triton_compile.py"), "--arch", "sm_90a",
         "--dtype", "bf16", "--head-dim", *map(str, head_dims), "--weights", "same", "--first",
         *options, "--json", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    seen = {(r["head_dim"], r["kernel"], r["mode"]) for r in rows}
    for d in head_dims:
        assert {(d, "fwd", "autotuned"), (d, "preprocess", "fixed"), (d, "dkdv", "autotuned"),
                (d, "dq", "autotuned"), (d, "dkdv", "deterministic"),
                (d, "dq", "deterministic")} <= seen
    bad = [r for r in rows if r["hot_loop_reloads"] or not r["launchable"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad)
    return rows


def test_first_configs_compile_clean_for_sm90(tmp_path):
    _first_configs_sm90(tmp_path, (64, 128))


def test_windowed_softcapped_configs_compile_clean_for_sm90(tmp_path):
    """The sliding-window and soft-capped specialisation (Gemma 2's: a 4096 window, cap 50;
    here 1024 at the 4096-token shape, so whole key blocks are skipped)."""
    rows = _first_configs_sm90(tmp_path, (128,), "--window", "1024", "--softcap", "50")
    assert all(r["window"] == 1024 and r["softcap"] == 50.0 for r in rows)


def test_packed_sequence_configs_compile_clean_for_sm90(tmp_path):
    """The packed-sequence specialisation (cu_seqlens; its programs past a sequence's end
    return early) at head dim 128."""
    rows = _first_configs_sm90(tmp_path, (128,), "--varlen")
    assert all(r["varlen"] for r in rows)
