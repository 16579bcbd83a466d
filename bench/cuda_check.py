"""The `cuda` backend's correctness gate on a GPU, for bench/gpu_check.sh: forward (out,
gate) and every gradient against the `torch` backend (SDPA + batched MLP, float32 weights'
math), at one shape, bf16.  Exits 1 on a mismatch.  Small shapes (--tiny) are what
compute-sanitizer runs (memcheck, racecheck, synccheck) in gpu_check.sh.

    python bench/cuda_check.py                 # B=4 Hq=32 Hkv=8 D=128 N=4096 causal
    python bench/cuda_check.py --tiny          # B=1 Hq=2 Hkv=1 D=64 Nq=70 Nk=131
"""

from __future__ import annotations

import argparse
import sys

import torch

import lift_kernels

NAMES = ("q", "k", "v", "w1", "b1", "w2", "b2", "g1", "c1", "g2")


def inputs(batch, nq, nk, hq, hkv, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m, r = 2 * d, int(d ** 0.5)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    t = dict(q=rnd(batch, nq, hq, d), k=rnd(batch, nk, hkv, d), v=rnd(batch, nk, hkv, d),
             w1=rnd(hq, d, m, scale=d ** -0.5), b1=rnd(hq, m, scale=0.1),
             w2=rnd(hq, m, d, scale=m ** -0.5), b2=rnd(hq, d, scale=0.1),
             g1=rnd(hq, d, r, scale=d ** -0.5), c1=rnd(hq, r, scale=0.1),
             g2=rnd(hq, r, scale=r ** -0.5))
    pos = torch.arange(nk - nq, nk, device="cuda", dtype=torch.float32)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    return t, ang.cos(), ang.sin()


def run(backend, t, cos, sin):
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in t.items()}
    out, gate = lift_kernels.gated_memory_attention(
        *(leaves[n] for n in NAMES), cos=cos, sin=sin, causal=True, return_gate=True,
        backend=backend)
    gen = torch.Generator(device="cuda").manual_seed(1)
    dout = torch.randn(out.shape, generator=gen, device="cuda").to(out.dtype)
    (out.float() * dout.float()).sum().backward()
    torch.cuda.synchronize()
    return out, gate, {n: x.grad for n, x in leaves.items()}


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small shape (for compute-sanitizer)")
    parser.add_argument("--tol", type=float, default=2e-2)
    args = parser.parse_args()
    shape = (1, 70, 131, 2, 1, 64) if args.tiny else (4, 4096, 4096, 32, 8, 128)
    t, cos, sin = inputs(*shape)
    print("shape B, Nq, Nk, Hq, Hkv, D =", shape)
    out_c, gate_c, grads_c = run("cuda", t, cos, sin)
    out_t, gate_t, grads_t = run("torch", t, cos, sin)
    errors = {"out": rel(out_c, out_t), "gate": rel(gate_c, gate_t)}
    errors.update({f"d{n}": rel(grads_c[n], grads_t[n]) for n in NAMES})
    bad = {k: e for k, e in errors.items() if not e < args.tol}
    for k, e in errors.items():
        print(f"{k:>6}: relative error {e:.3e}")
    print("cuda vs torch:", "ok" if not bad else f"MISMATCH {sorted(bad)} (tol {args.tol})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
