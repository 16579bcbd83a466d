"""The HF integration on tiny random models of every supported family (built from configs,
nothing downloaded): exactness against the unpatched model, backends against each other,
cache, padding, freezing, save/load, restore, PEFT, checkpointing, compile, bf16."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lift_kernels  # noqa: E402
from lift_kernels import GatedMemoryConfig  # noqa: E402
from lift_kernels.ops.reference import memory_mlp  # noqa: E402

from hf_families import logits, randomize_memory, rel, tokens  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 64


def tiny_config(family, layers=2, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    common.update(extra)
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    if family == "qwen3":
        common.setdefault("head_dim", 8)
    return classes[family](**common)


def tiny_model(family, seed=0, **extra):
    torch.manual_seed(seed)
    config = tiny_config(family, **extra)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_import_does_not_load_transformers():
    code = ("import sys, lift_kernels; assert 'transformers' not in sys.modules; "
            "assert 'lift_kernels.hf' not in sys.modules; lift_kernels.replace_attention")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_disabled_gives_original_logits(family):
    model = tiny_model(family)
    ids = tokens()
    original = logits(model, ids)
    lift_kernels.replace_attention(model, backend="reference")
    randomize_memory(model)
    patched = logits(model, ids)
    assert rel(patched, original) > 1e-2  # the memory is active
    with lift_kernels.memory_disabled(model):
        assert rel(logits(model, ids), original) <= 1e-5
    assert rel(logits(model, ids), patched) == 0.0  # the context manager restored it


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_closed_gate_reproduces_attention(family, padded):
    """With the gate shut (gate_shift=100: sigmoid(-300) = 0) the patched layers compute
    only attention: the op's (no mask) or the packed op's (padding) must then equal the
    original model, which checks q/k projection, RoPE, GQA, scaling and the cache layout."""
    model = tiny_model(family)
    ids = tokens()
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding on the first row
    original = logits(model, ids, attention_mask=mask)
    lift_kernels.replace_attention(model, GatedMemoryConfig(gate_shift=100.0), backend="torch")
    randomize_memory(model)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gated_memory"):
                m.gated_memory.g2.abs_().neg_()  # keeps the gate logit below -gate_shift
    patched = logits(model, ids, attention_mask=mask)
    keep = mask.bool()
    assert rel(patched[keep], original[keep]) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_reads_the_pre_rope_query(family):
    """With the gate open (gate_shift=-100) a patched attention module outputs
    o_proj(memory(q)) with q taken before RoPE (after q_norm for Qwen3)."""
    model = tiny_model(family)
    lift_kernels.replace_attention(model, GatedMemoryConfig(gate_shift=-100.0), backend="reference")
    randomize_memory(model)
    attn = model.model.layers[1].self_attn
    hidden = torch.randn(2, 9, 32)
    positions = torch.arange(5, 14).unsqueeze(0)  # offset positions: RoPE matters
    cos, sin = model.model.rotary_emb(hidden, positions)
    with torch.no_grad():
        out, _ = attn(hidden, position_embeddings=(cos, sin), attention_mask=None)
        q = attn.q_proj(hidden).view(2, 9, -1, attn.head_dim)
        if family == "qwen3":
            q = attn.q_norm(q)
        mem = attn.gated_memory
        expected = attn.o_proj(memory_mlp(q, mem.w1, mem.b1, mem.w2, mem.b2).reshape(2, 9, -1))
    assert rel(out, expected) <= 1e-5


def _grads(model, ids, backend):
    lift_kernels.replace_attention(model, backend=backend)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    named = dict(model.named_parameters())
    return out.logits.detach(), {n: p.grad.clone() for n, p in named.items() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", [b for b in lift_kernels.available_backends()
                                     if b != "reference"])
def test_backends_agree_with_reference(family, backend):
    model = tiny_model(family)
    lift_kernels.replace_attention(model, backend="reference")
    randomize_memory(model)
    ids = tokens()
    ref_logits, ref_grads = _grads(model, ids, "reference")
    got_logits, got_grads = _grads(model, ids, backend)
    assert rel(got_logits, ref_logits) <= 1e-5
    assert set(got_grads) == set(ref_grads)
    assert any("gated_memory" in n for n in ref_grads) and any("q_proj" in n for n in ref_grads)
    for name, g in ref_grads.items():
        assert rel(got_grads[name], g) <= 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_backends_agree_on_cuda(family):
    """The GPU backends in a patched model, fp32 model with bf16 autocast (the training
    setup), against the reference backend on the same device."""
    model = tiny_model(family).cuda()
    lift_kernels.replace_attention(model, backend="reference")
    randomize_memory(model)
    ids = tokens().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_logits, ref_grads = _grads(model, ids, "reference")
        for backend in lift_kernels.available_backends("cuda"):
            got_logits, got_grads = _grads(model, ids, backend)
            assert rel(got_logits.float(), ref_logits.float()) <= 2e-2, backend
            for name, g in ref_grads.items():
                assert rel(got_grads[name], g) <= 2e-2, (backend, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_path_agrees_with_op(family):
    """An unpadded row of a padded batch (packed path) equals the same row alone (op)."""
    model = tiny_model(family)
    lift_kernels.replace_attention(model, backend="reference")
    randomize_memory(model)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    batched = logits(model, ids, attention_mask=mask)
    alone = logits(model, ids[1:])
    assert rel(batched[1:], alone) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family):
    extra = {"sliding_window": 6} if family == "mistral" else {}
    model = tiny_model(family, **extra)
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    ids = tokens(n=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 15)
    assert torch.equal(with_cache, without)


def test_generate_differs_from_original():
    """The memory takes part in decoding (a test of the cache path that cannot pass by
    ignoring the memory)."""
    model = tiny_model("llama")
    ids = tokens(n=9)
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    out = model(ids, use_cache=True)
    step = torch.randint(3, VOCAB, (2, 1))
    cached = model(step, past_key_values=out.past_key_values).logits[:, -1]
    full = logits(model, torch.cat([ids, step], 1))[:, -1]
    assert rel(cached, full) <= 1e-5
    with lift_kernels.memory_disabled(model):
        assert rel(logits(model, torch.cat([ids, step], 1))[:, -1], full) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_base_model(family):
    model = tiny_model(family)
    lift_kernels.replace_attention(model, backend="torch")
    lift_kernels.freeze_base_model(model)
    memory = {id(p) for p in lift_kernels.memory_parameters(model)}
    assert len(memory) > 0
    for p in model.parameters():
        assert p.requires_grad == (id(p) in memory)
    model(tokens(), labels=tokens()).loss.backward()
    for p in model.parameters():
        if id(p) in memory:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None
    # the zero-initialised last layers get a gradient from the first step
    grads = [m.gated_memory.w2.grad for m in model.modules() if hasattr(m, "gated_memory")]
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count(family):
    model = tiny_model(family)
    lift_kernels.replace_attention(model)
    hq, d = 4, 8
    m, r = 2 * d, 2  # defaults: M = 2D, R = floor(sqrt(D))
    per_layer = hq * (2 * d * m + d * r + r)
    if family == "qwen2":  # attention biases -> memory biases b1, b2, c1
        per_layer += hq * (m + d + r)
    total = sum(p.numel() for p in lift_kernels.memory_parameters(model))
    assert total == 2 * per_layer


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    base = tiny_model(family)
    trained = copy.deepcopy(base)
    lift_kernels.replace_attention(trained, GatedMemoryConfig(gate_scale=2.5), backend="torch")
    randomize_memory(trained)
    ids = tokens()
    expected = logits(trained, ids)
    path = tmp_path / "memory.safetensors"
    lift_kernels.save_memory(trained, path)
    fresh = copy.deepcopy(base)  # unpatched: load_memory patches it with the file's config
    lift_kernels.load_memory(fresh, path, backend="torch")  # same backend: bit-exact
    assert torch.equal(logits(fresh, ids), expected)
    again = copy.deepcopy(base)  # already patched with the same config
    lift_kernels.replace_attention(again, GatedMemoryConfig(gate_scale=2.5), backend="reference")
    lift_kernels.load_memory(again, path)
    assert rel(logits(again, ids), expected) <= 1e-5


def test_load_memory_rejects_mismatches(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    lift_kernels.replace_attention(model)
    path = tmp_path / "memory.safetensors"
    lift_kernels.save_memory(model, path)

    other = tiny_model("llama")
    lift_kernels.replace_attention(other, GatedMemoryConfig(mem_hidden=24))
    with pytest.raises(ValueError, match="mem_hidden"):
        lift_kernels.load_memory(other, path)

    qwen = tiny_model("qwen2")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        lift_kernels.load_memory(qwen, path)
    assert not any(hasattr(m, "lift_patch") for m in qwen.modules())

    wider = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"layers\.0\.w1 has shape \(4, 8, 16\)"):
        lift_kernels.load_memory(wider, path)
    assert not any(hasattr(m, "lift_patch") for m in wider.modules())  # nothing left patched

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "layers.1.g2"}
    save_file(tensors, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"missing \['layers.1.g2'\]"):
        lift_kernels.load_memory(copy.deepcopy(model), tmp_path / "missing.safetensors")

    pickled = tmp_path / "memory.pt"
    torch.save(dict(model.state_dict()), pickled)
    with pytest.raises(ValueError, match="not a safetensors file"):
        lift_kernels.load_memory(model, pickled)
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a lift-kernels memory file"):
        lift_kernels.load_memory(model, tmp_path / "plain.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_attention_gives_the_original_back(family, tmp_path):
    model = tiny_model(family)
    ids = tokens()
    original = logits(model, ids)
    keys = set(model.state_dict())
    lift_kernels.replace_attention(model)
    randomize_memory(model)
    assert set(model.state_dict()) > keys
    lift_kernels.restore_attention(model)
    assert set(model.state_dict()) == keys
    assert not any("forward" in vars(m) or hasattr(m, "gated_memory") for m in model.modules())
    assert torch.equal(logits(model, ids), original)
    model.save_pretrained(tmp_path / "base")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert torch.equal(logits(reloaded, ids), original)


def test_replace_again_updates_in_place():
    model = tiny_model("llama")
    lift_kernels.replace_attention(model, backend="reference")
    randomize_memory(model)
    attn = model.model.layers[0].self_attn
    w1 = attn.gated_memory.w1
    lift_kernels.replace_attention(model, GatedMemoryConfig(gate_scale=5.0), backend="torch")
    assert attn.gated_memory.w1 is w1  # same shapes: weights kept
    assert attn.lift_patch.backend == "torch" and attn.gated_memory.gate_scale == 5.0
    assert sum(isinstance(m, lift_kernels.GatedMemory) for m in model.modules()) == 2
    lift_kernels.replace_attention(model, GatedMemoryConfig(mem_hidden=12), layers=[1])
    assert not hasattr(attn, "lift_patch")  # layer 0 left the set: restored
    assert model.model.layers[1].self_attn.gated_memory.mem_hidden == 12
    assert list(lift_kernels.collect_gates(model)) == [1]


def test_collect_gates():
    model = tiny_model("qwen3")
    lift_kernels.replace_attention(model)
    ids = tokens(batch=3, n=7)
    logits(model, ids)
    gates = lift_kernels.collect_gates(model)
    assert sorted(gates) == [0, 1]
    for g in gates.values():
        assert g.shape == (3, 7, 4) and g.dtype == torch.float32
        # the initial gate: sigmoid(-gate_scale * gate_shift) = sigmoid(-3)
        torch.testing.assert_close(g, torch.full_like(g, torch.sigmoid(torch.tensor(-3.0)).item()))


@pytest.mark.parametrize("family", ["phi", "olmo", "stablelm"])
def test_unsupported_family_raises(family):
    configs = {"phi": transformers.PhiConfig, "olmo": transformers.OlmoConfig,
               "stablelm": transformers.StableLmConfig}
    config = configs[family](vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    supported = ", ".join(sorted(lift_kernels.supported_families()))
    with pytest.raises(ValueError, match=f"supported families: {supported}$"):
        lift_kernels.replace_attention(model)
    assert not any(hasattr(m, "lift_patch") or "forward" in vars(m) for m in model.modules())


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="config"):
        lift_kernels.replace_attention(model, config={"mem_hidden": 8})
    with pytest.raises(ValueError, match="backend"):
        lift_kernels.replace_attention(model, backend="fast")
    with pytest.raises(ValueError, match="layers"):
        lift_kernels.replace_attention(model, layers=[0, 5])
    with pytest.raises(TypeError, match="config.model_type"):
        lift_kernels.replace_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="replace_attention"):
        lift_kernels.freeze_base_model(model)
    assert not any(hasattr(m, "lift_patch") for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_eager_float_masks_agree_with_sdpa(family):
    """With attn_implementation="eager" the model always builds a float mask; a plain causal
    one runs the op like sdpa's missing mask does, so both must agree."""
    sdpa = tiny_model(family)
    eager = tiny_model(family, attn_implementation="eager")
    for model in (sdpa, eager):
        lift_kernels.replace_attention(model, backend="reference")
        randomize_memory(model)
    assert eager.config._attn_implementation == "eager"
    ids = tokens()
    assert rel(logits(eager, ids), logits(sdpa, ids)) <= 1e-5


def test_static_cache_generation():
    """A static cache hands the layers max-length keys (empty slots masked or, at prefill,
    cut off by sdpa): generation must equal the dynamic cache's."""
    model = tiny_model("llama")
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    ids = tokens(n=9)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kw)
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)
