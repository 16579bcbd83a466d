"""The table from ``config.model_type`` to the adapter module of that family.  Adding a
family is one adapter file plus one line here."""

from __future__ import annotations

import importlib

FAMILIES = {
    "llama": "lift_kernels.hf.llama",
    "mistral": "lift_kernels.hf.mistral",
    "qwen2": "lift_kernels.hf.qwen2",
    "qwen3": "lift_kernels.hf.qwen3",
}


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
