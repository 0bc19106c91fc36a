"""Encoded prompts kept for reuse: a server sees the same prompt again and again (retries, seeds,
sizes), and each miss runs CLIP and T5 (at FLUX.1's size, T5-XXL's 4.7 B parameters) on the GPU's path.

Least recently used first out, bounded by the bytes of the tensors it holds (a T5 sequence of 512
tokens × 4096 is 4 MB in bf16). Keyed by the prompt, the token budget and the identity of the two
encoders, so a pipeline whose encoders are swapped never reads another model's embeddings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in value if isinstance(t, torch.Tensor))


class PromptCache:
    """An LRU of tuples of tensors, at most ``max_bytes`` of them (0: keep nothing).

    >>> cache = PromptCache(max_bytes=64)
    >>> cache.put("a", (torch.zeros(8),)); cache.get("a") is not None, cache.get("b")
    (True, None)
    >>> cache.put("b", (torch.zeros(16),)); cache.get("a"), len(cache)  # 32 + 64 bytes > 64: "a" leaves
    (None, 1)
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable) -> tuple | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: tuple) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= _nbytes(self.entries.pop(key))
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
