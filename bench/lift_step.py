"""End-to-end LIFT training step of a patched model, per backend: tokens/s, peak memory and
the time to absorb a document with the default recipe.

A step is what the LIFT trainer does per sample: forward with the language-modelling loss
and backward into the memory and gate parameters only (the base model frozen); once per
epoch an update: gradient clipping at 1.0 and an AdamW step (lr 1e-3, weight decay 1e-4,
betas (0.9, 0.98), eps 1e-8), the pipeline's steps_per_epoch=1.

Models are built from a config with random weights (what absorbing costs does not depend on
the weight values; nothing is downloaded):
    tiny       a small Llama (CPU default): 4 layers, hidden 256, 4 heads / 2 KV heads, D=64
    llama3-8b  Llama-3-8B's shapes (CUDA default): 32 layers, hidden 4096, 32 heads / 8 KV
               heads, D=128, MLP 14336, vocabulary 128256, in bfloat16

Absorb estimate (LIFT.md): the document is cut into segments of --seq tokens with stride
--stride (count_segments); the recipe is 3 epochs on the segments, then 5 epochs on the
segments plus --qa-pairs question/answer samples of --qa-len tokens.  So
    absorb_s = 8 * segments * t(segment step) + 5 * qa_pairs * t(QA step) + 8 * t(update)
with the three times measured here (lift_kernels.lift.LiftConfig's defaults: 2048/768,
10 QA pairs, 3 + 5 epochs, no contextualised prefix, no gradient checkpointing).  It
excludes tokenisation, QA generation and I/O.

    python bench/lift_step.py                          # CPU, tiny model, all backends
    python bench/lift_step.py --device cuda            # Llama-3-8B shapes, 2048-token segments
    python bench/lift_step.py --smoke                  # seconds: proves the harness
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import statistics
import sys
import time

import torch

import lift_kernels
from lift_kernels import benchmark

RECIPE = {"segment_epochs": 3, "mixed_epochs": 5}
MODELS = {
    "smoke": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5),
}


def count_segments(doc_tokens: int, seq: int, stride: int) -> int:
    """Windows of `seq` tokens starting every `stride` tokens until one reaches the end:
    1 + ceil((doc_tokens - seq) / stride) (8192 tokens, 2048/768 -> 9), the count of
    lift_kernels.lift's segment_starts."""
    if doc_tokens <= seq:
        return 1
    return 1 + math.ceil((doc_tokens - seq) / stride)


def build_model(name: str, device: str, dtype: torch.dtype, checkpointing: bool = False,
                seed: int = 0):
    """A LlamaForCausalLM with random weights, built in place on `device` in `dtype`
    (with HF gradient checkpointing when asked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False,
                         attention_dropout=0.0, **MODELS[name])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


class Stepper:
    """LIFT training of `model` (patched and frozen): per sample a forward with the loss and
    a backward that accumulates into the memory parameters; per epoch one update (gradient
    clipping, AdamW step), as the pipeline does with steps_per_epoch=1."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.params = list(lift_kernels.memory_parameters(model))
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=1e-4,
                                           betas=(0.9, 0.98), eps=1e-8)

    def sample(self, tokens):
        loss = self.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach()

    def update(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, seq, warmup, steps, seed):
        """Median seconds of a sample (forward + backward) at `seq` tokens (batch 1) and of
        an update; two token sets alternate."""
        gen = torch.Generator().manual_seed(seed)
        vocab = self.model.config.vocab_size
        batches = [torch.randint(0, vocab, (1, seq), generator=gen).to(self.device)
                   for _ in range(2)]
        for i in range(warmup):
            self.sample(batches[i % 2])
            self.update()
        self.sync()
        samples, updates = [], []
        for i in range(steps):
            begin = time.perf_counter()
            loss = self.sample(batches[i % 2])
            self.sync()
            middle = time.perf_counter()
            self.update()
            self.sync()
            samples.append(middle - begin)
            updates.append(time.perf_counter() - middle)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss.item()} at {seq} tokens")
        if not steps:
            return None, None
        return statistics.median(samples), statistics.median(updates)


def _peak_begin(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    benchmark._reset_peak_rss()
    return benchmark._rss_kib("VmRSS") * 1024


def _peak_end(device, base):
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - base
    return benchmark._rss_kib("VmHWM") * 1024, benchmark._rss_kib("VmHWM") * 1024 - base


def measure_backend(model, backend, args) -> dict:
    """Patches `model` with `backend` (re-patching keeps the memory weights) and times the
    segment and QA steps.  Peak memory is that of the segment steps: `peak_bytes` all
    allocated (model included), `step_peak_bytes` beyond what was allocated before them."""
    lift_kernels.replace_attention(model, backend=backend)
    lift_kernels.freeze_base_model(model)
    stepper = Stepper(model, args.device)
    stepper.time_steps(16, 1, 0, seed=0)  # optimizer state allocated before measuring
    base = _peak_begin(args.device)
    seg_s, update_s = stepper.time_steps(args.seq, args.warmup, args.steps, seed=1)
    peak, step_peak = _peak_end(args.device, base)
    qa_s, _ = stepper.time_steps(args.qa_len, args.warmup, args.steps, seed=2)
    segments = count_segments(args.doc_tokens, args.seq, args.stride)
    epochs = RECIPE["segment_epochs"] + RECIPE["mixed_epochs"]
    absorb_s = (epochs * segments * seg_s + RECIPE["mixed_epochs"] * args.qa_pairs * qa_s
                + epochs * update_s)
    del stepper
    return {"backend": backend, "status": "ok", "segment_step_ms": seg_s * 1e3,
            "tokens_per_s": args.seq / seg_s, "qa_step_ms": qa_s * 1e3,
            "update_ms": update_s * 1e3, "peak_bytes": peak, "step_peak_bytes": step_peak,
            "segments": segments, "absorb_s": absorb_s}


def _measure_or_status(model_fn, backend, args) -> dict:
    try:
        return measure_backend(model_fn(), backend, args)
    except torch.OutOfMemoryError as err:
        return {"backend": backend, "status": "oom", "note": str(err).splitlines()[0][:200]}
    except NotImplementedError as err:
        return {"backend": backend, "status": "unsupported", "note": str(err).splitlines()[0]}
    except Exception as err:  # one broken backend is a row, not the end of the run
        return {"backend": backend, "status": "error", "note": f"{type(err).__name__}: {err}"[:300]}
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def _child(conn, backend, args, dtype):
    if args.threads:
        torch.set_num_threads(args.threads)
    conn.send(_measure_or_status(lambda: build_model(args.model, "cpu", dtype,
                                                          args.gradient_checkpointing), backend, args))
    conn.close()


def run(args) -> tuple[list, dict]:
    device = args.device
    dtype = getattr(torch, args.dtype)
    env = benchmark.environment(device, args.threads)
    import transformers

    env["transformers"] = transformers.__version__
    backends = args.backends or [b for b in benchmark.default_backends(device)
                                 if b not in benchmark.BASELINES or b in ("reference", "torch")]
    rows = []
    if device == "cuda":
        # One model for all backends: re-patching swaps the backend, weights stay.
        model = build_model(args.model, device, dtype, args.gradient_checkpointing)
        for backend in backends:
            rows.append(_measure_or_status(lambda: model, backend, args))
            _report(rows, env, args)
        del model
    else:
        # A forked child per backend: its own model and a clean peak-RSS measure.
        ctx = multiprocessing.get_context("fork")
        for backend in backends:
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(child_end, backend, args, dtype))
            proc.start()
            child_end.close()
            try:
                rows.append(parent_end.recv())
            except EOFError:
                rows.append({"backend": backend, "status": "error",
                             "note": f"child process exited with code {proc.exitcode}"})
            proc.join()
            _report(rows, env, args)
    ref = next((r for r in rows if r["backend"] == "reference" and r["status"] == "ok"), None)
    for r in rows:
        ok = r["status"] == "ok" and ref is not None
        r["speedup_vs_reference"] = ref["segment_step_ms"] / r["segment_step_ms"] if ok else None
        r.update(model=args.model, dtype=args.dtype, seq=args.seq, device=device,
                 device_name=env["device_name"], date=env["date"])
    return rows, env


def _report(rows, env, args):
    """Prints the newest row and rewrites the JSON, so a run cut short keeps its rows."""
    print(_line(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)


def _line(r) -> str:
    if r["status"] != "ok":
        return f"  {r['backend']}: {r['status']} ({r.get('note', '')})"
    return (f"  {r['backend']}: segment step {r['segment_step_ms']:.1f} ms, "
            f"{r['tokens_per_s']:.0f} tokens/s, QA step {r['qa_step_ms']:.1f} ms")


def format_table(rows, env, args) -> str:
    segments = count_segments(args.doc_tokens, args.seq, args.stride)
    lines = [f"LIFT training step, {args.model} model ({args.dtype}), {env['device_name']}, "
             f"torch {env['torch']}, transformers {env['transformers']}, {env['date']}",
             f"segments of {args.seq} tokens; absorb = {args.doc_tokens}-token document "
             f"({segments} segments, stride {args.stride}), 3 epochs segments + 5 epochs "
             f"segments + {args.qa_pairs} QA of {args.qa_len} tokens",
             f"{'backend':<10} {'step ms':>9} {'tokens/s':>9} {'QA ms':>8} {'peak GiB':>9} "
             f"{'step GiB':>9} {'absorb s':>9} {'x ref':>6}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<10} {r['status']}: {r.get('note', '')}")
            continue
        ratio = r["speedup_vs_reference"]
        lines.append(f"{r['backend']:<10} {r['segment_step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} "
                     f"{r['qa_step_ms']:>8.1f} {r['peak_bytes'] / 2**30:>9.3f} "
                     f"{r['step_peak_bytes'] / 2**30:>9.3f} {r['absorb_s']:>9.2f} "
                     f"{'-' if ratio is None else format(ratio, '.2f'):>6}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--model", choices=sorted(MODELS),
                        help="default: llama3-8b on CUDA, tiny on CPU")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backends", type=lambda s: s.split(","),
                        help="default: reference, torch and every available fused backend")
    parser.add_argument("--seq", type=int, help="segment length (default 2048 CUDA, 512 CPU)")
    parser.add_argument("--stride", type=int,
                        help="segment stride (default 3/8 of --seq: 768 for 2048, as LIFT)")
    parser.add_argument("--doc-tokens", type=int, default=8192)
    parser.add_argument("--qa-pairs", type=int, default=10)
    parser.add_argument("--qa-len", type=int, default=128, help="tokens per QA sample")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per length")
    parser.add_argument("--threads", type=int,
                        help="CPU threads: torch's and OMP_NUM_THREADS (default: all cores)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer model, 64-token segments, 1 step: proves the harness")
    parser.add_argument("--json", metavar="FILE")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    benchmark.limit_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device == "cuda"
    if args.smoke:
        args.model, args.seq, args.qa_len = args.model or "smoke", args.seq or 64, 16
        args.warmup, args.steps, args.doc_tokens, args.stride = 0, 1, 256, 32
    args.model = args.model or ("llama3-8b" if cuda else "tiny")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.seq = args.seq or (2048 if cuda else 512)
    args.stride = args.stride or 3 * args.seq // 8
    if not 0 < args.stride <= args.seq:
        print(f"error: need 0 < --stride <= --seq, got {args.stride} and {args.seq}",
              file=sys.stderr)
        return 2
    if not hasattr(lift_kernels, "replace_attention"):
        print("error: this lift_kernels has no HF integration (replace_attention)", file=sys.stderr)
        return 2
    rows, env = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    print(format_table(rows, env, args))
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
