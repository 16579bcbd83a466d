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
from functools import partial

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
    "HAS_SOFTCAP": lambda a: a["SOFTCAP"] > 0,
    "IS_VARLEN": lambda a: a["CU_Q"] is not None,
}
# The window's bounds are runtime ints that vary with the shapes (an unbounded side is
# Nq + Nk): not specialised on (divisibility by 16, == 1), so they add no compiles.
WINDOW_ARGS = ["LEFT", "RIGHT"]
# Kernels that also run the memory MLP and the gate.
WEIGHT_HEURISTICS = {
    "BLOCK_R": lambda a: _pow2(a["GATE_HIDDEN"]),
    "HAS_B1": lambda a: a["B1"] is not None,
    "HAS_B2": lambda a: a["B2"] is not None,
    "HAS_C1": lambda a: a["C1"] is not None,
    "HAS_SLOTS": lambda a: a["SLOTS"] is not None,
}


# Per kernel and head-dim class, the configurations prune_configs keeps, in the order the
# autotuner tries them; the first is also deterministic mode's (untimed).  Rebuilt from the
# JIT-faithful sm_90a compile report, bf16, B=4 N=4096 Hq=32 Hkv=8 (bench/triton_compile.py;
# table and date in bench/RESULTS.md; printed by its --suggest): kept are the configurations
# that launch (shared memory measured) and reload no spilled value inside a hot loop, the
# larger loop-invariant tile first (less traffic), then fewer spill reloads anywhere, then
# the larger streamed tile, then less shared memory; dropped are the rest.
TUNED = {
    ("fwd", 64): [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 8, 3),
                  (128, 64, 64, 8, 3), (128, 64, 32, 4, 4), (128, 64, 64, 4, 4),
                  (128, 32, 32, 8, 2), (128, 32, 64, 8, 2), (64, 64, 32, 4, 4),
                  (64, 64, 64, 4, 4), (64, 32, 32, 4, 3), (64, 32, 32, 8, 3),
                  (64, 32, 64, 4, 3), (64, 32, 64, 8, 3)],
    ("fwd", 128): [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 32, 8, 3),
                   (128, 64, 64, 8, 3), (128, 32, 32, 8, 2), (128, 32, 64, 8, 2),
                   (64, 64, 32, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 4, 3),
                   (64, 32, 32, 8, 3), (64, 32, 64, 4, 3), (64, 32, 64, 8, 3)],
    ("dkdv", 64): [(32, 128, 8, 3), (64, 128, 8, 3), (16, 128, 4, 2), (32, 64, 8, 2),
                   (32, 64, 4, 3), (16, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2),
                   (32, 32, 4, 3)],
    ("dkdv", 128): [(32, 128, 8, 3), (32, 64, 8, 2), (16, 64, 4, 2), (32, 64, 4, 3),
                    (64, 64, 8, 2), (32, 32, 4, 3)],
    ("dq", 64): [(128, 32, 32, 8, 2), (64, 64, 32, 8, 2), (64, 64, 32, 4, 3),
                 (64, 32, 32, 4, 2), (64, 32, 32, 8, 2), (64, 32, 64, 4, 2),
                 (32, 64, 32, 4, 2), (32, 32, 32, 4, 3)],
    ("dq", 128): [(128, 32, 32, 8, 2), (64, 64, 32, 8, 2), (64, 32, 32, 8, 2),
                  (64, 32, 32, 4, 2), (64, 64, 32, 4, 3), (64, 32, 64, 4, 2),
                  (32, 32, 32, 4, 3)],
}


def gpu_configs(kind):
    """Every autotuning configuration of a kernel on the GPU (sm_80/sm_90): the candidates
    bench/triton_compile.py compiles, before prune_configs keeps and orders those for
    the head dim and dtype."""
    if kind == "fwd":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh}, num_warps=warps,
                              num_stages=stages)
                for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
                                              (64, 64, 4, 4), (64, 32, 8, 3), (64, 32, 4, 3),
                                              (128, 32, 8, 2))
                for bh in (32, 64)]
    if kind == "dkdv":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
                for bm, bn, warps, stages in ((32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3),
                                              (64, 64, 4, 2), (32, 64, 8, 2), (16, 64, 4, 2),
                                              (32, 32, 4, 3), (64, 64, 8, 2), (16, 128, 4, 2))]
    # dq: also runs the memory and gate backward on its query tile
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh}, num_warps=warps,
                          num_stages=stages)
            for bm, bn, bh, warps, stages in ((64, 32, 32, 8, 2), (128, 32, 32, 8, 2),
                                              (64, 64, 32, 4, 3), (64, 32, 64, 4, 2),
                                              (32, 64, 32, 4, 2), (64, 64, 32, 8, 2),
                                              (32, 32, 32, 4, 3), (64, 32, 32, 4, 2))]


def configs(kind):
    """The configurations the kernels are autotuned over: gpu_configs(kind), or the single
    fixed configuration under the interpreter (autotuning would only time numpy there;
    16-row tiles keep the tests' small sequences spanning several blocks).

    LIFT_KERNELS_TRITON_CONFIGS=N (read at import) keeps the first N that prune_configs
    orders for a call: every autotuning key compiles each configuration, so a test suite
    with many shapes (N=1) or a time-boxed benchmark (a few) would otherwise spend minutes
    compiling."""
    if INTERPRETED:
        tile = {"BLOCK_M": 16, "BLOCK_N": 16}
        if kind != "dkdv":
            tile["BLOCK_H"] = 32
        return [triton.Config(tile, num_warps=4, num_stages=1)]
    return gpu_configs(kind)


_LIMIT = int(os.environ.get("LIFT_KERNELS_TRITON_CONFIGS", "0") or 0)


# Autotuning results persist in Triton's cache directory (keyed by kernel source, key and
# configurations), so a new process does not time every configuration again.  Triton < 3.3
# has no such option.
_CACHE_RESULTS = ({"cache_results": True}
                  if "cache_results" in inspect.signature(triton.autotune).parameters else {})


def autotuned(kernel, kind, config_list, key, **options):
    """`kernel` (a heuristics-wrapped jit function) autotuned over `config_list`, pruned per
    call by prune_configs(kind, ...).  No kernel accumulates into its outputs, so no
    reset_to_zero (which in Triton 3.6 also called .zero_() on absent, None, arguments)."""
    return triton.autotune(configs=config_list, key=key,
                           prune_configs_by={"early_config_prune": partial(prune_configs, kind)},
                           **_CACHE_RESULTS, **options)(kernel)


def seq_bucket(nq, nk):
    """The autotuning key of the sequence lengths: their bit lengths, so decoding with a
    growing cache or ragged batches retune once per power of two, not once per length."""
    return nq.bit_length() * 64 + nk.bit_length()


def config_key(config):
    """(BLOCK_M, BLOCK_N[, BLOCK_H], warps, stages): how TUNED names a configuration."""
    blocks = tuple(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_H") if k in config.kwargs)
    return (*blocks, config.num_warps, config.num_stages)


def prune_configs(kind, configs, named_args, **kwargs):
    """The configurations of `configs` to try for this call, in order: TUNED's list for the
    head dim (64: D <= 64, 128: D <= 128); above 128 (not in the compile report) the small
    tiles; for float32 inputs single-stage small tiles only (exact fp32 dots run on FMA
    units, and a pipelined dK/dV tile at D=256 asked for 533 KB of shared memory).  A list
    with none of TUNED's configurations (the interpreter's) is kept as it is.  The
    autotuner passes positional arguments (Q) as named_args and keywords (HEAD_DIM,
    WINDOWED) as kwargs; LIFT_KERNELS_TRITON_CONFIGS=N keeps the first N."""
    d = kwargs["HEAD_DIM"] if "HEAD_DIM" in kwargs else named_args["HEAD_DIM"]
    windowed = kwargs.get("WINDOWED", named_args.get("WINDOWED", False))
    if d <= 128:
        by_key = {config_key(c): c for c in configs}
        kept = [by_key[k] for k in TUNED[kind, 64 if d <= 64 else 128] if k in by_key]
        if kind == "fwd" and windowed and d > 64:
            # The window's mask tips the 128x128 forward tiles (255 registers with the
            # causal mask) into reloading spilled values in the key loop: sm_90a compile
            # report, bench/RESULTS.md.  128x64 is the largest clean tile.
            kept = [c for c in kept if c.kwargs["BLOCK_N"] < 128]
        kept = kept or configs
    else:
        kept = [c for c in configs if min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 32
                and c.kwargs["BLOCK_M"] <= 64 and c.kwargs.get("BLOCK_H", 0) <= 32]
    q = named_args.get("Q", named_args.get("QROT"))  # the dK/dV kernel reads QROT
    if q is not None and q.dtype == torch.float32:
        kept = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=1) for c in kept
                if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048]
    kept = kept or configs[-1:]
    return kept[:_LIMIT] if _LIMIT > 0 else kept


@triton.jit
def sequence(CU_Q, CU_K, SLOTS, b, NQ, NK, IS_VARLEN: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Where program index b's sequence lies, as (batch, q0, k0, nq, nk, slot): packed input
    (IS_VARLEN, buffers [1, total, ...]): batch 0, the sequence's first query and key rows
    q0, k0 (int64, from cu_seqlens) and its lengths nq, nk (int32); else batch b, 0, 0, NQ,
    NK.  slot: the sequence's memory slot SLOTS[b] (HAS_SLOTS), else 0."""
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b).to(tl.int64)
        k0 = tl.load(CU_K + b).to(tl.int64)
        nq = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        nk = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
        batch = b * 0
    else:
        q0 = 0
        k0 = 0
        nq = NQ
        nk = NK
        batch = b
    slot = 0
    if HAS_SLOTS:
        slot = tl.load(SLOTS + b).to(tl.int64)
    return batch, q0, k0, nq, nk, slot


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


@triton.jit
def band_blocks(lo, hi, full_lo, full_hi, LIMIT, BLOCK: tl.constexpr):
    """Block bounds of a loop over a sliding-window band: the indices in [lo, hi) are the
    only ones any row of the tile can see, those in [full_lo, full_hi) all rows see.
    Returns (lo, full_lo, full_hi, hi) clipped to [0, LIMIT), lo, full_lo, full_hi
    multiples of BLOCK and lo <= full_lo <= full_hi, so that blocks [lo, full_lo) and
    [full_hi, hi) need the mask and [full_lo, full_hi) none; blocks wholly outside the band
    are never visited (cost grows with the window, not the sequence).  Negative values are
    clipped before any division (the interpreter floors, compiled code truncates)."""
    hi = tl.minimum(tl.maximum(hi, 0), LIMIT)
    lo = tl.minimum(tl.maximum(lo, 0), hi) // BLOCK * BLOCK
    hi_up = tl.cdiv(hi, BLOCK) * BLOCK
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK) * BLOCK, lo), hi_up)
    full_hi = tl.maximum(tl.maximum(tl.minimum(full_hi, hi), 0) // BLOCK * BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_blocks(start_m, NQ, NK, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Key range of the query block [start_m, start_m + BLOCK_M) as (lo, full_lo, full_hi,
    hi): blocks [full_lo, full_hi) need no mask, [lo, full_lo) and [full_hi, hi) do (lo =
    full_lo = 0 without a window).  Row i sees key j iff i + NK - NQ - LEFT <= j <= i + NK -
    NQ + RIGHT (WINDOWED; the launcher makes RIGHT 0 when causal and an unbounded side wider
    than the sequences), else as causal_bounds."""
    if WINDOWED:
        first = start_m + NK - NQ  # diagonals of the block's first and last rows
        last = first + BLOCK_M - 1
        lo, full_lo, full_hi, hi = band_blocks(first - LEFT, last + RIGHT + 1, last - LEFT,
                                               first + RIGHT + 1, NK, BLOCK_N)
    else:
        full_hi, hi = causal_bounds(start_m, NQ, NK, BLOCK_M, BLOCK_N, CAUSAL)
        lo = 0
        full_lo = 0
    return lo, full_lo, full_hi, hi


@triton.jit
def skip_gap(it, GAP_AT, GAP):
    """The block start of loop step `it` in a loop over both masked edges of a window band
    at once, [lo, GAP_AT) then [GAP_AT + GAP, hi) (the unmasked middle cut out): one loop
    rather than two, so the kernel keeps the plain kernel's two pipelined loops (a third
    made the sm_90a forward at D=128 spill inside its key loop)."""
    return tl.where(it >= GAP_AT, it + GAP, it)


@triton.jit
def in_window(rows, keys, SHIFT, LEFT, RIGHT):
    """Whether query `rows` see `keys` (broadcast against each other) inside the window
    around the bottom-right diagonal (SHIFT = NK - NQ); key_blocks' convention."""
    offset = keys - (rows + SHIFT)
    return (offset >= -LEFT) & (offset <= RIGHT)


@triton.jit
def tanh(x):
    """tanh from one exp2 (tl has none): 1 - 2 / (e^2x + 1), +-1 without NaN at the ends;
    near 0 its absolute error is a float32 ulp, which is what the softmax sees."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)
