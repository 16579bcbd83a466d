"""The CUDA backward's weight gradients: batched GEMMs over the per-row tensors its kernels
leave in the workspace (lift_kernels.ops.cext.weight_grads_from_rows), against float64 sums
of outer products.  Runs on CPU (float32 GEMMs); on a GPU, tests/test_cuda.py covers the
16-bit tensor-core path end to end."""

from __future__ import annotations

import pytest
import torch

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
