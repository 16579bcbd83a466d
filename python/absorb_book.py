"""Absorb a book into a real instruction model with LIFT, then ask it questions without the
book in its context, next to the truncated-context baseline.

Needs: a CUDA GPU (Qwen2.5-0.5B-Instruct: any GPU with >= 8 GB; Llama-3-8B-Instruct: one
40-80 GB GPU, or several with torchrun, see below), `pip install lift-kernels` (with
`lift-kernels[lora]` for --adapter lora), the checkpoint (downloaded from the Hugging Face
hub on first use; Llama 3 is gated: accept its licence and `huggingface-cli login` first), a
UTF-8 text file, and optionally a JSON file of {"question", "answer"} pairs (used as
auxiliary QA for training when --qa is given, and asked afterwards).

    python python/absorb_book.py --book moby_dick.txt --questions moby_qa.json
    python python/absorb_book.py --model meta-llama/Meta-Llama-3-8B-Instruct \\
        --book moby_dick.txt --questions moby_qa.json --gradient-checkpointing
    python python/absorb_book.py --adapter lora ...        # the same document into LoRA
    torchrun --nproc_per_node 4 python/absorb_book.py ...   # data parallel over segments

On a CPU it runs too (float32), slowly; any local checkpoint directory works as --model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lift_kernels.lift import LiftConfig, absorb, answer, init_distributed, load_qa
from lift_kernels.lift.pipeline import resolve_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--book", required=True, help="UTF-8 text file")
    parser.add_argument("--title", default=None)
    parser.add_argument("--questions", help="JSON list of {question, answer} to ask")
    parser.add_argument("--qa", action="store_true",
                        help="also train on --questions as auxiliary QA (the answers are then "
                             "seen in training: use held-out questions to evaluate)")
    parser.add_argument("--generate-qa", action="store_true",
                        help="let the model write its own QA pairs from the book first")
    parser.add_argument("--adapter", choices=("gated-memory", "lora"), default="gated-memory")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default="book_memory.safetensors")
    args = parser.parse_args()

    config = LiftConfig(title=args.title, adapter=args.adapter,
                        gradient_checkpointing=args.gradient_checkpointing,
                        contextualized=True)  # helped in the authors' ablation
    ctx = init_distributed(config.dist_timeout_s)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=resolve_dtype(config.dtype, ctx.device)).to(ctx.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.book, encoding="utf-8") as f:
        book = f.read()
    questions = load_qa(args.questions) if args.questions else []

    baseline = {}
    if ctx.is_main:
        for pair in questions:  # the truncated-context baseline: head + tail of the book
            baseline[pair.question] = answer(model, tokenizer, pair.question, document=book,
                                             config=config)

    qa = "generate" if args.generate_qa else (questions if args.qa and questions else None)
    start = time.perf_counter()
    result = absorb(model, tokenizer, book, qa=qa, config=config, ctx=ctx,
                    progress=ctx.is_main)
    if not ctx.is_main:
        return
    print(f"absorbed {result.document_tokens} tokens ({result.num_segments} segments, "
          f"{len(result.qa_pairs)} QA pairs) in {time.perf_counter() - start:.1f} s, "
          f"{result.tokens_per_second:.0f} tokens/s over {ctx.world_size} process(es)")
    result.save(args.out)
    print(f"memory written to {args.out} (reuse: lift-kernels ask --model <dir> --memory "
          f"{args.out} --question ...)")
    rows = []
    for pair in questions:
        with_memory = answer(result.model, tokenizer, pair.question, document=book,
                             config=config)
        memory_only = answer(result.model, tokenizer, pair.question, config=config)
        rows.append({"question": pair.question, "reference": pair.answer,
                     "truncated_context": baseline[pair.question],
                     "lift_with_context": with_memory, "lift_memory_only": memory_only})
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
