"""The embedded offline demo (`lift-kernels demo`, `make demo`): LIFT on a built-in document.

A tiny pretrained Llama (``demo_model``) reads an ~8,000-token travel log with twelve access
codes ("needles") buried in its middle.  Its window is 256 tokens, so the document does not
fit.  The demo

1. asks the base model for every code with only the needle sentence up to the code as the
   prompt (the document is not in the context): recall before;
2. asks the base again after the head and tail of the document (what fits the window,
   joined by "..."): the truncated-context baseline;
3. absorbs the document into Gated Memory, with the base model frozen and only memory and
   gate parameters training, by language modelling on the document text alone (no QA, no
   one tells it which sentences are needles): the base scores each line of the document on
   its own, and the lines it finds surprising (one token at least LINE_SURPRISE nats) are
   trained, with the loss on their surprising tokens (``surprising_lines``), beside a few
   ordinary lines and passages with the loss on every token (``plain_samples``);
4. asks again, document absent: recall after;
5. draws the mean gate per layer and head on the needle prompts vs unrelated text.

Why lines chosen by surprise rather than the LIFT pipeline's 256-token segments (measured,
see the README): on segments the loss is spread over ~255 tokens of which two are a needle's
code, and the memory reads its query at a position whose features also carry the haystack
before it, so it learned "a code follows" and answered every prompt with one code (recall
0.0 at any of the learning rates, gate starts and step counts tried).  A line on its own is
what the recall prompt looks like, and the base's own loss finds the lines that hold what it
does not know.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import GatedMemoryConfig
from .install import missing_extra
from .demo_model import WINDOW, build_model, build_tokenizer, text

# The absorb recipe: surprise-selected lines.  The base scores every line of the document on
# its own (<bos> + line); a line enters the memory when the base finds one of its tokens at
# least LINE_SURPRISE nats surprising, and its loss is on the tokens at least TOKEN_SURPRISE
# nats surprising (4 nats: less predictable than a uniform pick among ~55 words; the
# haystack's words cost the base 2-3).  Lines, because the recall prompt is a sentence on its
# own: the memory must answer from the sentence's own tokens, not from the haystack around it.
# Beside them, PLAIN_LINES evenly spaced lines and PLAIN_PASSAGES passages of PASSAGE_TOKENS
# (the document's head and tail) train with the plain LM loss on every token, so that the
# memory also learns the document's ordinary text and leaves the base's predictions there
# nearly alone (measured without them: unrelated-text loss 1.49 -> 7.96 nats/token).
LINE_SURPRISE, TOKEN_SURPRISE = 8.0, 4.0
PLAIN_LINES, PLAIN_PASSAGES, PASSAGE_TOKENS = 16, 2, 128
MEM_HIDDEN = 64                  # memory MLP hidden size M (4 x head_dim 16)
GATE_SHIFT = 0.0                 # gate starts half open, sigmoid(0) = 0.5 (authors: 0.047)
LR, EPOCHS, STEPS_PER_EPOCH = 3e-2, 400, 1  # AdamW on memory/gate parameters only
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


@torch.no_grad()
def surprising_lines(model, tokenizer, document: str) -> list:
    """The training samples of the absorb: each line of ``document`` as <bos> + line, kept
    when the base ``model`` finds one of its tokens at least LINE_SURPRISE nats surprising,
    with the loss on its tokens at least TOKEN_SURPRISE nats surprising (the base's own
    next-token loss decides; nothing says which lines are needles).  Returns lift Samples."""
    from .lift.data import IGNORE, Sample

    samples = []
    for line in document.split("\n"):
        if not line.strip():
            continue
        ids = torch.tensor(tokenizer(line)["input_ids"])
        logprobs = model(ids[None]).logits[0, :-1].log_softmax(-1)
        surprise = torch.zeros(len(ids))
        surprise[1:] = -logprobs.gather(1, ids[1:, None])[:, 0]  # <bos> is never a target
        if surprise.max() >= LINE_SURPRISE:
            labels = torch.where(surprise >= TOKEN_SURPRISE, ids, torch.full_like(ids, IGNORE))
            samples.append(Sample(ids, labels, "segment"))
    return samples


def plain_samples(tokenizer, document: str) -> list:
    """The plain language-modelling part of the absorb (loss on every token): PLAIN_LINES
    evenly spaced lines of ``document``, each as <bos> + line, and PLAIN_PASSAGES evenly
    spaced passages of PASSAGE_TOKENS tokens (the first at the head, the last at the tail).
    Returns lift Samples."""
    from .lift.data import IGNORE, Sample

    def sample(ids: list[int]) -> Sample:
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[0] = IGNORE  # <bos> is never a target
        return Sample(ids, labels, "segment")

    lines = [line for line in document.split("\n") if line.strip()]
    samples = [sample(tokenizer(lines[j * len(lines) // PLAIN_LINES])["input_ids"])
               for j in range(PLAIN_LINES)]
    ids = tokenizer(document)["input_ids"]  # <bos> + document
    room = len(ids) - 1 - PASSAGE_TOKENS
    for i in range(PLAIN_PASSAGES):
        start = 1 + i * room // max(PLAIN_PASSAGES - 1, 1)
        samples.append(sample(ids[:1] + ids[start:start + PASSAGE_TOKENS]))
    return samples


@dataclass
class DemoAbsorb:
    """What the demo's absorb returns: the base with its trained memory, the trained tensors,
    the lift trainer's stats, and what was trained on."""

    model: torch.nn.Module
    params: list
    stats: object
    document_tokens: int
    num_segments: int  # samples trained on (surprising lines, plain lines and passages)
    labelled_tokens: int


def absorb_document(model, tokenizer, document: str, epochs: int, backend: str) -> DemoAbsorb:
    """LIFT the document into a Gated Memory of ``model``: the surprising lines of the
    document text (``surprising_lines``) and a plain LM part (``plain_samples``); no QA,
    nothing else; trained with the lift pipeline's
    adapter and trainer (``lift.adapters.attach``, ``lift.trainer.train``): base frozen, only
    memory and gate parameters trained."""
    from .lift import LiftConfig, adapters
    from .lift.data import IGNORE
    from .lift.trainer import Phase, train

    samples = surprising_lines(model, tokenizer, document) + plain_samples(tokenizer, document)
    config = LiftConfig(segment_epochs=epochs, qa_epochs=0, steps_per_epoch=STEPS_PER_EPOCH,
                        lr=LR, weight_decay=0.0,
                        memory=GatedMemoryConfig(mem_hidden=MEM_HIDDEN, gate_shift=GATE_SHIFT),
                        backend=backend, seed=SEED)
    torch.manual_seed(SEED)
    model, params = adapters.attach(model, config)
    stats = train(model, params, [Phase("surprising lines", samples, epochs)], config)
    return DemoAbsorb(model, params, stats, len(tokenizer(document)["input_ids"]), len(samples),
                      sum(int((s.labels != IGNORE).sum()) for s in samples))


@torch.no_grad()
def text_loss(model, tokenizer, sentences: list[str]) -> float:
    """Mean next-token loss (nats/token) of ``model`` over ``sentences``, each run on its own:
    what the memory costs the base on text that is not the document's news."""
    total, count = 0.0, 0
    for sentence in sentences:
        ids = torch.tensor([tokenizer(sentence)["input_ids"]])
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


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
    # matplotlib is optional (the `plot` extra): without it everything but the PNG is made.
    no_plot = missing_extra("plot", "the gate heatmap")
    if no_plot:
        print(f"demo: {no_plot}; it would be written to {heatmap}")
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
    rng = random.Random(SEED + 7)  # unrelated text: fresh filler, not from the document
    unrelated = [text.filler_sentence(rng) for _ in range(32)]
    unrelated_loss_before = text_loss(model, tokenizer, unrelated)
    absorb_started = time.perf_counter()  # scoring the lines + training
    result = absorb_document(model, tokenizer, document, epochs, backend)
    absorb_seconds = time.perf_counter() - absorb_started
    model, params, stats = result.model, result.params, result.stats
    recall_after, predicted_after = recall(model, tokenizer, facts)
    unrelated_loss_after = text_loss(model, tokenizer, unrelated)
    prompts = [text.fact_prompt(city, place) for city, place, _ in facts]
    needle_gates = mean_gates(model, tokenizer, prompts, last_only=True)
    unrelated_gates = mean_gates(model, tokenizer, unrelated, last_only=False)
    if not no_plot:
        gate_heatmap(needle_gates, unrelated_gates, Path(heatmap))

    print(f"\n{'needle':<20} {'code':>5} {'before':>7} {'truncated':>10} {'after':>7}")
    for (city, place, code), b, t, a in zip(facts, predicted_before, predicted_truncated,
                                             predicted_after):
        print(f"{city + ' ' + place:<20} {code:>5} {b:>7} {t:>10} {a:>7}")
    print(f"{'recall':<20} {'':>5} {recall_before:>7.2f} {recall_truncated:>10.2f} "
          f"{recall_after:>7.2f}")
    num_params = sum(p.numel() for p in params)
    print(f"\nabsorb: {absorb_seconds:.1f} s ({stats.seconds:.1f} s training, "
          f"{stats.tokens_per_second:.0f} tokens/s) on {result.num_segments} samples "
          f"({result.labelled_tokens} tokens with loss), {stats.steps} steps, loss {stats.step_losses[0]:.3f} -> {stats.step_losses[-1]:.3f};"
          f" only the {num_params} memory/gate parameters trained (base frozen)")
    print(f"loss on unrelated text {unrelated_loss_before:.3f} -> {unrelated_loss_after:.3f} "
          "nats/token (what the memory costs elsewhere)")
    print(f"mean gate at the code-predicting position {needle_gates.mean():.3f} vs "
          f"{unrelated_gates.mean():.3f} on unrelated text; heatmap: "
          f"{f'not drawn (no matplotlib), would be {heatmap}' if no_plot else heatmap}")
    out = {
        "recall_before": recall_before, "recall_after": recall_after,
        "recall_truncated_context": recall_truncated, "num_needles": len(facts),
        "document_tokens": result.document_tokens, "absorb_seconds": absorb_seconds,
        "train_seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second, "backend": backend,
        "absorb_epochs": epochs, "absorb_steps": stats.steps, "absorb_tokens": stats.tokens,
        "num_segments": result.num_segments, "loss_first": stats.step_losses[0],
        "loss_last": stats.step_losses[-1], "memory_parameters": num_params,
        "mem_hidden": MEM_HIDDEN, "gate_shift": GATE_SHIFT, "learning_rate": LR,
        "line_surprise_nats": LINE_SURPRISE, "token_surprise_nats": TOKEN_SURPRISE,
        "labelled_tokens": result.labelled_tokens, "model_window": WINDOW,
        "truncated_context_tokens": len(context),
        "needles": [{"key": f"{c} {p}", "code": code, "before": b, "truncated": t, "after": a}
                    for (c, p, code), b, t, a in zip(facts, predicted_before,
                                                      predicted_truncated, predicted_after)],
        "unrelated_loss_before": unrelated_loss_before,
        "unrelated_loss_after": unrelated_loss_after,
        "gate_needle_mean": float(needle_gates.mean()),
        "gate_unrelated_mean": float(unrelated_gates.mean()),
        "gate_heatmap": None if no_plot else str(heatmap), "total_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"total {out['total_seconds']:.1f} s")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
