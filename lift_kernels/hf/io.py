"""Saving and loading the memory of a patched model: safetensors only (no pickle, ever).

File layout: one tensor per memory parameter, named ``layers.<layer_idx>.<w1|b1|...>``, and
string metadata in the safetensors header:

    format          "lift-kernels-memory"
    format_version  "1"
    model_type      the family (config.model_type)
    layers          JSON list of the patched layer indices
    config          JSON of the resolved GatedMemoryConfig (no None left)
    num_heads, head_dim, shapes (JSON {name: shape})
    num_memories    K memory slots per layer (tensors [K, Hq, ...]); absent in files
                    written before slots existed, which hold one memory ("1")
"""

from __future__ import annotations

import json
import os

import torch

from ..memory import GatedMemoryConfig
from .families import model_type_of
from .patch import _need_patched, patched_modules, replace_attention, restore_attention

FORMAT = "lift-kernels-memory"
FORMAT_VERSION = "1"


def _memory_tensors(modules) -> dict:
    return {f"layers.{i}.{name}": p for i, m in sorted(modules.items())
            for name, p in m.gated_memory.named_parameters()}


def save_memory(model, path, slot: int | None = None) -> None:
    """Writes the memory of every patched layer of `model` to `path` (safetensors).

    slot: with num_memories=K, write only memory slot `slot` as a single-memory file (the
    layout of a model with one memory, loadable into either); None writes all K slots."""
    from safetensors.torch import save_file

    modules = _need_patched(model, "save_memory")
    configs = {json.dumps(m.lift_patch.config.to_dict(), sort_keys=True) for m in modules.values()}
    if len(configs) != 1:
        raise ValueError(f"save_memory: the patched layers have different configs {configs}")
    first = next(iter(modules.values()))
    num_memories = _num_memories(modules)
    tensors = {n: p.detach() for n, p in _memory_tensors(modules).items()}
    if slot is not None:
        _check_slot(slot, num_memories)
        if num_memories > 1:
            tensors = {n: t[slot] for n, t in tensors.items()}
        num_memories = 1
    tensors = {n: t.contiguous().cpu() for n, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type_of(model),
        "layers": json.dumps(sorted(modules)),
        "config": configs.pop(),
        "num_heads": str(first.gated_memory.num_heads),
        "head_dim": str(first.gated_memory.head_dim),
        "shapes": json.dumps({n: list(t.shape) for n, t in tensors.items()}),
        "num_memories": str(num_memories),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _num_memories(modules) -> int:
    counts = {m.lift_patch.num_memories for m in modules.values()}
    if len(counts) != 1:
        raise ValueError(f"the patched layers have different num_memories {sorted(counts)}")
    return counts.pop()


def _check_slot(slot, num_memories):
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < num_memories:
        raise ValueError(f"slot must be an int in [0, {num_memories}) (the model's "
                         f"num_memories), got {slot!r}")


def _read_header(handle, path) -> dict:
    meta = handle.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lift-kernels memory file (header format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has memory format version {meta.get('format_version')!r}; "
                         f"this lift_kernels reads version {FORMAT_VERSION!r}")
    try:
        return {"model_type": meta["model_type"], "layers": json.loads(meta["layers"]),
                "config": json.loads(meta["config"]),
                "num_memories": int(meta.get("num_memories", "1"))}
    except (KeyError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} has a malformed lift-kernels header ({err})") from None


def load_memory(model, path, backend: str | None = None, slot: int | None = None):
    """Loads memory written by save_memory into `model` and returns it.

    An unpatched model is first patched with the file's config, layers and num_memories
    (backend `backend`, default "auto"); a patched one must match them.  slot: load a
    single-memory file into memory slot `slot` of a model patched with num_memories=K
    (the other slots are left alone).  Every tensor name and shape is checked before
    anything is copied; a mismatch raises ValueError naming it.  Never unpickles anything.
    `backend`, if given, also sets the backend of a patched model.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"memory file not found: {path}")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from None
    with handle:
        _load(model, handle, path, backend, slot)
    return model


def _load(model, handle, path, backend, slot):
    """load_memory once the file is open: header checks, patching, then the checked copy."""
    header = _read_header(handle, path)
    model_type = model_type_of(model)
    if header["model_type"] != model_type:
        raise ValueError(f"{path} holds memory for model_type {header['model_type']!r}, "
                         f"the model is {model_type!r}")
    try:
        config = GatedMemoryConfig(**header["config"])
    except TypeError as err:
        raise ValueError(f"{path} has an unknown memory config ({err})") from None
    modules = patched_modules(model)
    patched_before = bool(modules)
    if slot is not None and not modules:
        raise ValueError(f"load_memory(slot={slot!r}) loads into a slot of a patched model: "
                         f"call lift_kernels.replace_attention(model, num_memories=K) first")
    if modules:
        _check_patched(modules, header, path)
        _check_memories(modules, header, path, slot)
        if backend is not None:
            replace_attention(model, config, backend, layers=header["layers"])
    else:
        replace_attention(model, config, backend or "auto", layers=header["layers"],
                          num_memories=header["num_memories"])
        modules = patched_modules(model)
    targets = _memory_tensors(modules)
    if slot is not None and _num_memories(modules) > 1:
        targets = {n: p[slot] for n, p in targets.items()}
    try:
        _copy_checked(handle, targets, path)
    except ValueError:
        if not patched_before:
            restore_attention(model)
        raise


def _check_patched(modules, header, path):
    if sorted(modules) != header["layers"]:
        raise ValueError(f"{path} holds layers {header['layers']}, the model has patched "
                         f"layers {sorted(modules)}")
    for i, m in modules.items():
        ours = m.lift_patch.config.to_dict()
        diff = {k: (v, ours.get(k)) for k, v in header["config"].items() if ours.get(k) != v}
        if diff:
            raise ValueError(f"{path}: the memory config differs from layer {i}'s in "
                             f"{{field: (file, model)}} {diff}")


def _check_memories(modules, header, path, slot):
    """The file's num_memories against the model's: all of them, or one into `slot`."""
    ours, theirs = _num_memories(modules), header["num_memories"]
    if slot is not None:
        _check_slot(slot, ours)
        if theirs != 1:
            raise ValueError(f"{path} holds {theirs} memories; load_memory(slot=...) takes a "
                             f"single-memory file (save_memory(model, path, slot=...))")
    elif theirs != ours:
        raise ValueError(f"{path} holds {theirs} memories per layer, the model has "
                         f"num_memories={ours} (load one into a slot with slot=...)")


def _copy_checked(handle, params, path):
    """Checks every name and shape first, then copies (so a mismatch changes nothing)."""
    names = set(handle.keys())
    missing, unexpected = sorted(set(params) - names), sorted(names - set(params))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model's memory: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, p in params.items():
        shape = tuple(handle.get_slice(name).get_shape())
        if shape != tuple(p.shape):
            raise ValueError(f"{path}: tensor {name} has shape {shape}, the model's is "
                             f"{tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(handle.get_tensor(name))
