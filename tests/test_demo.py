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


def test_write_qa_and_unrelated(tmp_path):
    args = argparse.Namespace(json=None, write_document=None, write_qa=str(tmp_path / "qa.json"),
                              write_unrelated=str(tmp_path / "u.txt"))
    assert demo.run_demo(args) == 0
    pairs = json.loads((tmp_path / "qa.json").read_text())
    assert pairs == [{"question": text.fact_prompt(c, p), "answer": code}
                     for c, p, code in text.needles()]
    lines = (tmp_path / "u.txt").read_text().splitlines()
    assert lines == demo.unrelated_text() and len(lines) == demo.UNRELATED_SENTENCES
    # Every filler form, including those that name a city (the document's filler never does).
    assert any(set(line.split()) & set(text.CITIES) for line in lines)


def test_other_documents_differ_and_spread_their_needles(tokenizer):
    for seed in (1, 2):
        document, facts = text.other_document(seed)
        assert tokenizer.unk_token_id not in tokenizer(document)["input_ids"]
        lines = document.splitlines()
        where = [lines.index(text.fact_sentence(*fact)) / len(lines) for fact in facts]
        assert max(where) - min(where) > 0.6  # spread, not buried in the middle fifth
        assert not {c for c, _, _ in facts} & {c for c, _ in text.NEEDLE_KEYS}
        assert any(c in line.split() for line in lines for c in text.CITIES[:120]
                   if not line.startswith("the access"))  # filler that names cities
    assert text.other_document(1) == text.other_document(1)
    assert text.other_document(1)[0] != text.other_document(2)[0]


@pytest.mark.parametrize("other", [None, 1, 2, 3])
def test_demo_recipe_selects_the_needle_lines(tokenizer, other):
    """The base's own surprise picks every needle line (and few others) of the built-in
    document and of other documents of its kind, with the recipe's thresholds unchanged;
    the selected tokens of a needle are its code."""
    from lift_kernels.lift import recipe
    from lift_kernels.lift.data import line_samples
    from lift_kernels.lift.selective import select_samples

    document, facts = text.document() if other is None else text.other_document(other)
    config = recipe("demo")
    kept = select_samples(build_model(), line_samples(tokenizer, document, config), config, "cpu")
    kept_lines = {tokenizer.decode(s.input_ids[1:].tolist()) for s in kept}
    for city, place, code in facts:
        sentence = text.fact_sentence(city, place, code[:2] + " " + code[2:])
        assert sentence in kept_lines, sentence
    assert len(kept) <= len(facts) + 3
    for s in kept:
        tokens = tokenizer.convert_ids_to_tokens(s.input_ids.tolist())
        targets = tokenizer.convert_ids_to_tokens(s.labels[s.labels != -100].tolist())
        if "access" in tokens:  # a needle: the loss is on its code, not on the template
            assert tokens[-3] in targets and len(targets) <= 4, targets
            assert not {"access", "code", "of", "is"} & set(targets), targets


def test_fast_demo_writes_every_key_and_trains_only_memory(tmp_path, monkeypatch):
    import lift_kernels.lift as lift

    base = {k: v.clone() for k, v in build_model().state_dict().items()}
    seen = {}
    original = lift.absorb

    def spy(*args, **kwargs):
        seen["result"] = original(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(lift, "absorb", spy)
    out = tmp_path / "demo.json"
    args = argparse.Namespace(json=str(out), write_document=None, epochs=2)
    assert demo.run_demo(args) == 0
    result = json.loads(out.read_text())
    for key in ("recall_before", "recall_after", "recall_truncated_context", "num_needles",
                "document_tokens", "absorb_seconds", "tokens_per_second", "backend",
                "unrelated_loss_before", "unrelated_loss_after", "gate_needle_mean",
                "gate_unrelated_mean"):
        assert key in result, key
    assert result["num_needles"] == len(text.needles())
    assert result["document_tokens"] >= 8000
    assert 0.0 <= result["recall_after"] <= 1.0 and result["tokens_per_second"] > 0
    assert result["absorb_epochs"] == 2 and result["absorb_steps"] == 2
    assert os.path.getsize(result["gate_heatmap"]) > 0
    from lift_kernels.lift import LiftConfig, recipe

    assert LiftConfig.from_dict(result["recipe"]) == recipe(
        "demo", segment_epochs=2, backend=result["backend"])
    # Only memory and gate parameters trained; the base weights are unchanged.
    absorbed = seen["result"]
    assert absorbed.config == LiftConfig.from_dict(result["recipe"])
    trainable = {id(p) for p in absorbed.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in absorbed.params}
    state = absorbed.model.state_dict()
    for name, value in base.items():
        assert torch.equal(state[name], value), name
    assert len(result["gate_needle"]) == 3 and len(result["gate_needle"][0]) == 4

    # The command line reproduces the demo on its written document: `absorb --recipe demo`
    # trains the same memory, and `eval` reports the same figures.
    for name, path in (("write_document", "doc.txt"), ("write_qa", "qa.json"),
                       ("write_unrelated", "u.txt")):
        assert demo.run_demo(argparse.Namespace(json=None, **{name: str(tmp_path / path)})) == 0
    memory = tmp_path / "demo.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs: the same float reductions, the same bits
    try:
        _reproduce_with_the_command_line(tmp_path, memory, result, absorbed)
    finally:
        torch.set_num_threads(threads)


def _reproduce_with_the_command_line(tmp_path, memory, result, absorbed):
    import contextlib
    import io

    import lift_kernels
    import lift_kernels.lift as lift
    from lift_kernels.cli import main

    assert main(["absorb", "--model", "demo", "--document", str(tmp_path / "doc.txt"),
                 "--recipe", "demo", "--epochs", "2", "--backend", result["backend"],
                 "--out", str(memory), "--quiet"]) == 0
    fresh, _ = lift.load_memory_file(build_model(), memory)
    for a, b in zip(lift_kernels.memory_parameters(fresh), absorbed.params, strict=True):
        assert torch.equal(a, b)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["eval", "--model", "demo", "--memory", str(memory), "--qa",
                     str(tmp_path / "qa.json"), "--unrelated", str(tmp_path / "u.txt"),
                     "--prompt", "raw", "--json"]) == 0
    report = json.loads(buffer.getvalue())
    assert report["recall"] == result["recall_after"]
    for mine, theirs in (("unrelated_loss_base", "unrelated_loss_before"),
                         ("unrelated_loss_memory", "unrelated_loss_after"),
                         ("gate_answer_mean", "gate_needle_mean"),
                         ("gate_unrelated_mean", "gate_unrelated_mean")):
        assert report[mine] == pytest.approx(result[theirs], rel=1e-6), mine


def test_evaluate_recall_loss_and_gates(tokenizer):
    """lift.evaluate on the demo model: exact and contains matches, the unrelated-text loss
    with the memory bypassed is the base's own, and the answer gates are read at the
    positions that predict the answer."""
    import lift_kernels
    from lift_kernels.lift import evaluate

    base = build_model()
    pairs = [{"question": "the access", "answer": "code"},     # the base knows this one
             {"question": "the access", "answer": "river"}]
    score, rows = evaluate.recall(base, tokenizer, evaluate.as_pairs(pairs), prompt="raw")
    assert score == 0.5 and [r["correct"] for r in rows] == [True, False]
    score, _ = evaluate.recall(base, tokenizer, evaluate.as_pairs(pairs[:1]), prompt="raw",
                               match="contains", max_new_tokens=4)
    assert score == 1.0
    with pytest.raises(ValueError, match="match must be one of"):
        evaluate.recall(base, tokenizer, evaluate.as_pairs(pairs), match="fuzzy")
    lines = demo.unrelated_text()[:4]
    loss_base = evaluate.text_loss(base, tokenizer, lines, WINDOW)

    model = lift_kernels.replace_attention(build_model(), backend="torch")
    with torch.no_grad():
        for p in lift_kernels.memory_parameters(model):
            p.normal_(0.0, 0.3)
    report = evaluate.evaluate(model, tokenizer, pairs, lines, prompt="raw")
    assert report.unrelated_loss_base == pytest.approx(loss_base, abs=1e-6)
    assert abs(report.unrelated_loss_memory - loss_base) > 1e-3
    ids = tokenizer("the access code")["input_ids"]  # prompt + answer, teacher-forced
    with torch.no_grad():
        model(torch.tensor([ids]))
    gates = torch.stack([g[0] for _, g in sorted(lift_kernels.collect_gates(model).items())])
    # Both pairs are predicted from one position ("access"), which never sees the answer.
    want = gates[:, len(ids) - 2]
    torch.testing.assert_close(torch.tensor(report.gate_answer), want, rtol=1e-5, atol=1e-6)
    assert report.to_dict()["gate_unrelated_per_layer"] is not None
    assert len(report.gate_unrelated) == 3 and len(report.gate_unrelated[0]) == 4
