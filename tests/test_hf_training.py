"""Training a patched HF model: PEFT LoRA beside the memory, activation checkpointing,
torch.compile, bf16 models / autocast, and a Liger-style convergence test."""

from __future__ import annotations

import functools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lift_kernels  # noqa: E402
from test_hf import FAMILIES, logits, randomize_memory, rel, tiny_model, tokens  # noqa: E402


def test_peft_lora_and_memory_both_train():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    lift_kernels.replace_attention(model, backend="torch")  # after PEFT
    attn = model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, peft.tuners.lora.Linear)  # the LoRA layer is reused
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("gated_memory" in n for n in trainable)
    assert all("lora_" in n or "gated_memory" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    ids = tokens()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), n


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradient_checkpointing_reaches_the_memory(family, reentrant):
    model = tiny_model(family).train()
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    lift_kernels.freeze_base_model(model)
    ids = tokens()

    def memory_grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in lift_kernels.memory_parameters(model)]

    plain = memory_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = memory_grads()
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(checkpointed, plain):
        assert rel(a, b) <= 1e-5


def test_reentrant_checkpointing_with_inputs_embeds_that_do_not_require_grad():
    """A frozen base fed inputs_embeds that do not require grad: reentrant checkpointing
    would give the memory inside the checkpointed layers no gradient at all."""
    model = tiny_model("llama").train()
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    lift_kernels.freeze_base_model(model)
    ids = tokens()
    embeds = model.get_input_embeddings()(ids).detach()

    def memory_grads():
        model.zero_grad(set_to_none=True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        return [p.grad for p in lift_kernels.memory_parameters(model)]

    plain = memory_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = memory_grads()
    assert not embeds.requires_grad  # the caller's tensor is left alone
    for a, b in zip(checkpointed, plain):
        assert a is not None and rel(a, b) <= 1e-5
    lift_kernels.restore_attention(model)
    assert not model.model._forward_pre_hooks  # the hook goes with the patch


def test_torch_compile():
    """fullgraph dynamo + AOTAutograd (aot_eager keeps the test fast; inductor was checked
    by hand: same logits to 1.2e-7, backward reaches the memory)."""
    model = tiny_model("qwen2")
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    ids = tokens()
    eager = logits(model, ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = logits(compiled, ids)
    assert rel(got, eager) <= 1e-5
    assert lift_kernels.collect_gates(model)[0].shape == (2, 13, 4)
    # and training through the compiled graph
    lift_kernels.freeze_base_model(model)
    compiled(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lift_kernels.memory_parameters(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_with_fp32_memory(family):
    model32 = tiny_model(family)
    lift_kernels.replace_attention(model32, backend="reference")
    randomize_memory(model32)
    model16 = tiny_model(family).to(torch.bfloat16)
    lift_kernels.replace_attention(model16, backend="torch")
    with torch.no_grad():
        for a, b in zip(lift_kernels.memory_parameters(model16),
                        lift_kernels.memory_parameters(model32)):
            assert a.dtype == torch.float32
            a.copy_(b)
    ids = tokens()
    assert rel(logits(model16, ids).float(), logits(model32, ids)) <= 2e-2
    lift_kernels.freeze_base_model(model16)
    model16(ids, labels=ids).loss.backward()
    for p in lift_kernels.memory_parameters(model16):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_autocast_fp32_model():
    model = tiny_model("qwen2")
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    ids = tokens()
    expected = logits(model, ids)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model, ids)
        padded = logits(model, ids, attention_mask=mask)
        model(ids, labels=ids).loss.backward()
    assert rel(got.float(), expected) <= 2e-2
    assert rel(padded[1].float(), expected[1]) <= 2e-2
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in lift_kernels.memory_parameters(model))


CONVERGENCE_STEPS = 30


@functools.lru_cache(maxsize=None)  # the reference curve is shared by every backend's test
def _train_curve(backend):
    """A 4-layer mini Llama, base frozen, memory trained with AdamW to memorise one fixed
    batch for 30 steps; returns the loss per step."""
    model = tiny_model("llama", layers=4, seed=7).train()
    lift_kernels.replace_attention(model, backend=backend)
    lift_kernels.freeze_base_model(model)
    opt = torch.optim.AdamW(lift_kernels.memory_parameters(model), lr=5e-2)
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(11))
    losses = []
    for _ in range(CONVERGENCE_STEPS):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def _convergence_backends():
    # Interpreted Triton (CPU test runs) takes ~10 minutes for these 60 training steps; its
    # agreement with the reference is covered by test_backends_agree_with_reference.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    slow = pytest.mark.skipif(interpreted, reason="interpreted Triton is too slow for 60 steps")
    return [pytest.param(b, marks=slow) if b == "triton" else b
            for b in lift_kernels.available_backends() if b != "reference"]


@pytest.mark.parametrize("backend", _convergence_backends())
def test_convergence_matches_reference(backend):
    """Liger-style: the loss curve of a fused/composite backend follows the reference's
    step by step (fp32), and training actually lowers the loss."""
    ref = _train_curve("reference")
    got = _train_curve(backend)
    assert ref[-1] < ref[0] - 0.2  # the memory learns (measured: 4.14 -> 3.80)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
