"""What a user gets from `pip install lift-kernels`, checked in a fresh virtual environment
holding only the wheel, its declared dependencies and the CPU torch (`make test-install`,
run by CI).  Run it with that environment's python, outside the source tree:

    cd build && install-venv/bin/python ../tests/installed_check.py

It fails (exit code 1, naming the step) when the installed package cannot run its CLI, a
short demo, the quick benchmark, or replace_attention forward and backward on a tiny model.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
# A short demo: the full one trains 400 epochs (about 90 s); 3 show it runs end to end.
DEMO_EPOCHS = "3"


def run(*argv, expect=0) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "lift-kernels"), *argv], capture_output=True, text=True)
    print(f"$ lift-kernels {' '.join(argv)}  -> exit {done.returncode} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    if done.returncode != expect:
        sys.exit(f"FAILED: expected exit code {expect}\n--- stdout\n{done.stdout}\n"
                 f"--- stderr\n{done.stderr}")
    return done


def check(condition, what) -> None:
    if not condition:
        sys.exit(f"FAILED: {what}")


def check_import() -> None:
    import lift_kernels

    where = Path(lift_kernels.__file__).resolve()
    check("site-packages" in where.parts, f"lift_kernels imported from {where}, not the venv")
    info = lift_kernels.build_info()
    check(info["backends_compiled"][:1] == ["cpu"] and info["openmp"],
          f"the wheel's _C lacks the cpu backend or OpenMP: {info}")
    check(info["transformers"] is not None, "transformers did not come with the wheel")
    for extra in ("plot", "lora"):  # not declared dependencies: must not have come along
        check(not info["extras"][extra], f"the optional {extra!r} extra came with the wheel")
    print(f"import ok: {lift_kernels.__version__} from {where.parent}, "
          f"backends {lift_kernels.available_backends('cpu')}")


def check_replace_attention() -> None:
    """A tiny random Llama: patched forward and backward on the compiled backend, against
    the reference backend (logits and memory gradients)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lift_kernels

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 600))  # >= 512 rows: "auto" picks the compiled cpu backend
    results = {}
    for backend in ("cpu", "reference"):
        lift_kernels.replace_attention(model, backend=backend)
        if backend == "cpu":
            for p in lift_kernels.memory_parameters(model):  # a nonzero memory to compare
                torch.nn.init.normal_(p, std=0.05)
        lift_kernels.freeze_base_model(model)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in lift_kernels.memory_parameters(model)])
        results[backend] = (loss.detach(), grads)
    (loss_c, grad_c), (loss_r, grad_r) = results["cpu"], results["reference"]
    check(torch.isfinite(grad_c).all() and grad_c.abs().sum() > 0, "cpu backend gradients")
    err = float((grad_c - grad_r).norm() / grad_r.norm())
    check(abs(float(loss_c - loss_r)) < 1e-5 and err < 1e-4,
          f"cpu vs reference: loss {float(loss_c)} vs {float(loss_r)}, grad error {err}")
    print(f"replace_attention ok: loss {float(loss_c):.5f}, memory-gradient error vs "
          f"reference {err:.1e}")


def main() -> None:
    check_import()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        check("usage" in run("--help").stdout, "--help prints the usage")
        print(run("--version").stdout.strip())

        demo = run("demo", "--epochs", DEMO_EPOCHS, "--json", str(tmp / "demo.json"))
        result = json.loads((tmp / "demo.json").read_text())
        for key in ("recall_before", "recall_after", "recall_truncated_context",
                    "num_needles", "document_tokens", "absorb_seconds", "tokens_per_second",
                    "backend"):
            check(key in result, f"demo JSON lacks {key!r}")
        check(result["gate_heatmap"] is None and "lift-kernels[plot]" in demo.stdout,
              "without matplotlib the demo says so and draws no heatmap")

        bench = run("bench", "--quick", "--n", "256", "--json", str(tmp / "b.json"), "--plot",
                    str(tmp / "b.png"))
        rows = json.loads((tmp / "b.json").read_text())["rows"]
        check(any(r["backend"] == "cpu" and r["status"] == "ok" for r in rows),
              "the quick benchmark has cpu rows")
        check(not (tmp / "b.png").exists() and "lift-kernels[plot]" in bench.stdout,
              "without matplotlib the benchmark says so and writes no plot")

        doc = tmp / "doc.txt"
        doc.write_text("a short document.\n")
        lora = run("absorb", "--model", "demo", "--document", str(doc), "--out",
                   str(tmp / "m.safetensors"), "--adapter", "lora", "--json", expect=9)
        error = json.loads(lora.stdout)
        check(error["error"] == "missing_extra" and "lift-kernels[lora]" in error["message"],
              f"absorb --adapter lora without peft: {error}")
    check_replace_attention()
    print("installed package: all checks passed")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
