"""Pretrain the demo's tiny Llama on the synthetic corpus of ``text.py`` and write
``weights.safetensors`` (the file shipped in the package).

    nice -n 10 python -m lift_kernels.demo_model.pretrain [--steps N] [--out FILE]

The shipped file: the defaults (seed 0, 1000 steps of 8 x 256 tokens, AdamW lr 5e-3 with
warm-up and cosine decay, 1 thread), about 8 minutes on one busy CPU core.  The corpus
teaches the base to carry a fact's city into the position that predicts its code (the
city's digit-pair prefix: greedy accuracy 0.98 at the end) and offers a copy lesson
(restated facts), which this small budget does not learn (copy accuracy <= 0.04).
Seeded: the same seed, step count and thread count re-create the same weights.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

from . import WEIGHTS, WINDOW, build_model, build_tokenizer, text


def batches(tokenizer, seed: int, batch_size: int):
    """Endless [batch_size, WINDOW] token batches of fresh pretraining sequences."""
    rng = random.Random(seed)
    excluded = frozenset(text.needles())
    while True:
        rows = []
        for _ in range(batch_size):
            ids = tokenizer(text.pretraining_sequence(rng, WINDOW + 32, excluded))["input_ids"]
            rows.append(ids[:WINDOW])
        yield torch.tensor(rows)


def code_positions(ids: list[int], tokenizer):
    """(position predicting the first code token, fact key, whether the key was seen before)
    for every fact in ``ids``: the position is that of "is"."""
    is_id = tokenizer.convert_tokens_to_ids("is")
    access_id = tokenizer.convert_tokens_to_ids("access")
    seen, out = set(), []
    for i in range(len(ids) - 3):
        if ids[i] == is_id and i >= 6 and ids[i - 6] == access_id:
            key = (ids[i - 2], ids[i - 1])
            out.append((i, key in seen))
            seen.add(key)
    return out


@torch.no_grad()
def code_accuracy(model, tokenizer, seed: int = 12345, sequences: int = 16) -> dict:
    """Greedy accuracy, under teacher forcing on held-out sequences, of the first code token
    of first statements ("prefix": the city's digit pair, which needs the city at "is") and
    of both code tokens of restated facts ("copy")."""
    tallies = {"prefix": [0, 0], "copy": [0, 0]}
    rng = random.Random(seed)
    for _ in range(sequences):
        ids = tokenizer(text.pretraining_sequence(rng, WINDOW + 64))["input_ids"][:WINDOW]
        pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        for pos, restated in code_positions(ids, tokenizer):
            if pos + 2 >= len(ids):
                continue
            if restated:
                right = pred[pos] == ids[pos + 1] and pred[pos + 1] == ids[pos + 2]
                tally = tallies["copy"]
            else:
                right, tally = pred[pos] == ids[pos + 1], tallies["prefix"]
            tally[0] += right
            tally[1] += 1
    return {k: (r / n if n else float("nan")) for k, (r, n) in tallies.items()}


def save(model, path, steps: int, seed: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, path, metadata={"steps": str(steps), "seed": str(seed)})


def pretrain(steps: int, seed: int, batch_size: int, lr: float, log_every: int = 50,
             checkpoints: str | None = None):
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(weights=None).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def schedule(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.perf_counter()
    data = batches(tokenizer, seed, batch_size)
    for step in range(steps):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            acc = code_accuracy(model, tokenizer)
            model.train()
            if checkpoints:
                save(model, f"{checkpoints}.step{step + 1}.safetensors", step + 1, seed)
            print(f"step {step + 1:5d}  loss {loss.item():.3f}  prefix acc {acc['prefix']:.2f}"
                  f"  copy acc {acc['copy']:.2f}"
                  f"  {time.perf_counter() - start:.0f}s", flush=True)
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (float sums depend on it: keep it to re-create the weights; "
                             "1 is also the fastest for this tiny model)")
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--checkpoints", metavar="PREFIX",
                        help="also save PREFIX.stepN.safetensors at every log line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = pretrain(args.steps, args.seed, args.batch_size, args.lr, args.log_every,
                     args.checkpoints)
    save(model, args.out, args.steps, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
