"""The shared embedding cache can live in a Redis of its own (issue #37, item 10): the README advised `allkeys-lru`
for a hard memory cap, which on the broker's Redis would evict queues and heartbeats. A real Redis (a database
number of its own stands in for a second server) and the real encoder."""

from __future__ import annotations

import uuid

import pytest
import redis

from rewardq.storage.settings import Settings
from rewardq.workers.models.sim_exp import load_sim_exp


def _keys(url: str, prefix: bytes) -> set[bytes]:
    return set(redis.Redis.from_url(url).scan_iter(match=prefix + b"*", count=1000))


def test_the_shared_embedding_cache_uses_its_own_redis_url(redis_url: str):
    own = redis_url.rsplit("/", 1)[0] + "/9"
    model = load_sim_exp("base", None, Settings(embed_shared_ttl_s=60, embed_cache_size=0, embed_cache_redis_url=own))
    prefix = model.shared.prefix
    before_broker, before_own = _keys(redis_url, prefix), _keys(own, prefix)
    tag = uuid.uuid4().hex
    model.embed([f"cache text {tag} {i}" for i in range(3)])
    new_own = _keys(own, prefix) - before_own
    try:
        assert len(new_own) == 3, new_own
        assert _keys(redis_url, prefix) - before_broker == set()  # nothing in the broker's Redis
        # Left empty, the broker's Redis serves it, as before.
        default = load_sim_exp("base", None, Settings(embed_shared_ttl_s=60, embed_cache_size=0))
        broker_db = int(Settings().redis_url.rsplit("/", 1)[1])
        assert default.shared.redis.connection_pool.connection_kwargs["db"] == broker_db != 9
    finally:
        if new_own:
            redis.Redis.from_url(own).delete(*new_own)


def test_a_cache_url_that_is_not_redis_is_refused():
    with pytest.raises(ValueError, match="REWARDQ_EMBED_CACHE_REDIS_URL must start with redis://"):
        Settings(embed_cache_redis_url="http://cache:6379")
    assert Settings().embed_cache_url() == Settings().redis_url
