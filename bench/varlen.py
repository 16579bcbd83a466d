"""Packed variable-length sequences with a memory slot each, one fused call against the
alternatives at the same tokens (issue 15: the fused varlen op vs a Python loop over the
sequences, and within 1.2x of the same op on one rectangular batch of equal total tokens).

    python bench/varlen.py                                   # cpu, 16 sequences of 256-1024
    python bench/varlen.py --sequences 8 --min-len 128 --max-len 512 --threads 2 --json out.json

Rows, all fwd+bwd of the same op (gradients to q, k, v and every slot's weights):
  packed            one call on the packed ragged sequences (cu_seqlens, memory_index)
  loop              one call per sequence (B=1, that sequence's slot), as absorbing the
                    documents one after another calls it
  torch packed      the torch backend's packed path (padded [S, Lq, Lk] mask, SDPA)
  packed, equal     one packed call on S sequences of equal length (the mean)
  rectangle, equal  the same tokens as one [S, N, H, D] batch (memory_index [S])
The last two hold the same work, so their ratio is the cost of the packed layout itself;
the ragged rows hold more attention work than the equal ones (sum of squares).
Times are the best of --repeats runs after one warm-up, in ms; fwd alone, then fwd+bwd.
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
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=None,
                        help="memory slots (default: one per sequence)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true", help="leave out the torch row")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the cpu backend's OpenMP team

    import torch

    import lift_kernels

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    s_count, h, hkv, d = args.sequences, args.heads, args.kv_heads, args.head_dim
    slots = args.slots or s_count
    lengths = torch.randint(args.min_len, args.max_len + 1, (s_count,), generator=gen).tolist()
    total = sum(lengths)
    mean = total // s_count
    memory = lift_kernels.GatedMemory(h, d, num_slots=slots)
    with torch.no_grad():  # a trained memory: every branch carries signal
        for w in memory.weights():
            if w is not None:
                w.normal_(0, 0.1, generator=gen)
    index = torch.arange(s_count) % slots

    def tensors(rows):
        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
        return rnd(rows, h, d), rnd(rows, hkv, d), rnd(rows, hkv, d), torch.randn(
            rows, h, d, generator=gen).to(dtype)

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    def call(q, k, v, backend, weights=None, **kw):
        return lift_kernels.gated_memory_attention(
            q, k, v, *(weights or memory.weights()), gate_scale=memory.gate_scale,
            gate_shift=memory.gate_shift, backend=backend, **kw)

    def packed(lens, backend):
        q, k, v, dout = tensors(sum(lens))
        kw = dict(cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens), max_seqlen_q=max(lens),
                  max_seqlen_k=max(lens), memory_index=index)
        return (lambda: call(q, k, v, backend, **kw)), dout

    def loop(lens, backend):
        q, k, v, dout = tensors(sum(lens))
        bounds = cu(lens).tolist()

        def run():
            outs = []
            for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
                mine = [None if w is None else w[int(index[s])] for w in memory.weights()]
                outs.append(call(q[None, a:b], k[None, a:b], v[None, a:b], backend, mine)[0])
            return torch.cat(outs)
        return run, dout

    def rectangle(n, backend):
        q, k, v, dout = tensors(s_count * n)
        shape = (s_count, n)
        q4, k4, v4 = (t.view(*shape, *t.shape[1:]) for t in (q, k, v))
        return (lambda: call(q4, k4, v4, backend, memory_index=index)), dout.view(
            *shape, *dout.shape[1:])

    cases = [("packed", packed(lengths, args.backend)), ("loop", loop(lengths, args.backend))]
    if not args.skip_torch:
        cases.append(("torch packed", packed(lengths, "torch")))
    cases += [("packed, equal", packed([mean] * s_count, args.backend)),
              ("rectangle, equal", rectangle(mean, args.backend))]

    rows = []
    for name, (run, dout) in cases:
        def forward():
            with torch.no_grad():
                run()

        def forward_backward():
            run().backward(dout)

        fwd = measure(forward, args.repeats)
        both = measure(forward_backward, args.repeats)
        rows.append({"case": name, "fwd_ms": round(fwd, 1), "bwd_ms": round(both - fwd, 1),
                     "fwd_bwd_ms": round(both, 1)})
    packed_ms = rows[0]["fwd_bwd_ms"]
    for row in rows:
        row["time_over_packed"] = round(row["fwd_bwd_ms"] / packed_ms, 2)

    info = {"backend": args.backend, "sequences": s_count, "lengths": lengths, "total": total,
            "slots": slots, "heads": h, "kv_heads": hkv, "head_dim": d, "dtype": args.dtype,
            "threads": args.threads, "repeats": args.repeats, "cpu": cpu_name(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": round(os.getloadavg()[0], 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(" ".join(f"{key}={value}" for key, value in info.items()))
    print(f"{'case':<17} {'fwd ms':>10} {'bwd ms':>10} {'f+b ms':>10} {'f+b / packed':>13}")
    for row in rows:
        print(f"{row['case']:<17} {row['fwd_ms']:>10.1f} {row['bwd_ms']:>10.1f} "
              f"{row['fwd_bwd_ms']:>10.1f} {row['time_over_packed']:>12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    main()
