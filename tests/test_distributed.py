"""absorb under torchrun on the CPU (gloo): 2 processes give the memory of 1 process with the
same effective batch; a rank that crashes or hangs ends the job with a clear message.

Run as a script (`torchrun ... tests/test_distributed.py MODE ARGS...`) it is the worker that
injects a fault into rank 1 and then runs the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The recipe's learning rate: a far larger one makes training chaotic enough for float
# rounding (which differs with the split) to grow past the 1e-4 comparison.
FAST = ["--segment-length", "32", "--segment-stride", "16", "--epochs", "2", "--qa-epochs", "2",
        "--steps-per-epoch", "2", "--backend", "torch", "--json"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun(*args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout,
                          cwd=ROOT)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from lift_tiny import make_document, save_checkpoint

    root = tmp_path_factory.mktemp("dist")
    save_checkpoint(root / "model")
    (root / "doc.txt").write_text(make_document(90, seed=5))  # 6 segments: uneven splits
    (root / "qa.json").write_text(json.dumps([{"question": "what is red ?",
                                               "answer": "the tower"}]))
    return root


def _absorb_args(root, out, *extra):
    return ["absorb", "--model", str(root / "model"), "--document", str(root / "doc.txt"),
            "--qa", str(root / "qa.json"), "--out", str(out), *FAST, *extra]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fsdp", [False, True], ids=["allreduce", "fsdp"])
def test_two_processes_match_one(inputs, tmp_path, fsdp):
    from safetensors.torch import load_file

    from lift_kernels.cli import main

    one = tmp_path / "one.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_absorb_args(inputs, one)) == 0
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two.safetensors"
    extra = ["--fsdp"] if fsdp else []
    proc, _ = _torchrun("-m", "lift_kernels", *_absorb_args(inputs, two, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["world_size"] == 2  # rank 0 alone reports
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    worst = max(_rel(b[k], a[k]) for k in a if a[k].abs().sum() > 0)
    print(f"2 processes vs 1: worst norm-relative difference {worst:.2e}")
    assert worst <= 1e-4, worst
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("w2"))  # it did train


@pytest.mark.parametrize("mode, timeout, message", [
    # A crash is seen at once (gloo loses the connection); the long timeout makes sure the
    # message comes from the crash, not from a slow start of rank 1.
    ("crash", "120", "injected failure on rank 1"),
    ("hang", "5", "waited up to 5 s for the other ranks"),
])
def test_a_failing_rank_ends_the_job(inputs, tmp_path, mode, timeout, message):
    out = tmp_path / "never.safetensors"
    proc, seconds = _torchrun(__file__, mode,
                              *_absorb_args(inputs, out, "--dist-timeout", timeout),
                              timeout=180)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    assert seconds < 150


def _worker(mode: str, argv: list[str]) -> int:
    """Rank 1 raises (crash) or blocks (hang) in its first training sample; then the CLI."""
    from lift_kernels.cli import main
    from lift_kernels.lift import trainer

    if os.environ.get("RANK") == "1":
        def fault(*args, **kwargs):
            if mode == "crash":
                raise RuntimeError("injected failure on rank 1")
            time.sleep(3600)

        trainer.sample_loss = fault
    return main(argv)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
