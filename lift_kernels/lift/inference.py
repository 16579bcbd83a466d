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


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy continuation of prompt_ids (at most max_new_tokens, stopping at
    its end-of-sequence tokens), decoded without special tokens."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model_device(model))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         generation_config=generation)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def answer(model, tokenizer, question: str, document: str | None = None,
           config: LiftConfig | None = None) -> str:
    """The model's greedy answer to `question`, after the truncated `document` when given
    (the same prompt format that absorb's QA samples teach)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    config = config or LiftConfig()
    context = ""
    if document is not None:
        ids = document_ids(tokenizer, document, config.title)
        context = head_tail_text(tokenizer, ids, context_budget(model, config))
    prompt = question_prompt(tokenizer, question.strip(), context)
    text = greedy_completion(model, tokenizer, prompt, config.max_new_tokens).strip()
    # A base model without a chat template may run on into the next "Question:".
    return text if uses_chat_template(tokenizer) else text.split("\n", 1)[0].strip()
