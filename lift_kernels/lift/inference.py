"""Asking: the question after a truncated context (the document's head and tail within the
model's window, joined by "..."), greedy decoding."""

from __future__ import annotations

import torch

from .config import LiftConfig
from .data import document_ids, head_tail_text, question_prompt, uses_chat_template

MAX_WINDOW = 8192
QUESTION_ROOM = 256


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def context_budget(model, config: LiftConfig) -> int:
    """Document tokens to put before a question (LiftConfig.answer_context_tokens)."""
    if config.answer_context_tokens is not None:
        return config.answer_context_tokens
    window = min(getattr(model.config, "max_position_embeddings", None) or 2048, MAX_WINDOW)
    return max(0, window - config.max_new_tokens - QUESTION_ROOM)


def _generation_ids(model, tokenizer):
    """(eos, pad) token ids for generate: the model's end-of-sequence tokens (else the
    tokenizer's) and a padding id (the tokenizer's, else the first eos, else 0)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    return eos, pad if pad is not None else 0


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[list[int]],
                       max_new_tokens: int | list[int]) -> list[str]:
    """The model's greedy continuation of each prompt in one batched generate (prompts
    left-padded; each stops at its end-of-sequence tokens or its own max_new_tokens),
    decoded without special tokens.  Under lift_kernels.memory_slots, row b is prompts[b]."""
    from transformers import GenerationConfig

    limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
              else list(max_new_tokens))
    eos, pad = _generation_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    device = model_device(model)
    generation = GenerationConfig(max_new_tokens=max(limits), do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         generation_config=generation)
    return [tokenizer.decode(out[row, width:width + limit].tolist(), skip_special_tokens=True)
            for row, limit in enumerate(limits)]


def greedy_completion(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy continuation of prompt_ids (at most max_new_tokens, stopping at
    its end-of-sequence tokens), decoded without special tokens."""
    return greedy_completions(model, tokenizer, [prompt_ids], max_new_tokens)[0]


def _check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return question.strip()


def _first_answer(tokenizer, text: str) -> str:
    # A base model without a chat template may run on into the next "Question:".
    text = text.strip()
    return text if uses_chat_template(tokenizer) else text.split("\n", 1)[0].strip()


def answer(model, tokenizer, question: str, document: str | None = None,
           config: LiftConfig | None = None) -> str:
    """The model's greedy answer to `question`, after the truncated `document` when given
    (the same prompt format that absorb's QA samples teach)."""
    question = _check_question(question)
    config = config or LiftConfig()
    context = ""
    if document is not None:
        ids = document_ids(tokenizer, document, config.title)
        context = head_tail_text(tokenizer, ids, context_budget(model, config))
    prompt = question_prompt(tokenizer, question, context)
    return _first_answer(tokenizer, greedy_completion(model, tokenizer, prompt,
                                                      config.max_new_tokens))


def answer_many(model, tokenizer, questions: list[str], slots: list[int], configs=None,
                batch_size: int = 16) -> list[str]:
    """Greedy answers to many questions, each from its own memory slot of a model patched
    with num_memories=K (question i reads slot slots[i]), batch_size questions per batched
    generate with any mix of slots.  configs: one LiftConfig, or one per question (its
    memory's recipe: max_new_tokens); no document context.  Each answer is what `answer`
    gives with that memory alone, up to float rounding."""
    import lift_kernels

    questions = [_check_question(q) for q in questions]
    if len(slots) != len(questions):
        raise ValueError(f"slots must give one slot per question ({len(questions)}), got "
                         f"{len(slots)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    configs = ([configs or LiftConfig()] * len(questions)
               if not isinstance(configs, (list, tuple)) else list(configs))
    answers = []
    for start in range(0, len(questions), batch_size):
        batch = range(start, min(start + batch_size, len(questions)))
        prompts = [question_prompt(tokenizer, questions[i]) for i in batch]
        with lift_kernels.memory_slots(model, [int(slots[i]) for i in batch]):
            texts = greedy_completions(model, tokenizer, prompts,
                                       [configs[i].max_new_tokens for i in batch])
        answers += [_first_answer(tokenizer, t) for t in texts]
    return answers
