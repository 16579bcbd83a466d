"""Sliding-window against full causal attention on one backend (issue 16's target: at
N=8192 with a 1024-key window, fwd+bwd on the cpu backend at least 3x faster than full
causal, since the kernels skip the key blocks outside the window).

    python bench/window.py                                   # cpu, N=8192, window 1024
    python bench/window.py --n 4096 --window 512 --threads 2 --json out.json

Times are the best of --repeats runs after one warm-up, in ms; fwd alone, then fwd+bwd
(the backward is their difference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def measure(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024, help="keys each query sees")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the cpu backend's OpenMP team

    import torch

    import lift_kernels

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    n, h, hkv, d = args.n, args.heads, args.kv_heads, args.head_dim
    memory = lift_kernels.GatedMemory(h, d)
    q = torch.randn(1, n, h, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(1, n, hkv, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(1, n, hkv, d, generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(1, n, h, d, generator=gen).to(dtype)

    def attend(window):
        return lift_kernels.gated_memory_attention(
            q, k, v, *memory.weights(), gate_scale=memory.gate_scale,
            gate_shift=memory.gate_shift, backend=args.backend, window_size=window)

    rows = []
    for name, window in (("full causal", (-1, -1)), (f"window {args.window}",
                                                     (args.window - 1, 0))):
        def forward():
            with torch.no_grad():
                attend(window)

        def forward_backward():
            attend(window).backward(dout)

        fwd = measure(forward, args.repeats)
        total = measure(forward_backward, args.repeats)
        rows.append({"case": name, "window_size": list(window), "fwd_ms": round(fwd, 1),
                     "bwd_ms": round(total - fwd, 1), "fwd_bwd_ms": round(total, 1)})
    full = rows[0]["fwd_bwd_ms"]
    for row in rows:
        row["speedup_fwd_bwd"] = round(full / row["fwd_bwd_ms"], 2)

    info = {"backend": args.backend, "n": n, "heads": h, "kv_heads": hkv, "head_dim": d,
            "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
            "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": round(os.getloadavg()[0], 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(" ".join(f"{key}={value}" for key, value in info.items()))
    print(f"{'case':<14} {'fwd ms':>10} {'bwd ms':>10} {'f+b ms':>10} {'f+b speedup':>12}")
    for row in rows:
        print(f"{row['case']:<14} {row['fwd_ms']:>10.1f} {row['bwd_ms']:>10.1f} "
              f"{row['fwd_bwd_ms']:>10.1f} {row['speedup_fwd_bwd']:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
