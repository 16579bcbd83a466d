"""lift.absorb_many and lift.answer_many: many documents, one memory slot each, trained and
asked in shared packed calls, each memory what its document alone would give."""

from __future__ import annotations

import pytest
import torch

from lift_kernels.lift import (LiftConfig, absorb, absorb_many, answer, answer_many,
                               load_memory_file, recipe)
from lift_kernels.lift.adapters import load_slots

from lift_tiny import make_document, make_model, make_tokenizer, one_thread  # noqa: F401


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_each_memory_is_its_own_absorb(make_base, tok, documents, configs, qa, **kwargs):
    """absorb_many's slot d against absorb() of document d alone on a fresh base: the
    trained parameters (norm-relative <= 1e-4), the step losses, steps and tokens."""
    many = absorb_many(make_base(), tok, documents, config=configs, qa=qa, progress=False,
                       **kwargs)
    assert len(many) == len(documents)
    for d, document in enumerate(documents):
        alone = absorb(make_base(), tok, document, config=configs[d], qa=qa[d], progress=False)
        ours = many[d]
        assert ours.slot == d and ours.stats.steps == alone.stats.steps
        assert ours.stats.tokens == alone.stats.tokens
        assert ours.num_segments == alone.num_segments
        assert ours.labelled_tokens == alone.labelled_tokens
        assert ours.num_anchors == alone.num_anchors
        # abs: a step of anchors alone has a KL near 0 (differences of close log-probs).
        assert ours.stats.step_losses == pytest.approx(alone.stats.step_losses, rel=1e-5,
                                                       abs=1e-6)
        trained = rel(flat(ours.params), flat(alone.params))
        assert trained <= 1e-4, (d, trained)
        # The parameters moved well beyond that difference.
        initial = absorb(make_base(), tok, document, progress=False, config=LiftConfig(
            **{**configs[d].to_dict(), "segment_epochs": 1, "qa_epochs": 0, "lr": 1e-12}))
        assert rel(flat(alone.params), flat(initial.params)) > 1e-2
    assert many.stats.steps == max(r.stats.steps for r in many)
    assert many.stats.tokens == sum(r.stats.tokens for r in many) > 0
    return many


def test_segments_with_token_selection_kl_anchor_and_qa():
    """Three documents of different lengths (1, 4 and 9 segments), their own seeds,
    schedules (10, 8 and 12 optimiser steps) and clip limits, token selection, the KL
    anchor, QA pairs for one of them, and steps split over several packed calls
    (batch_tokens)."""
    tok = make_tokenizer()
    documents = [make_document(n, seed=s) for n, s in ((20, 1), (70, 2), (150, 3))]
    base = dict(segment_length=32, segment_stride=16, lr=0.05, backend="torch",
                select_token_nats=3.0, kl_weight=0.5, kl_texts=3, kl_tokens=12,
                steps_per_epoch=2)
    # Clip limits below the gradients' norms (about 1e-3 here): clipping acts, per document.
    configs = [LiftConfig(**base, seed=0, segment_epochs=3, qa_epochs=2, max_grad_norm=4e-4),
               LiftConfig(**base, seed=5, segment_epochs=2, qa_epochs=2, max_grad_norm=1e-3),
               LiftConfig(**base, seed=1, segment_epochs=4, qa_epochs=2, weight_decay=0.1,
                          max_grad_norm=6e-4)]
    qa = [None, [{"question": "what is red ?", "answer": "the old tower"}], None]
    many = assert_each_memory_is_its_own_absorb(lambda: make_model(tok), tok, documents,
                                                configs, qa, batch_tokens=96)
    assert [r.stats.steps for r in many] == [10, 8, 12]


def test_the_demo_recipe_on_the_demo_model():
    """The demo recipe (lines selected by the base's surprise, loss on surprising tokens, KL
    anchor on texts the base sampled) on three generated documents of the demo's kind.

    Three steps, not the recipe's 400: at its lr of 3e-2 AdamW amplifies float rounding
    step after step (here about 4x a step: 2e-5 after 3 steps, 8e-5 after 4, measured), so
    that absorbing one document alone on two exact backends (`torch` and `reference`)
    already differs by 1e-4 after 6 steps and 1e-3 after 12; before that, rounding is all
    there is to compare."""
    from lift_kernels.demo_model import load_demo_model, text

    _, tok = load_demo_model()
    documents = [text.other_document(seed, num_needles=n, filler_sentences=f)[0]
                 for seed, n, f in ((1, 2, 12), (2, 3, 30), (3, 4, 50))]
    config = recipe("demo", segment_epochs=3, kl_texts=3, kl_tokens=24)
    many = assert_each_memory_is_its_own_absorb(lambda: load_demo_model()[0], tok, documents,
                                                [config] * 3, [None] * 3)
    assert all(r.num_anchors == 3 and r.labelled_tokens > 0 for r in many)


def test_saved_files_are_single_memories_that_answer_alike(tmp_path):
    """ManyResult.save writes one ordinary memory file per document; loaded into a fresh
    base (one at a time, or all as slots) they give the slot's logits, and answer_many
    gives every question the answer its memory alone gives."""
    tok = make_tokenizer()
    documents = [make_document(n, seed=s) for n, s in ((30, 4), (60, 5), (45, 6))]
    config = LiftConfig(segment_length=32, segment_stride=16, segment_epochs=3, qa_epochs=0,
                        lr=0.3, backend="torch", max_new_tokens=5)
    many = absorb_many(make_model(tok), tok, documents, config=config, progress=False)
    paths = many.save(tmp_path, ["a", "b", "c"])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.safetensors", "b.safetensors",
                                                    "c.safetensors"]
    ids = torch.tensor([tok("the king of the old city", add_special_tokens=True)["input_ids"]])
    import lift_kernels

    questions = ["what is red ?", "who is the king ?", "where is the river ?", "what ?",
                 "the old city ?"]
    slots = [2, 0, 1, 2, 0]
    alone = []
    for d, path in enumerate(paths):
        fresh, _ = load_memory_file(make_model(tok), path)
        with lift_kernels.memory_slots(many.model, [d]), torch.no_grad():
            expected = many.model(ids).logits
        assert rel(fresh(ids).logits.detach(), expected) <= 1e-5
        alone.append(fresh)
    singles = [answer(alone[s], tok, q, config=config) for q, s in zip(questions, slots)]
    slotted, metadata = load_slots(make_model(tok), paths)
    assert len(metadata) == 3
    assert answer_many(slotted, tok, questions, slots, config, batch_size=3) == singles
    assert answer_many(many.model, tok, questions, slots, config, batch_size=5) == singles


def test_bad_input_is_named():
    tok = make_tokenizer()
    model = make_model(tok)
    doc = make_document(20)
    fast = LiftConfig(segment_length=32, segment_stride=16, segment_epochs=1, qa_epochs=0)
    cases = [
        (dict(documents="one document"), TypeError, "documents must be a non-empty list"),
        (dict(documents=[]), TypeError, "documents must be a non-empty list"),
        (dict(documents=[doc, 3]), TypeError, r"documents\[1\] must be a str"),
        (dict(config=[fast]), ValueError, "a list of 2 LiftConfig"),
        (dict(config=[fast, LiftConfig(**{**fast.to_dict(), "memory": {"mem_hidden": 8}})]),
         ValueError, "share LiftConfig.memory"),
        (dict(config=LiftConfig(**{**fast.to_dict(), "adapter": "lora"})), ValueError,
         "one document at a time"),
        (dict(qa=[None]), ValueError, "a list of 2 entries"),
        (dict(qa="qa.json"), ValueError, "'generate' or a list"),
        (dict(qa=[None, {"question": "q", "answer": "a"}]), ValueError, r"qa\[1\] must be"),
        (dict(batch_tokens=0), ValueError, "batch_tokens must be a positive int"),
    ]
    for overrides, error, message in cases:
        kwargs = {"documents": [doc, doc], "config": fast, **overrides}
        with pytest.raises(error, match=message):
            absorb_many(model, tok, kwargs.pop("documents"), progress=False, **kwargs)
    import lift_kernels

    lift_kernels.replace_attention(model)
    with pytest.raises(ValueError, match="already has a gated memory"):
        absorb_many(model, tok, [doc], config=fast, progress=False)
    with pytest.raises(ValueError, match="one slot per question"):
        answer_many(model, tok, ["q ?", "r ?"], [0], fast)
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        answer_many(model, tok, ["q ?", " "], [0, 0], fast)
