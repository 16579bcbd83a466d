"""What an absorbed memory does (`lift-kernels eval`, and the demo's figures): recall of QA
pairs, the loss on unrelated text with and without the memory, and where the gate opens.

    report = evaluate(model, tokenizer, pairs, unrelated_lines, prompt="question")

Recall asks every question after `context` (token ids; none by default), greedily:
"exact" counts a pair when the completion, as many tokens long as the answer, equals the
answer; "contains" when the completion of LiftConfig.max_new_tokens tokens contains it (both
compare lower-cased with whitespace removed).  `prompt` "question" asks the way absorb's QA
samples teach (lift.data.question_prompt); "raw" takes the question text as the prompt and
the answer as its continuation (a base model without a question format, like the demo's)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch

from .data import question_prompt, special_prefix
from .inference import greedy_completion, model_device
from .qa import QAPair

MATCHES = ("exact", "contains")
PROMPTS = ("question", "raw")


@dataclass
class EvalReport:
    """recall: the fraction of pairs answered right; answers: each pair's completion;
    unrelated_loss_base / unrelated_loss_memory: mean next-token loss (nats/token) on the
    unrelated text without / with the adapter (None without unrelated text);
    gate_answer / gate_unrelated: mean gate [layer][head] at the positions that predict an
    answer's tokens (the question prompt, answer teacher-forced) / at every position of the
    unrelated text (None when the model has no gated memory)."""

    recall: float
    num_questions: int
    answers: list[dict] = field(default_factory=list)
    unrelated_loss_base: float | None = None
    unrelated_loss_memory: float | None = None
    gate_answer: list[list[float]] | None = None
    gate_unrelated: list[list[float]] | None = None

    @staticmethod
    def _mean(gates):
        return None if gates is None else float(torch.tensor(gates).mean())

    @property
    def gate_answer_mean(self) -> float | None:
        return self._mean(self.gate_answer)

    @property
    def gate_unrelated_mean(self) -> float | None:
        return self._mean(self.gate_unrelated)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["gate_answer_mean"] = self.gate_answer_mean
        out["gate_unrelated_mean"] = self.gate_unrelated_mean
        for name in ("gate_answer", "gate_unrelated"):
            gates = getattr(self, name)
            out[f"{name}_per_layer"] = (None if gates is None else
                                        [sum(row) / len(row) for row in gates])
        return out


def _normalise(text: str) -> str:
    return "".join(text.lower().split())


def _prompt_ids(tokenizer, question: str, prompt: str) -> list[int]:
    if prompt == "raw":
        return list(tokenizer(question, add_special_tokens=True)["input_ids"])
    return question_prompt(tokenizer, question)


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def _with_context(context: list[int] | None, prompt_ids: list[int], tokenizer) -> list[int]:
    if not context:
        return prompt_ids
    bos = special_prefix(tokenizer)
    body = prompt_ids[len(bos):] if prompt_ids[:len(bos)] == bos else prompt_ids
    return list(context) + body


@contextlib.contextmanager
def adapter_disabled(model):
    """Within the block the model runs as its base: gated memory bypassed (memory_disabled),
    a PEFT adapter disabled, a model with neither unchanged."""
    from ..hf import memory_disabled
    from ..hf.patch import patched_modules

    if patched_modules(model):
        with memory_disabled(model):
            yield model
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def recall(model, tokenizer, pairs: list[QAPair], *, match: str = "exact",
           prompt: str = "question", context: list[int] | None = None,
           max_new_tokens: int = 64) -> tuple[float, list[dict]]:
    """(fraction answered right, [{"question", "answer", "completion", "correct"}])."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    rows = []
    for pair in pairs:
        ids = _with_context(context, _prompt_ids(tokenizer, pair.question, prompt), tokenizer)
        length = len(_answer_ids(tokenizer, pair.answer)) if match == "exact" else max_new_tokens
        completion = greedy_completion(model, tokenizer, ids, max(length, 1))
        want, got = _normalise(pair.answer), _normalise(completion)
        correct = got == want if match == "exact" else want in got
        rows.append({"question": pair.question, "answer": pair.answer,
                     "completion": completion.strip(), "correct": correct})
    return (sum(r["correct"] for r in rows) / len(rows) if rows else 0.0), rows


def _line_ids(tokenizer, line: str, window: int) -> torch.Tensor:
    return torch.tensor(tokenizer(line, add_special_tokens=True)["input_ids"][:window])


@torch.no_grad()
def text_loss(model, tokenizer, lines: list[str], window: int) -> float:
    """Mean next-token loss (nats/token) over `lines`, each run on its own (BOS first, cut
    to `window` tokens)."""
    device = model_device(model)
    total, count = 0.0, 0
    for line in lines:
        ids = _line_ids(tokenizer, line, window).to(device)[None]
        if ids.shape[1] < 2:
            continue
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    if count == 0:
        raise ValueError("the unrelated text has no line of two or more tokens")
    return total / count


@torch.no_grad()
def _gates(model, ids: list[int], positions) -> torch.Tensor:
    """Gates [layers, heads] of one forward of `ids`, averaged over `positions` (a slice)."""
    from ..hf import collect_gates

    model(input_ids=torch.tensor([ids], device=model_device(model)), use_cache=False)
    gates = torch.stack([g[0] for _, g in sorted(collect_gates(model).items())])
    return gates[:, positions].float().mean(dim=1).cpu()


def answer_gates(model, tokenizer, pairs: list[QAPair], prompt: str = "question",
                 context: list[int] | None = None) -> torch.Tensor:
    """Mean gate [layers, heads] at the positions that predict each answer's tokens."""
    total = None
    for pair in pairs:
        ids = _with_context(context, _prompt_ids(tokenizer, pair.question, prompt), tokenizer)
        answer = _answer_ids(tokenizer, pair.answer)
        gates = _gates(model, ids + answer, slice(len(ids) - 1, len(ids) + len(answer) - 1))
        total = gates if total is None else total + gates
    return total / len(pairs)


def text_gates(model, tokenizer, lines: list[str], window: int) -> torch.Tensor:
    """Mean gate [layers, heads] over every position of `lines`, each run on its own."""
    total, count = None, 0
    for line in lines:
        ids = _line_ids(tokenizer, line, window).tolist()
        gates = _gates(model, ids, slice(0, len(ids)))
        total = gates if total is None else total + gates
        count += 1
    return total / count


def model_window(model) -> int:
    return min(getattr(model.config, "max_position_embeddings", None) or 2048, 8192)


def as_pairs(pairs) -> list[QAPair]:
    """QAPair or {"question", "answer"} dicts as QAPair."""
    return [p if isinstance(p, QAPair) else QAPair(p["question"], p["answer"]) for p in pairs]


def evaluate(model, tokenizer, pairs, unrelated: list[str] | None = None, *,
             match: str = "exact", prompt: str = "question",
             context: list[int] | None = None, max_new_tokens: int = 64) -> EvalReport:
    """Recall of `pairs` (QAPair or {"question", "answer"} dicts), the loss on the
    `unrelated` lines with and without the adapter, and the gates (module docstring)."""
    from ..hf.patch import patched_modules

    pairs = as_pairs(pairs)
    if not pairs:
        raise ValueError("evaluate needs at least one question/answer pair")
    window = model_window(model)
    score, rows = recall(model, tokenizer, pairs, match=match, prompt=prompt, context=context,
                         max_new_tokens=max_new_tokens)
    report = EvalReport(score, len(pairs), rows)
    lines = [line for line in (unrelated or []) if line.strip()]
    if lines:
        report.unrelated_loss_memory = text_loss(model, tokenizer, lines, window)
        with adapter_disabled(model):
            report.unrelated_loss_base = text_loss(model, tokenizer, lines, window)
    if patched_modules(model):
        report.gate_answer = answer_gates(model, tokenizer, pairs, prompt, context).tolist()
        if lines:
            report.gate_unrelated = text_gates(model, tokenizer, lines, window).tolist()
    return report
