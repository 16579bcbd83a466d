"""The lift-kernels command line (also `python -m lift_kernels`).

    lift-kernels demo [--json FILE] [--write-document FILE]
    lift-kernels absorb --model PATH|demo --document FILE --out MEMORY.safetensors [options]
    lift-kernels absorb --model PATH|demo --document A.txt B.txt ... --out-dir DIR [options]
    lift-kernels ask --model PATH|demo --memory MEMORY.safetensors --question TEXT [options]
    lift-kernels ask --model PATH|demo --memories DIR --questions FILE.jsonl [options]
    lift-kernels eval --model PATH|demo [--memory MEMORY.safetensors] --qa QA.json [options]
    lift-kernels bench [benchmark options]
    lift-kernels --version          what this installation holds (lift_kernels.build_info())

`absorb --out` runs data-parallel under `torchrun --nproc_per_node K` (rank 0 writes and
prints); `absorb --out-dir` trains one memory per document in one process, all documents in
shared packed calls.  Exit codes: see EXIT_CODES."""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_CODES = {
    "ok": 0,
    "error": 1,          # anything unexpected (a bug: please report it)
    "usage": 2,          # bad command-line options (argparse's own code too)
    "document": 3,       # document missing, unreadable, not UTF-8, or empty
    "model": 4,          # model path missing or not a causal language model
    "unsupported": 5,    # model family the adapter does not support
    "memory": 6,         # memory file missing, not ours, made for another model, unknown name
    "qa": 7,             # QA or questions file invalid
    "distributed": 8,    # a rank failed or timed out
    "missing_extra": 9,  # an optional package is not installed (the message names the extra)
}


def _error_kinds():
    from .install import MissingExtraError
    from .lift import (DistributedError, DocumentError, MemoryFileError, ModelLoadError,
                       QAError, UnsupportedModelError)

    # Order matters: the specific ValueError subclasses before ValueError itself.
    return ((MissingExtraError, "missing_extra"), (DocumentError, "document"),
            (ModelLoadError, "model"), (UnsupportedModelError, "unsupported"),
            (MemoryFileError, "memory"), (QAError, "qa"), (DistributedError, "distributed"),
            (ValueError, "usage"))


def _require_extras(adapter: str | None = None, backend: str | None = None) -> None:
    """Raise MissingExtraError (exit code 9), before any work starts, when the adapter or
    backend a command will use needs an optional package that is not installed."""
    from .install import require_extra

    if adapter == "lora":
        require_extra("lora", "--adapter lora")
    if backend == "triton":
        require_extra("triton", "--backend triton")


class _Version(argparse.Action):
    """`--version`: the package version, the compiled backends and the libraries found."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .install import build_info, describe

        print(describe(build_info()))
        parser.exit()


def build_parser(demo_options: bool = True) -> argparse.ArgumentParser:
    """The whole command line.  demo_options=False leaves out the demo's own options, whose
    import (the demo and torch) is only worth it when the command is `demo`."""
    parser = argparse.ArgumentParser(prog="lift-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version,
                        help="print the version, the compiled backends and the libraries found")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded offline LIFT demo")
    demo.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    demo.add_argument("--write-document", metavar="FILE",
                      help="write the built-in document to FILE and exit")
    if demo_options:
        try:  # the demo may add its own options (e.g. a fast mode)
            from .demo import add_arguments
        except ImportError:
            add_arguments = None
        if add_arguments is not None:
            add_arguments(demo)

    absorb = sub.add_parser("absorb", help="train documents into a model's memory")
    _model_options(absorb)
    absorb.add_argument("--document", required=True, nargs="+", metavar="FILE",
                        help="UTF-8 text file(s); several need --out-dir")
    out = absorb.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="MEMORY.safetensors",
                     help="where to write the trained memory (one document)")
    out.add_argument("--out-dir", metavar="DIR",
                     help="one memory per document, DIR/<document name>.safetensors, all "
                          "trained in the same run (memory slots, packed calls)")
    absorb.add_argument("--qa", nargs="+", metavar="FILE|generate",
                        help="auxiliary QA: a JSON list of {question, answer} (one file per "
                             "document), or 'generate' (the model writes pairs from random "
                             "windows); default none")
    absorb.add_argument("--title", help="document title, prepended before tokenising")
    absorb.add_argument("--adapter", choices=("gated-memory", "lora"), default=None,
                        help="gated-memory (default, this package's kernels) or lora (PEFT)")
    absorb.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    absorb.add_argument("--epochs", type=int, default=None,
                        help="epochs on segments alone (default 3)")
    absorb.add_argument("--qa-epochs", type=int, default=None,
                        help="epochs on segments + QA afterwards (default 5)")
    absorb.add_argument("--steps-per-epoch", type=int, default=None,
                        help="optimiser steps per epoch (default 1: the whole epoch)")
    absorb.add_argument("--lr", type=float, default=None, help="AdamW learning rate (1e-3)")
    absorb.add_argument("--segment-length", type=int, default=None, help="tokens (2048)")
    absorb.add_argument("--segment-stride", type=int, default=None, help="tokens (768)")
    absorb.add_argument("--contextualized", action="store_true", default=None,
                        help="contextualised training samples (head/tail context + recite)")
    absorb.add_argument("--gradient-checkpointing", action="store_true", default=None)
    absorb.add_argument("--fsdp", action="store_true", default=None,
                        help="under torchrun: shard the frozen base with FSDP2")
    absorb.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long a rank waits for the others before failing (600)")
    _recipe_options(absorb)
    absorb.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                        help="--out-dir: rows x longest row per packed call (default 16384)")
    absorb.add_argument("--quiet", action="store_true", help="no progress bar")
    absorb.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout")

    ask = sub.add_parser("ask", help="answer questions with trained memories")
    _model_options(ask)
    memory = ask.add_mutually_exclusive_group(required=True)
    memory.add_argument("--memory", metavar="FILE", help="from `absorb --out`")
    memory.add_argument("--memories", metavar="DIR",
                        help="a folder of memory files (`absorb --out-dir`), named by file "
                             "name without .safetensors; needs --questions")
    question = ask.add_mutually_exclusive_group(required=True)
    question.add_argument("--question", help="one question (with --memory)")
    question.add_argument("--questions", metavar="FILE.jsonl",
                          help='JSON Lines of {"memory": NAME, "question": TEXT} (with '
                               "--memories), answered in packed batches")
    ask.add_argument("--batch-size", type=int, default=16,
                     help="--questions: questions per batched generate (default 16)")
    ask.add_argument("--document", metavar="FILE",
                     help="--memory: also put the document's head and tail in the context")
    ask.add_argument("--context-tokens", type=int, default=None,
                     help="document tokens in the context (default: the model's window)")
    ask.add_argument("--max-new-tokens", type=int, default=None, help="(default 64)")
    ask.add_argument("--json", action="store_true", help="print the answer as JSON")

    _eval_parser(sub)

    # Every option after `bench` belongs to the benchmark's own parser (main passes them on).
    sub.add_parser("bench", help="kernel benchmarks (lift_kernels.benchmark)", add_help=False)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH|demo",
                   help="a Hugging Face checkpoint directory, or 'demo' (embedded tiny model)")
    p.add_argument("--backend", default=None,
                   help="gated-memory attention backend (auto, torch, triton, cuda, cpu, "
                        "reference)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="base model dtype (auto: bfloat16 on GPU, float32 on CPU)")


def _lazy_choice(module: str, name: str):
    """An argparse `type` that checks a value against the tuple/dict `name` of `module`,
    imported only when an option is parsed (building the parser imports nothing heavy)."""
    def check(value: str) -> str:
        import importlib

        choices = getattr(importlib.import_module(module, __package__), name)
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {', '.join(sorted(choices))})")
        return value

    return check


def _recipe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="authors", type=_lazy_choice(".lift.config", "RECIPES"),
                   help="named LiftConfig preset (default authors: the paper's recipe; demo: "
                        "token-selective lines held to the base by a KL anchor)")
    p.add_argument("--config", metavar="FILE",
                   help="JSON object of LiftConfig fields over the recipe (options given "
                        "here win over both)")


def _recipe_fields(args) -> dict:
    """LiftConfig fields of --recipe with the --config file over them (a "memory" object
    updates the recipe's memory fields)."""
    from .lift import RECIPES

    fields = json.loads(json.dumps(RECIPES[getattr(args, "recipe", None) or "authors"]))
    if getattr(args, "config", None):
        try:
            with open(args.config, encoding="utf-8") as f:
                overrides = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config!r}: {e}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--config {args.config!r} must hold a JSON object")
        memory = overrides.pop("memory", None)
        if memory is not None:
            if not isinstance(memory, dict):
                raise ValueError(f"--config {args.config!r}: \"memory\" must be a JSON object")
            fields["memory"] = {**fields.get("memory", {}), **memory}
        fields.update(overrides)
    return fields


def _lift_config(args):
    from .lift import LiftConfig

    fields = _recipe_fields(args)
    options = {"title": "title", "adapter": "adapter", "seed": "seed", "epochs": "segment_epochs",
               "qa_epochs": "qa_epochs", "steps_per_epoch": "steps_per_epoch", "lr": "lr",
               "segment_length": "segment_length", "segment_stride": "segment_stride",
               "contextualized": "contextualized",
               "gradient_checkpointing": "gradient_checkpointing", "fsdp": "fsdp",
               "dist_timeout": "dist_timeout_s", "backend": "backend", "dtype": "dtype"}
    for option, name in options.items():
        value = getattr(args, option, None)
        if value is not None:
            fields[name] = value
    return LiftConfig.from_dict(fields)


def _device(args):
    return None if args.device == "auto" else args.device


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_absorb(args, say) -> int:
    if args.out_dir is not None:
        return _absorb_many(args)
    from .lift import absorb, init_distributed, load_model, read_document
    from .lift.pipeline import resolve_dtype
    from .lift.distributed import barrier, shutdown

    if len(args.document) != 1:
        raise ValueError(f"--out takes one document, got {len(args.document)}; give --out-dir "
                         "DIR for one memory per document")
    if args.qa is not None and len(args.qa) != 1:
        raise ValueError(f"--qa: one document takes one QA source, got {len(args.qa)}")
    if args.batch_tokens is not None:
        raise ValueError("--batch-tokens belongs to --out-dir (documents trained together)")
    config = _lift_config(args)
    _require_extras(config.adapter, config.backend)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {args.out!r}: directory {out_dir!r} does not exist")
    document = read_document(args.document[0])
    qa = args.qa[0] if args.qa else None
    ctx = init_distributed(config.dist_timeout_s, _device(args))
    say.rank = (ctx.rank, ctx.world_size)
    if not ctx.is_main:  # rank 0 logs; the others print only their errors
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    try:
        # Under FSDP each rank loads on the CPU and moves only its shard to its device.
        load_on = "cpu" if config.fsdp and ctx.distributed else ctx.device
        model, tokenizer = load_model(args.model, load_on,
                                      resolve_dtype(config.dtype, ctx.device))
        result = absorb(model, tokenizer, document, qa=qa, config=config,
                        progress=not (args.quiet or args.json), ctx=ctx)
        if ctx.is_main:
            tmp = args.out + ".tmp"
            result.save(tmp)
            os.replace(tmp, args.out)
        barrier(ctx)
    finally:
        shutdown(ctx)
    if not ctx.is_main:
        return 0
    stats = result.stats
    report = {
        "out": args.out, "model": args.model, "adapter": config.adapter,
        "backend": config.backend, "device": str(ctx.device), "world_size": ctx.world_size,
        "seed": config.seed, "document_tokens": result.document_tokens,
        "num_segments": result.num_segments, "num_qa": len(result.qa_pairs),
        "steps": stats.steps, "first_loss": stats.step_losses[0],
        "last_loss": stats.step_losses[-1], "step_losses": stats.step_losses,
        "tokens": stats.tokens, "seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second, "fingerprint": result.fingerprint,
        "labelled_tokens": result.labelled_tokens, "num_anchors": result.num_anchors,
        "recipe_name": args.recipe, "recipe": config.to_dict(),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"absorbed {result.document_tokens} tokens ({result.num_segments} segments, "
              f"{len(result.qa_pairs)} QA pairs) into {config.adapter} memory: {args.out}")
        print(f"{stats.steps} optimiser steps, loss {stats.step_losses[0]:.4f} -> "
              f"{stats.step_losses[-1]:.4f}, {stats.seconds:.1f} s, "
              f"{stats.tokens_per_second:.0f} tokens/s on {ctx.world_size} x {ctx.device}")
    return 0


def memory_names(paths) -> list[str]:
    """Each path's file name without its last extension ("notes/a.txt" -> "a"): the name of
    its memory file; ValueError when two paths give one name."""
    names = [os.path.splitext(os.path.basename(os.fspath(p)))[0] for p in paths]
    for name, path in zip(names, paths):
        if not name:
            raise ValueError(f"--document {path!r} has no file name to name its memory after")
        same = [q for n, q in zip(names, paths) if n == name]
        if len(same) > 1:
            raise ValueError(f"--document {same[0]!r} and {same[1]!r} would both write the "
                             f"memory file {name}.safetensors; rename one")
    return names


def _absorb_many(args) -> int:
    """absorb --out-dir: one memory per document, trained in one run (lift.absorb_many)."""
    from .lift import absorb_many, load_model, read_document
    from .lift.many import DEFAULT_BATCH_TOKENS
    from .lift.pipeline import resolve_dtype

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("absorb --out-dir trains its documents together in one process; "
                         "under torchrun give one --document and --out")
    if not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir {args.out_dir!r} is not an existing directory")
    names = memory_names(args.document)
    qa = args.qa
    if qa is not None:
        if len(qa) == 1 and (qa[0] in ("none", "generate") or len(args.document) == 1):
            qa = qa * len(args.document)
        elif len(qa) != len(args.document):
            raise ValueError(f"--qa: give 'generate', 'none' or one QA file per document "
                             f"({len(args.document)}), got {len(qa)} values")
    config = _lift_config(args)
    _require_extras(config.adapter, config.backend)
    documents = [read_document(path) for path in args.document]
    device = _device(args) or _default_device()
    model, tokenizer = load_model(args.model, device, resolve_dtype(config.dtype, device))
    result = absorb_many(model, tokenizer, documents, qa=qa, config=config,
                         progress=not (args.quiet or args.json),
                         batch_tokens=args.batch_tokens or DEFAULT_BATCH_TOKENS)
    paths = result.save(args.out_dir, names)
    stats = result.stats
    report = {
        "out_dir": args.out_dir, "model": args.model, "adapter": config.adapter,
        "backend": config.backend, "device": str(device), "seed": config.seed,
        "documents": [{
            "document": path, "out": out, "document_tokens": r.document_tokens,
            "num_segments": r.num_segments, "num_qa": len(r.qa_pairs), "steps": r.stats.steps,
            "first_loss": r.stats.step_losses[0], "last_loss": r.stats.step_losses[-1],
            "tokens": r.stats.tokens, "labelled_tokens": r.labelled_tokens,
            "num_anchors": r.num_anchors} for path, out, r in zip(args.document, paths, result)],
        "steps": stats.steps, "tokens": stats.tokens, "seconds": stats.seconds,
        "tokens_per_second": stats.tokens_per_second, "fingerprint": result[0].fingerprint,
        "recipe_name": args.recipe, "recipe": config.to_dict(),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    for doc in report["documents"]:
        print(f"absorbed {doc['document_tokens']} tokens ({doc['num_segments']} segments, "
              f"{doc['num_qa']} QA pairs) into {doc['out']}: loss {doc['first_loss']:.4f} -> "
              f"{doc['last_loss']:.4f} in {doc['steps']} optimiser steps")
    print(f"{len(paths)} documents together: {stats.steps} steps, {stats.seconds:.1f} s, "
          f"{stats.tokens_per_second:.0f} tokens/s on {device}")
    return 0


def cmd_ask(args, say) -> int:
    if args.memories is not None or args.questions is not None:
        return _ask_many(args)
    from .lift import LiftConfig, answer, load_memory_file, load_model, read_document
    from .lift.adapters import read_metadata

    metadata = read_metadata(args.memory)  # fail on a bad file before loading a model
    document = read_document(args.document) if args.document else None
    recorded = json.loads(metadata.get("lift.config", "{}"))
    config = LiftConfig.from_dict({**recorded, **{k: v for k, v in {
        "answer_context_tokens": args.context_tokens, "max_new_tokens": args.max_new_tokens,
        "backend": args.backend, "dtype": args.dtype}.items() if v is not None}})
    _require_extras(metadata.get("lift.adapter"), config.backend)
    model, tokenizer = load_model(args.model, _device(args) or _default_device(), config.dtype)
    model, _ = load_memory_file(model, args.memory, config.backend)
    text = answer(model, tokenizer, args.question, document, config)
    if args.json:
        print(json.dumps({"question": args.question, "answer": text, "memory": args.memory,
                          "adapter": metadata["lift.adapter"], "model": args.model,
                          "with_document": document is not None}))
    else:
        print(text)
    return 0


def _ask_many(args) -> int:
    """ask --memories DIR --questions FILE.jsonl: every question with its own memory, the
    memories as slots of one model, questions answered in packed batches."""
    import time

    from .lift import LiftConfig, MemoryFileError, answer_many, load_model, load_questions
    from .lift.adapters import load_slots, read_metadata

    if args.memories is None or args.questions is None:
        raise ValueError("--memories DIR goes with --questions FILE.jsonl (and --memory FILE "
                         "with --question TEXT)")
    if args.document is not None:
        raise ValueError("--document goes with --memory: with --memories each memory holds "
                         "its own document")
    if isinstance(args.batch_size, bool) or args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")
    if not os.path.isdir(args.memories):
        raise MemoryFileError(f"--memories {args.memories!r} is not an existing directory")
    available = {os.path.splitext(f)[0]: os.path.join(args.memories, f)
                 for f in sorted(os.listdir(args.memories)) if f.endswith(".safetensors")}
    questions = load_questions(args.questions)
    used = list(dict.fromkeys(q["memory"] for q in questions))  # first-use order
    for number, q in enumerate(questions, 1):
        if q["memory"] not in available:
            raise MemoryFileError(
                f"question {number} of {args.questions!r} asks memory {q['memory']!r}, which "
                f"{args.memories!r} does not hold (memories there: "
                f"{', '.join(available) or 'none'})")
    overrides = {k: v for k, v in {"max_new_tokens": args.max_new_tokens,
                                   "backend": args.backend, "dtype": args.dtype}.items()
                 if v is not None}
    configs = {name: LiftConfig.from_dict({**json.loads(read_metadata(
        available[name]).get("lift.config", "{}")), **overrides}) for name in used}
    first = configs[used[0]]
    _require_extras(backend=first.backend)
    device = _device(args) or _default_device()
    model, tokenizer = load_model(args.model, device, first.dtype)
    model, _ = load_slots(model, [available[name] for name in used], first.backend)
    start = time.perf_counter()
    answers = answer_many(model, tokenizer, [q["question"] for q in questions],
                          [used.index(q["memory"]) for q in questions],
                          [configs[q["memory"]] for q in questions], args.batch_size)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({
            "model": args.model, "memories": args.memories, "questions": args.questions,
            "num_questions": len(questions), "num_memories": len(used),
            "batch_size": args.batch_size, "seconds": seconds,
            "questions_per_second": len(questions) / seconds if seconds > 0 else 0.0,
            "answers": [{"memory": q["memory"], "question": q["question"], "answer": a}
                        for q, a in zip(questions, answers)]}))
    else:
        for q, a in zip(questions, answers):
            print(f"{q['memory']}\t{q['question']}\t{a}")
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="recall, unrelated-text loss and gates of a memory")
    _model_options(p)
    p.add_argument("--memory", metavar="FILE", default=None,
                   help="from `absorb --out` (default: the base model alone)")
    p.add_argument("--qa", required=True, metavar="FILE",
                   help='JSON list of {"question", "answer"}')
    p.add_argument("--match", type=_lazy_choice(".lift.evaluate", "MATCHES"), default="exact",
                   help="exact: the completion as long as the answer equals it; contains: "
                        "the answer appears in the completion (default exact)")
    p.add_argument("--prompt", type=_lazy_choice(".lift.evaluate", "PROMPTS"),
                   default="question",
                   help="question: the pipeline's question prompt; raw: the question text "
                        "is the prompt and the answer its continuation (default question)")
    p.add_argument("--unrelated", metavar="FILE", default=None,
                   help="text that is not the document, one text a line: loss with and "
                        "without the memory, and the gate on it")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion length for --match contains (default 64)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def cmd_eval(args, say) -> int:
    from .lift import LiftConfig, evaluate, load_memory_file, load_model, load_qa, read_document

    config, adapter = LiftConfig(), None
    if args.memory:
        from .lift.adapters import read_metadata

        metadata = read_metadata(args.memory)  # fail on a bad file before loading a model
        config = LiftConfig.from_dict(json.loads(metadata.get("lift.config", "{}")))
        adapter = metadata.get("lift.adapter")
    overrides = {"backend": args.backend, "dtype": args.dtype,
                 "max_new_tokens": args.max_new_tokens}
    config = LiftConfig.from_dict({**config.to_dict(),
                                   **{k: v for k, v in overrides.items() if v is not None}})
    _require_extras(adapter, config.backend)
    pairs = load_qa(args.qa)
    unrelated = read_document(args.unrelated).split("\n") if args.unrelated else None
    model, tokenizer = load_model(args.model, _device(args) or _default_device(), config.dtype)
    if args.memory:
        model, _ = load_memory_file(model, args.memory, config.backend)
    report = evaluate.evaluate(model, tokenizer, pairs, unrelated, match=args.match,
                               prompt=args.prompt, max_new_tokens=config.max_new_tokens)
    out = {"model": args.model, "memory": args.memory, "match": args.match,
           "prompt": args.prompt, **report.to_dict()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"recall {report.recall:.3f} ({sum(a['correct'] for a in report.answers)} of "
          f"{report.num_questions}, {args.match} match)")
    if report.unrelated_loss_base is not None:
        print(f"unrelated-text loss {report.unrelated_loss_base:.4f} without the memory, "
              f"{report.unrelated_loss_memory:.4f} with it (nats/token)")
    if report.gate_answer is not None:
        print("mean gate per layer: " + ", ".join(
            f"layer {i}: answer {a:.3f}" + (f" / unrelated {u:.3f}" if u is not None else "")
            for i, (a, u) in enumerate(zip(out["gate_answer_per_layer"],
                                           out["gate_unrelated_per_layer"] or
                                           [None] * len(report.gate_answer)))))
    return 0


def cmd_bench(args, say) -> int:
    try:
        from .benchmark import main as bench_main
    except ImportError as e:
        say(f"the benchmark is not available in this installation "
            f"(lift_kernels.benchmark: {e})")
        return EXIT_CODES["error"]
    return int(bench_main(args.bench_args) or 0)


def cmd_demo(args, say) -> int:
    from .demo import run_demo

    _require_extras(backend=getattr(args, "backend", None))
    return int(run_demo(args) or 0)


class _Say:
    """Error messages on stderr, prefixed with the command and, when distributed, the rank."""

    def __init__(self, command: str):
        self.command, self.rank = command, None

    def __call__(self, message: str) -> None:
        where = f" [rank {self.rank[0]}/{self.rank[1]}]" if self.rank and self.rank[1] > 1 else ""
        print(f"lift-kernels {self.command}{where}: error: {message}", file=sys.stderr,
              flush=True)


def _json_error(args, name: str, message: str) -> None:
    """Under --json, the error as {"error", "message", "exit_code"}: on stdout for absorb/ask
    (their --json is a flag), into the file for demo (its --json names one)."""
    report = json.dumps({"error": name, "message": message, "exit_code": EXIT_CODES[name]})
    target = getattr(args, "json", None)
    if target is True:
        print(report)
    elif isinstance(target, str):
        try:
            with open(target, "w", encoding="utf-8") as f:
                f.write(report + "\n")
        except OSError:  # an unwritable FILE: the error line on stderr is all there is
            pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(demo_options=command == "demo")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    say = _Say(args.command)
    commands = {"absorb": cmd_absorb, "ask": cmd_ask, "bench": cmd_bench, "demo": cmd_demo,
                "eval": cmd_eval}
    try:
        return commands[args.command](args, say)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:
        for kind, name in _error_kinds():
            if isinstance(e, kind):
                say(str(e))
                _json_error(args, name, str(e))
                return EXIT_CODES[name]
        if say.rank and say.rank[1] > 1:  # name the rank before torchrun's summary
            say(f"this rank failed: {type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
