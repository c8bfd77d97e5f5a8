"""A multi-turn conversation that keeps its KV cache across turns.

Each turn renders the whole conversation with the model's chat template, finds how much
of it the cache already holds (the common prefix of token ids) and feeds only the rest,
so earlier turns are never recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .generate import continue_stream


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, max_len: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cache = model.new_cache(1, min(max_len or model.cfg.max_seq_len,
                                            model.cfg.max_seq_len))
        self.cached_ids: list[int] = []  # exactly the tokens whose K/V are in the cache
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reused_tokens = 0  # of the last turn: prompt tokens served from the cache

    def send(self, text: str, max_new_tokens: int = 256) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed for logits
        self.cache.truncate(common)
        self.reused_tokens = common
        produced: list[int] = []
        decoder = self.tokenizer.stream_decoder()
        try:
            for tok in continue_stream(self.model, self.cache, ids[common:], max_new_tokens,
                                       generator=self.generator,
                                       stop_ids=self.tokenizer.stop_ids, **self.sampling):
                produced.append(tok)
                piece = decoder.push(tok)
                if piece:
                    yield piece
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            self.cached_ids = (ids + produced)[:self.cache.length]
            self.messages.append({"role": "assistant",
                                  "content": self.tokenizer.decode(produced,
                                                                   skip_special_tokens=True)})
