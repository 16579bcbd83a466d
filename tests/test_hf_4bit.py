"""A 4-bit base (bitsandbytes NF4, the memory in float32), as LIFT users run the authors'
code: patching, exactness with the gate shut, training reaches only the memory, save/load.
Needs bitsandbytes (0.50.2 runs NF4 on the CPU here); skipped without it (make test does
not install it: `pip install bitsandbytes` first)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import lift_kernels  # noqa: E402
from lift_kernels import GatedMemoryConfig  # noqa: E402

from hf_families import VOCAB, tiny_model  # noqa: E402
from lift_tiny import one_thread  # noqa: E402,F401


def load_4bit(family, path):
    # bitsandbytes' CPU inference path packs weights in blocks of 64 input features
    tiny_model(family, hidden_size=128, intermediate_size=128, head_dim=32).save_pretrained(path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
    # Train mode (the tiny configs have no dropout): in eval mode bitsandbytes 0.50.2 repacks
    # 4-bit weights for its CPU inference kernel on the first forward without grad (on CPUs
    # with AVX512-BF16), after which no gradient flows back through the layer's input, so
    # the memory of earlier layers would get none.
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map="cpu").train()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nf4_base_with_float32_memory(family, tmp_path):
    import bitsandbytes as bnb

    model = load_4bit(family, tmp_path / "base")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(ids).logits
    lift_kernels.replace_attention(model, GatedMemoryConfig(gate_shift=100.0), backend="torch")
    for m in lift_kernels.memory_parameters(model):
        assert m.dtype == torch.float32
    with torch.no_grad():  # gate shut (gate_shift=100, g2 zero-initialised): the 4-bit model
        torch.testing.assert_close(model(ids).logits, original, rtol=1e-5, atol=1e-5)

    lift_kernels.replace_attention(model, backend="torch")  # default gate: the memory trains
    lift_kernels.freeze_base_model(model)
    memory = {id(p) for p in lift_kernels.memory_parameters(model)}
    opt = torch.optim.AdamW(lift_kernels.memory_parameters(model), lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            assert (p.grad is not None) == (id(p) in memory)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    path = tmp_path / "memory.safetensors"
    lift_kernels.save_memory(model, path)
    with torch.no_grad():
        expected = model(ids).logits
    fresh = load_4bit(family, tmp_path / "base2")
    lift_kernels.load_memory(fresh, path, backend="torch")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
