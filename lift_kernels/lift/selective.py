"""What the frozen base itself says about the text, computed once before the adapter is
attached: which document tokens it finds surprising (token-selective training, after Rho-1's
selective language modelling), and its next-token distribution on text that is not the
document (the anchor the patched model is held to, so that the memory leaves the rest of
the model alone).  Both work for any causal LM and either adapter."""

from __future__ import annotations

import torch

from .config import LiftConfig
from .data import IGNORE, Sample, read_document, special_prefix

# Anchor teachers are kept as full log-probability rows; past this many values (1 GiB of
# float32) a smaller kl_texts * kl_tokens is the way out.
MAX_TEACHER_VALUES = 1 << 28


SCORE_BATCH = 64  # sequences per forward when the base scores the document


@torch.no_grad()
def token_surprise(model, sequences: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Per sequence, [N] float32: -log p_base(token t | tokens < t) for t >= 1, 0 at t = 0.

    Sequences run SCORE_BATCH at a time, right-padded and without an attention mask: under
    causal attention a position never sees the padding after it, so each row's values are
    those of the sequence run alone (up to float rounding)."""
    out = []
    for i in range(0, len(sequences), SCORE_BATCH):
        chunk = sequences[i:i + SCORE_BATCH]
        width = max(int(s.numel()) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, :s.numel()] = s
        ids = ids.to(device)
        logprobs = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        nats = -logprobs.gather(2, ids[:, 1:, None])[..., 0].cpu()
        for row, s in enumerate(chunk):
            out.append(torch.cat([torch.zeros(1), nats[row, :s.numel() - 1]]))
    return out


def select_samples(model, samples: list[Sample], config: LiftConfig, device) -> list[Sample]:
    """The samples and tokens that carry the loss, by the base's own surprise:
    config.select_line_nats drops a sample none of whose labelled tokens reaches it;
    config.select_token_nats keeps the loss only on labelled tokens that reach it (a sample
    left with none is dropped).  Both None: the samples unchanged."""
    line, token = config.select_line_nats, config.select_token_nats
    if line is None and token is None:
        return samples
    was_training = model.training
    model.eval()
    try:
        surprises = token_surprise(model, [s.input_ids for s in samples], device)
    finally:
        model.train(was_training)
    kept = []
    for sample, surprise in zip(samples, surprises):
        labelled = sample.labels != IGNORE
        if line is not None and not bool((surprise[labelled] >= line).any()):
            continue
        labels = sample.labels
        if token is not None:
            labels = torch.where(labelled & (surprise >= token), labels,
                                 torch.full_like(labels, IGNORE))
            if not bool((labels != IGNORE).any()):
                continue
        kept.append(Sample(sample.input_ids, labels, sample.kind))
    return kept


def anchor_texts(model, tokenizer, config: LiftConfig, device) -> list[list[int]]:
    """config.kl_texts token sequences of at most config.kl_tokens tokens (BOS first when the
    tokenizer has one) that are not the document: sampled from the base (temperature 1,
    seeded by config.seed) when config.kl_source == "generated", else evenly spaced pieces
    of the text file config.kl_source."""
    bos = special_prefix(tokenizer)
    if config.kl_source != "generated":
        ids = tokenizer(read_document(config.kl_source), add_special_tokens=False)["input_ids"]
        length = min(config.kl_tokens - len(bos), len(ids))
        if length < 1:
            raise ValueError(f"LiftConfig.kl_source {config.kl_source!r} has no tokens")
        room = len(ids) - length
        starts = [i * room // max(config.kl_texts - 1, 1) for i in range(config.kl_texts)]
        return [bos + list(ids[s:s + length]) for s in starts]
    start = bos or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if not start:
        raise ValueError("kl_source='generated' needs a tokenizer with a BOS or EOS token to "
                         "start the base's text from; give a text file as kl_source instead")
    from transformers import GenerationConfig

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    prompt = torch.tensor([start] * config.kl_texts, device=device)
    generation = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=config.kl_tokens - len(start),
                                  min_new_tokens=config.kl_tokens - len(start),
                                  pad_token_id=tokenizer.pad_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             generation_config=generation)
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    return [row.tolist() for row in out.cpu()]


@torch.no_grad()
def anchor_samples(model, tokenizer, config: LiftConfig, device) -> list[Sample]:
    """The anchor samples of LiftConfig.kl_weight (none when it is 0): anchor_texts with the
    base's log-probabilities as `teacher`.  Call before the adapter is attached."""
    if config.kl_weight == 0:
        return []
    texts = anchor_texts(model, tokenizer, config, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    values = sum(len(t) - 1 for t in texts) * vocab
    if values > MAX_TEACHER_VALUES:
        raise ValueError(f"the KL anchor would keep {values} base log-probabilities "
                         f"(> {MAX_TEACHER_VALUES}); lower LiftConfig.kl_texts or kl_tokens")
    was_training = model.training
    model.eval()
    samples = []
    for text in texts:
        ids = torch.tensor(text, dtype=torch.long)
        logits = model(input_ids=ids.to(device)[None], use_cache=False).logits[0, :-1]
        samples.append(Sample(ids, torch.full_like(ids, IGNORE), "anchor",
                              teacher=logits.float().log_softmax(-1).cpu()))
    model.train(was_training)
    return samples
