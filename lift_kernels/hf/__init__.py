"""Hugging Face integration: give a causal LM's attention layers a Gated Memory backed by
the lift_kernels op, instance by instance (no class is patched), and undo it.

    model = replace_attention(model)          # supported_families() lists the families
    freeze_base_model(model)                  # only memory/gate parameters train
    save_memory(model, "doc.safetensors"); load_memory(model, "doc.safetensors")
    with memory_disabled(model): ...          # exactly the original attention
    replace_attention(model, num_memories=K)  # K memory slots per layer
    with memory_slots(model, index): ...      # batch row b uses slot index[b]
    collect_gates(model)                      # {layer: gate [B, N, Hq]} of the last forward
    restore_attention(model)                  # undo

transformers is imported only when a model is patched; ``import lift_kernels`` imports
neither it nor this package (the names above are loaded lazily).
"""

from .families import FAMILIES, supported_families
from .io import load_memory, save_memory
from .patch import (
    collect_gates,
    freeze_base_model,
    memory_disabled,
    memory_parameters,
    memory_slots,
    replace_attention,
    restore_attention,
)

__all__ = ["replace_attention", "restore_attention", "freeze_base_model", "memory_parameters",
           "memory_disabled", "memory_slots", "save_memory", "load_memory", "collect_gates",
           "FAMILIES", "supported_families"]
