"""The embedded demo.  For now: a showcase of the op (each backend's agreement with the
float64 reference and its time on a small problem); the LIFT demo replaces it."""

from __future__ import annotations

import json
import time

import torch

from . import available_backends, gated_memory_attention
from .memory import GatedMemory
from .ops.reference import gated_memory_attention_reference


def run_demo(args) -> int:
    torch.manual_seed(0)
    b, n, hq, hkv, d = 1, 512, 8, 2, 64
    module = GatedMemory(hq, d)
    with torch.no_grad():  # a trained-looking memory: non-zero last layers
        module.w2.normal_(0, 0.05)
        module.g2.normal_(0, 0.5)
    q = torch.randn(b, n, hq, d)
    k, v = torch.randn(b, n, hkv, d), torch.randn(b, n, hkv, d)
    weights = [None if w is None else w.detach().double() for w in module.weights()]
    oracle, _ = gated_memory_attention_reference(q.double(), k.double(), v.double(), *weights)
    rows = []
    print(f"gated-memory attention, B={b} N={n} Hq={hq} Hkv={hkv} D={d}, float32, causal")
    print(f"{'backend':<10} {'rel err vs fp64':>16} {'fwd+bwd ms':>11}")
    for name in available_backends("cpu"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = gated_memory_attention(*leaves, *module.weights(), backend=name)
        err = ((out.double() - oracle).norm() / oracle.norm()).item()
        start = time.perf_counter()
        for _ in range(3):
            gated_memory_attention(*leaves, *module.weights(), backend=name).sum().backward()
        ms = (time.perf_counter() - start) / 3 * 1e3
        rows.append({"backend": name, "rel_err": err, "fwd_bwd_ms": ms})
        print(f"{name:<10} {err:>16.2e} {ms:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
