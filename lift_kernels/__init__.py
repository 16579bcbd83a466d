"""lift-kernels: fused gated-memory attention (the adapter of LIFT) and the LIFT pipeline."""

__version__ = "0.1.0"

import importlib
import importlib.util

from .install import build_info, warn_if_unbuilt

warn_if_unbuilt()


def available_backends(device="cpu") -> list:
    """Backends importable for tensors on `device` (a backend may still decline a case)."""
    import torch

    from . import dispatch

    problem = dispatch.Problem(1, 1, 1, 1, 1, 64, 128, 8, torch.float32, torch.float32,
                               torch.device(device), False, False, False, False, True)
    return [b for b in dispatch.BACKENDS[1:] if dispatch.unsupported_reason(b, problem) is None]


# Everything that needs torch (or transformers) loads on first use: `import lift_kernels`
# (and so `lift-kernels --help`) stays cheap, and the kernels import without transformers.
_LAZY = {"gated_memory_attention": "function", "GatedMemory": "memory",
         "GatedMemoryConfig": "memory", "BACKENDS": "dispatch"}
# The HF integration (lift_kernels.hf).
_HF_NAMES = ("replace_attention", "restore_attention", "freeze_base_model", "memory_parameters",
             "memory_disabled", "save_memory", "load_memory", "collect_gates",
             "supported_families", "memory_slots")
_LAZY.update(dict.fromkeys(_HF_NAMES, "hf"))


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lift_kernels' has no attribute {name!r}")


__all__ = ["gated_memory_attention", "GatedMemory", "GatedMemoryConfig", "BACKENDS",
           "build_info", "available_backends", "__version__", *_HF_NAMES]
