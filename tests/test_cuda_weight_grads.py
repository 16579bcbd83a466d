"""The CUDA backward's weight gradients: batched GEMMs over the per-row tensors its kernels
leave in the workspace (lift_kernels.ops.cext.weight_grads_from_rows), against float64 sums
of outer products; and the workspace's layout itself (host code of _C).  Runs on CPU
(float32 GEMMs); on a GPU, tests/test_cuda.py covers the 16-bit tensor-core path end to
end."""

from __future__ import annotations

import pytest
import torch

from helpers import Case, make_inputs
from lift_kernels.ops import cext
from lift_kernels.ops.cext import weight_grads_from_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_grads_from_rows(dtype):
    gen = torch.Generator().manual_seed(7)
    batch, nq, hq, d, m, r = 2, 37, 3, 16, 24, 5
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=gen).to(dt)
    q = rand(batch, nq, hq, d).transpose(1, 2).contiguous().transpose(1, 2)  # strided q
    rows = dict(a1=rand(batch * nq, hq, m), dh1=rand(batch * nq, hq, m),
                dmem=rand(batch * nq, hq, d), ag=rand(batch * nq, hq, r, dt=torch.float32),
                dhg=rand(batch * nq, hq, r, dt=torch.float32),
                dlogit=rand(batch * nq, hq, 1, dt=torch.float32))
    got = weight_grads_from_rows(q, rows)
    x = q.reshape(-1, hq, d).double()
    f = {k: v.double() for k, v in rows.items()}
    want = dict(
        dw1=torch.einsum("nhi,nhj->hij", x, f["dh1"]), db1=f["dh1"].sum(0),
        dw2=torch.einsum("nhi,nhj->hij", f["a1"], f["dmem"]), db2=f["dmem"].sum(0),
        dg1=torch.einsum("nhi,nhj->hij", x, f["dhg"]), dc1=f["dhg"].sum(0),
        dg2=torch.einsum("nh,nhj->hj", f["dlogit"][..., 0], f["ag"]))
    assert set(got) == set(want)
    for key, ref in want.items():
        assert got[key].dtype == torch.float32, key
        assert got[key].shape == ref.shape, key
        err = (got[key].double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.skipif(cext._C is None or not cext._C.build_info()["cuda"],
                    reason="lift_kernels._C was built without CUDA")
@pytest.mark.parametrize("rope", [True, False])
def test_cuda_workspace_regions(rope):
    """The CUDA backward's workspace (host code, no GPU needed): every region the kernels
    use, 128-byte aligned, disjoint, inside the size cuda_workspace_bytes gives; lse' and
    delta' padded to whole 64-row tiles; the rotated query only with RoPE; and the views
    cext hands to the weight-gradient GEMMs."""
    case = Case(batch=2, nq=70, nk=50, hq=4, hkv=2, head_dim=64, mem_hidden=128,
                gate_hidden=8, dtype=torch.bfloat16, rope=rope)
    t = make_inputs(case, 0)
    fields, keep = cext._fields(*(t[n] for n in ("q", "k", "v", "w1", "b1", "w2", "b2", "g1",
                                                 "c1", "g2", "cos", "sin")),
                                True, 0.125, 3.0, 1.0, (-1, -1), 0.0)
    fields.update(out=0, attn=0, gate=0, lse=0)
    total = cext._C.cuda_workspace_bytes(fields)
    regions = cext._C.cuda_workspace_offsets(fields)
    rows, padded = 2 * 70 * 4, 2 * 4 * 128  # (B, Nq, Hq) rows; (B, Hq, Nq rounded up to 64)
    size = dict(dmem=rows * 64 * 2, a1=rows * 128 * 2, dh1=rows * 128 * 2, ag=rows * 8 * 4,
                dhg=rows * 8 * 4, dlogit=rows * 4, lse2=padded * 4, delta2=padded * 4,
                dq=rows * 64 * 4)
    if rope:
        size["qrot"] = rows * 64 * 2
    assert set(regions) == set(size)
    end = 0
    for name, (offset, _) in sorted(regions.items(), key=lambda kv: kv[1][0]):
        assert offset % 128 == 0 and offset >= end, name
        end = offset + size[name]
    assert end <= total
    views = cext._workspace_rows(torch.zeros(total, dtype=torch.uint8), regions, t["q"].shape,
                                 128, 8)
    assert {k: tuple(v.shape) for k, v in views.items()} == dict(
        a1=(140, 4, 128), dh1=(140, 4, 128), dmem=(140, 4, 64), ag=(140, 4, 8),
        dhg=(140, 4, 8), dlogit=(140, 4, 1))
    assert views["a1"].dtype == torch.bfloat16 and views["ag"].dtype == torch.float32
    del keep
