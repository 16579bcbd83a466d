"""The LIFT pipeline (lift_kernels.lift): segmentation, samples, QA validation and generation,
the trainer's step plan and rank split, absorb with both adapters, saving and loading."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from lift_kernels.lift import (DocumentError, LiftConfig, MemoryFileError, QAError, QAPair,
                               UnsupportedModelError, absorb, answer, load_memory_file,
                               load_qa, read_document, segment_document, segment_starts)
from lift_kernels.lift.data import (IGNORE, answer_ids, document_ids, head_tail_text,
                                    qa_samples, question_prompt, segment_samples)
from lift_kernels.lift.distributed import DistContext, shard_step
from lift_kernels.lift.qa import generate_qa, parse_generated
from lift_kernels.lift.trainer import sample_loss, step_groups

from lift_tiny import make_document, make_model, make_tokenizer, one_thread  # noqa: F401


# ---- segmentation ---------------------------------------------------------------------------

def test_short_document_is_one_segment():
    assert segment_document(range(10), 2048, 768) == [list(range(10))]
    assert segment_document(range(2048), 2048, 768) == [list(range(2048))]


def test_exact_multiple_gets_no_extra_segment():
    n = 2048 + 3 * 768
    segments = segment_document(range(n), 2048, 768)
    assert [len(s) for s in segments] == [2048] * 4
    assert segments[-1][-1] == n - 1


def test_last_partial_segment_is_kept_and_everything_is_covered():
    for n, length, stride in [(2049, 2048, 768), (5000, 2048, 768), (101, 10, 3), (7, 4, 4)]:
        starts = segment_starts(n, length, stride)
        segments = segment_document(range(n), length, stride)
        assert starts == list(range(0, starts[-1] + 1, stride))
        assert all(len(s) == length for s in segments[:-1])
        assert 0 < len(segments[-1]) <= length and segments[-1][-1] == n - 1
        assert starts[-1] + length >= n > starts[-2] + length if len(starts) > 1 else True
        assert sorted({t for s in segments for t in s}) == list(range(n))
    assert segment_starts(5000, 2048, 768) == [0, 768, 1536, 2304, 3072]


def test_segmentation_errors():
    with pytest.raises(DocumentError, match="no tokens"):
        segment_document([], 16, 8)
    with pytest.raises(ValueError, match="stride"):
        segment_starts(100, 8, 9)
    with pytest.raises(ValueError, match="segment_stride"):
        LiftConfig(segment_length=8, segment_stride=9)
    with pytest.raises(ValueError, match="segment_length"):
        LiftConfig(segment_length=0)
    with pytest.raises(ValueError, match="adapter"):
        LiftConfig(adapter="pissa")
    with pytest.raises(ValueError, match="nothing would be trained"):
        LiftConfig(segment_epochs=0, qa_epochs=0)
    with pytest.raises(ValueError, match="unknown LiftConfig fields"):
        LiftConfig.from_dict({"segment_lenght": 8})


def test_document_errors(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(DocumentError, match="empty"):
        document_ids(tok, "  \n ")
    with pytest.raises(DocumentError, match="does not exist"):
        read_document(tmp_path / "missing.txt")
    with pytest.raises(DocumentError, match="directory"):
        read_document(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(DocumentError, match="empty"):
        read_document(tmp_path / "blank.txt")
    (tmp_path / "binary.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(DocumentError, match="UTF-8"):
        read_document(tmp_path / "binary.txt")


def test_title_comes_first():
    tok = make_tokenizer()
    ids = document_ids(tok, "the king of the north .", title="the old tower")
    assert tok.decode(ids).startswith("the old tower the king")


# ---- samples --------------------------------------------------------------------------------

def test_segment_samples_take_the_loss_on_the_segment_only():
    tok = make_tokenizer()
    ids = document_ids(tok, make_document(120))
    cfg = LiftConfig(segment_length=32, segment_stride=16)
    plain = segment_samples(tok, ids, cfg, random.Random(0))
    assert len(plain) == len(segment_starts(len(ids), 32, 16))
    first = plain[0]
    assert first.input_ids[0] == tok.bos_token_id and first.labels[0] == IGNORE
    assert first.labels[1:].tolist() == ids[:32]

    ctx_cfg = LiftConfig(segment_length=32, segment_stride=16, contextualized=True,
                         context_tokens=24)
    contextual = segment_samples(tok, ids, ctx_cfg, random.Random(0))
    for sample, seg in zip(contextual, segment_document(ids, 32, 16)):
        labelled = sample.labels[sample.labels != IGNORE].tolist()
        assert labelled == seg
        assert sample.input_ids[-len(seg):].tolist() == seg
        assert sample.num_tokens > len(seg) + 24  # context + recite prompt before it
    assert "..." in tok.decode(contextual[0].input_ids.tolist())


def test_head_tail_context():
    tok = make_tokenizer()
    ids = document_ids(tok, make_document(200))
    text = head_tail_text(tok, ids, 20)
    head, tail = text.split("...")
    assert tok(head.strip(), add_special_tokens=False)["input_ids"] == ids[:10]
    assert tok(tail.strip(), add_special_tokens=False)["input_ids"] == ids[-10:]
    assert head_tail_text(tok, ids[:15], 20) == tok.decode(ids[:15])
    assert head_tail_text(tok, ids, 0) == ""


@pytest.mark.parametrize("chat", [False, True])
def test_qa_samples_take_the_loss_on_the_answer_only(chat):
    tok = make_tokenizer(chat=chat)
    ids = document_ids(tok, make_document(60))
    pair = QAPair("what is the code of the vault ?", "seven three nine")
    (sample,) = qa_samples(tok, ids, [pair], LiftConfig(), random.Random(0))
    prompt = question_prompt(tok, pair.question)
    target = answer_ids(tok, pair.question, pair.answer, "", prompt)
    assert sample.input_ids.tolist() == prompt + target
    assert sample.labels.tolist() == [IGNORE] * len(prompt) + target
    assert tok.decode(target, skip_special_tokens=True).strip() == pair.answer
    assert target[-1] == tok.eos_token_id


# ---- QA -------------------------------------------------------------------------------------

def test_load_qa_accepts_a_list_of_pairs(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": " Who? ", "answer": "the king", "evidence": "x"}]))
    assert load_qa(path) == [QAPair("Who?", "the king")]
    assert load_qa([{"question": "a", "answer": "b"}]) == [QAPair("a", "b")]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON.*line 1"),
    ('{"question": "a", "answer": "b"}', "must be a JSON list"),
    ("[]", "is empty"),
    ('["a question"]', "item 0 must be an object"),
    ('[{"question": "a", "answer": "b"}, {"question": "c"}]', 'item 1 has no "answer"'),
    ('[{"question": 3, "answer": "b"}]', 'item 0 "question" must be a string, got int'),
    ('[{"question": "a", "answer": "  "}]', 'item 0 "answer" is empty'),
])
def test_load_qa_errors_name_the_problem(tmp_path, content, message):
    path = tmp_path / "qa.json"
    path.write_text(content)
    with pytest.raises(QAError, match=message):
        load_qa(path)


def test_load_qa_missing_file(tmp_path):
    with pytest.raises(QAError, match="does not exist"):
        load_qa(tmp_path / "nope.json")


def test_parse_generated():
    assert parse_generated(" what is red ?\nAnswer: the tower\nQuestion: more") == \
        QAPair("what is red ?", "the tower")
    assert parse_generated("Question: who ? Answer: the king") == QAPair("who ?", "the king")
    assert parse_generated('**Question:** who ?\n**Answer:** "the king"') == \
        QAPair("who ?", "the king")
    assert parse_generated("Question: who ?\n**Answer:**\n the king\nmore") == \
        QAPair("who ?", "the king")
    assert parse_generated("no answer here") is None
    assert parse_generated("Question: who ?\nAnswer:   ") is None


def test_generated_qa_keeps_only_verbatim_answers():
    tok = make_tokenizer()
    ids = document_ids(tok, "the vault code is seven three nine . " * 20)
    cfg = LiftConfig(num_generated_qa=6, qa_window_tokens=16)
    replies = iter(["what is the code ?\nAnswer: seven three nine",   # verbatim: kept
                    "what is the code ?\nAnswer: seven three nine",   # duplicate: dropped
                    "where ?\nAnswer: the blue garden",               # invented: dropped
                    "nothing useful",                                 # unparsable: dropped
                    "what is it ?\nAnswer: the vault code",           # verbatim: kept
                    "who ?\nAnswer: nine four"])                      # not in text: dropped
    prompts = []

    def generate(prompt_ids):
        prompts.append(tok.decode(prompt_ids))
        return next(replies)

    pairs = generate_qa(tok, ids, cfg, generate, random.Random(0))
    assert pairs == [QAPair("what is the code ?", "seven three nine"),
                     QAPair("what is it ?", "the vault code")]
    assert len(prompts) == 6 and all("answer" in p and "vault code" in p for p in prompts)


# ---- the step plan and the split over ranks -------------------------------------------------

def test_step_groups_partition_each_epoch_reproducibly():
    groups = step_groups(10, "0:0:0", 3)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert [len(g) for g in groups] in ([3, 4, 3], [3, 3, 4], [4, 3, 3])
    assert groups == step_groups(10, "0:0:0", 3)
    assert groups != step_groups(10, "0:0:1", 3)
    assert [len(g) for g in step_groups(2, "s", 5)] == [1, 1]
    assert step_groups(7, "s", 1)[0] != list(range(7))  # shuffled


@pytest.mark.parametrize("n, world", [(7, 2), (3, 4), (8, 3), (1, 2)])
def test_shard_step_splits_every_sample_once(n, world):
    shards = [shard_step(n, DistContext(rank=r, world_size=world), False) for r in range(world)]
    assert sorted(i for s in shards for i in s.indices) == list(range(n))
    padded = [shard_step(n, DistContext(rank=r, world_size=world), True) for r in range(world)]
    assert len({len(s.indices) + s.padding for s in padded}) == 1


# ---- absorb ---------------------------------------------------------------------------------

def _mean_segment_loss(model, tok, document, config):
    ids = document_ids(tok, document)
    samples = segment_samples(tok, ids, config, random.Random(0))
    with torch.no_grad():
        return sum(sample_loss(model, s, "cpu").item() for s in samples) / len(samples)


FAST = dict(segment_length=32, segment_stride=16, segment_epochs=4, qa_epochs=2,
            steps_per_epoch=2, lr=0.1, backend="torch")


def test_absorb_gated_memory_lowers_the_loss_and_trains_only_memory(tmp_path):
    tok = make_tokenizer()
    document = make_document(60, seed=1)
    model = make_model(tok)
    config = LiftConfig(**FAST)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _mean_segment_loss(model, tok, document, config)
    result = absorb(model, tok, document, qa=[{"question": "what is red ?", "answer": "the tower"}],
                    config=config, progress=False)
    after = _mean_segment_loss(result.model, tok, document, config)
    assert after < before - 0.05, (before, after)
    assert result.stats.steps == 12 and len(result.qa_pairs) == 1
    named = dict(result.model.named_parameters())
    trained = {id(p) for p in result.params}
    assert {n for n, p in named.items() if p.requires_grad} == \
        {n for n, p in named.items() if id(p) in trained}
    assert all("gated_memory" in n for n, p in named.items() if id(p) in trained)
    for name, value in base.items():
        assert torch.equal(named[name], value), f"base parameter {name} changed"
    assert any(p.abs().sum() > 0 for n, p in named.items() if n.endswith("gated_memory.w2"))

    # The memory file brings the same model back on a fresh copy of the base ...
    path = tmp_path / "memory.safetensors"
    result.save(path)
    fresh, metadata = load_memory_file(make_model(tok), path, backend="torch")
    assert metadata["lift.adapter"] == "gated-memory"
    probe = torch.tensor([tok(document)["input_ids"][:40]])
    with torch.no_grad():
        assert torch.equal(fresh(probe).logits, result.model(probe).logits)
    assert isinstance(answer(fresh, tok, "what is red ?", document=document), str)
    # ... and refuses another base model of the same shape.
    with pytest.raises(MemoryFileError, match="another base model"):
        load_memory_file(make_model(tok, seed=1), path)


def test_absorb_is_reproducible_with_a_seed():
    tok = make_tokenizer()
    document = make_document(40, seed=2)
    config = LiftConfig(**{**FAST, "segment_epochs": 2, "qa_epochs": 0})
    runs = [absorb(make_model(tok), tok, document, config=config, progress=False)
            for _ in range(2)]
    for a, b in zip(runs[0].params, runs[1].params):
        assert torch.equal(a, b)


def test_absorb_lora_adapter(tmp_path):
    tok = make_tokenizer(chat=True)
    document = make_document(60, seed=1)
    model = make_model(tok)
    config = LiftConfig(**{**FAST, "adapter": "lora", "lora_rank": 4})
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _mean_segment_loss(model, tok, document, config)
    result = absorb(model, tok, document, config=config, progress=False)
    after = _mean_segment_loss(result.model, tok, document, config)
    assert after < before - 0.05, (before, after)
    named = dict(result.model.named_parameters())
    trained = [n for n, p in named.items() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    for name, value in base.items():
        peft_name = next(n for n in named if n.endswith(name.replace(".weight", ".base_layer.weight"))
                         or n.endswith(name))
        assert torch.equal(named[peft_name], value), f"base parameter {name} changed"
    path = tmp_path / "lora.safetensors"
    result.save(path)
    fresh, metadata = load_memory_file(make_model(tok), path)
    assert metadata["lift.adapter"] == "lora"
    probe = torch.tensor([tok(document)["input_ids"][:40]])
    with torch.no_grad():
        assert torch.allclose(fresh(probe).logits, result.model(probe).logits, atol=1e-6)


def test_absorb_with_self_generated_qa():
    tok = make_tokenizer()
    document = "the vault code is seven three nine . " * 8
    config = LiftConfig(**{**FAST, "segment_epochs": 1, "qa_epochs": 1, "num_generated_qa": 2,
                           "qa_window_tokens": 16})
    result = absorb(make_model(tok), tok, document, qa="generate", config=config,
                    progress=False, generate=lambda ids: "what ?\nAnswer: seven three nine")
    assert result.qa_pairs == [QAPair("what ?", "seven three nine")]


def test_gated_memory_rejects_an_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                       n_positions=64))
    with pytest.raises(UnsupportedModelError, match=r"supported families: .*\bllama\b"):
        absorb(model, tok, make_document(20), config=LiftConfig(**FAST), progress=False)


def test_absorb_rejects_bad_qa():
    tok = make_tokenizer()
    with pytest.raises(QAError, match="item 0"):
        absorb(make_model(tok), tok, make_document(20), qa=[{"question": "x"}],
               config=LiftConfig(**FAST), progress=False)


def test_gradient_checkpointing_and_contextualised_samples_train_the_same_memory():
    tok = make_tokenizer()
    document = make_document(50, seed=4)
    config = dict(FAST, segment_epochs=2, qa_epochs=1, contextualized=True, context_tokens=12)
    runs = [absorb(make_model(tok), tok, document, config=LiftConfig(**config, **extra),
                   progress=False) for extra in ({}, {"gradient_checkpointing": True})]
    assert runs[1].model.is_activation_checkpointing
    assert not runs[0].model.is_activation_checkpointing
    for a, b in zip(runs[0].params, runs[1].params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert runs[1].stats.step_losses == pytest.approx(runs[0].stats.step_losses, rel=1e-5)


# ---- token selection, the KL anchor, recipes ------------------------------------------------


def _base_surprise64(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token t | < t) in float64 from an independent float64 copy of the model."""
    import copy

    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logprobs = model64(ids[None]).logits[0, :-1].log_softmax(-1)
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      -logprobs.gather(1, ids[1:, None])[:, 0]])


def test_new_config_fields_are_validated_by_name():
    for fields, name in (({"sample_unit": "page"}, "sample_unit"),
                         ({"select_token_nats": -1.0}, "select_token_nats"),
                         ({"select_line_nats": 3.0}, "select_line_nats"),  # needs lines
                         ({"kl_weight": -0.5}, "kl_weight"), ({"kl_texts": 0}, "kl_texts"),
                         ({"plain_lines": -1}, "plain_lines"), ({"kl_source": ""}, "kl_source"),
                         ({"passage_tokens": 0}, "passage_tokens")):
        with pytest.raises(ValueError, match=name):
            LiftConfig(**fields)


def test_recipes_resolve_to_configs_and_overrides_win():
    from lift_kernels.lift import RECIPES, recipe

    assert recipe("authors") == LiftConfig()
    demo = recipe("demo", lr=0.5, memory={"gate_shift": 2.0})
    assert demo.sample_unit == "line" and demo.lr == 0.5
    assert demo.memory.gate_shift == 2.0
    assert demo.memory.mem_hidden == RECIPES["demo"]["memory"]["mem_hidden"]
    assert LiftConfig.from_dict(json.loads(demo.to_json())) == demo
    with pytest.raises(ValueError, match="unknown LIFT recipe 'fast'; known"):
        recipe("fast")


def test_line_and_plain_samples():
    from lift_kernels.lift.data import line_samples, plain_samples

    tok = make_tokenizer()
    document = "the red tower .\n\n  \nthe blue ship is north .\nwhat is it ?\n"
    config = LiftConfig(sample_unit="line", title="the king", plain_lines=2, plain_passages=2,
                        passage_tokens=3)
    lines = line_samples(tok, document, config)
    words = [tok.convert_ids_to_tokens(s.input_ids.tolist()) for s in lines]
    assert words == [["[BOS]", "the", "king"], ["[BOS]", "the", "red", "tower", "."],
                     ["[BOS]", "the", "blue", "ship", "is", "north", "."],
                     ["[BOS]", "what", "is", "it", "?"]]
    for s in lines:
        assert s.labels[0] == IGNORE and torch.equal(s.labels[1:], s.input_ids[1:])
    ids = document_ids(tok, document, config.title)
    plain = plain_samples(tok, document, ids, config)
    assert len(plain) == 4
    assert plain[0].input_ids.tolist() == lines[0].input_ids.tolist()
    assert plain[1].input_ids.tolist() == lines[2].input_ids.tolist()
    assert plain[2].input_ids[1:].tolist() == ids[:3]
    assert plain[3].input_ids[1:].tolist() == ids[-3:]


def test_select_samples_keeps_the_tokens_the_base_finds_surprising():
    from lift_kernels.lift.data import line_samples
    from lift_kernels.lift.selective import select_samples

    tok = make_tokenizer()
    model = make_model(tok, seed=3)
    document = make_document(120, seed=5).replace(" . ", " .\n")
    base = LiftConfig(sample_unit="line")
    lines = line_samples(tok, document, base)
    surprise = [_base_surprise64(model, s.input_ids) for s in lines]
    everything = torch.cat([s[1:] for s in surprise])
    token_nats = float(everything.quantile(0.8))
    line_nats = float(torch.stack([s.max() for s in surprise]).median())
    config = LiftConfig(sample_unit="line", select_line_nats=line_nats,
                        select_token_nats=token_nats)
    kept = select_samples(model, lines, config, "cpu")
    expected = []
    for s, nats in zip(lines, surprise):
        if nats.max() < line_nats:
            continue
        labels = torch.where(nats >= token_nats, s.input_ids, torch.full_like(s.input_ids, IGNORE))
        labels[0] = IGNORE
        if (labels != IGNORE).any():
            expected.append((s.input_ids, labels))
    assert 0 < len(kept) < len(lines)
    assert len(kept) == len(expected)
    for sample, (ids, labels) in zip(kept, expected):
        assert torch.equal(sample.input_ids, ids) and torch.equal(sample.labels, labels)
    assert select_samples(model, lines, base, "cpu") is lines  # no thresholds: unchanged


def test_anchor_samples_hold_the_base_distribution():
    from lift_kernels.lift.selective import anchor_samples, anchor_texts

    tok = make_tokenizer()
    model = make_model(tok, seed=1)
    config = LiftConfig(kl_weight=1.0, kl_texts=3, kl_tokens=10, seed=4)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    anchors = anchor_samples(model, tok, config, "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream untouched
    assert [a.input_ids.tolist() for a in anchors] == anchor_texts(model, tok, config, "cpu")
    assert len({tuple(a.input_ids.tolist()) for a in anchors}) == 3
    for a in anchors:
        assert a.input_ids.numel() == 10 and a.input_ids[0] == tok.bos_token_id
        assert (a.labels == IGNORE).all() and a.kind == "anchor"
        import copy

        with torch.no_grad():
            want = copy.deepcopy(model).double()(a.input_ids[None]).logits[0, :-1]
        torch.testing.assert_close(a.teacher.double(), want.log_softmax(-1), rtol=0, atol=1e-5)
    assert anchor_samples(model, tok, LiftConfig(), "cpu") == []


def test_anchor_texts_from_a_file(tmp_path):
    from lift_kernels.lift.selective import anchor_texts

    tok = make_tokenizer()
    text = make_document(200, seed=9)
    (tmp_path / "plain.txt").write_text(text)
    config = LiftConfig(kl_weight=1.0, kl_texts=4, kl_tokens=9,
                        kl_source=str(tmp_path / "plain.txt"))
    texts = anchor_texts(make_model(tok), tok, config, "cpu")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert texts[0] == [tok.bos_token_id] + ids[:8]
    assert texts[-1] == [tok.bos_token_id] + ids[-8:]
    assert len(texts) == 4 and all(len(t) == 9 for t in texts)
    with pytest.raises(DocumentError, match="does not exist"):
        anchor_texts(make_model(tok), tok, LiftConfig(kl_weight=1.0, kl_source=str(tmp_path / "x")),
                     "cpu")


def test_anchor_loss_is_the_kl_from_the_base_and_steps_weight_it():
    import lift_kernels
    from lift_kernels.lift.data import Sample
    from lift_kernels.lift.selective import anchor_samples
    from lift_kernels.lift.trainer import sample_weights

    tok = make_tokenizer()
    model = make_model(tok)
    config = LiftConfig(kl_weight=1.0, kl_texts=2, kl_tokens=12, backend="torch")
    anchor = anchor_samples(model, tok, config, "cpu")[0]
    with torch.no_grad():
        assert float(sample_loss(model, anchor, "cpu")) == pytest.approx(0.0, abs=1e-6)
    lift_kernels.replace_attention(model, backend="torch")
    with torch.no_grad():  # a memory that moves the model well away from the base
        for p in lift_kernels.memory_parameters(model):
            p.normal_(0.0, 3.0)
        logp = model(anchor.input_ids[None]).logits[0, :-1].double().log_softmax(-1)
        base = anchor.teacher.double()
        want = (base.exp() * (base - logp)).sum(-1).mean()
        got = sample_loss(model, anchor, "cpu")
    assert float(want) > 1e-2
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    plain = Sample(anchor.input_ids, anchor.input_ids, "line")
    samples = [plain, anchor, plain, anchor, plain]
    assert sample_weights(samples, [0, 1, 2, 3, 4], 0.5) == pytest.approx(
        [1 / 3, 0.25, 1 / 3, 0.25, 1 / 3])
    assert sample_weights(samples, [0, 2], 0.5) == pytest.approx([0.5, 0.5])


def test_absorb_with_selection_and_kl_anchor_keeps_the_base_closer():
    from lift_kernels.lift.trainer import sample_loss as loss_of

    tok = make_tokenizer()
    document = make_document(150, seed=6).replace(" . ", " .\n")
    common = dict(sample_unit="line", select_token_nats=3.0, plain_lines=3, plain_passages=1,
                  passage_tokens=16, segment_epochs=20, qa_epochs=0, lr=0.3, backend="torch",
                  kl_texts=4, kl_tokens=16, memory={"gate_shift": 0.0})
    runs = {w: absorb(make_model(tok), tok, document, config=LiftConfig(**common, kl_weight=w),
                      progress=False) for w in (0.0, 30.0)}
    assert runs[0.0].num_anchors == 0 and runs[30.0].num_anchors == 4
    assert runs[0.0].num_segments == runs[30.0].num_segments > 4
    assert runs[0.0].labelled_tokens == runs[30.0].labelled_tokens
    assert runs[30.0].stats.steps == 20
    from lift_kernels.lift.selective import anchor_samples

    anchors = anchor_samples(make_model(tok), tok, LiftConfig(**common, kl_weight=1.0), "cpu")
    with torch.no_grad():
        kl = {w: sum(float(loss_of(r.model, a, "cpu")) for a in anchors)
              for w, r in runs.items()}
    assert kl[30.0] < 0.3 * kl[0.0], kl  # measured: 0.006 vs 0.054


def test_absorb_warns_when_its_samples_exceed_the_model_window():
    tok = make_tokenizer()
    model = make_model(tok)
    model.config.max_position_embeddings = 24  # FAST's 32-token segments do not fit
    # <bos> + 32 segment tokens = 33 positions
    with pytest.warns(RuntimeWarning, match="up to 33 tokens exceed the model's window of 24"):
        absorb(model, tok, make_document(60), config=LiftConfig(**FAST), progress=False)
    model = make_model(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        absorb(model, tok, make_document(60), config=LiftConfig(**FAST), progress=False)
