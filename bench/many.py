"""Many documents at once (issue 15): absorbing N short documents together (lift.absorb_many,
one memory slot each, every step's samples of all documents in shared packed calls) vs one
after another (lift.absorb per document), and asking Q questions over those N memories in
packed batches (lift.answer_many) vs one generate call per question.

    python bench/many.py                         # 16 documents of ~1,000 tokens, 64 questions
    python bench/many.py --threads 2 --json many.json
    python bench/many.py --smoke                 # seconds: proves the harness

The model is the embedded demo model, the recipe the demo's (lines selected by the base's
surprise, KL anchor) with --epochs optimiser steps instead of its 400: tokens/s is a rate
per step, and both sides run the same steps.  The documents are text.other_document's
generator with seeds 1..N (about 100 sentences each).  Reported per side: the training
loop's tokens/s (TrainStats: tokens through forward+backward over the loop's wall time)
and the end-to-end wall time (with each document's preparation: tokenising, the base
scoring every line, the KL anchor texts, which both sides do per document).  The sides
run in the order given by --order, one after the other, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def documents(count: int, sentences: int) -> list[str]:
    from lift_kernels.demo_model import text

    return [text.other_document(seed, num_needles=4, filler_sentences=sentences)[0]
            for seed in range(1, count + 1)]


def questions(count: int, num_memories: int, sentences: int) -> list[tuple[int, str]]:
    """(memory slot, question) pairs, round-robin over the memories: each document's needle
    prompts ("the access code of the <city> <place> is")."""
    from lift_kernels.demo_model import text

    facts = [text.other_document(seed, num_needles=4, filler_sentences=sentences)[1]
             for seed in range(1, num_memories + 1)]
    return [(i % num_memories, text.fact_prompt(*facts[i % num_memories][
        (i // num_memories) % len(facts[0])][:2])) for i in range(count)]


def absorb_sides(docs, config, order, batch_tokens):
    """{"one_by_one"|"together": {"seconds", "loop_seconds", "tokens", ...}}, and the
    together run's model (its N memory slots)."""
    from lift_kernels.demo_model import load_demo_model
    from lift_kernels.lift import absorb, absorb_many

    tokenizer = load_demo_model()[1]
    sides, model = {}, None
    for side in order:
        start = time.perf_counter()
        if side == "together":
            result = absorb_many(load_demo_model()[0], tokenizer, docs, config=config,
                                 progress=False, batch_tokens=batch_tokens)
            loop, tokens, steps = result.stats.seconds, result.stats.tokens, result.stats.steps
            document_tokens = sum(r.document_tokens for r in result)
            model = result.model
        else:
            loop = tokens = steps = document_tokens = 0
            for doc in docs:
                result = absorb(load_demo_model()[0], tokenizer, doc, config=config,
                                progress=False)
                loop += result.stats.seconds
                tokens += result.stats.tokens
                steps += result.stats.steps
                document_tokens += result.document_tokens
        seconds = time.perf_counter() - start
        sides[side] = {"seconds": seconds, "loop_seconds": loop, "tokens": tokens,
                       "optimiser_steps": steps, "document_tokens": document_tokens,
                       "tokens_per_second": tokens / loop,
                       "end_to_end_tokens_per_second": tokens / seconds}
    return sides, model, tokenizer


def ask_sides(model, tokenizer, asked, config, batch_size, order):
    from lift_kernels.lift import answer_many

    sides, answers = {}, {}
    slots = [slot for slot, _ in asked]
    texts = [question for _, question in asked]
    answer_many(model, tokenizer, texts[:2], slots[:2], config, batch_size)  # warm-up
    for side in order:
        size = 1 if side == "one_by_one" else batch_size
        start = time.perf_counter()
        answers[side] = answer_many(model, tokenizer, texts, slots, config, size)
        seconds = time.perf_counter() - start
        sides[side] = {"seconds": seconds, "batch_size": size,
                       "questions_per_second": len(asked) / seconds}
    return sides, answers["one_by_one"] == answers["together"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=100,
                        help="filler sentences per document (100: about 1,000 tokens)")
    parser.add_argument("--epochs", type=int, default=20, help="optimiser steps per document")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=16384,
                        help="absorb_many: rows x longest row per packed call")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--order", default="one_by_one,together",
                        help="which side runs first (comma-separated)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 documents of 10 sentences, 2 steps, 4 questions")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.documents, args.sentences, args.epochs, args.questions = 2, 10, 2, 4
        args.batch_size = 2
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the cpu backend's OpenMP team

    import torch

    from lift_kernels.lift import recipe

    torch.set_num_threads(args.threads)
    order = args.order.split(",")
    if sorted(order) != ["one_by_one", "together"]:
        parser.error("--order must name one_by_one and together")
    config = recipe("demo", segment_epochs=args.epochs, backend=args.backend,
                    max_new_tokens=args.max_new_tokens)
    docs = documents(args.documents, args.sentences)
    absorbed, model, tokenizer = absorb_sides(docs, config, order, args.batch_tokens)
    asked, same = ask_sides(model, tokenizer,
                            questions(args.questions, args.documents, args.sentences),
                            config, args.batch_size, order)
    info = {"documents": args.documents, "epochs": args.epochs, "questions": args.questions,
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "backend": args.backend, "threads": args.threads, "order": order,
            "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average": round(os.getloadavg()[0], 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    absorb_ratio = (absorbed["together"]["tokens_per_second"]
                    / absorbed["one_by_one"]["tokens_per_second"])
    wall_ratio = absorbed["one_by_one"]["seconds"] / absorbed["together"]["seconds"]
    ask_ratio = (asked["together"]["questions_per_second"]
                 / asked["one_by_one"]["questions_per_second"])
    print(" ".join(f"{key}={value}" for key, value in info.items()))
    one, together = absorbed["one_by_one"], absorbed["together"]
    print(f"absorb {args.documents} documents ({together['document_tokens']} document tokens, "
          f"{together['tokens']} trained tokens in {together['optimiser_steps']} packed steps):")
    for name, side in absorbed.items():
        print(f"  {name:<11} loop {side['loop_seconds']:8.2f} s {side['tokens_per_second']:9.0f} "
              f"tokens/s   end to end {side['seconds']:8.2f} s")
    print(f"  together / one by one: {absorb_ratio:.2f}x tokens/s in the loop, "
          f"{wall_ratio:.2f}x end to end")
    print(f"ask {args.questions} questions over {args.documents} memories "
          f"(answers identical: {same}):")
    for name, side in asked.items():
        print(f"  {name:<11} batch {side['batch_size']:3d} {side['seconds']:8.2f} s "
              f"{side['questions_per_second']:8.1f} questions/s")
    print(f"  packed / one call per question: {ask_ratio:.2f}x questions/s")
    results = {"info": info, "absorb": absorbed, "ask": asked, "answers_identical": same,
               "absorb_speedup": absorb_ratio, "absorb_wall_speedup": wall_ratio,
               "ask_speedup": ask_ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
