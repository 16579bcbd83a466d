"""Tiny random configs of every supported family, for the shared family test suite
(tests/test_hf_families.py): 2 layers, 4 query heads, 2 kv heads, head_dim 8, built from a
config (nothing downloaded).  Windows are shorter than the test sequences, so they matter."""

from __future__ import annotations

import torch

VOCAB = 64
WINDOW = 5  # the sliding window of the families that have one

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
LOCAL_GLOBAL = ["sliding_attention", "full_attention"]
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

# family -> (config class name in transformers, what differs from COMMON)
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW,
                                  layer_types=LOCAL_GLOBAL)),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    # eager: transformers 5.0.0 runs Gemma 2 with sdpa attention, which silently drops the
    # soft-capping that the op applies
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW, attn_logit_softcapping=1.5,
                                    query_pre_attn_scalar=12, layer_types=LOCAL_GLOBAL,
                                    attn_implementation="eager")),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=WINDOW, query_pre_attn_scalar=12,
                                             layer_types=LOCAL_GLOBAL)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", dict(attention_multiplier=0.2)),
    "mixtral": ("MixtralConfig", dict(sliding_window=WINDOW, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, shared_expert_intermediate_size=16,
                                         use_sliding_window=True, sliding_window=WINDOW,
                                         layer_types=LOCAL_GLOBAL, **MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, **MOE)),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),  # layer 1 has no RoPE
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW, use_bias=True)),
    "cohere2": ("Cohere2Config", dict(sliding_window=WINDOW, layer_types=LOCAL_GLOBAL)),
    "cohere": ("CohereConfig", dict(use_qk_norm=True)),
}
FAMILIES = tuple(CONFIGS)
# Families whose tiny model has a window or soft-capping in some layer.
WINDOWED = ("mistral", "qwen2", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe",
            "starcoder2", "cohere2")


def tiny_config(family, **extra):
    import transformers

    name, special = CONFIGS[family]
    return getattr(transformers, name)(**{**COMMON, **special, **extra})


def tiny_model(family, seed=0, **extra):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **extra))
    # transformers initialises tiny models with std 0.02: the attention would be nearly
    # uniform and a wrong mask or RoPE could hide.  Wider weights make every position count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


# Helpers the HF test files share.
def randomize_memory(model, seed=1):
    """Random memory (the default init has zero last layers, which would hide bugs in the
    memory path) with gates spread over (0, 1)."""
    import lift_kernels

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lift_kernels.memory_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def tokens(batch=2, n=13, seed=3):  # n > WINDOW: the windows matter
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits
