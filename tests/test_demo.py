"""The embedded demo: its model, tokenizer and document, and a fast run of the whole demo.

The full demo (the recall targets) is `make demo`; here the absorb runs a few steps only, so
these tests check the plumbing and the honesty rules, not the recall figures."""

import argparse
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from lift_kernels import demo
from lift_kernels.demo_model import WEIGHTS, WINDOW, build_model, build_tokenizer, text


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_shipped_weights_load_and_model_knows_the_templates(tokenizer):
    assert WEIGHTS.is_file()
    model = build_model()
    assert not model.training
    ids = tokenizer("the access code of the oslo bank is 12 34 .")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    # A pretrained model, not a random one: it knows "access" is followed by "code".
    access = ids.index(tokenizer.convert_tokens_to_ids("access"))
    assert logits[access].argmax() == tokenizer.convert_tokens_to_ids("code")
    assert tokenizer.unk_token_id not in ids


def test_build_model_rejects_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain"):
        build_model(tmp_path / "absent.safetensors")


def test_tokenizer_splits_codes_into_digit_pairs(tokenizer):
    ids = tokenizer("The access code of the Lisbon vault is 7294.")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<bos>", "the", "access", "code", "of", "the", "lisbon", "vault", "is",
                      "72", "94", "."]


def test_document_has_needles_outside_the_truncated_window(tokenizer):
    document, facts = text.document()
    ids = tokenizer(document)["input_ids"]
    assert len(ids) >= 8000 and len(facts) >= 10
    assert tokenizer.unk_token_id not in ids
    context = demo.truncated_context(ids, tokenizer, WINDOW - 16)
    assert len(context) == WINDOW - 16
    context_text = " ".join(tokenizer.convert_ids_to_tokens(context))
    for city, place, code in facts:
        sentence = text.fact_sentence(city, place, code)
        assert document.count(sentence) == 1  # each needle once, in the document
        assert f"{city} {place} is" not in context_text
        position = document.index(sentence) / len(document)
        assert 0.3 < position < 0.7  # buried in the middle
    assert len({code[:2] for _, _, code in facts}) == len(facts)


def test_pretraining_corpus_never_states_a_demo_needle():
    import random

    needles = {text.fact_sentence(*fact) for fact in text.needles()}
    rng = random.Random(0)
    excluded = frozenset(text.needles())
    for _ in range(200):
        sequence = text.pretraining_sequence(rng, 300, excluded)
        assert not any(needle in sequence for needle in needles)


def test_write_document(tmp_path):
    path = tmp_path / "doc.txt"
    assert demo.run_demo(argparse.Namespace(json=None, write_document=str(path))) == 0
    assert path.read_text() == text.document()[0]


def test_fast_demo_writes_every_key_and_trains_only_memory(tmp_path, monkeypatch):
    base = {k: v.clone() for k, v in build_model().state_dict().items()}
    seen = {}
    original = demo.absorb_document

    def spy(*args, **kwargs):
        seen["result"] = original(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(demo, "absorb_document", spy)
    out = tmp_path / "demo.json"
    args = argparse.Namespace(json=str(out), write_document=None, epochs=1)
    assert demo.run_demo(args) == 0
    result = json.loads(out.read_text())
    for key in ("recall_before", "recall_after", "recall_truncated_context", "num_needles",
                "document_tokens", "absorb_seconds", "tokens_per_second", "backend"):
        assert key in result, key
    assert result["num_needles"] == len(text.needles())
    assert result["document_tokens"] >= 8000
    assert 0.0 <= result["recall_after"] <= 1.0 and result["tokens_per_second"] > 0
    assert result["absorb_epochs"] == 1 and result["absorb_steps"] == demo.STEPS_PER_EPOCH
    assert os.path.getsize(result["gate_heatmap"]) > 0
    # Only memory and gate parameters trained; the base weights are unchanged.
    absorbed = seen["result"]
    trainable = {id(p) for p in absorbed.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in absorbed.params}
    state = absorbed.model.state_dict()
    for name, value in base.items():
        assert torch.equal(state[name], value), name


def test_recall_prompts_hold_the_needle_prompt_only(tokenizer):
    """The document is absent from every recall prompt; a needle counts only when both
    code tokens are right."""
    facts = text.needles()
    answer = tokenizer.convert_tokens_to_ids(["29", "51"])  # the first needle's code, 2951

    class Recorder(torch.nn.Module):
        inputs = []

        def forward(self, ids):
            self.inputs.append(ids[0].tolist())
            logits = torch.zeros(1, ids.shape[1], len(tokenizer))
            logits[0, -1, answer[len(self.inputs) % 2 == 0]] = 1.0
            return argparse.Namespace(logits=logits)

    model = Recorder()
    score, predicted = demo.recall(model, tokenizer, facts)
    assert facts[0][2] == "2951" and predicted == ["2951"] * len(facts)
    assert score == 1 / len(facts)
    for ids in model.inputs:
        prompt = tokenizer.convert_ids_to_tokens(ids)
        assert len(ids) <= 12 and prompt[:3] == ["<bos>", "the", "access"]


def test_absorb_trains_the_lines_the_base_finds_surprising(tokenizer):
    """The absorb's samples come from the base's own loss on the document text: a fact line
    with a code the base cannot know is kept, with the loss on its surprising tokens only;
    haystack lines are dropped; nothing about needles is passed in."""
    import random

    rng = random.Random(3)
    filler = [text.filler_sentence(rng, text.CITY_FREE_FORMS) for _ in range(20)]
    fact = text.fact_sentence("oslo", "bank", "6234")  # not the base's oslo prefix
    assert not fact.split()[-2].startswith(text.CITY_PREFIX["oslo"])
    document = "\n".join(filler[:10] + [fact] + filler[10:]) + "\n"
    samples = demo.surprising_lines(build_model(), tokenizer, document)
    kept = [tokenizer.convert_ids_to_tokens(s.input_ids.tolist()) for s in samples]
    assert ["<bos>"] + fact.replace("6234", "62 34").split() in kept
    assert len(samples) < 5  # the haystack is mostly predictable
    for sample in samples:
        labelled = sample.labels != -100
        assert labelled.any() and sample.labels[0] == -100
        assert torch.equal(sample.labels[labelled], sample.input_ids[labelled])
    needle = samples[[k[1:3] for k in kept].index(["the", "access"])]
    targets = tokenizer.convert_ids_to_tokens(needle.labels[needle.labels != -100].tolist())
    assert "62" in targets and "access" not in targets


def test_plain_samples_are_document_text_with_loss_on_every_token(tokenizer):
    document, _ = text.document()
    samples = demo.plain_samples(tokenizer, document)
    assert len(samples) == demo.PLAIN_LINES + demo.PLAIN_PASSAGES
    ids = tokenizer(document)["input_ids"]
    for sample in samples:
        assert sample.labels[0] == -100
        assert torch.equal(sample.labels[1:], sample.input_ids[1:])
        body = tokenizer.decode(sample.input_ids[1:].tolist())
        assert " ".join(body.split()) in " ".join(document.split())
    passages = samples[demo.PLAIN_LINES:]
    assert passages[0].input_ids[1:].tolist() == ids[1:1 + demo.PASSAGE_TOKENS]
    assert passages[-1].input_ids[1:].tolist() == ids[-demo.PASSAGE_TOKENS:]
