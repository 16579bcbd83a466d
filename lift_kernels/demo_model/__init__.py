"""The embedded demo's tiny Llama: its config, its word-level tokenizer (made in code) and the
pretrained weights shipped beside this file (``weights.safetensors``, made by
``python -m lift_kernels.demo_model.pretrain``)."""

from __future__ import annotations

from pathlib import Path

from . import text

WEIGHTS = Path(__file__).with_name("weights.safetensors")

# The model window: pretraining sequences, absorb segments and the truncated context all fit.
WINDOW = 256


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast over a `tokenizers` WordLevel model: lower-cased
    words and punctuation are tokens, numbers split into digit pairs ("7294" -> "72", "94"),
    and every encoding starts with <bos>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(text.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\.\.\.|[.,]"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=1 << 30)


def build_config():
    """LlamaConfig of the demo model: 3 layers, width 64, 4 heads of 16, tied embeddings."""
    from transformers import LlamaConfig

    vocab_size = len(text.vocabulary())
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        max_position_embeddings=WINDOW, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, attention_bias=False)


def build_model(weights: str | Path | None = WEIGHTS):
    """The demo LlamaForCausalLM in float32, eval mode, with the shipped weights (``None``:
    freshly initialised, for pretraining)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    config = build_config()
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(torch.float32)
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"demo model weights not found at {weights}; recreate them with "
                "`python -m lift_kernels.demo_model.pretrain`")
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
        if missing:
            raise ValueError(f"{weights} lacks {sorted(missing)[:3]}...: not the demo model")
    return model.eval()


def load_demo_model():
    """(model, tokenizer): what ``--model demo`` means everywhere a model path is taken."""
    return build_model(), build_tokenizer()
