"""The table from ``config.model_type`` to the adapter module of that family.  Adding a
family is one adapter file plus one line here (and one tiny config in the shared family
test suite, tests/hf_families.py)."""

from __future__ import annotations

import importlib

from ..install import TRANSFORMERS_RANGE

FAMILIES = {
    "llama": "lift_kernels.hf.llama",
    "mistral": "lift_kernels.hf.mistral",
    "qwen2": "lift_kernels.hf.qwen2",
    "qwen3": "lift_kernels.hf.qwen3",
    "gemma": "lift_kernels.hf.gemma",
    "gemma2": "lift_kernels.hf.gemma2",
    "gemma3_text": "lift_kernels.hf.gemma3_text",
    "phi3": "lift_kernels.hf.phi3",
    "olmo2": "lift_kernels.hf.olmo2",
    "granite": "lift_kernels.hf.granite",
    "mixtral": "lift_kernels.hf.mixtral",
    "qwen2_moe": "lift_kernels.hf.qwen2_moe",
    "qwen3_moe": "lift_kernels.hf.qwen3_moe",
    "smollm3": "lift_kernels.hf.smollm3",
    "starcoder2": "lift_kernels.hf.starcoder2",
    "cohere2": "lift_kernels.hf.cohere2",
    "cohere": "lift_kernels.hf.cohere",
}

def supported_families() -> dict:
    """{model_type: {"features": what differs from Llama, "transformers": the tested range}}
    for every family replace_attention serves.  Every family passes the shared family suite
    at both ends of the range (make test: the newest, make test-compat: the lowest).
    Imports no transformers."""
    return {name: {"features": importlib.import_module(path).ADAPTER.features,
                   "transformers": TRANSFORMERS_RANGE}
            for name, path in FAMILIES.items()}


def model_type_of(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(f"model must be a Hugging Face model with a config.model_type, got "
                        f"{type(model).__name__}")
    return model_type


def adapter_for(model):
    """The Adapter for `model`'s family; ValueError naming the supported ones otherwise."""
    model_type = model_type_of(model)
    if model_type not in FAMILIES:
        raise ValueError(f"lift_kernels does not support model_type {model_type!r}; supported "
                         f"families: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(FAMILIES[model_type]).ADAPTER
