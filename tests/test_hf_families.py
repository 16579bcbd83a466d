"""The shared family test suite: every supported family (tests/hf_families.py) on a tiny
random model.  Exactness with the memory disabled and with the gate shut (fused and exact
path), the fused kernels against the reference, generation with a cache, training reaches
only the memory, save/load, restore, padding; sliding-window and soft-capped layers must run
the fused kernels."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lift_kernels  # noqa: E402
from lift_kernels import GatedMemoryConfig  # noqa: E402
from lift_kernels.hf import patch as hf_patch  # noqa: E402
from lift_kernels.install import TRANSFORMERS_RANGE  # noqa: E402

from hf_families import (FAMILIES, WINDOW, WINDOWED, logits, randomize_memory,  # noqa: E402
                         rel, tiny_model, tokens)
from lift_tiny import one_thread  # noqa: E402,F401  (fixture: one torch thread per test)

# The fused kernels where they are built, else the torch composite.
FUSED = "cpu" if "cpu" in lift_kernels.available_backends() else "torch"


def shut_gates(model):
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gated_memory"):
                m.gated_memory.g2.abs_().neg_()  # gate logit below -gate_shift: gate 0


def test_supported_families_lists_every_family():
    listed = lift_kernels.supported_families()
    assert set(listed) == set(FAMILIES)
    for info in listed.values():
        assert info["features"] and info["transformers"] == TRANSFORMERS_RANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_disabled_and_closed_gate_are_exact(family):
    """With the memory disabled the logits are the original model's; with the gate shut the
    patched layers compute only attention, through the fused op (no padding) and through
    the exact path (left padding): both must equal the original model, which checks the
    projections, norms, RoPE (or none), window, soft-capping and scaling of every layer."""
    model = tiny_model(family)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    original, original_padded = logits(model, ids), logits(model, ids, attention_mask=mask)
    lift_kernels.replace_attention(model, backend=FUSED)
    randomize_memory(model)
    assert rel(logits(model, ids), original) > 1e-3  # the memory is active
    with lift_kernels.memory_disabled(model):
        assert rel(logits(model, ids), original) <= 1e-5
    lift_kernels.replace_attention(model, GatedMemoryConfig(gate_shift=100.0), backend=FUSED)
    shut_gates(model)
    assert rel(logits(model, ids), original) <= 1e-5
    keep = mask.bool()
    padded = logits(model, ids, attention_mask=mask)
    assert rel(padded[keep], original_padded[keep]) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_agrees_with_reference_and_exact_path(family):
    """Logits and every gradient of the fused backend against the reference backend; an
    unpadded row of a padded batch (exact path) against the same row alone (fused op)."""
    model = tiny_model(family)
    lift_kernels.replace_attention(model, backend="reference")
    randomize_memory(model)
    ids = tokens()

    def grads(backend):
        lift_kernels.replace_attention(model, backend=backend)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}

    ref_logits, ref_grads = grads("reference")
    got_logits, got_grads = grads(FUSED)
    assert rel(got_logits, ref_logits) <= 1e-5
    assert set(got_grads) == set(ref_grads) and any("gated_memory" in n for n in ref_grads)
    for name, g in ref_grads.items():
        assert rel(got_grads[name], g) <= 1e-4, name
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    batched = logits(model, ids, attention_mask=mask)
    assert rel(batched[1:], logits(model, ids[1:])) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family):
    model = tiny_model(family)
    lift_kernels.replace_attention(model, backend=FUSED)
    randomize_memory(model)
    ids = tokens(n=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    for m in (mask, torch.ones_like(ids)):  # padded (exact path) and not (fused op)
        with_cache = model.generate(ids, use_cache=True, attention_mask=m, **kw)
        without = model.generate(ids, use_cache=False, attention_mask=m, **kw)
        assert with_cache.shape == (2, 14)
        assert torch.equal(with_cache, without)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_reaches_only_the_memory(family):
    model = tiny_model(family)
    lift_kernels.replace_attention(model, backend=FUSED)
    lift_kernels.freeze_base_model(model)
    memory = {id(p) for p in lift_kernels.memory_parameters(model)}
    assert len(memory) == 2 * 4 + sum(m.gated_memory.b1 is not None for m in
                                      hf_patch.patched_modules(model).values()) * 3
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    for p in model.parameters():
        if id(p) in memory:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None
    for m in hf_patch.patched_modules(model).values():  # the zero-initialised w2 learns
        assert m.gated_memory.w2.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_and_restore(family, tmp_path):
    base = tiny_model(family)
    ids = tokens()
    original = logits(base, ids)
    keys = set(base.state_dict())
    trained = copy.deepcopy(base)
    lift_kernels.replace_attention(trained, GatedMemoryConfig(gate_scale=2.5), backend=FUSED)
    randomize_memory(trained)
    expected = logits(trained, ids)
    path = tmp_path / "memory.safetensors"
    lift_kernels.save_memory(trained, path)
    fresh = copy.deepcopy(base)
    lift_kernels.load_memory(fresh, path, backend=FUSED)
    assert torch.equal(logits(fresh, ids), expected)
    lift_kernels.restore_attention(fresh)
    assert set(fresh.state_dict()) == keys
    assert not any("forward" in vars(m) or hasattr(m, "gated_memory") for m in fresh.modules())
    assert torch.equal(logits(fresh, ids), original)


@pytest.mark.skipif(FUSED != "cpu", reason="lift_kernels._C is not built")
@pytest.mark.parametrize("family", WINDOWED)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_windowed_and_softcapped_layers_run_the_fused_kernels(family, implementation,
                                                              monkeypatch):
    """Fails if a sliding-window or soft-capped layer takes the exact path: the exact path
    raises, and the cpu kernels must see each layer's window and soft-capping."""
    from lift_kernels.ops import cext

    try:
        model = tiny_model(family, attn_implementation=implementation)
    except ValueError as err:  # Gemma 2 has no sdpa attention (soft-capping)
        pytest.skip(f"{family} does not run {implementation} attention ({str(err)[:60]})")
    lift_kernels.replace_attention(model, backend="cpu")
    randomize_memory(model)

    def no_exact_path(*args, **kwargs):
        raise AssertionError("the exact path was taken")

    seen = []
    forward = cext.forward

    def spy(*args, **kwargs):
        seen.append((kwargs.get("window_size", (-1, -1)), kwargs.get("softcap", 0.0)))
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf_patch, "_exact_attention", no_exact_path)
    monkeypatch.setattr(cext, "forward", spy)
    out = model(tokens(n=3 * WINDOW), labels=tokens(n=3 * WINDOW))
    out.loss.backward()
    expected = []
    for _, m in sorted(hf_patch.patched_modules(model).items()):
        adapter = m.lift_patch.adapter
        window = adapter.sliding_window(m)
        expected.append(((window - 1, -1) if window else (-1, -1), adapter.softcap(m) or 0.0))
    assert seen == expected
    assert any(w != (-1, -1) or c for w, c in expected)  # the tiny model has some


def test_partial_rotary_is_refused():
    model = tiny_model("phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
    lift_kernels.replace_attention(model, backend="torch")
    with pytest.raises(ValueError, match="partial rotary"):
        logits(model, tokens())
