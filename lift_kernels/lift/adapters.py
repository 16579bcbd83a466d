"""The two adapters a document can be absorbed into, behind one interface: attach (make the
adapter's parameters the only trainable ones), save and load (one safetensors file whose
metadata says which adapter, with which settings, for which base model).

- "gated-memory": this package's Gated Memory through lift_kernels.replace_attention.
- "lora": PEFT's LoRA (the authors' later variant), for comparison on the same document.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..install import require_extra
from ..memory import GatedMemoryConfig
from .config import LiftConfig
from .errors import MemoryFileError, UnsupportedModelError

# The HF integration's file format (lift_kernels/hf/io.py); LoRA files share it, and the
# pipeline's own keys carry a "lift." prefix.
FORMAT, FORMAT_VERSION = "lift-kernels-memory", "1"


def model_fingerprint(model) -> str:
    """A short hash of the base model: its architecture numbers and the first 4096 values of
    its input embedding rounded to bfloat16 (so the same checkpoint loaded in float32 or
    bfloat16 gets the same fingerprint).  Call it before attaching an adapter or sharding."""
    config = model.config
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    arch = {k: getattr(config, k, None) for k in keys}
    weight = model.get_input_embeddings().weight.detach().reshape(-1)[:4096]
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    digest.update(weight.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _hf():
    import lift_kernels
    import lift_kernels.hf  # noqa: F401  (FAMILIES)

    needed = ("replace_attention", "freeze_base_model", "memory_parameters", "save_memory",
              "load_memory")
    missing = [n for n in needed if not hasattr(lift_kernels, n)]
    if missing:
        raise ImportError(f"lift_kernels lacks the HF integration ({', '.join(missing)}); "
                          "the gated-memory adapter needs it")
    return lift_kernels


def attach(model, config: LiftConfig):
    """Attach config.adapter to `model`, freeze everything else, and return
    (model, trained parameters); the trained parameters are made float32 (AdamW state and
    small updates need it; the gated-memory op and PEFT both accept float32 weights beside a
    16-bit base).  Seed torch before calling: the adapter's initialisation draws from it."""
    if config.adapter == "gated-memory":
        hf = _gated_memory_family(model)
        model = hf.replace_attention(model, config=config.memory, backend=config.backend)
        hf.freeze_base_model(model)
        params = list(hf.memory_parameters(model))
    else:
        require_extra("lora", "the LoRA adapter (adapter='lora')")
        from peft import get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, _lora_config(config.lora_rank, config.lora_alpha,
                                                   config.lora_targets))
        params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.data = p.data.float()
    return model, params


def _gated_memory_family(model):
    """lift_kernels (its HF integration) when `model`'s family takes Gated Memory, else
    UnsupportedModelError naming the families that do."""
    hf = _hf()
    model_type = _model_type(model)
    if model_type not in hf.hf.FAMILIES:
        raise UnsupportedModelError(
            f"the gated-memory adapter does not support model_type {model_type!r}; "
            f"supported families: {', '.join(sorted(hf.hf.FAMILIES))} (--adapter lora "
            "works with any model PEFT supports)")
    return hf


def slot_view(param: torch.Tensor, slot: int, num_slots: int) -> torch.Tensor:
    """Memory slot `slot` of a gated-memory parameter (a view sharing its storage, without
    autograd history): the tensor itself when the memory has one slot (no slot dim)."""
    return param.detach() if num_slots == 1 else param.detach()[slot]


def attach_slots(model, configs: list[LiftConfig]):
    """Gated Memory with one slot per config (num_memories=len(configs)): slot d starts
    exactly where attach(model, configs[d]) after torch.manual_seed(configs[d].seed) starts,
    so that training it reproduces absorbing that document alone.  The configs must agree on
    the memory layout (memory, backend).  Freezes the base; returns (model, parameters with
    a leading slot dimension, or plain ones for a single config)."""
    hf = _gated_memory_family(model)
    if hf.hf.patch.patched_modules(model):
        raise ValueError("the model already has a gated memory: give a base model (a fresh "
                         "copy) to train one memory per document")
    memory, backend = configs[0].memory, configs[0].backend
    initial = []
    for config in configs:  # each slot drawn as a single memory from its own seed
        torch.manual_seed(config.seed)
        hf.replace_attention(model, config=memory, backend=backend)
        initial.append([p.detach().clone() for p in hf.memory_parameters(model)])
        hf.restore_attention(model)
    hf.replace_attention(model, config=memory, backend=backend, num_memories=len(configs))
    hf.freeze_base_model(model)
    params = list(hf.memory_parameters(model))
    with torch.no_grad():
        for slot, tensors in enumerate(initial):
            for p, t in zip(params, tensors):
                slot_view(p, slot, len(configs)).copy_(t)
    return model, params


def load_slots(model, paths, backend: str = "auto"):
    """Gated-memory files (each written for one document) into memory slots 0..K-1 of the
    base `model`, in the order of `paths`; returns (model, [metadata of each file]).
    MemoryFileError when a file is not a gated-memory file, was made for another base
    model, or its memory layout differs from the first file's."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("load_slots needs at least one memory file")
    metadata = [read_metadata(p) for p in paths]
    fingerprint = model_fingerprint(model)
    for path, meta in zip(paths, metadata):
        if meta["lift.adapter"] != "gated-memory":
            raise MemoryFileError(f"memory file {path!r} holds a {meta['lift.adapter']!r} "
                                  "adapter; memory slots take gated-memory files only")
        if meta.get("lift.base_fingerprint", fingerprint) != fingerprint:
            raise MemoryFileError(f"memory file {path!r} was made for another base model "
                                  f"(fingerprint {meta['lift.base_fingerprint']}, this model "
                                  f"{fingerprint})")
        if meta.get("num_memories", "1") != "1":
            raise MemoryFileError(f"memory file {path!r} holds {meta['num_memories']} "
                                  "memories; slots take single-memory files")
        for key in ("config", "layers"):
            if meta.get(key) != metadata[0].get(key):
                raise MemoryFileError(f"memory files {paths[0]!r} and {path!r} have different "
                                      f"memory {key} ({metadata[0].get(key)} vs "
                                      f"{meta.get(key)}); slots share one layout")
    hf = _gated_memory_family(model)
    try:
        config = GatedMemoryConfig(**json.loads(metadata[0]["config"]))
        layers = json.loads(metadata[0]["layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise MemoryFileError(f"memory file {paths[0]!r} has a malformed header: {e}") from None
    hf.replace_attention(model, config=config, backend=backend, layers=layers,
                         num_memories=len(paths))
    for slot, path in enumerate(paths):
        try:
            hf.load_memory(model, path, slot=slot)
        except (ValueError, RuntimeError) as e:  # names/shapes that do not fit
            hf.restore_attention(model)
            raise MemoryFileError(f"memory file {path!r} does not fit this model: {e}") from e
    model.eval()
    return model, metadata


def _lora_config(rank: int, alpha: int, targets):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def adapter_metadata(config: LiftConfig, fingerprint: str, model_type: str) -> dict:
    """The metadata every memory file carries (safetensors metadata is str -> str)."""
    if config.adapter == "gated-memory":
        settings = config.memory.to_dict()
    else:
        settings = {"rank": config.lora_rank, "alpha": config.lora_alpha,
                    "targets": config.lora_targets}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": str(model_type),
            "lift.adapter": config.adapter, "lift.adapter_config": json.dumps(settings),
            "lift.base_fingerprint": fingerprint, "lift.config": config.to_json()}


def save(model, path, config: LiftConfig, fingerprint: str, slot: int | None = None) -> None:
    """Write the trained adapter of `model` to `path` (safetensors) with its metadata;
    `slot`: only that memory slot of a gated memory with slots (a single-memory file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    metadata = adapter_metadata(config, fingerprint, _model_type(model))
    if config.adapter == "gated-memory":
        _hf().save_memory(model, path, slot=slot)
        # Keep what save_memory recorded and add the pipeline's own keys.
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = {**(f.metadata() or {}), **metadata}
    else:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata=metadata)


def read_metadata(path) -> dict:
    """The metadata of a memory file; MemoryFileError when it is not one."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise MemoryFileError(f"memory file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise MemoryFileError(f"memory file {str(path)!r} is not a safetensors file: {e}") from None
    if metadata.get("format") != FORMAT:
        raise MemoryFileError(f"{str(path)!r} is a safetensors file but not a lift-kernels "
                              f"memory file (format {metadata.get('format')!r})")
    # A file from lift_kernels.save_memory alone (e.g. after HF Trainer) is Gated Memory
    # without the pipeline's keys: no fingerprint to check, the default recipe for asking.
    metadata.setdefault("lift.adapter", "gated-memory")
    return metadata


def load(model, path, backend: str = "auto"):
    """Attach the adapter recorded in the memory file at `path` to the base `model` and load
    its weights; returns (model, metadata).  MemoryFileError if the file was made for another
    base model (fingerprint mismatch) or does not fit it."""
    metadata = read_metadata(path)
    fingerprint = model_fingerprint(model)
    if metadata.get("lift.base_fingerprint", fingerprint) != fingerprint:
        raise MemoryFileError(
            f"memory file {str(path)!r} was made for another base model (model_type "
            f"{metadata.get('model_type')!r}, fingerprint {metadata['lift.base_fingerprint']}); "
            f"this model is {_model_type(model)!r} with fingerprint {fingerprint}")
    try:
        if metadata["lift.adapter"] == "gated-memory":
            model = _hf().load_memory(model, path, backend)
        else:
            model = _load_lora(model, path, json.loads(metadata["lift.adapter_config"]))
    except (ValueError, RuntimeError, KeyError) as e:  # names/shapes that do not fit
        raise MemoryFileError(f"memory file {str(path)!r} does not fit this model: {e}") from e
    model.eval()
    return model, metadata


def _load_lora(model, path, settings: dict):
    require_extra("lora", "a LoRA memory file")
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, _lora_config(settings["rank"], settings["alpha"],
                                               settings["targets"]))
    tensors = load_file(str(path))
    expected = set(get_peft_model_state_dict(model))
    if set(tensors) != expected:
        raise MemoryFileError(
            f"memory file {str(path)!r} does not match this model's LoRA layers: missing "
            f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}")
    set_peft_model_state_dict(model, tensors)
    return model


def _model_type(model) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
