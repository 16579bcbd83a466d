"""lift-kernels: fused gated-memory attention (the adapter of LIFT) and the LIFT pipeline."""

__version__ = "0.1.0"

from .function import gated_memory_attention
from .memory import GatedMemory, GatedMemoryConfig
from .dispatch import BACKENDS
from .install import build_info, warn_if_unbuilt

warn_if_unbuilt()


def available_backends(device="cpu") -> list:
    """Backends importable for tensors on `device` (a backend may still decline a case)."""
    import torch

    from . import dispatch

    problem = dispatch.Problem(1, 1, 1, 1, 1, 64, 128, 8, torch.float32, torch.float32,
                               torch.device(device), False, False, False, False, True)
    return [b for b in BACKENDS[1:] if dispatch.unsupported_reason(b, problem) is None]


# The HF integration (lift_kernels.hf), loaded on first use so that the kernels import
# without transformers.
_HF_NAMES = ("replace_attention", "restore_attention", "freeze_base_model", "memory_parameters",
             "memory_disabled", "save_memory", "load_memory", "collect_gates",
             "supported_families", "memory_slots")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'lift_kernels' has no attribute {name!r}")


__all__ = ["gated_memory_attention", "GatedMemory", "GatedMemoryConfig", "BACKENDS",
           "build_info", "available_backends", "__version__", *_HF_NAMES]
