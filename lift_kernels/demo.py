"""The embedded offline demo (`lift-kernels demo`, `make demo`): LIFT on a built-in document.

A tiny pretrained Llama (``demo_model``) reads an ~8,000-token travel log with twelve access
codes ("needles") buried in its middle.  Its window is 256 tokens, so the document does not
fit.  The demo

1. asks the base model for every code with only the needle sentence up to the code as the
   prompt (the document is not in the context): recall before;
2. asks the base again after the head and tail of the document (what fits the window,
   joined by "..."): the truncated-context baseline;
3. absorbs the document with ``lift.absorb()`` and the named recipe ``demo``
   (``lift.config.RECIPES``): what ``lift-kernels absorb --model demo --recipe demo`` does
   on any document.  No QA, and nothing tells it which lines are needles: the frozen base's
   own per-token loss selects the lines and tokens that carry the loss, and a KL term holds
   the patched model to the base on text the base itself generated beforehand;
4. asks again, document absent (recall after), and measures the loss on unrelated text with
   and without the memory and the mean gate per layer and head at the code-predicting
   positions vs on unrelated text, all with ``lift.evaluate`` (what ``lift-kernels eval``
   runs), and draws the gates.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

from .install import missing_extra
from .demo_model import WINDOW, build_model, build_tokenizer, text

RECIPE = "demo"
UNRELATED_SEED, UNRELATED_SENTENCES = 7, 32


def truncated_context(ids: list[int], tokenizer, budget: int) -> list[int]:
    """The head and the tail of the document that fit ``budget`` tokens, joined by "..."
    (the in-context baseline LIFT is compared with); starts with <bos>."""
    half = (budget - 1) // 2
    dots = tokenizer.convert_tokens_to_ids("...")
    return ids[:half] + [dots] + ids[-(budget - 1 - half):]


def qa_pairs(facts) -> list[dict]:
    """The recall questions: the needle sentence up to the code, and the code."""
    return [{"question": text.fact_prompt(city, place), "answer": code}
            for city, place, code in facts]


def unrelated_text() -> list[str]:
    """Fresh filler sentences of every form (some name cities), not from the document: the
    text on which the memory should change nothing."""
    rng = random.Random(UNRELATED_SEED)
    return [text.filler_sentence(rng) for _ in range(UNRELATED_SENTENCES)]


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


def resolved_backend(backend: str, model, config) -> str:
    """The backend the op picks for the demo's absorb calls (what "auto" resolves to)."""
    from . import dispatch
    from .memory import default_gate_hidden, default_mem_hidden

    c = model.config
    mem_hidden = config.memory.mem_hidden or default_mem_hidden(c.head_dim)
    problem = dispatch.Problem(1, WINDOW, WINDOW, c.num_attention_heads, c.num_key_value_heads,
                               c.head_dim, mem_hidden, default_gate_hidden(c.head_dim),
                               torch.float32, torch.float32, torch.device("cpu"), False, False,
                               False, True, True)
    return dispatch.choose_backend(backend, problem)


def add_arguments(parser) -> None:
    """The demo's own options on the CLI's `demo` subcommand."""
    parser.add_argument("--epochs", type=int, default=None,
                        help="absorb epochs (default: the demo recipe's; fewer for a quick "
                             "look)")
    parser.add_argument("--seed", type=int, default=None, help="absorb seed (default 0)")
    parser.add_argument("--other-document", type=int, default=None, metavar="SEED",
                        help="run on another generated document of the same kind (other "
                             "cities and codes, needles anywhere, another filler mix)")
    parser.add_argument("--write-qa", metavar="FILE", default=None,
                        help="write the recall questions as QA JSON (for `lift-kernels eval "
                             "--prompt raw`) and exit")
    parser.add_argument("--write-unrelated", metavar="FILE", default=None,
                        help="write the unrelated text (one text a line) and exit")
    parser.add_argument("--heatmap", metavar="PNG", default=None,
                        help="where to draw the gate heatmap (default: beside --json, "
                             "else ./lift-demo-gates.png)")
    parser.add_argument("--backend", default="auto", help="gated-memory attention backend")


def run_demo(args) -> int:
    """The demo (see the module docstring).  ``args``: ``json`` (file for the results or
    None), ``write_document``, ``write_qa``, ``write_unrelated`` (write the document, the
    recall QA JSON, the unrelated text there and exit), optional ``epochs``
    (default: the recipe's, or $LIFT_KERNELS_DEMO_EPOCHS), ``seed``, ``other_document``
    (seed of text.other_document instead of the built-in document), ``heatmap`` (PNG path;
    default beside the JSON, else ./lift-demo-gates.png) and ``backend``."""
    other = getattr(args, "other_document", None)
    document, facts = text.document() if other is None else text.other_document(other)
    writes = {"write_document": lambda: document,
              "write_qa": lambda: json.dumps(qa_pairs(facts), indent=1),
              "write_unrelated": lambda: "\n".join(unrelated_text()) + "\n"}
    wanted = {name: getattr(args, name) for name in writes if getattr(args, name, None)}
    for name, path in wanted.items():
        Path(path).write_text(writes[name]())
        print(f"wrote the demo's {name[6:]} ({len(facts)} needles) to {path}")
    if wanted:
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


def demo_config(args):
    """The demo recipe with the command line's epochs, seed and backend over it."""
    from .lift import recipe

    overrides = {}
    epochs = getattr(args, "epochs", None) or os.environ.get("LIFT_KERNELS_DEMO_EPOCHS")
    if epochs:
        overrides["segment_epochs"] = int(epochs)
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    return recipe(RECIPE, **overrides)


def _run(args, document: str, facts: list) -> int:
    from .lift import absorb, evaluate

    heatmap = getattr(args, "heatmap", None) or (
        Path(args.json).with_suffix(".gates.png") if getattr(args, "json", None)
        else Path("lift-demo-gates.png"))
    # matplotlib is optional (the `plot` extra): without it everything but the PNG is made.
    no_plot = missing_extra("plot", "the gate heatmap")
    if no_plot:
        print(f"demo: {no_plot}; it would be written to {heatmap}")
    started = time.perf_counter()
    tokenizer, model = build_tokenizer(), build_model()
    config = demo_config(args)
    config.backend = resolved_backend(getattr(args, "backend", None) or "auto", model, config)
    ids = tokenizer(document)["input_ids"]
    context = truncated_context(ids, tokenizer, WINDOW - 16)  # room for the prompt
    pairs, unrelated = qa_pairs(facts), unrelated_text()
    print(f"demo: {len(ids)} document tokens, {len(facts)} needles, model window {WINDOW}, "
          f"backend {config.backend}, recipe {RECIPE!r} ({config.segment_epochs} epochs)")

    # Before: the pretrained base alone (no memory yet), prompt only, then after the
    # truncated context.
    before = evaluate.recall(model, tokenizer, evaluate.as_pairs(pairs), prompt="raw")
    truncated = evaluate.recall(model, tokenizer, evaluate.as_pairs(pairs), prompt="raw",
                                context=context)
    absorb_started = time.perf_counter()  # scoring the text + training
    result = absorb(model, tokenizer, document, config=config)
    absorb_seconds = time.perf_counter() - absorb_started
    model, stats = result.model, result.stats
    after = evaluate.evaluate(model, tokenizer, pairs, unrelated, prompt="raw")
    if not no_plot:
        gate_heatmap(torch.tensor(after.gate_answer), torch.tensor(after.gate_unrelated),
                     Path(heatmap))
    predicted = [[row["completion"].replace(" ", "") for row in rows]
                 for rows in (before[1], truncated[1], after.answers)]

    print(f"\n{'needle':<20} {'code':>5} {'before':>7} {'truncated':>10} {'after':>7}")
    for (city, place, code), b, t, a in zip(facts, *predicted):
        print(f"{city + ' ' + place:<20} {code:>5} {b:>7} {t:>10} {a:>7}")
    print(f"{'recall':<20} {'':>5} {before[0]:>7.2f} {truncated[0]:>10.2f} "
          f"{after.recall:>7.2f}")
    num_params = sum(p.numel() for p in result.params)
    print(f"\nabsorb: {absorb_seconds:.1f} s ({stats.seconds:.1f} s training, "
          f"{stats.tokens_per_second:.0f} tokens/s) on {result.num_segments} document samples "
          f"({result.labelled_tokens} tokens with loss) and {result.num_anchors} KL anchors, "
          f"{stats.steps} steps, loss {stats.step_losses[0]:.3f} -> "
          f"{stats.step_losses[-1]:.3f}; only the {num_params} memory/gate parameters trained "
          "(base frozen)")
    print(f"loss on unrelated text {after.unrelated_loss_base:.3f} -> "
          f"{after.unrelated_loss_memory:.3f} nats/token (what the memory costs elsewhere)")
    print(f"mean gate at the code-predicting positions {after.gate_answer_mean:.3f} vs "
          f"{after.gate_unrelated_mean:.3f} on unrelated text; heatmap: "
          f"{f'not drawn (no matplotlib), would be {heatmap}' if no_plot else heatmap}")
    out = {
        "recall_before": before[0], "recall_after": after.recall,
        "recall_truncated_context": truncated[0], "num_needles": len(facts),
        "document_tokens": result.document_tokens, "absorb_seconds": absorb_seconds,
        "train_seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second, "backend": config.backend,
        "absorb_epochs": config.segment_epochs, "absorb_steps": stats.steps,
        "absorb_tokens": stats.tokens, "num_segments": result.num_segments,
        "num_anchors": result.num_anchors, "loss_first": stats.step_losses[0],
        "loss_last": stats.step_losses[-1], "memory_parameters": num_params,
        "labelled_tokens": result.labelled_tokens, "model_window": WINDOW,
        "truncated_context_tokens": len(context),
        "other_document": getattr(args, "other_document", None),
        "needles": [{"key": f"{c} {p}", "code": code, "before": b, "truncated": t, "after": a}
                    for (c, p, code), b, t, a in zip(facts, *predicted)],
        "unrelated_loss_before": after.unrelated_loss_base,
        "unrelated_loss_after": after.unrelated_loss_memory,
        "gate_needle_mean": after.gate_answer_mean,
        "gate_unrelated_mean": after.gate_unrelated_mean,
        "gate_needle": after.gate_answer, "gate_unrelated": after.gate_unrelated,
        "gate_heatmap": None if no_plot else str(heatmap), "recipe_name": RECIPE,
        "recipe": config.to_dict(),
        "total_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"total {out['total_seconds']:.1f} s")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
