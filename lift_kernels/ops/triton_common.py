"""Pieces shared by the Triton forward and backward kernels: the per-tile math (dot in the
chosen precision, SiLU, the rotated query tile), the constexpr flags chosen by
`triton.heuristics`, and the autotuning configurations.

Shapes as the kernels see them (one program owns one tile of one (batch, head)):
    q tile [BLOCK_M, BLOCK_D]   key/value tile [BLOCK_N, BLOCK_D]
    memory chunk W1[:, m0:m0+BLOCK_H] [BLOCK_D, BLOCK_H], W2[m0:m0+BLOCK_H] [BLOCK_H, BLOCK_D]
    gate G1 [BLOCK_D, BLOCK_R], c1/g2 [BLOCK_R]
BLOCK_D and BLOCK_R are the head dim and gate width padded to powers of two (masked).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# Read once: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRETED = bool(triton.knobs.runtime.interpret)

LOG2E = tl.constexpr(1.4426950408889634)


def dot_dtype(args):
    """The operand dtype of every tl.dot: the inputs' own dtype (tensor cores), float32 for
    float32 inputs.  The interpreter multiplies bfloat16 operands as their uint16 storage
    (triton 3.9, interpreter.py create_dot), so there bfloat16 tiles are upcast to float32
    first: exact for the operands, only the summation order differs from a GPU mma."""
    dtype = args["Q"].dtype
    if dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16):
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def dot_precision(args):
    """float32 dots are exact ("ieee") unless the user allowed TF32 through
    torch.set_float32_matmul_precision("high"/"medium"), as for torch.matmul."""
    if args["Q"].dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _pow2(n, least=16):
    return max(least, triton.next_power_of_2(n))


# Flags of the kernels: specialisations of one kernel body, not copies of it.
ATTENTION_HEURISTICS = {
    "BLOCK_D": lambda a: _pow2(a["HEAD_DIM"]),
    "HAS_ROPE": lambda a: a["COS"] is not None,
    "DOT_DTYPE": dot_dtype,
    "PRECISION": dot_precision,
}
# Kernels that also run the memory MLP and the gate.
WEIGHT_HEURISTICS = {
    "BLOCK_R": lambda a: _pow2(a["GATE_HIDDEN"]),
    "HAS_B1": lambda a: a["B1"] is not None,
    "HAS_B2": lambda a: a["B2"] is not None,
    "HAS_C1": lambda a: a["C1"] is not None,
}


def gpu_configs(kind):
    """Every autotuning configuration of a kernel on the GPU (sm_80/sm_90), before pruning by
    head dim and dtype (prune_by_head_dim)."""
    # Each list starts with the configuration that spilled least in an sm_90a compile at
    # D=128, bf16 (tests/test_triton_compile.py); deterministic mode uses it untimed.
    out = []
    if kind == "fwd":
        for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                      (64, 64, 4, 4), (64, 32, 8, 3), (64, 32, 4, 3),
                                      (128, 32, 8, 2)):
            for bh in (32, 64):
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh},
                                         num_warps=warps, num_stages=stages))
    elif kind == "dkdv":
        for bm, bn, warps, stages in ((32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3),
                                      (64, 64, 4, 2), (32, 64, 8, 2), (16, 64, 4, 2)):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                     num_stages=stages))
    else:  # dq: also runs the memory and gate backward on its query tile
        for bm, bn, bh, warps, stages in ((64, 32, 32, 8, 2), (128, 32, 32, 8, 2),
                                          (64, 64, 32, 4, 3), (64, 32, 64, 4, 2),
                                          (32, 64, 32, 4, 2)):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh},
                                     num_warps=warps, num_stages=stages))
    return out


def configs(kind):
    """The configurations the kernels are autotuned over: gpu_configs(kind), or the single
    fixed configuration under the interpreter (autotuning would only time numpy there;
    16-row tiles keep the tests' small sequences spanning several blocks).

    LIFT_KERNELS_TRITON_CONFIGS=N (read at import) keeps the first N of each list: every
    autotuning key compiles each configuration, so a test suite with many shapes (N=1) or a
    time-boxed benchmark (a few) would otherwise spend minutes compiling."""
    if INTERPRETED:
        tile = {"BLOCK_M": 16, "BLOCK_N": 16}
        if kind != "dkdv":
            tile["BLOCK_H"] = 32
        return [triton.Config(tile, num_warps=4, num_stages=1)]
    out = gpu_configs(kind)
    limit = int(os.environ.get("LIFT_KERNELS_TRITON_CONFIGS", "0") or 0)
    return out[:limit] if limit > 0 else out


def zero_buffers(names):
    """The autotuner's pre-hook for accumulated outputs: zeroes each named tensor before every
    timed run and once before the real launch.  Used instead of autotune(reset_to_zero=...),
    which in Triton 3.6 calls .zero_() on every named argument, also on an absent (None)
    bias gradient."""
    def hook(kwargs, reset_only=False):
        for name in names:
            if kwargs[name] is not None:
                kwargs[name].zero_()
    return hook


# Autotuning results persist in Triton's cache directory (keyed by kernel source, key and
# configurations), so a new process does not time every configuration again.  Triton < 3.3
# has no such option.
_CACHE_RESULTS = ({"cache_results": True}
                  if "cache_results" in inspect.signature(triton.autotune).parameters else {})


def autotuned(kernel, config_list, key, accumulated=(), **options):
    """`kernel` (a heuristics-wrapped jit function) autotuned over `config_list`, pruned per
    call by prune_by_head_dim; tensors named in `accumulated` are zeroed before each run."""
    if accumulated:
        options["pre_hook"] = zero_buffers(list(accumulated))
    return triton.autotune(configs=config_list, key=key,
                           prune_configs_by={"early_config_prune": prune_by_head_dim},
                           **_CACHE_RESULTS, **options)(kernel)


def seq_bucket(nq, nk):
    """The autotuning key of the sequence lengths: their bit lengths, so decoding with a
    growing cache or ragged batches retune once per power of two, not once per length."""
    return nq.bit_length() * 64 + nk.bit_length()


def prune_by_head_dim(configs, named_args, **kwargs):
    """Drop the tiles that cannot fit registers/shared memory at large head dims, and the
    large tiles for float32 inputs (exact fp32 dots run on FMA units, not tensor cores, and
    a 128 x 64 tile spilled 87 KB in an sm_90a compile).  The autotuner passes positional
    arguments (Q) as named_args and keywords (HEAD_DIM) as kwargs."""
    d = kwargs["HEAD_DIM"] if "HEAD_DIM" in kwargs else named_args["HEAD_DIM"]
    kept = configs
    if d > 64:
        limit = 64 if d <= 128 else 32
        kept = [c for c in kept
                if min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= limit
                and (d <= 128 or (c.kwargs["BLOCK_M"] <= 64 and c.kwargs.get("BLOCK_H", 0) <= 32))]
    q = named_args.get("Q")
    if q is not None and q.dtype == torch.float32:
        # Software-pipelined fp32 tiles overflow shared memory (a 3-stage dK/dV tile at
        # D=256 asked for 533 KB): one stage.
        kept = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=1) for c in kept
                if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048]
    return kept or configs[-1:]


@triton.jit
def rope_partner(offs_d, HEAD_DIM: tl.constexpr):
    """rotate_half as an index map: rotate_half(x)[d] = sign[d] * x[partner[d]]."""
    half: tl.constexpr = HEAD_DIM // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0)
    return partner, sign


@triton.jit
def load_query(Q, COS, SIN, b, start, offs_d, mask, stride_qn, stride_qd, stride_cb, stride_cn,
               stride_cd, stride_sb, stride_sn, stride_sd, BLOCK_M: tl.constexpr,
               HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr):
    """The pre-RoPE query tile of rows [start, start + BLOCK_M) and its rotation, both float32
    [BLOCK_M, BLOCK_D].  Q points at this (batch, head)'s row 0, COS/SIN (None without RoPE)
    at their start; b and start are int64 scalars, offsets inside the tile int32."""
    rows = tl.arange(0, BLOCK_M)
    Q = Q + start * stride_qn
    q = tl.load(Q + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_ROPE:
        # rotate_half(q)[d] = sign[d] * q[partner[d]], as rope_partner (inlined: called per
        # block in the dK/dV loop, and the interpreter pays for every device call).
        half: tl.constexpr = HEAD_DIM // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        q_partner = tl.load(Q + rows[:, None] * stride_qn + partner[None, :] * stride_qd,
                            mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(COS + b * stride_cb + start * stride_cn + rows[:, None] * stride_cn
                      + offs_d[None, :] * stride_cd, mask=mask,
                      other=0.0)
        sin = tl.load(SIN + b * stride_sb + start * stride_sn + rows[:, None] * stride_sn
                      + offs_d[None, :] * stride_sd, mask=mask,
                      other=0.0)
        q_rot = q * cos + sign[None, :] * q_partner * sin
    else:
        q_rot = q
    return q, q_rot


@triton.jit
def causal_bounds(start_m, NQ, NK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):
    """Key range of a query block [start_m, start_m + BLOCK_M): keys below `full_end` (a
    multiple of BLOCK_N) need no mask; keys in [full_end, end) are masked (causal diagonal,
    ragged last block).  Bottom-right causal: row i sees key j iff j <= i + NK - NQ."""
    if CAUSAL:
        end = tl.minimum(NK, start_m + BLOCK_M + NK - NQ)
        full_end = tl.minimum(start_m + NK - NQ + 1, NK)
    else:
        end = NK
        full_end = NK
    end = tl.maximum(end, 0)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    return full_end, end
