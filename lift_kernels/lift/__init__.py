"""The LIFT pipeline (Long Input Fine-Tuning): a long document becomes trained adapter
parameters of a model, which then answers questions about it without (all of) it in context.

    from lift_kernels.lift import LiftConfig, absorb, answer, load_model
    model, tok = load_model("path/to/checkpoint")
    result = absorb(model, tok, open("book.txt").read(), qa="qa.json", config=LiftConfig())
    result.save("book.safetensors")
    print(answer(result.model, tok, "Who is the narrator's brother?"))

Later, on a fresh base: `model, _ = load_memory_file(model, "book.safetensors")`.
Many documents, one memory slot each, trained in one run:
`absorb_many(model, tok, [doc_a, doc_b], config=LiftConfig()).save("memories/")`.
Named recipes: `recipe("demo", seed=1)` (RECIPES); what a memory does:
`evaluate.evaluate(model, tok, pairs, unrelated_lines)`.
"""

from .adapters import load as load_memory_file
from .adapters import model_fingerprint
from . import evaluate
from .config import ADAPTERS, RECIPES, LiftConfig, recipe
from .data import Sample, read_document, segment_document, segment_starts
from .distributed import DistContext, DistributedError, init_distributed
from .errors import (DocumentError, MemoryFileError, ModelLoadError, QAError,
                     UnsupportedModelError)
from .inference import answer, answer_many, greedy_completion
from .many import ManyResult, absorb_many
from .pipeline import AbsorbResult, absorb, load_model
from .qa import QAPair, generate_qa, load_qa, load_questions
from .trainer import Phase, TrainStats, train

__all__ = [
    "ADAPTERS", "AbsorbResult", "DistContext", "DistributedError", "DocumentError",
    "LiftConfig", "ManyResult", "MemoryFileError", "ModelLoadError", "Phase", "QAError",
    "QAPair", "RECIPES", "Sample", "TrainStats", "UnsupportedModelError", "absorb",
    "absorb_many", "answer", "answer_many", "evaluate", "generate_qa", "greedy_completion",
    "init_distributed", "load_memory_file", "load_model", "load_qa", "load_questions",
    "model_fingerprint", "read_document", "recipe", "segment_document", "segment_starts",
    "train",
]
