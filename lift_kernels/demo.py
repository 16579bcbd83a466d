"""The embedded offline demo (`lift-kernels demo`, `make demo`): LIFT on a built-in document.

A tiny pretrained Llama (``demo_model``) reads an ~8,000-token travel log with twelve access
codes ("needles") buried in its middle.  Its window is 256 tokens, so the document does not
fit.  The demo

1. asks the base model for every code with only the needle sentence up to the code as the
   prompt (the document is not in the context): recall before;
2. asks the base again after the head and tail of the document (what fits the window,
   joined by "..."): the truncated-context baseline;
3. absorbs the document into Gated Memory: language-modelling loss on overlapping segments of
   the document text, nothing else (no one tells it which sentences are needles), with the
   base model frozen and only memory and gate parameters training;
4. asks again, document absent: recall after;
5. draws the mean gate per layer and head on the needle prompts vs unrelated text.

Status (measured, see the README): the pipeline runs end to end in about a minute, but this
base and recipe do not yet bind the codes to their cities (recall after 0.0); the module
keeps the recipe in the constants below so that a better base or recipe drops in.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

from . import GatedMemoryConfig
from .demo_model import WINDOW, build_model, build_tokenizer, text

# The absorb recipe: the LIFT pipeline's segments-only schedule with 8 optimiser steps per
# epoch instead of the authors' one (a tiny model needs more steps than a large one).
SEGMENT, STRIDE = WINDOW - 1, WINDOW // 2  # <bos> + segment fits the window; 50% overlap
MEM_HIDDEN = 64                            # memory MLP hidden size M (4 x head_dim 16)
GATE_SHIFT = 1.0                           # the authors' gate start, sigmoid(-3) = 0.047
LR, EPOCHS, STEPS_PER_EPOCH = 1e-2, 12, 8  # AdamW on memory/gate parameters only
SEED = 0


def truncated_context(ids: list[int], tokenizer, budget: int) -> list[int]:
    """The head and the tail of the document that fit ``budget`` tokens, joined by "..."
    (the in-context baseline LIFT is compared with); starts with <bos>."""
    half = (budget - 1) // 2
    dots = tokenizer.convert_tokens_to_ids("...")
    return ids[:half] + [dots] + ids[-(budget - 1 - half):]


@torch.no_grad()
def recall(model, tokenizer, facts, context: list[int] | None = None) -> tuple[float, list]:
    """Greedy completion of each needle prompt ("the access code of the lisbon vault is"),
    after ``context`` if given (else the prompt alone, after <bos>).  A needle counts when the
    two code tokens are exactly right.  Returns (fraction right, predicted codes)."""
    predicted = []
    for city, place, code in facts:
        prompt = tokenizer(text.fact_prompt(city, place))["input_ids"]
        ids = (context + prompt[1:]) if context is not None else prompt
        for _ in range(2):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        predicted.append("".join(tokenizer.convert_ids_to_tokens(ids[-2:])))
    right = sum(p == code for p, (_, _, code) in zip(predicted, facts))
    return right / len(facts), predicted


def absorb_document(model, tokenizer, document: str, epochs: int, backend: str):
    """LIFT the document into a Gated Memory of ``model`` with ``lift_kernels.lift.absorb``:
    language-modelling loss on overlapping segments of the document text (no QA, nothing
    else), base frozen, only memory and gate parameters trained.  Returns its AbsorbResult."""
    from .lift import LiftConfig, absorb

    config = LiftConfig(segment_length=SEGMENT, segment_stride=STRIDE, segment_epochs=epochs,
                        qa_epochs=0, steps_per_epoch=STEPS_PER_EPOCH, lr=LR, weight_decay=0.0,
                        memory=GatedMemoryConfig(mem_hidden=MEM_HIDDEN, gate_shift=GATE_SHIFT),
                        backend=backend,
                        seed=SEED)
    return absorb(model, tokenizer, document, qa=None, config=config)


@torch.no_grad()
def mean_gates(model, tokenizer, sentences: list[str], last_only: bool) -> torch.Tensor:
    """Mean gate [layers, heads] over ``sentences`` run one by one: at each sentence's last
    position (``last_only``; for a needle prompt, the position that predicts the code) or
    over all its positions."""
    from .hf import collect_gates

    total = None
    for sentence in sentences:
        model(torch.tensor([tokenizer(sentence)["input_ids"]]))
        gates = torch.stack([g[0] for _, g in sorted(collect_gates(model).items())])
        gates = gates[:, -1] if last_only else gates.mean(dim=1)  # [layers, heads]
        total = gates if total is None else total + gates
    return total / len(sentences)


def gate_heatmap(needle: torch.Tensor, unrelated: torch.Tensor, path: Path) -> None:
    """Two heatmaps side by side (layer x head), one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), constrained_layout=True)
    vmax = float(max(needle.max(), unrelated.max()))
    for ax, gates, title in ((axes[0], needle, "needle prompts\n(position predicting the code)"),
                             (axes[1], unrelated, "unrelated text\n(all positions)")):
        image = ax.imshow(gates.numpy(), vmin=0.0, vmax=vmax, cmap="viridis")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(gates.shape[1]))
        ax.set_yticks(range(gates.shape[0]))
        for layer in range(gates.shape[0]):
            for head in range(gates.shape[1]):
                value = float(gates[layer, head])
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 * vmax else "white")
    fig.colorbar(image, ax=axes, label="mean gate")
    fig.suptitle("Gated Memory after LIFT: how much each head answers from memory")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolved_backend(backend: str, model) -> str:
    """The backend the op picks for the demo's absorb calls (what "auto" resolves to)."""
    from . import dispatch
    from .memory import default_gate_hidden

    c = model.config
    problem = dispatch.Problem(1, WINDOW, WINDOW, c.num_attention_heads, c.num_key_value_heads,
                               c.head_dim, MEM_HIDDEN, default_gate_hidden(c.head_dim),
                               torch.float32, torch.float32, torch.device("cpu"), False, False,
                               False, True, True)
    return dispatch.choose_backend(backend, problem)


def add_arguments(parser) -> None:
    """The demo's own options on the CLI's `demo` subcommand."""
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"absorb epochs over the document (default {EPOCHS}; "
                             "fewer for a quick look)")
    parser.add_argument("--heatmap", metavar="PNG", default=None,
                        help="where to draw the gate heatmap (default: beside --json, "
                             "else ./lift-demo-gates.png)")
    parser.add_argument("--backend", default="auto", help="gated-memory attention backend")


def run_demo(args) -> int:
    """The demo (see the module docstring).  ``args``: ``json`` (file for the results or
    None), ``write_document`` (write the document there and exit), optional ``epochs``
    (default EPOCHS, or $LIFT_KERNELS_DEMO_EPOCHS), ``heatmap`` (PNG path; default beside
    the JSON, else ./lift-demo-gates.png) and ``backend``."""
    document, facts = text.document()
    if getattr(args, "write_document", None):
        Path(args.write_document).write_text(document)
        print(f"wrote the demo document ({len(facts)} needles) to {args.write_document}")
        return 0
    # One thread: the model is so small that a second thread's synchronisation costs more
    # than it saves, and on a busy machine spinning threads collapse (measured: 1 thread
    # 2,600 tokens/s fwd+bwd vs 2 threads 200-800 tokens/s on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, document, facts)
    finally:
        torch.set_num_threads(threads)


def _run(args, document: str, facts: list) -> int:
    epochs = getattr(args, "epochs", None) or int(
        os.environ.get("LIFT_KERNELS_DEMO_EPOCHS", EPOCHS))
    heatmap = getattr(args, "heatmap", None) or (
        Path(args.json).with_suffix(".gates.png") if getattr(args, "json", None)
        else Path("lift-demo-gates.png"))
    started = time.perf_counter()
    tokenizer, model = build_tokenizer(), build_model()
    ids = tokenizer(document)["input_ids"]
    backend = resolved_backend(getattr(args, "backend", None) or "auto", model)
    context = truncated_context(ids, tokenizer, WINDOW - 16)  # room for the prompt
    print(f"demo: {len(ids)} document tokens, {len(facts)} needles, model window {WINDOW}, "
          f"backend {backend}, {epochs} absorb epochs")

    # Before: the pretrained base alone (no memory yet), prompt only, then with the
    # truncated context.
    recall_before, predicted_before = recall(model, tokenizer, facts)
    recall_truncated, predicted_truncated = recall(model, tokenizer, facts, context)
    result = absorb_document(model, tokenizer, document, epochs, backend)
    model, params, stats = result.model, result.params, result.stats
    recall_after, predicted_after = recall(model, tokenizer, facts)

    prompts = [text.fact_prompt(city, place) for city, place, _ in facts]
    rng = random.Random(SEED + 7)  # unrelated text: fresh filler, not from the document
    unrelated = [text.filler_sentence(rng) for _ in range(32)]
    needle_gates = mean_gates(model, tokenizer, prompts, last_only=True)
    unrelated_gates = mean_gates(model, tokenizer, unrelated, last_only=False)
    gate_heatmap(needle_gates, unrelated_gates, Path(heatmap))

    print(f"\n{'needle':<20} {'code':>5} {'before':>7} {'truncated':>10} {'after':>7}")
    for (city, place, code), b, t, a in zip(facts, predicted_before, predicted_truncated,
                                             predicted_after):
        print(f"{city + ' ' + place:<20} {code:>5} {b:>7} {t:>10} {a:>7}")
    print(f"{'recall':<20} {'':>5} {recall_before:>7.2f} {recall_truncated:>10.2f} "
          f"{recall_after:>7.2f}")
    num_params = sum(p.numel() for p in params)
    print(f"\nabsorb: {stats.seconds:.1f} s, {stats.tokens_per_second:.0f} tokens/s, "
          f"{stats.steps} steps, loss {stats.step_losses[0]:.3f} -> {stats.step_losses[-1]:.3f};"
          f" only the {num_params} memory/gate parameters trained (base frozen)")
    print(f"mean gate at the code-predicting position {needle_gates.mean():.3f} vs "
          f"{unrelated_gates.mean():.3f} on unrelated text; heatmap: {heatmap}")
    out = {
        "recall_before": recall_before, "recall_after": recall_after,
        "recall_truncated_context": recall_truncated, "num_needles": len(facts),
        "document_tokens": result.document_tokens, "absorb_seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second, "backend": backend,
        "absorb_epochs": epochs, "absorb_steps": stats.steps, "absorb_tokens": stats.tokens,
        "num_segments": result.num_segments, "loss_first": stats.step_losses[0],
        "loss_last": stats.step_losses[-1], "memory_parameters": num_params,
        "mem_hidden": MEM_HIDDEN, "learning_rate": LR, "segment_tokens": SEGMENT,
        "segment_stride": STRIDE, "model_window": WINDOW,
        "truncated_context_tokens": len(context),
        "needles": [{"key": f"{c} {p}", "code": code, "before": b, "truncated": t, "after": a}
                    for (c, p, code), b, t, a in zip(facts, predicted_before,
                                                      predicted_truncated, predicted_after)],
        "gate_needle_mean": float(needle_gates.mean()),
        "gate_unrelated_mean": float(unrelated_gates.mean()),
        "gate_heatmap": str(heatmap), "total_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"total {out['total_seconds']:.1f} s")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
