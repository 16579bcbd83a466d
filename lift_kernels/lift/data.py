"""From a document to training samples: segments, contextualised segments, QA samples, and
the question prompt that training and inference share (so a model is asked exactly the way it
was taught).

A sample is a pair of 1-D LongTensors (input_ids, labels) of the same length N; labels are
-100 wherever no loss is taken."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .config import LiftConfig
from .errors import DocumentError

IGNORE = -100
ELLIPSIS = "\n...\n"


@dataclass
class Sample:
    """input_ids [N] and labels [N] (int64; -100 = no loss); kind: 'segment', 'line', 'qa'
    or 'anchor'.  An anchor sample (text that is not the document) carries no labels but
    `teacher` [N - 1, V]: the frozen base's next-token log-probabilities at positions
    0..N-2, which the patched model is held to (LiftConfig.kl_weight)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    kind: str
    teacher: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def read_document(path) -> str:
    """The text of a UTF-8 document file; DocumentError when it is missing, unreadable,
    not text, or has no non-blank character."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DocumentError(f"document {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise DocumentError(f"document {str(path)!r} is a directory, not a file") from None
    except PermissionError:
        raise DocumentError(f"document {str(path)!r} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise DocumentError(f"document {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                            f"{e.start})") from None
    except OSError as e:
        raise DocumentError(f"document {str(path)!r} cannot be read: {e.strerror}") from None
    if not text.strip():
        raise DocumentError(f"document {str(path)!r} is empty")
    return text


def segment_starts(num_tokens: int, length: int, stride: int) -> list[int]:
    """Start offsets of overlapping windows of `length` tokens every `stride` tokens, until a
    window reaches the end (that last window may be shorter).  A document of at most `length`
    tokens is one window; one that ends exactly on a window boundary gets no extra window."""
    if num_tokens <= 0:
        raise DocumentError("the document has no tokens")
    if length <= 0 or stride <= 0 or stride > length:
        raise ValueError(f"need 0 < stride <= length, got length={length}, stride={stride}")
    starts = [0]
    while starts[-1] + length < num_tokens:
        starts.append(starts[-1] + stride)
    return starts


def segment_document(token_ids, length: int = 2048, stride: int = 768) -> list[list[int]]:
    """The document's token ids cut into overlapping segments (see segment_starts)."""
    ids = list(token_ids)
    return [ids[s:s + length] for s in segment_starts(len(ids), length, stride)]


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before text on its own (e.g. Llama's BOS), or []."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return list(with_special[:k])
    return []


def document_ids(tokenizer, document: str, title: str | None = None) -> list[int]:
    """Token ids of the document (title and a blank line first), without special tokens."""
    if not isinstance(document, str):
        raise TypeError(f"document must be a str, got {type(document).__name__}")
    if not document.strip():
        raise DocumentError("the document is empty")
    text = f"{title}\n\n{document}" if title else document
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DocumentError("the document has no tokens")
    return list(ids)


def head_tail_text(tokenizer, ids: list[int], budget: int, head: int | None = None) -> str:
    """The document as text within `budget` tokens: all of it if it fits, else its first
    `head` (default budget // 2) and last budget - head tokens joined by '...'."""
    if budget <= 0:
        return ""
    if len(ids) <= budget:
        return tokenizer.decode(ids)
    head = budget // 2 if head is None else head
    tail = budget - head
    parts = [tokenizer.decode(ids[:head])] if head else []
    if tail:
        parts.append(tokenizer.decode(ids[len(ids) - tail:]))
    return ELLIPSIS.join(parts)


def random_context(tokenizer, ids: list[int], budget: int, rng: random.Random) -> str:
    """Contextualised training's context: a random split of `budget` tokens between a head
    piece and a tail piece of the document (each at least a quarter), joined by '...'."""
    quarter = budget // 4
    return head_tail_text(tokenizer, ids, budget, head=rng.randint(quarter, budget - quarter))


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, user_text: str) -> list[int]:
    """Token ids of one user turn and the assistant's generation prompt (chat template)."""
    messages = [{"role": "user", "content": user_text}]
    return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True))


def _user_text(question: str, context: str) -> str:
    return f"{context}\n\n{question}" if context else question


def question_prompt(tokenizer, question: str, context: str = "") -> list[int]:
    """Token ids of the prompt that asks `question` after `context` (may be empty): the
    tokenizer's chat template when it has one, else 'Question: ...\\nAnswer:'."""
    if uses_chat_template(tokenizer):
        return chat_prompt(tokenizer, _user_text(question, context))
    text = f"Question: {question}\nAnswer:"
    text = f"{context}\n\n{text}" if context else text
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _as_ids(encoded) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding in newer transformers.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def answer_ids(tokenizer, question: str, answer: str, context: str, prompt: list[int]) -> list[int]:
    """The tokens that follow `prompt` when the model answers: the chat template's assistant
    turn (with its end-of-turn token) or ' answer' + EOS."""
    if uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": _user_text(question, context)},
                    {"role": "assistant", "content": answer}]
        full = _as_ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[:len(prompt)] == prompt and len(full) > len(prompt):
            return full[len(prompt):]
    ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _sample(prefix: list[int], target: list[int], kind: str) -> Sample:
    input_ids = torch.tensor(prefix + target, dtype=torch.long)
    labels = torch.tensor([IGNORE] * len(prefix) + target, dtype=torch.long)
    return Sample(input_ids, labels, kind)


def segment_samples(tokenizer, ids: list[int], config: LiftConfig,
                    rng: random.Random) -> list[Sample]:
    """One language-modelling sample per segment; contextualised ones get head/tail context
    and the recite prompt before the segment, with the loss on the segment only."""
    bos = special_prefix(tokenizer)
    samples = []
    for seg in segment_document(ids, config.segment_length, config.segment_stride):
        if config.contextualized:
            context = random_context(tokenizer, ids, config.context_tokens, rng)
            prefix = tokenizer(f"{context}\n\n{config.recite_prompt}\n",
                               add_special_tokens=True)["input_ids"]
            samples.append(_sample(list(prefix), seg, "segment"))
        else:
            samples.append(_sample(bos, seg, "segment"))
    return samples


def document_lines(document: str, title: str | None = None) -> list[str]:
    """The non-blank lines of the document (the title first when given)."""
    text = f"{title}\n\n{document}" if title else document
    return [line for line in text.split("\n") if line.strip()]


def line_samples(tokenizer, document: str, config: LiftConfig) -> list[Sample]:
    """One language-modelling sample per non-blank line: the tokenizer's BOS (if any), then
    the line, with the loss on the line."""
    bos = special_prefix(tokenizer)
    samples = []
    for line in document_lines(document, config.title):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        if ids:
            samples.append(_sample(bos, list(ids), "line"))
    return samples


def plain_samples(tokenizer, document: str, ids: list[int], config: LiftConfig) -> list[Sample]:
    """The unselected part of a token-selective recipe, with the loss on every token:
    config.plain_lines evenly spaced lines of the document and config.plain_passages evenly
    spaced passages of config.passage_tokens tokens of `ids` (the first at the head, the
    last at the tail), each after the tokenizer's BOS."""
    bos = special_prefix(tokenizer)
    lines = [line for line in document_lines(document, config.title)
             if tokenizer(line, add_special_tokens=False)["input_ids"]]
    count = min(config.plain_lines, len(lines))
    samples = [_sample(bos, list(tokenizer(lines[j * len(lines) // count],
                                            add_special_tokens=False)["input_ids"]), "segment")
               for j in range(count)]
    length = min(config.passage_tokens, len(ids))
    room = len(ids) - length
    for i in range(config.plain_passages):
        start = i * room // max(config.plain_passages - 1, 1)
        samples.append(_sample(bos, list(ids[start:start + length]), "segment"))
    return samples


def qa_samples(tokenizer, ids: list[int], pairs, config: LiftConfig,
               rng: random.Random) -> list[Sample]:
    """One sample per QA pair: the question prompt (with a random head/tail context when
    training is contextualised), then the answer; loss on the answer only."""
    samples = []
    for pair in pairs:
        context = (random_context(tokenizer, ids, config.context_tokens, rng)
                   if config.contextualized else "")
        prompt = question_prompt(tokenizer, pair.question, context)
        target = answer_ids(tokenizer, pair.question, pair.answer, context, prompt)
        samples.append(_sample(prompt, target, "qa"))
    return samples
