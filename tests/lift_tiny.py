"""A tiny Llama checkpoint and a word-level tokenizer, built offline in a few hundred ms, for
the pipeline, CLI and distributed tests (nothing is downloaded)."""

from __future__ import annotations

import random

import pytest

import torch

WORDS = ("the a of and to in is was it that on for with as by at from his her they this "
         "city vault code river king queen north south east west old new red blue green "
         "gold silver stone tower bridge garden ship storm winter summer night morning "
         "seven three nine four eight one two five six zero what which who where is are "
         "question answer user assistant").split()


def make_tokenizer(chat: bool = False):
    """A whitespace word-level PreTrainedTokenizerFast over WORDS (+ punctuation), with BOS,
    EOS, PAD and UNK; `chat` adds a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) +
                                        [".", ",", ":", "?", "...", "Question", "Answer"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                  bos_token="[BOS]", eos_token="[EOS]")
    if chat:
        tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
                             "{% if m['role'] == 'assistant' %} [EOS] {% else %} . {% endif %}"
                             "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    return tok


def make_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A randomly initialised Llama (4 query heads, 2 kv heads, head_dim 8) for `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def make_document(num_words: int, seed: int = 0) -> str:
    """Random sentences of WORDS, `num_words` words in all."""
    rng = random.Random(seed)
    content = [w for w in WORDS if w not in ("question", "answer")]
    words, out = 0, []
    while words < num_words:
        n = min(rng.randint(5, 12), num_words - words)
        out.append(" ".join(rng.choice(content) for _ in range(n)) + " .")
        words += n
    return " ".join(out)


def save_checkpoint(path, seed: int = 0, chat: bool = False):
    """save_pretrained a tiny model and its tokenizer into `path`; returns (model, tok)."""
    tok = make_tokenizer(chat)
    model = make_model(tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound; a second thread only contends on a shared machine.
    Test modules that import this fixture run each test on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

