"""Decoding: ``GenerationOptions`` → tokens, for both runtimes.

- ``hf_generate_kwargs`` maps the options onto ``transformers``' ``generate()`` (the CUDA path:
  bitsandbytes int8 / bf16 models).
- ``generate_with_engine`` is the CPU path's own decoding loop over ``T5Engine``: greedy,
  sampling (temperature, top-k, top-p), beam search and beam sampling, with the repetition
  penalty, n-gram blocking and a minimum length. It reuses ``transformers``' logits processors,
  so "temperature 0.8, top_p 0.85" means exactly what it means for ``generate()``.

Both stop at ``</s>`` and at ``<extra_id_1>``… (FRED-T5 opening a *second* denoising span means
the reply is over; ``prompt.decode_reply`` cuts there anyway, so generating on would be wasted
time). Both call ``check()`` once per step: it raises ``GenerationTimeoutError`` when the
request's deadline has passed (or its caller is gone), which frees the worker thread at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from doppelbot.config import GenerationOptions
from doppelbot.model.engine import T5Engine

Check = Callable[[], None]
_NEG_INF = float("-inf")
MAX_EXTRA_IDS = 100


def stop_token_ids(tokenizer: Any, eos_token_id: int, vocab_size: int) -> list[int]:
    """``</s>`` and every ``<extra_id_N>`` with N ≥ 1 the model can emit."""
    ids = {eos_token_id}
    unk = tokenizer.unk_token_id
    for n in range(1, MAX_EXTRA_IDS):
        tid = tokenizer.convert_tokens_to_ids(f"<extra_id_{n}>")
        if isinstance(tid, int) and tid != unk and 0 <= tid < vocab_size:
            ids.add(tid)
    return sorted(ids)


def _seed_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def hf_generate_kwargs(
    options: GenerationOptions, *, stop_ids: Sequence[int], pad_token_id: int
) -> dict[str, Any]:
    """Keyword arguments for ``model.generate()`` (the seed is set by the caller)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "min_new_tokens": min(options.min_new_tokens, options.max_new_tokens),
        "do_sample": options.do_sample,
        "num_beams": options.num_beams,
        "eos_token_id": list(stop_ids),
        "pad_token_id": pad_token_id,
        "repetition_penalty": options.repetition_penalty,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
        "use_cache": True,
    }
    if options.do_sample:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    else:
        # generation_config.json of a checkpoint may carry sampling values; greedy ignores them
        # but transformers warns, so neutralise them explicitly.
        kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
    return kwargs


class _Scorer:
    """The logits pipeline of one request: processors, then (when sampling) warpers."""

    def __init__(self, options: GenerationOptions, stop_ids: Sequence[int], keep: int) -> None:
        from transformers.generation.logits_process import (
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.options = options
        self.stop = torch.tensor(list(stop_ids), dtype=torch.long)
        self.processors: list[Any] = []
        if options.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        if options.no_repeat_ngram_size > 0:
            self.processors.append(NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
        self.warpers: list[Any] = []
        if options.do_sample:
            if options.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(options.temperature))
            if options.top_k > 0:
                self.warpers.append(TopKLogitsWarper(options.top_k, min_tokens_to_keep=keep))
            if options.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(options.top_p, min_tokens_to_keep=keep))

    def process(self, seqs: torch.Tensor, scores: torch.Tensor, generated: int) -> torch.Tensor:
        if generated < self.options.min_new_tokens:
            scores[:, self.stop] = _NEG_INF
        for proc in self.processors:
            scores = proc(seqs, scores)
        return scores

    def warp(self, seqs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(seqs, scores)
        return scores


def generate_with_engine(
    engine: T5Engine,
    input_ids: Sequence[int],
    options: GenerationOptions,
    *,
    stop_ids: Sequence[int],
    check: Check = lambda: None,
) -> list[int]:
    """Generated token ids (without the decoder start token, ending at a stop id if reached)."""
    with torch.inference_mode():
        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        encoded = engine.encode(ids)
        check()
        if options.num_beams > 1:
            return _beam_search(engine, encoded, options, stop_ids, check)
        return _sample_or_greedy(engine, encoded, options, stop_ids, check)


def _sample_or_greedy(
    engine: T5Engine,
    encoded: torch.Tensor,
    options: GenerationOptions,
    stop_ids: Sequence[int],
    check: Check,
) -> list[int]:
    max_new = options.max_new_tokens
    state = engine.start(encoded, max_len=max_new + 1)
    scorer = _Scorer(options, stop_ids, keep=1)
    gen = _seed_generator(options.seed) if options.do_sample else None
    stops = set(stop_ids)
    seq = [engine.config.decoder_start_token_id]
    for step in range(max_new):
        logits = engine.decode(state, torch.tensor([[seq[-1]]]))[:, -1].float()
        seqs = torch.tensor([seq], dtype=torch.long)
        scores = scorer.process(seqs, logits, step)
        if gen is not None:
            probs = torch.softmax(scorer.warp(seqs, scores), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        else:
            token = int(scores.argmax(-1))
        seq.append(token)
        if token in stops:
            break
        check()
    return seq[1:]


def _beam_search(
    engine: T5Engine,
    encoded: torch.Tensor,
    options: GenerationOptions,
    stop_ids: Sequence[int],
    check: Check,
) -> list[int]:
    """Beam search (or beam sampling) for one input, length penalty 1.0, like ``generate()``'s
    default: a finished hypothesis scores sum(log p) / its generated length, and the search
    ends when no running beam can beat the worst of the ``k`` best finished ones."""
    k = options.num_beams
    max_new = options.max_new_tokens
    state = engine.start(encoded, batch=k, max_len=max_new + 1)
    scorer = _Scorer(options, stop_ids, keep=2 if options.do_sample else 1)
    gen = _seed_generator(options.seed) if options.do_sample else None
    stops = set(stop_ids)
    start = engine.config.decoder_start_token_id
    seqs = torch.full((k, 1), start, dtype=torch.long)
    # All beams start identical: only the first is live, or step 1 would pick k copies.
    beam_scores = torch.full((k,), _NEG_INF)
    beam_scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []
    vocab = engine.config.vocab_size
    for step in range(max_new):
        logits = engine.decode(state, seqs[:, -1:])[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        logp = scorer.process(seqs, logp, step)
        if gen is not None:
            logp = scorer.warp(seqs, logp)
        total = (logp + beam_scores[:, None]).view(-1)
        if gen is not None:
            probs = torch.softmax(total, dim=-1)
            picked = torch.multinomial(probs, 2 * k, generator=gen)
            values = total[picked]
            order = values.argsort(descending=True)
            values, picked = values[order], picked[order]
        else:
            values, picked = total.topk(2 * k)
        length = step + 1
        next_rows: list[int] = []
        next_tokens: list[int] = []
        next_scores: list[float] = []
        for rank, (value, flat) in enumerate(zip(values.tolist(), picked.tolist(), strict=True)):
            if value == _NEG_INF:
                break
            row, token = divmod(flat, vocab)
            if token in stops:
                if rank < k:
                    finished.append((value / length, [*seqs[row].tolist()[1:], token]))
                continue
            next_rows.append(row)
            next_tokens.append(token)
            next_scores.append(value)
            if len(next_rows) == k:
                break
        finished.sort(key=lambda item: item[0], reverse=True)
        del finished[k:]
        if not next_rows:
            break
        while len(next_rows) < k:  # too few live candidates: pad with dead beams
            next_rows.append(next_rows[0])
            next_tokens.append(next_tokens[0])
            next_scores.append(_NEG_INF)
        index = torch.tensor(next_rows, dtype=torch.long)
        state.reorder(index)
        seqs = torch.cat([seqs[index], torch.tensor(next_tokens)[:, None]], dim=1)
        beam_scores = torch.tensor(next_scores)
        if len(finished) == k and max(next_scores) / length <= finished[-1][0]:
            break
        check()
    if finished:
        return finished[0][1]
    return seqs[int(beam_scores.argmax())].tolist()[1:]


def engine_target_logits(
    engine: T5Engine, input_ids: Sequence[int], target_ids: Sequence[int]
) -> torch.Tensor:
    """Teacher-forced logits ``[T, V]`` of ``target_ids`` given ``input_ids`` (one pass)."""
    with torch.inference_mode():
        encoded = engine.encode(torch.tensor([list(input_ids)], dtype=torch.long))
        decoder_in = [engine.config.decoder_start_token_id, *target_ids[:-1]]
        state = engine.start(encoded, max_len=len(decoder_in))
        return engine.decode(state, torch.tensor([decoder_in]))[0].float()
