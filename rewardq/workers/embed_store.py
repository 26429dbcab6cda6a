"""Embeddings shared by every worker through Redis: the second level behind each worker's LRU.

A text one worker encoded is not encoded again by another (N workers, one encoding). Values are
the exact float32 bytes the encoder produced plus the truncation flag, so a shared hit scores
bit-for-bit like a local one. Keys carry the model version and the token limit, and expire after
``ttl_s`` (REWARDQ_EMBED_SHARED_TTL_S) so the cache stays bounded; give a dedicated Redis
``maxmemory`` with ``allkeys-lru`` for a hard cap. Redis trouble never fails a batch: the store
logs once and the worker encodes as if the cache were empty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import redis

log = logging.getLogger(__name__)
RETRY_AFTER_S = 30.0  # after a Redis error, the store stays off this long


class RedisEmbeddingStore:
    def __init__(self, url: str, *, namespace: str, dim: int, ttl_s: int):
        from rewardq.workers.metrics import client

        self.redis = client(url)
        self.prefix = f"rewardq:emb:{namespace}:".encode()
        self.dim = dim
        self.ttl_s = ttl_s
        self._off_until = 0.0

    def _usable(self) -> bool:
        return time.monotonic() >= self._off_until

    def _failed(self, exc: Exception) -> None:
        if self._usable():
            log.warning("shared embedding cache unavailable for %.0fs: %s", RETRY_AFTER_S, exc)
        self._off_until = time.monotonic() + RETRY_AFTER_S

    def get_many(self, keys: Sequence[bytes]) -> list[tuple[np.ndarray, bool] | None]:
        """(embedding float32 [dim], truncated) for each key, or None where no worker has it."""
        if not keys or not self._usable():
            return [None] * len(keys)
        try:
            raw = self.redis.mget([self.prefix + k for k in keys])
        except redis.RedisError as exc:
            self._failed(exc)
            return [None] * len(keys)
        out: list[tuple[np.ndarray, bool] | None] = []
        for value in raw:
            if not isinstance(value, bytes) or len(value) != 4 * self.dim + 1:
                out.append(None)
            else:
                out.append((np.frombuffer(value, dtype=np.float32, count=self.dim), value[-1] == 1))
        return out

    def set_many(self, items: Sequence[tuple[bytes, np.ndarray, bool]]) -> None:
        if not items or not self._usable():
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key, emb, truncated in items:
                value = np.ascontiguousarray(emb, dtype=np.float32).tobytes() + (b"\x01" if truncated else b"\x00")
                pipe.set(self.prefix + key, value, ex=self.ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            self._failed(exc)
