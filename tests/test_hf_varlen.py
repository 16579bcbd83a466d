"""Padded batches through the packed op, and per-row memory slots (issue 15), on tiny random
models: agreement with the exact path, slot selection for forward and generate, gradients
per slot, save/load of one slot or all."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lift_kernels  # noqa: E402
from lift_kernels.hf import patch as hf_patch  # noqa: E402

import hf_families  # noqa: E402
from test_hf import logits, randomize_memory, rel, tiny_model, tokens  # noqa: E402


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the forwards that took the packed path."""
    calls = []
    real = hf_patch._packed_attention

    def spy(*args, **kwargs):
        calls.append(args[7].shape)  # keep
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_patch, "_packed_attention", spy)
    return calls


def _exact_only(monkeypatch):
    """From here on every masked forward takes the exact path."""
    monkeypatch.setattr(hf_patch, "_kept_tokens", lambda *args: None)


def padding_mask(ids, hole=True):
    mask = torch.ones_like(ids)
    mask[0, :4] = 0     # left padding
    mask[1, -3:] = 0    # right padding
    if hole:
        mask[2, 5:7] = 0
    return mask


def _loss_and_grads(model, ids, mask):
    # Token t is predicted from position t - 1: both must be real tokens (the paths differ
    # only at padding positions, whose outputs nobody should read).
    pad = mask == 0
    labels = ids.masked_fill(pad | torch.cat([pad[:, :1], pad[:, :-1]], 1), -100)
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = [p.grad.clone() for p in lift_kernels.memory_parameters(model)]
    return out.logits.detach(), out.loss.detach(), grads


AGREEMENT = [  # family, attention implementation, a hole in the padding
    ("llama", "sdpa", True), ("llama", "eager", True), ("qwen3", "sdpa", True),
    ("smollm3", "sdpa", True),                          # a layer without RoPE
    ("qwen2", "sdpa", False), ("mistral", "sdpa", False),  # windows that cut
    ("gemma2", "eager", False),                         # window and soft-capping
]


@pytest.mark.parametrize("family,attn,hole", AGREEMENT)
def test_padded_batch_runs_packed_and_agrees_with_exact_path(family, attn, hole, packed_calls,
                                                             monkeypatch):
    model = hf_families.tiny_model(family, attn_implementation=attn)
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    ids = tokens(batch=3, n=11)
    mask = padding_mask(ids, hole)
    keep = mask.bool()
    packed_logits, packed_loss, packed_grads = _loss_and_grads(model, ids, mask)
    assert len(packed_calls) == model.config.num_hidden_layers
    _exact_only(monkeypatch)
    exact_logits, exact_loss, exact_grads = _loss_and_grads(model, ids, mask)
    assert len(packed_calls) == model.config.num_hidden_layers  # the exact path this time
    assert rel(packed_logits[keep], exact_logits[keep]) <= 1e-5
    assert abs(packed_loss.item() - exact_loss.item()) <= 1e-5 * abs(exact_loss.item())
    for a, b in zip(packed_grads, exact_grads):
        assert rel(a, b) <= 1e-5
    gates = lift_kernels.collect_gates(model)
    assert all(g.shape == (3, 11, model.config.num_attention_heads) for g in gates.values())


def test_masks_the_op_cannot_take_stay_exact(packed_calls):
    """A window that cuts with a hole in the padding (the op would count the window in
    packed positions), and keys from a cache: the exact path."""
    model = hf_families.tiny_model("mistral")
    lift_kernels.replace_attention(model, backend="torch")
    randomize_memory(model)
    ids = tokens(batch=3, n=11)
    logits(model, ids, attention_mask=padding_mask(ids))
    assert packed_calls == []
    out = model(ids[:, :6], attention_mask=padding_mask(ids)[:, :6], use_cache=True)
    calls = len(packed_calls)  # the prefill packs ...
    model(ids[:, 6:8], attention_mask=padding_mask(ids)[:, :8],
          past_key_values=out.past_key_values)
    assert len(packed_calls) == calls  # ... the next call, with cached keys, does not


def _slot_models(family="llama", num_memories=3, **extra):
    """A model with K slots (random memories) and, per slot, a single-memory copy of it."""
    model = tiny_model(family, **extra)
    lift_kernels.replace_attention(model, backend="torch", num_memories=num_memories)
    randomize_memory(model, seed=5)
    singles = []
    for s in range(num_memories):
        single = copy.deepcopy(model)
        lift_kernels.replace_attention(single, num_memories=1)
        with torch.no_grad():
            for p, q in zip(lift_kernels.memory_parameters(single),
                            lift_kernels.memory_parameters(model)):
                p.copy_(q[s])
        singles.append(single)
    return model, singles


def test_num_memories_gives_every_layer_slots():
    model, _ = _slot_models(num_memories=3)
    attn = model.model.layers[0].self_attn
    assert attn.gated_memory.w1.shape == (3, 4, 8, 16) and attn.gated_memory.g2.shape == (3, 4, 2)
    assert attn.lift_patch.num_memories == 3
    lift_kernels.replace_attention(model, backend="reference")  # keeps K and the weights
    assert attn.gated_memory.w1.shape[0] == 3 and attn.gated_memory.w1.abs().max() > 0
    with pytest.raises(ValueError, match="3 memory slots per layer"):
        logits(model, tokens())
    with pytest.raises(ValueError, match=r"index must hold slots in \[0, 3\)"):
        with lift_kernels.memory_slots(model, [0, 3]):
            pass
    with pytest.raises(ValueError, match="num_memories must be a positive int"):
        lift_kernels.replace_attention(model, num_memories=0)


@pytest.mark.parametrize("padded,exact", [(False, False), (True, False), (True, True)],
                         ids=["causal", "padded", "padded-exact-path"])
def test_memory_slots_select_per_batch_row(padded, exact, monkeypatch):
    model, singles = _slot_models()
    if exact:
        _exact_only(monkeypatch)
    ids = tokens(batch=3, n=11)
    # No hole: a row alone then has the same relative positions.
    mask = padding_mask(ids, hole=False) if padded else torch.ones_like(ids)
    index = torch.tensor([2, 0, 2])
    with lift_kernels.memory_slots(model, index):
        batched = logits(model, ids, attention_mask=mask)
    assert model.model.layers[0].self_attn.lift_patch.memory_index is None  # restored
    for row, slot in enumerate(index.tolist()):
        keep = mask[row].bool()
        alone = logits(singles[slot], ids[row:row + 1, keep])
        assert rel(batched[row, keep], alone[0]) <= 1e-5, (row, slot)
    assert rel(batched[1], batched[0]) > 1e-2  # the slots really differ


needs_cpu = pytest.mark.skipif("cpu" not in lift_kernels.available_backends("cpu"),
                               reason="lift_kernels._C is not built")


@pytest.fixture
def cpu_kernel_calls(monkeypatch):
    """Counts the packed calls into the fused cpu kernels (forward and backward)."""
    from lift_kernels.ops import cext

    calls = []
    for direction in ("forward", "backward"):
        real = getattr(cext, direction)

        def spy(*args, _real=real, _direction=direction, **kwargs):
            if "cu_seqlens_q" in kwargs:
                calls.append(_direction)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cext, direction, spy)
    return calls


@needs_cpu
@pytest.mark.parametrize("family,attn,hole", [AGREEMENT[0], AGREEMENT[4], AGREEMENT[6]])
def test_padded_batch_runs_the_fused_cpu_kernels(family, attn, hole, packed_calls,
                                                 cpu_kernel_calls, monkeypatch):
    """backend="cpu": a padded batch runs the fused kernels on the packed tokens (this fails
    if the exact path is taken) and agrees with the exact path, loss and gradients."""
    model = hf_families.tiny_model(family, attn_implementation=attn)
    lift_kernels.replace_attention(model, backend="cpu")
    randomize_memory(model)
    ids = tokens(batch=3, n=11)
    mask = padding_mask(ids, hole)
    keep = mask.bool()
    layers = model.config.num_hidden_layers
    packed_logits, packed_loss, packed_grads = _loss_and_grads(model, ids, mask)
    assert len(packed_calls) == layers
    assert cpu_kernel_calls.count("forward") == layers
    assert cpu_kernel_calls.count("backward") == layers
    _exact_only(monkeypatch)
    exact_logits, exact_loss, exact_grads = _loss_and_grads(model, ids, mask)
    assert len(packed_calls) == layers and len(cpu_kernel_calls) == 2 * layers
    assert rel(packed_logits[keep], exact_logits[keep]) <= 1e-5
    assert abs(packed_loss.item() - exact_loss.item()) <= 1e-5 * abs(exact_loss.item())
    for a, b in zip(packed_grads, exact_grads):
        assert rel(a, b) <= 1e-5


@needs_cpu
def test_memory_slots_run_the_fused_cpu_kernels(packed_calls, cpu_kernel_calls):
    """Slots and padding on backend="cpu": packed fused calls, the torch backend's logits."""
    model, _ = _slot_models()
    ids = tokens(batch=3, n=11)
    mask = padding_mask(ids)
    with lift_kernels.memory_slots(model, [1, 0, 2]):
        expected = logits(model, ids, attention_mask=mask)
        calls = len(packed_calls)
        lift_kernels.replace_attention(model, backend="cpu")
        got = logits(model, ids, attention_mask=mask)
    layers = model.config.num_hidden_layers
    assert len(packed_calls) == calls + layers and cpu_kernel_calls == ["forward"] * layers
    assert rel(got[mask.bool()], expected[mask.bool()]) <= 1e-5


@needs_cpu
def test_backend_without_varlen_takes_the_exact_path(packed_calls, monkeypatch):
    """An explicit fused backend that takes no packed input or slots (cpu with its
    SUPPORTS_VARLEN emptied, as cuda is today): padded batches and memory slots run the
    exact path and agree with torch."""
    from lift_kernels.ops import cext

    monkeypatch.setattr(cext, "SUPPORTS_VARLEN", ())
    model, _ = _slot_models()
    ids = tokens(batch=3, n=11)
    mask = padding_mask(ids)
    with lift_kernels.memory_slots(model, [1, 0, 2]):
        expected = logits(model, ids, attention_mask=mask)
        calls = len(packed_calls)
        lift_kernels.replace_attention(model, backend="cpu")
        got = logits(model, ids, attention_mask=mask)
    assert len(packed_calls) == calls
    assert rel(got[mask.bool()], expected[mask.bool()]) <= 1e-5


@pytest.mark.skipif("triton" not in lift_kernels.available_backends("cpu"),
                    reason="triton is not available here")
def test_triton_runs_padded_batches_with_slots_packed(packed_calls):
    """triton takes packed input and slots: a padded batch with a slot per row runs the
    packed fused path and agrees with torch's."""
    model, _ = _slot_models()
    ids = tokens(batch=3, n=11)
    mask = padding_mask(ids)
    with lift_kernels.memory_slots(model, [1, 0, 2]):
        expected = logits(model, ids, attention_mask=mask)
        calls = len(packed_calls)
        lift_kernels.replace_attention(model, backend="triton")
        got = logits(model, ids, attention_mask=mask)
    assert len(packed_calls) > calls
    assert rel(got[mask.bool()], expected[mask.bool()]) <= 1e-5


def test_memory_slots_generate():
    model, singles = _slot_models()
    ids = tokens(batch=2, n=9)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with lift_kernels.memory_slots(model, [1, 2]):
        both = model.generate(ids, **kw)
    for row, slot in enumerate([1, 2]):
        assert torch.equal(both[row:row + 1], singles[slot].generate(ids[row:row + 1], **kw))


def test_gradients_reach_only_the_used_slots():
    model, _ = _slot_models()
    ids = tokens(batch=2, n=9)
    with lift_kernels.memory_slots(model, torch.tensor([0, 0])):
        model(ids, labels=ids).loss.backward()
    for p in lift_kernels.memory_parameters(model):
        assert p.grad[0].abs().max() > 0
        assert p.grad[1:].abs().max().item() == 0.0


def test_save_and_load_slots(tmp_path):
    model, singles = _slot_models()
    ids = tokens(batch=1, n=9)
    # One slot as a single-memory file: loads into a fresh model as its one memory ...
    model_slot = tmp_path / "slot2.safetensors"
    lift_kernels.save_memory(model, model_slot, slot=2)
    fresh = tiny_model("llama")
    lift_kernels.load_memory(fresh, model_slot, backend="torch")
    assert rel(logits(fresh, ids), logits(singles[2], ids)) <= 1e-6
    # ... and a single-memory file into a slot of a K-slot model.
    single_file = tmp_path / "single.safetensors"
    lift_kernels.save_memory(singles[2], single_file)
    other, _ = _slot_models()
    lift_kernels.load_memory(other, single_file, slot=0)
    for p, q in zip(lift_kernels.memory_parameters(other), lift_kernels.memory_parameters(model)):
        assert torch.equal(p[0], q[2])
    # All slots round-trip, and an unpatched model is patched with the file's num_memories.
    all_file = tmp_path / "all.safetensors"
    lift_kernels.save_memory(model, all_file)
    restored = lift_kernels.load_memory(tiny_model("llama"), all_file)
    for p, q in zip(lift_kernels.memory_parameters(restored), lift_kernels.memory_parameters(model)):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="holds 3 memories per layer, the model has num_memories=1"):
        lift_kernels.load_memory(fresh, all_file)
    with pytest.raises(ValueError, match="takes a single-memory file"):
        lift_kernels.load_memory(other, all_file, slot=1)
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 3\)"):
        lift_kernels.save_memory(model, tmp_path / "x.safetensors", slot=3)
    with pytest.raises(ValueError, match="loads into a slot of a patched model"):
        lift_kernels.load_memory(tiny_model("llama"), single_file, slot=0)
