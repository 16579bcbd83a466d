"""Gated Memory inside a Hugging Face Trainer: for users who already train with Trainer
(its callbacks, logging, DeepSpeed/accelerate integration) and want LIFT's adapter there.

The LIFT pieces used: the sample builders of lift_kernels.lift.data (segments and QA with the
loss on the right tokens), lift_kernels.replace_attention + freeze_base_model (only memory and
gate train), save_memory.  Trainer then runs the recipe's optimiser settings.  Two
simplifications against `lift-kernels absorb`: one phase over segments + QA instead of
segments first, and the gradient accumulated over a whole epoch through
gradient_accumulation_steps (Trainer's own loss scaling).

Needs: `pip install lift-kernels accelerate`, a GPU for a real checkpoint (the default,
Qwen2.5-0.5B-Instruct, downloads from the hub; ~8 GB of GPU memory), a UTF-8 text file.
Any local checkpoint directory of a supported family (llama, mistral, qwen2, qwen3) works
as --model, on a CPU too.

    python python/hf_trainer.py --book moby_dick.txt --out moby.safetensors
    torchrun --nproc_per_node 2 python/hf_trainer.py --book moby_dick.txt   # Trainer's DDP
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import lift_kernels
from lift_kernels.lift import LiftConfig, load_qa
from lift_kernels.lift.data import document_ids, qa_samples, segment_samples


class Samples(torch.utils.data.Dataset):
    """LIFT samples as Trainer examples (batch size 1: no padding needed)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {"input_ids": self.samples[i].input_ids, "labels": self.samples[i].labels}


def collate(batch):
    return {key: torch.stack([b[key] for b in batch]) for key in batch[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--book", required=True)
    parser.add_argument("--qa", help="JSON list of {question, answer} (auxiliary QA)")
    parser.add_argument("--epochs", type=int, default=8, help="3 + 5 in the authors' recipe")
    parser.add_argument("--out", default="book_memory.safetensors")
    parser.add_argument("--output-dir", default="lift_trainer_out")
    args = parser.parse_args()

    recipe = LiftConfig()  # the same defaults as `lift-kernels absorb`
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.book, encoding="utf-8") as f:
        ids = document_ids(tokenizer, f.read())
    rng = random.Random(recipe.seed)
    samples = segment_samples(tokenizer, ids, recipe, rng)
    if args.qa:
        samples += qa_samples(tokenizer, ids, load_qa(args.qa), recipe, rng)

    torch.manual_seed(recipe.seed)
    lift_kernels.replace_attention(model, config=recipe.memory, backend=recipe.backend)
    lift_kernels.freeze_base_model(model)

    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    arguments = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=1,
        # One optimiser step per epoch, as the authors did (each rank sees len / world).
        gradient_accumulation_steps=max(1, len(samples) // world),
        learning_rate=recipe.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=recipe.weight_decay, adam_beta1=recipe.betas[0],
        adam_beta2=recipe.betas[1], adam_epsilon=recipe.eps, max_grad_norm=recipe.max_grad_norm,
        bf16=cuda, gradient_checkpointing=cuda,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], seed=recipe.seed,
        remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=Samples(samples),
                      data_collator=collate)
    trainer.train()
    if trainer.is_world_process_zero():
        lift_kernels.save_memory(model, args.out)
        print(f"memory of {len(samples)} samples written to {args.out}; load it with "
              "lift_kernels.load_memory(model, path) on the same base model")


if __name__ == "__main__":
    main()
