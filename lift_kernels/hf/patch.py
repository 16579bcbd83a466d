"""Instance-level patching of a Hugging Face causal LM's attention modules.

Each patched attention module keeps its class and its own projections; it gains two
attributes and an instance-level ``forward``:

    module.gated_memory  GatedMemory (the seven trainable tensors of the layer; with
                         num_memories=K > 1 each carries a leading slot dimension K)
    module.lift_patch    LiftPatch (adapter, backend, config, disabled flag, last gate,
                         memory slots and the slot of each batch row)
    module.forward       gated_attention_forward bound to the module

``restore_attention`` deletes the three, which gives back the class's forward and a state
dict without memory tensors.  No class is ever modified.
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..dispatch import BACKENDS, takes_varlen
from ..function import gated_memory_attention
from ..install import check_transformers_version
from ..memory import GatedMemory, GatedMemoryConfig, default_gate_hidden, default_mem_hidden
from ..ops.reference import (apply_rope, compute_dtype, gate_mlp, memory_mlp, slot_weights,
                             visible_mask)
from .families import adapter_for


@dataclass
class LiftPatch:
    """Per-module state of a patched attention module (a plain object, not a Module, so it
    adds nothing to the state dict)."""

    adapter: object
    backend: str
    config: GatedMemoryConfig  # resolved: no None left
    disabled: bool = False
    last_gate: torch.Tensor | None = None  # [B, N, Hq] float32 of the last forward
    num_memories: int = 1  # memory slots K of the layer (K = 1: the plain layout)
    memory_index: torch.Tensor | None = None  # [B] slot of each batch row (memory_slots)


def _memory_and_gate(q, memory: GatedMemory, memory_index=None):
    """The memory MLP and the gate of the reference, in float32 (float64 for float64 q).
    q [B, N, Hq, D] -> mem [B, N, Hq, D], gate [B, N, Hq].  memory_index [B]: each batch
    row's memory slot (a memory with slots)."""
    ct = compute_dtype(q.dtype)
    w1, b1, w2, b2, g1, c1, g2 = (None if t is None else t.to(ct) for t in memory.weights())
    if memory_index is not None:
        w1, b1, w2, b2, g1, c1, g2 = slot_weights(memory_index, w1, b1, w2, b2, g1, c1, g2)
    qf = q.to(ct)
    mem = memory_mlp(qf, w1, b1, w2, b2)
    gate = gate_mlp(qf, g1, c1, g2, memory.gate_scale, memory.gate_shift)
    return mem, gate


def _attention_function(module):
    """The attention function the unpatched module would call (eager, sdpa, flash, flex...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    implementation = module.config._attn_implementation
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers >= 5.17
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def _exact_attention(module, patch, q, k, v, cos, sin, attention_mask, dropout, kwargs,
                     memory_index):
    """Any mask the model built (padding, sliding window, static cache, eager or sdpa format):
    the model's own attention function computes attention with it, exactly as unpatched,
    and the reference memory and gate are blended in.  Slower than the op (the memory MLP
    runs unfused) but exact for every mask.  Shapes as in gated_attention_forward."""
    attn, weights = _attention_function(module)(
        module, apply_rope(q, cos, sin).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attention_mask, dropout=dropout, scaling=module.scaling,
        **patch.adapter.attention_kwargs(module), **kwargs)
    mem, gate = _memory_and_gate(q, module.gated_memory, memory_index)
    g = gate.unsqueeze(-1)
    out = (1 - g) * attn.to(mem.dtype) + g * mem
    return out.to(q.dtype), gate, weights


def op_window(adapter, module) -> tuple:
    """The op's window_size for the layer: HF's sliding window w lets query i see keys
    i - w < j <= i, which is FlashAttention's (w - 1, 0)."""
    window = adapter.sliding_window(module)
    return (window - 1, -1) if window else (-1, -1)


def _plain_causal(attention_mask, nq: int, nk: int, window_size) -> bool:
    """Whether the mask the model built is the op's bottom-right causal (windowed) mask and
    nothing more (no padding, no empty cache slots), so the fused op computes exactly what
    the model's attention would.  None means plain causal attention (the model skipped
    building a mask), which agrees with the op when Nq == Nk or Nq == 1.  An eager float
    mask counts when every entry is 0 (visible) or at most the dtype's lowest (masked).
    Under torch.compile a mask tensor always takes the exact path."""
    if attention_mask is None:
        return nq == nk or nq == 1
    if torch.compiler.is_compiling():
        return False  # reading the mask would be a data-dependent branch in the graph
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
            or tuple(attention_mask.shape[-2:]) != (nq, nk) or attention_mask.shape[1] != 1):
        return False
    visible = _mask_visible(attention_mask)
    if visible is None:
        return False
    expected = visible_mask(nq, nk, True, window_size, attention_mask.device)
    return bool((visible == expected).all())


def _mask_visible(attention_mask):
    """What a bool mask, or an additive float mask of 0 (visible) and at most the dtype's
    lowest (masked), lets through, as bool; None for any other mask (biases)."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        visible = attention_mask == 0
        if (visible | (attention_mask <= torch.finfo(attention_mask.dtype).min)).all():
            return visible
    return None


def gated_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                            cache=None, **kwargs):
    """Replaces the attention module's forward on the instance (same signature and return
    as the families' own forward: (output [B, N, hidden], attention weights or None)).

    q is taken before RoPE (the memory reads it there); only k is rotated here and goes to
    the KV cache; the op rotates q itself with the same cos/sin (none for a layer without
    RoPE).  The layer's sliding window and soft-capping go to the op, so such layers run
    the fused kernels too.  transformers < 5.24 names the cache ``past_key_values`` (and
    < 5.17 passes ``cache_position``); all are accepted.
    """
    patch = self.lift_patch
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if patch.disabled:
        patch.last_gate = None
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  cache, **kwargs)
    adapter = patch.adapter
    batch, n = hidden_states.shape[:2]
    q, k, v = adapter.project(self, hidden_states)  # [B, N, H, D]
    cos, sin = adapter.rope(self, position_embeddings)
    if cos is not None and cos.shape[-1] != q.shape[-1]:
        raise ValueError(f"{adapter.model_type}: RoPE over {cos.shape[-1]} of the head's "
                         f"{q.shape[-1]} features (partial rotary, cos {tuple(cos.shape)}) is "
                         f"not supported; the op rotates whole heads")
    perm = adapter.rope_permutation(self) if cos is not None else None
    if perm is not None:  # the op's RoPE layout (see Adapter.rope_permutation)
        perm = perm.to(q.device)
        q, k, cos, sin = q[..., perm], k[..., perm], cos[..., perm], sin[..., perm]
    k = apply_rope(k, cos, sin)
    # Under autocast the projections come out in the autocast dtype while cos/sin may not;
    # the op wants q, k, v in one dtype.
    k, v = k.to(q.dtype), v.to(q.dtype)
    if cache is not None:
        # The cache holds [B, H, N, D] in the model's layout; transposing back gives
        # [B, Nk, H, D] views.  The dict is what transformers < 5.17 reads (static caches
        # need cache_position); later versions ignore it.
        cache_kwargs = {"sin": sin, "cos": cos,
                        "cache_position": kwargs.pop("cache_position", None)}
        if perm is not None:
            k = k[..., torch.argsort(perm)]
        k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx, cache_kwargs)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if perm is not None:
            k = k[..., perm]
    dropout = self.attention_dropout if self.training else 0.0
    window_size = op_window(adapter, self)
    memory_index = _batch_slots(patch, batch)
    # A padding mask over this call's keys only (no cache, or a prefill) runs the op on the
    # packed non-padding tokens; any other mask (a static cache's empty slots, ...) takes
    # the exact path, and so do packed input and memory slots on a backend that takes
    # neither (an explicit fused one, for now).
    varlen_ok = takes_varlen(patch.backend)
    if (dropout == 0.0 and (memory_index is None or varlen_ok)
            and _plain_causal(attention_mask, n, k.shape[1], window_size)):
        memory = self.gated_memory
        out, gate = gated_memory_attention(
            q, k, v, *memory.weights(), cos=cos, sin=sin, causal=True,
            softmax_scale=self.scaling, gate_scale=memory.gate_scale,
            gate_shift=memory.gate_shift, return_gate=True, backend=patch.backend,
            window_size=window_size, softcap=adapter.softcap(self) or 0.0,
            memory_index=memory_index)
        weights = None
    elif (dropout == 0.0 and k.shape[1] == n and not kwargs.get("output_attentions")
          and varlen_ok and not torch.compiler.is_compiling()
          and (keep := _kept_tokens(attention_mask, batch, n, window_size)) is not None):
        out, gate = _packed_attention(self, patch, q, k, v, cos, sin, keep, window_size,
                                      memory_index)
        weights = None
    else:
        out, gate, weights = _exact_attention(self, patch, q, k, v, cos, sin, attention_mask,
                                              dropout, kwargs, memory_index)
    patch.last_gate = gate.detach()
    return adapter.output(self, out.reshape(batch, n, -1)), weights


# ------------------------------------------------ padded batches and memory slots (issue 15)

def _batch_slots(patch: LiftPatch, batch: int):
    """The memory_index [B] of this forward: None for a single memory; a layer with slots
    needs lift_kernels.memory_slots to say which slot each batch row uses."""
    if patch.num_memories == 1:
        return None
    if patch.memory_index is None:
        raise ValueError(f"the model has {patch.num_memories} memory slots per layer: say which "
                         f"slot each batch row uses with lift_kernels.memory_slots(model, index)")
    if patch.memory_index.shape[0] != batch:
        raise ValueError(f"memory_slots gave {patch.memory_index.shape[0]} slots, the batch has "
                         f"{batch} rows")
    return patch.memory_index


def _kept_tokens(attention_mask, batch: int, n: int, window_size):
    """keep [B, N] bool (the non-padding tokens) when `attention_mask` [B or 1, 1, N, N] is
    exactly the layer's causal (windowed) attention among each row's kept tokens, the mask
    transformers builds from a 2-D padding mask; else None (packed documents, biases, any
    other mask, a BlockMask).  Rows of padding queries are not compared: transformers may
    fill them in, and they are dropped."""
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4
            or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] != 1
            or tuple(attention_mask.shape[2:]) != (n, n)):
        return None
    visible = _mask_visible(attention_mask)
    if visible is None:
        return None
    visible = visible[:, 0].expand(batch, n, n)
    keep = visible.diagonal(dim1=-2, dim2=-1)  # a real token sees itself, padding does not
    expected = visible_mask(n, n, True, window_size, visible.device) & keep[:, None, :]
    if not bool(((visible == expected) | ~keep[:, :, None]).all()):
        return None
    # The op counts a window (left side; the right is causal) in packed positions, the mask
    # in the row's: they agree when the window cuts nothing or each row's kept tokens are
    # one run (left or right padding, no holes).
    runs = keep[:, 0].long() + (keep[:, 1:] & ~keep[:, :-1]).sum(1)
    if 0 <= window_size[0] < n - 1 and bool((runs > 1).any()):
        return None
    return keep


def _packed_attention(module, patch, q, k, v, cos, sin, keep, window_size, memory_index):
    """The op on the packed kept tokens (batch row b is sequence b), scattered back to
    [B, N, ...] with zero output and gate at padding.  q [B, N, Hq, D], k, v [B, N, Hkv, D],
    cos, sin [B or 1, N, D] or None; keep [B, N] bool."""
    batch, n = keep.shape
    lengths = keep.sum(1)
    rows = keep.flatten().nonzero().squeeze(1)  # packed row -> position in [B * N]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())

    def pack(t):  # cos/sin are None in a layer without RoPE
        if t is None:
            return None
        return t.expand(batch, n, *t.shape[2:]).reshape(batch * n, *t.shape[2:])[rows]

    memory = module.gated_memory
    out, gate = gated_memory_attention(
        pack(q), pack(k), pack(v), *memory.weights(), cos=pack(cos), sin=pack(sin),
        causal=True, softmax_scale=module.scaling, gate_scale=memory.gate_scale,
        gate_shift=memory.gate_shift, return_gate=True, backend=patch.backend,
        window_size=window_size, softcap=patch.adapter.softcap(module) or 0.0,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=longest,
        max_seqlen_k=longest, memory_index=memory_index)
    out = out.new_zeros(batch * n, *out.shape[1:]).index_copy(0, rows, out)
    gate = gate.new_zeros(batch * n, gate.shape[1]).index_copy(0, rows, gate)
    return out.view(batch, n, *out.shape[1:]), gate.view(batch, n, -1)


@contextlib.contextmanager
def memory_slots(model, index):
    """Within the block, batch row b of every forward (and of generate) reads and trains
    memory slot index[b] of every patched layer (a model patched with num_memories=K).

    index: int tensor [B] (or a list of ints) with slots in [0, K)."""
    modules = _need_patched(model, "memory_slots").values()
    if isinstance(index, (list, tuple)):
        index = torch.tensor(index, dtype=torch.int64)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be an int tensor [B] or a list of ints, got "
                        f"{type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise ValueError(f"index must be an int32/int64 tensor of shape [B], got shape "
                         f"{tuple(index.shape)}, {index.dtype}")
    num_memories = min(m.lift_patch.num_memories for m in modules)
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < num_memories:
        raise ValueError(f"index must hold slots in [0, {num_memories}) (the model's "
                         f"num_memories), got {index.tolist()}")
    before = [m.lift_patch.memory_index for m in modules]
    for m in modules:
        m.lift_patch.memory_index = index.to(m.gated_memory.w1.device)
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.lift_patch.memory_index = was


def attention_modules(model) -> dict:
    """{layer_idx: attention module} of `model`'s family, patched or not.  Raises ValueError
    for an unsupported family (before anything is touched)."""
    adapter = adapter_for(model)
    cls = adapter.load_attention_class()
    found = {m.layer_idx: m for m in model.modules() if isinstance(m, cls)}
    if not found:
        raise ValueError(f"no {cls.__name__} module found in {type(model).__name__}")
    return dict(sorted(found.items()))


def patched_modules(model) -> dict:
    """{layer_idx: attention module} of the patched layers (empty if none)."""
    return {m.layer_idx: m for m in model.modules() if hasattr(m, "lift_patch")}


def _need_patched(model, what: str) -> dict:
    modules = patched_modules(model)
    if not modules:
        raise ValueError(f"{what}: the model has no gated memory; call "
                         f"lift_kernels.replace_attention(model) first")
    return modules


def resolve_config(config: GatedMemoryConfig, module, adapter) -> GatedMemoryConfig:
    """`config` with every None replaced by what it means for this module."""
    d = module.head_dim
    return replace(
        config,
        mem_hidden=config.mem_hidden if config.mem_hidden is not None else default_mem_hidden(d),
        gate_hidden=(config.gate_hidden if config.gate_hidden is not None
                     else default_gate_hidden(d)),
        bias=config.bias if config.bias is not None else adapter.has_bias(module),
        gate_scale=float(config.gate_scale), gate_shift=float(config.gate_shift))


def _new_memory(module, config: GatedMemoryConfig, num_memories: int) -> GatedMemory:
    # Memory parameters are float32 whatever the model's dtype (the op accepts float32
    # weights with 16-bit activations); an optimizer then updates them in full precision.
    return GatedMemory(module.config.num_attention_heads, module.head_dim, config.mem_hidden,
                       config.gate_hidden, config.bias, config.gate_scale, config.gate_shift,
                       device=next(module.parameters()).device, dtype=torch.float32,
                       num_slots=None if num_memories == 1 else num_memories)


def _same_shapes(a: GatedMemoryConfig, b: GatedMemoryConfig) -> bool:
    return (a.mem_hidden, a.gate_hidden, a.bias) == (b.mem_hidden, b.gate_hidden, b.bias)


def _unpatch(module):
    del module.forward, module.gated_memory, module.lift_patch


def _embeds_require_grad(decoder, args, kwargs):
    """Forward pre-hook on the decoder stack (the module holding embed_tokens and layers).

    Reentrant activation checkpointing gives a checkpointed layer's parameters (the memory's
    included) no gradient when none of the layer's inputs requires grad, which is the case
    for a frozen base fed `inputs_embeds` that do not require grad.  Then the embeddings
    are handed on as a leaf that requires grad.  (For input_ids, transformers'
    activation_checkpointing_enable already makes the embedding output require grad.)"""
    embeds = kwargs.get("inputs_embeds")
    if (embeds is not None and not embeds.requires_grad and torch.is_grad_enabled()
            and decoder.training and getattr(decoder, "gradient_checkpointing", False)):
        kwargs["inputs_embeds"] = embeds.detach().requires_grad_()
        return args, kwargs
    return None


def _decoders(model):
    return [m for m in model.modules()
            if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
            and hasattr(m, "embed_tokens")]


def _set_embeds_hook(model, on: bool):
    for decoder in _decoders(model):
        hooks = decoder._forward_pre_hooks
        mine = [k for k, fn in hooks.items() if fn is _embeds_require_grad]
        if on and not mine:
            decoder.register_forward_pre_hook(_embeds_require_grad, with_kwargs=True)
        elif not on:
            for k in mine:
                del hooks[k]
                decoder._forward_pre_hooks_with_kwargs.pop(k, None)


def replace_attention(model, config: GatedMemoryConfig | None = None, backend: str = "auto",
                      layers=None, num_memories: int | None = None):
    """Give every decoder layer's attention (or those in `layers`) a Gated Memory.

    Args:
        model: a transformers causal LM of a supported family (supported_families() lists
            them), possibly wrapped by PEFT (patch after get_peft_model: its LoRA on the projections
            keeps working, the projections are reused, not copied).
        config: GatedMemoryConfig; None means the defaults.  bias=None follows the model
            (memory biases where the attention projections have biases, e.g. Qwen2).
        backend: the op's backend ("auto", "reference", "torch", "triton", "cuda", "cpu").
        layers: iterable of layer indices to patch; None means all.
        num_memories: K memory slots per layer (each initialised like one memory); select
            the slot of each batch row with ``lift_kernels.memory_slots(model, index)``.
            None: 1 for a new patch, unchanged for a patched layer.  K = 1 is the plain
            single-memory layout.

    Calling it again on a patched model updates the backend and config in place: memory
    weights are kept when their shapes do not change (only gate_scale/gate_shift change),
    re-initialised when they (or num_memories) do; patched layers not in `layers` are
    restored.
    Returns `model` (patched in place).  Raises ValueError for an unsupported family, with
    nothing patched.
    """
    check_transformers_version()
    config = GatedMemoryConfig() if config is None else config
    if not isinstance(config, GatedMemoryConfig):
        raise TypeError(f"config must be a lift_kernels.GatedMemoryConfig, got "
                        f"{type(config).__name__}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_memories is not None and (isinstance(num_memories, bool) or not isinstance(
            num_memories, int) or num_memories < 1):
        raise ValueError(f"num_memories must be a positive int, got {num_memories!r}")
    adapter = adapter_for(model)
    modules = attention_modules(model)
    if layers is None:
        wanted = set(modules)
    else:
        wanted = set()
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or i not in modules:
                raise ValueError(f"layers must hold layer indices in 0..{max(modules)}, got {i!r}")
            wanted.add(i)
    for idx, module in modules.items():
        if idx not in wanted:
            if hasattr(module, "lift_patch"):
                _unpatch(module)
            continue
        resolved = resolve_config(config, module, adapter)
        if hasattr(module, "lift_patch"):
            patch = module.lift_patch
            slots = patch.num_memories if num_memories is None else num_memories
            if _same_shapes(patch.config, resolved) and slots == patch.num_memories:
                module.gated_memory.gate_scale = resolved.gate_scale
                module.gated_memory.gate_shift = resolved.gate_shift
            else:
                module.gated_memory = _new_memory(module, resolved, slots)
            patch.config, patch.backend, patch.adapter = resolved, backend, adapter
            patch.num_memories = slots
        else:
            slots = 1 if num_memories is None else num_memories
            module.gated_memory = _new_memory(module, resolved, slots)
            module.lift_patch = LiftPatch(adapter, backend, resolved, num_memories=slots)
            module.forward = types.MethodType(gated_attention_forward, module)
    _set_embeds_hook(model, bool(patched_modules(model)))
    return model


def restore_attention(model):
    """Undo replace_attention: every patched module gets its class's forward back and loses
    its memory (save it first with save_memory if needed).  Returns `model`."""
    for module in patched_modules(model).values():
        _unpatch(module)
    _set_embeds_hook(model, False)
    return model


def memory_parameters(model):
    """The memory and gate parameters of the patched layers, in layer order."""
    for _, module in sorted(_need_patched(model, "memory_parameters").items()):
        yield from module.gated_memory.parameters()


def freeze_base_model(model):
    """Only the memory and gate parameters keep requires_grad (everything else, LoRA
    included, is frozen).  Returns `model`.  Activation checkpointing, reentrant or not,
    still reaches the memory (see _embeds_require_grad)."""
    memory = set(map(id, memory_parameters(model)))
    for p in model.parameters():
        p.requires_grad_(id(p) in memory)
    return model


@contextlib.contextmanager
def memory_disabled(model):
    """Within the block, every patched layer runs its original attention (the memory is
    bypassed entirely, so the outputs are exactly the unpatched model's)."""
    modules = _need_patched(model, "memory_disabled").values()
    before = [m.lift_patch.disabled for m in modules]
    for m in modules:
        m.lift_patch.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.lift_patch.disabled = was


def collect_gates(model) -> dict:
    """{layer_idx: gate [B, N, Hq] float32 (detached)} from the last forward of each patched
    layer (None for a layer that has not run, or ran with the memory disabled)."""
    return {i: m.lift_patch.last_gate
            for i, m in sorted(_need_patched(model, "collect_gates").items())}
