"""The ``cpu`` and ``cuda`` backends: thin calls into the compiled ``lift_kernels._C``.

``_C`` links no libtorch, so this module does what a torch extension would do in C++:
it allocates every output with torch, makes the layouts the kernels accept (the last dim
contiguous; the weights float32 and contiguous), and hands over raw pointers, sizes,
strides (in elements), the dtype and, on CUDA, the current stream.

Contract (function.py's module docstring): ``forward`` returns (out, gate, lse, attn) and
``backward`` the ten gradients.  Shapes: q [B, Nq, Hq, D]; k, v [B, Nk, Hkv, D]; weights as
in SPEC section 1; cos/sin [B, Nq, D] float32 or None.  The ``cpu`` kernels also take packed
sequences (q [total_q, Hq, D], k, v [total_k, Hkv, D], cos/sin [total_q, D]; gate
[total_q, Hq], lse [Hq, total_q]) and memory slots (weights [K, Hq, ...]) through the
keywords cu_seqlens_q/k, max_seqlen_q/k and memory_index; the ``cuda`` kernels do not yet.
"""

from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError as err:  # a source tree without the compiled module
    _C = None
    _IMPORT_ERROR = err
else:
    _IMPORT_ERROR = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The backends of this module that take packed sequences and memory slots (dispatch.py reads
# this: a module serving several backends may name some of them).
SUPPORTS_VARLEN = ("cpu",)
# The CUDA kernels' tiles are 16-bit (csrc/cuda/launch.h lists the head dims).
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def unsupported_reason(name: str, problem) -> str | None:
    """Why backend `name` ("cpu" or "cuda") cannot serve `problem`, or None."""
    if _C is None:
        return f"lift_kernels._C is not built ({_IMPORT_ERROR})"
    if name == "cpu":
        if problem.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got device {problem.device}"
        if problem.dtype not in _DTYPE_CODES:
            return f"the cpu backend supports float32, float16 and bfloat16, got {problem.dtype}"
        return None
    if name == "cuda":
        if problem.device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got device {problem.device}"
        if problem.windowed or problem.softcap:
            return "the cuda kernels have no sliding window or soft-capping yet (issue 16)"
        if not _C.build_info()["cuda"]:
            return "lift_kernels._C was built without CUDA (nvcc was not found at build time)"
        if problem.dtype not in CUDA_DTYPES:
            return (f"the cuda backend runs float16/bfloat16 tensor-core tiles, got "
                    f"{problem.dtype} (use triton or torch)")
        if _C.cuda_device_count() == 0:
            return "the CUDA runtime of lift_kernels._C sees no GPU"
        major, _ = torch.cuda.get_device_capability(problem.device)
        if major < 8:
            return f"the cuda kernels need compute capability >= 8.0 (sm_80), got {major}.x"
        # Head dim, dtype, M, R, and the device's shared memory per block (sm_86/89: 99 KB).
        index = problem.device.index
        reason = _C.cuda_supports(problem.head_dim, _DTYPE_CODES[problem.dtype],
                                  problem.mem_hidden, problem.gate_hidden,
                                  torch.cuda.current_device() if index is None else index)
        return reason or None
    return f"lift_kernels.ops.cext serves 'cpu' and 'cuda', not {name!r}"


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _rows_16b_aligned(t):
    """t with every row starting on 16 bytes (the CUDA kernels copy rows with 16-byte
    cp.async): a fresh contiguous copy (contiguous() would keep a contiguous view at an odd
    offset) when its data pointer or a stride is not aligned."""
    if t is None or (t.data_ptr() % 16 == 0 and all(
            (st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _weight(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _strides(t):
    """(batch, row, head) element strides; a packed [total, H, D] tensor has no batch."""
    if t.dim() == 3:
        return (0, t.stride(0), t.stride(1))
    return (t.stride(0), t.stride(1), t.stride(2))


def _fields(q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale, gate_scale,
            gate_shift, window_size, softcap, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, memory_index=None):
    """The AttnParams fields shared by forward and backward, and the tensors they point to
    (kept alive by the caller for the duration of the call)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if q.is_cuda:
        q, k, v = (_rows_16b_aligned(t) for t in (q, k, v))
    weights = [_weight(t) for t in (w1, b1, w2, b2, g1, c1, g2)]
    if cos is not None:
        cos = _last_dim_contiguous(cos.to(torch.float32))
        sin = _last_dim_contiguous(sin.to(torch.float32))
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    hq, d = q.shape[-2:]
    if cu_seqlens_q is not None:  # packed: S sequences, each at most max_seqlen_q/k long
        batch, nq, nk = cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    fields = dict(
        batch=batch, nq=nq, nk=nk, hq=hq, hkv=k.shape[-2], head_dim=d,
        mem_hidden=w1.shape[-1], gate_hidden=g1.shape[-1], dtype=_DTYPE_CODES[q.dtype],
        q=_ptr(q), k=_ptr(k), v=_ptr(v),
        q_stride=_strides(q), k_stride=_strides(k), v_stride=_strides(v),
        cos=_ptr(cos), sin=_ptr(sin),
        rope_batch_stride=cos.stride(0) if cos is not None and cos.dim() == 3 else 0,
        rope_row_stride=cos.stride(-2) if cos is not None else 0,
        scale=float(scale), gate_scale=float(gate_scale), gate_shift=float(gate_shift),
        causal=bool(causal), window_left=int(window_size[0]), window_right=int(window_size[1]),
        softcap=float(softcap),
        stream=torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0,
    )
    for key, t in zip(("w1", "b1", "w2", "b2", "g1", "c1", "g2"), weights):
        fields[key] = _ptr(t)
    keep = [q, k, v, cos, sin, *weights]
    if cu_seqlens_q is not None:
        cu_q, cu_k = (t.to(torch.int32).contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
        fields.update(cu_seqlens_q=_ptr(cu_q), cu_seqlens_k=_ptr(cu_k), total_q=q.shape[0],
                      total_k=k.shape[0])
        keep += [cu_q, cu_k]
    if memory_index is not None:
        index = memory_index.to(torch.int64).contiguous()
        fields.update(memory_index=_ptr(index), num_slots=w1.shape[0])
        keep.append(index)
    return fields, keep


def _mma_weights(w1, w2, g1, dtype) -> dict:
    """The CUDA forward's tensor-core operands (AttnParams::w1t_mma, ...): the weights in the
    16-bit input dtype, as [rows][D] tiles like K and V: W1^T and W2 [Hq, M, D], and G1^T
    zero-padded to _C.CUDA_GATE_COLS rows (padded hidden units contribute exactly 0)."""
    hq, d, r = g1.shape
    g1t = torch.zeros((hq, _C.CUDA_GATE_COLS, d), dtype=dtype, device=g1.device)
    g1t[:, :r] = g1.detach().to(dtype).transpose(1, 2)
    return dict(w1t_mma=w1.detach().to(dtype).transpose(1, 2).contiguous(),
                w2_mma=w2.detach().to(dtype).contiguous(), g1t_mma=g1t)


def _workspace_rows(workspace, offsets, q_shape, mem_hidden, gate_hidden) -> dict:
    """Views of the CUDA backward's workspace regions that the weight gradients read, each
    [B * Nq, Hq, width]: a1 = silu(q W1 + b1) and dh1 (its pre-activation's gradient), dmem,
    ag = silu(q G1 + c1) and dhg, dlogit.  `offsets` (bytes) and the dtypes come from _C."""
    batch, nq, hq, d = q_shape
    widths = dict(a1=mem_hidden, dh1=mem_hidden, dmem=d, ag=gate_hidden, dhg=gate_hidden,
                  dlogit=1)
    out = {}
    for key, (offset, code) in offsets.items():
        if key not in widths:
            continue
        dtype = next(t for t, c in _DTYPE_CODES.items() if c == code)
        count = batch * nq * hq * widths[key]
        region = workspace[offset:offset + count * dtype.itemsize]
        out[key] = region.view(dtype).view(batch * nq, hq, widths[key])
    return out


def _head_gram(x, y):
    """sum over rows r of x[r, h]^T y[r, h], per head h: [Hq, X, Y] float32 from x [rows, Hq,
    X], y [rows, Hq, Y].  16-bit operands go to one batched tensor-core GEMM with float32
    output (CUDA); others are multiplied in float32."""
    xt, yt = x.permute(1, 2, 0), y.permute(1, 0, 2)
    if x.is_cuda and x.dtype == y.dtype and x.dtype in CUDA_DTYPES:
        return torch.bmm(xt, yt, out_dtype=torch.float32)
    return torch.bmm(xt.float(), yt.float())


def weight_grads_from_rows(q, rows) -> dict:
    """The seven weight gradients (float32) from the backward's per-row tensors (see
    _workspace_rows) and the unrotated q [B, Nq, Hq, D]: dW1 = q^T dh1, db1 = sum dh1,
    dW2 = a1^T dmem, db2 = sum dmem, dG1 = q^T dhg, dc1 = sum dhg, dg2 = sum dlogit ag."""
    x = q.reshape(-1, q.shape[2], q.shape[3])
    return dict(
        dw1=_head_gram(x, rows["dh1"]), db1=rows["dh1"].sum(0, dtype=torch.float32),
        dw2=_head_gram(rows["a1"], rows["dmem"]), db2=rows["dmem"].sum(0, dtype=torch.float32),
        dg1=_head_gram(x, rows["dhg"]), dc1=rows["dhg"].sum(0, dtype=torch.float32),
        dg2=_head_gram(rows["dlogit"], rows["ag"])[:, 0])


def _call(name: str, direction: str, fields: dict, device: torch.device):
    fn = getattr(_C, f"{name}_{direction}")
    if device.type == "cuda":
        with torch.cuda.device(device):
            fn(fields)
    else:
        fn(fields)


def _cuda_refuses_varlen(name: str, varlen: dict) -> None:
    """The cuda kernels take no packed sequences or memory slots (dispatch never sends them);
    a direct call is refused here, before the CUDA-only operand preparation would misread
    slotted weights (the compiled entry points refuse too)."""
    if name == "cuda" and any(value is not None for value in varlen.values()):
        raise ValueError("the cuda kernels take no packed sequences or memory slots")


def forward(name, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale, gate_scale,
            gate_shift, window_size=(-1, -1), softcap=0.0, **varlen):
    """Returns out [B, Nq, Hq, D], gate [B, Nq, Hq] float32, lse [B, Hq, Nq] float32 and
    attn [B, Nq, Hq, D] (the attention-only output the backward reads); packed: out, attn
    [total_q, Hq, D], gate [total_q, Hq], lse [Hq, total_q].  `varlen`: cu_seqlens_q/k,
    max_seqlen_q/k, memory_index (cpu only)."""
    _cuda_refuses_varlen(name, varlen)
    fields, keep = _fields(q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale,
                           gate_scale, gate_shift, window_size, softcap, **varlen)
    out = _alloc(q.shape, q.dtype, q.device)
    attn = _alloc(q.shape, q.dtype, q.device)
    gate = _alloc(q.shape[:-1], torch.float32, q.device)
    if q.dim() == 3:  # packed
        lse = _alloc((q.shape[1], q.shape[0]), torch.float32, q.device)
    else:
        lse = _alloc((q.shape[0], q.shape[2], q.shape[1]), torch.float32, q.device)
    fields.update(out=_ptr(out), attn=_ptr(attn), gate=_ptr(gate), lse=_ptr(lse))
    if name == "cuda":
        mma = _mma_weights(w1, w2, g1, q.dtype)
        fields.update({key: _ptr(t) for key, t in mma.items()})
        keep.extend(mma.values())
    _call(name, "forward", fields, q.device)
    del keep
    return out, gate, lse, attn


def backward(name, dout, dgate, q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, gate, lse,
             attn, causal, scale, gate_scale, gate_shift, deterministic, window_size=(-1, -1),
             softcap=0.0, **varlen):
    """Returns (dq, dk, dv, dw1, db1, dw2, db2, dg1, dc1, dg2), each in its input's dtype,
    None for an absent bias.  dgate [B, Nq, Hq] ([total_q, Hq] packed) may be None.

    `deterministic` asks nothing of these kernels: both reduce every sum in a fixed order
    without atomics, so their backward is always bit-reproducible."""
    del deterministic
    _cuda_refuses_varlen(name, varlen)
    fields, keep = _fields(q, k, v, w1, b1, w2, b2, g1, c1, g2, cos, sin, causal, scale,
                           gate_scale, gate_shift, window_size, softcap, **varlen)
    dout = _last_dim_contiguous(dout.to(q.dtype))
    if dout.is_cuda:
        dout = _rows_16b_aligned(dout)
    gate, lse = gate.float().contiguous(), lse.float().contiguous()
    attn = attn.to(q.dtype).contiguous()
    if dgate is not None:
        dgate = dgate.to(torch.float32).contiguous()
    dq = _alloc(q.shape, q.dtype, q.device)
    dk = _alloc(k.shape, q.dtype, q.device)
    dv = _alloc(k.shape, q.dtype, q.device)
    weights = (w1, b1, w2, b2, g1, c1, g2)
    wgrads = [None if w is None else _alloc(w.shape, torch.float32, q.device) for w in weights]
    fields.update(
        dout=_ptr(dout), dout_stride=_strides(dout), dgate=_ptr(dgate), gate=_ptr(gate),
        lse=_ptr(lse), attn=_ptr(attn), out=0, dq=_ptr(dq), dk=_ptr(dk), dv=_ptr(dv))
    for key, g in zip(("dw1", "db1", "dw2", "db2", "dg1", "dc1", "dg2"), wgrads):
        fields[key] = _ptr(g)
    workspace = None
    if name == "cuda":  # the CUDA backward's scratch rows (O(N)), allocated here like all else
        workspace = torch.empty(_C.cuda_workspace_bytes(fields), dtype=torch.uint8,
                                device=q.device)
        fields["workspace"] = _ptr(workspace)
    _call(name, "backward", fields, q.device)
    if name == "cuda":
        # The kernels leave the per-row activations and gradients in the workspace; the
        # weight gradients are sums over all (batch, row) of their outer products: batched
        # GEMMs over the heads (cuBLAS, tensor cores), not a kernel of ours.
        rows = _workspace_rows(workspace, _C.cuda_workspace_offsets(fields), q.shape,
                               w1.shape[2], g1.shape[2])
        grads = weight_grads_from_rows(q, rows)
        for key, g in zip(("dw1", "db1", "dw2", "db2", "dg1", "dc1", "dg2"), wgrads):
            if g is not None:
                g.copy_(grads[key])
    del keep
    wgrads = [None if g is None else g.to(w.dtype) for g, w in zip(wgrads, weights)]
    return (dq, dk, dv, *wgrads)
