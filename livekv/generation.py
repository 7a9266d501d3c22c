"""Prefill and decode loops over a ``LiveKVCache``: chunked prefill with progress, token-by-token decoding.

``model.generate(..., past_key_values=cache)`` works too; these loops exist to feed text token by token through
the sparse path (questions, perplexity), to chunk long prefills, and to time prefill and decode apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from livekv.cache import LiveKVCache


@torch.no_grad()
def prefill(
    model,
    cache: LiveKVCache,
    input_ids: torch.Tensor,
    chunk: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Feed ``input_ids [B, T]`` in chunks of ``chunk`` tokens; return the logits of the last token ``[B, V]``.

    ``progress(done, total)`` is called after each chunk.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {list(input_ids.shape)}")
    T = input_ids.shape[1]
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        logits = model(input_ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        if progress is not None:
            progress(end, T)
    return logits[:, -1]


@torch.no_grad()
def feed(model, cache: LiveKVCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Feed ``token_ids [B, n]`` one token at a time (each a sparse decode step); return logits ``[B, n, V]``."""
    steps = [
        model(token_ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
        for t in range(token_ids.shape[1])
    ]
    return torch.stack(steps, dim=1)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    memory: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0


@torch.no_grad()
def generate_stream(
    model,
    cache: LiveKVCache,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    stop_ids: set[int] = frozenset(),
    temperature: float = 0.0,
    chunk: int = 2048,
    question_ids: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one (batch 1): prefill ``prompt_ids [1, T]``, feed ``question_ids [1, n]``
    token by token through the sparse path (if given), then decode greedily (or sample at ``temperature``)."""
    stats = stats if stats is not None else GenerationStats()
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt_ids, chunk, progress)
    stats.prompt_tokens = prompt_ids.shape[1]
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if question_ids is not None and question_ids.shape[1]:
        logits = feed(model, cache, question_ids)[:, -1]
    for _ in range(max_new_tokens):
        if temperature > 0:
            token = torch.multinomial((logits / temperature).softmax(-1), 1)
        else:
            token = logits.argmax(-1, keepdim=True)
        stats.new_tokens += 1
        stats.decode_s = time.perf_counter() - t0
        yield int(token)
        if int(token) in stop_ids:
            break
        logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
    stats.decode_s = time.perf_counter() - t0
    stats.memory = cache.memory()
