"""function.py's custom-op plumbing (gradients of both outputs, absent biases, the fake
implementation under torch.compile, checkpointing), checked with a stand-in fused backend
so that it is tested apart from any kernel."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lift_kernels import GatedMemory, dispatch

import fake_fused_backend
from helpers import Case, check_against_oracle, make_inputs


@pytest.fixture
def fake_cpu_backend(monkeypatch):
    monkeypatch.setitem(dispatch.FUSED_BACKENDS, "cpu", fake_fused_backend)
    return "cpu"


@pytest.mark.parametrize("case", [Case(), Case(bias=True, nq=5, nk=9), Case(nq=9, nk=4, rope=False)],
                         ids=repr)
def test_custom_op_gradients(fake_cpu_backend, case):
    check_against_oracle(fake_cpu_backend, case)


def test_custom_op_compiles_fullgraph_and_checkpoints(fake_cpu_backend):
    torch._dynamo.reset()
    mod = GatedMemory(4, 16)
    with torch.no_grad():
        mod.w2.normal_(0, 0.1)
        mod.g2.normal_(0, 0.5)
    t = make_inputs(Case(nq=12, nk=12), 0)

    def step(q):
        out, gate = mod(q, t["k"], t["v"], cos=t["cos"], sin=t["sin"], backend="cpu",
                        return_gate=True)
        return out.square().sum() + gate.sum()

    q = t["q"].requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads_compiled = torch.autograd.grad(compiled(q), [q, *mod.parameters()])
    grads_eager = torch.autograd.grad(step(q), [q, *mod.parameters()])
    grads_ckpt = torch.autograd.grad(checkpoint(step, q, use_reentrant=False), [q, *mod.parameters()])
    for a, b, c in zip(grads_compiled, grads_eager, grads_ckpt):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
