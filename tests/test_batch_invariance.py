"""A pair's score does not depend on what shares its batch (padding, batch size, order): 1e-5 in fp32."""

from __future__ import annotations

import pytest

from rewardq.workers.models.sim_exp import SimExpModel
from rewardq.workers.registry import default_encoder_path


@pytest.fixture(scope="module")
def model() -> SimExpModel:
    return SimExpModel("test", default_encoder_path(), encode_batch_size=16)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_pair_alone_equals_pair_in_a_batch_of_longer_texts(model: SimExpModel, kernel: str, monkeypatch):
    monkeypatch.setenv("REWARDQ_KERNEL", kernel)
    prompt, response = "What is the capital of France?", "Paris is the capital of France."
    alone = model.score([prompt], [response])
    fillers = [f"A considerably longer filler sentence about topic {i}, " * (2 + i % 9) for i in range(40)]
    for pos in (0, 17, 40):
        prompts = fillers[:pos] + [prompt] + fillers[pos:]
        responses = fillers[::-1][:pos] + [response] + fillers[::-1][pos:]
        batch = model.score(prompts, responses)
        assert abs(batch.reward[pos] - alone.reward[0]) < 1e-5
        assert abs(batch.cos[pos][0] - alone.cos[0][0]) < 1e-5


def test_repeated_prompt_is_encoded_once_and_scores_alike(model: SimExpModel):
    prompts = ["Tell me a joke."] * 5
    responses = ["Why did the chicken cross the road?", "No.", "Knock knock.", "No.", "Ha."]
    s = model.score(prompts, responses)
    assert s.reward[1] == s.reward[3]
    assert len(set(s.reward)) == 4


def test_token_budget_and_embedding_cache_do_not_change_scores(model: SimExpModel):
    texts = [f"{'word ' * (1 + (i * 7) % 60)}number {i}" for i in range(90)]
    prompts, responses = texts[:45], texts[45:]
    budget, cache = model.token_budget, model.cache_size
    try:
        model.token_budget, model.cache_size = 10**9, 0  # one group per encode_batch_size texts, no cache
        wide = model.score(prompts, responses)
        model.take_stats()
        model.token_budget, model.cache_size = 256, 1000  # many small groups, cached
        narrow = model.score(prompts, responses)
        stats = model.take_stats()
        again = model.score(prompts, responses)
        hits = model.take_stats()
    finally:
        model.token_budget, model.cache_size = budget, cache
        model._cache.clear()
    assert max(abs(x - y) for x, y in zip(wide.reward, narrow.reward, strict=True)) < 1e-5
    assert stats["embed_cache_misses"] == 90 and "embed_cache_hits" not in stats
    assert stats["encoder_batches"] > 2 and stats["padded_tokens"] / stats["encoder_batches"] <= 256
    assert again.reward == narrow.reward and hits["embed_cache_hits"] == 90 and "encoder_batches" not in hits


def test_cache_scopes_are_kept_apart_unless_global(model: SimExpModel, monkeypatch):
    from rewardq.storage.settings import Settings
    from rewardq.workers.engine import cache_scope

    texts = [f"scoped text {i}" for i in range(4)]
    cache, scope = model.cache_size, model.cache_scope
    try:
        model.cache_size = 100
        model.take_stats()
        for who, hits in (("t:a", 0), ("t:b", 0), ("t:a", 4)):
            model.cache_scope = who
            model.embed(texts)
            assert model.take_stats().get("embed_cache_hits", 0) == hits, who
    finally:
        model.cache_size, model.cache_scope = cache, scope
        model._cache.clear()
    assert cache_scope(Settings(), "a", "job1") != cache_scope(Settings(), "b", "job1")
    assert cache_scope(Settings(), "", "job1") != cache_scope(Settings(), "", "job2")  # no tenant: nothing shared
    shared = Settings(embed_cache_scope="global")
    assert cache_scope(shared, "a", "job1") == cache_scope(shared, "b", "job2")


def test_autocast_bf16_runs_the_encoder_in_low_precision(model: SimExpModel):
    """REWARDQ_AUTOCAST (meant for GPUs) checked on the CPU, where torch autocasts to bfloat16 too."""
    texts = [f"sentence {i} about a topic of some kind, number {i % 7}" for i in range(24)]
    full = model.score(texts[:12], texts[12:])
    try:
        model.autocast = "bf16"
        low = model.score(texts[:12], texts[12:])
    finally:
        model.autocast = "off"
    diffs = [abs(a - b) for a, b in zip(full.reward, low.reward, strict=True)]
    assert max(diffs) > 1e-6  # it took effect
    assert max(diffs) < 0.05  # and it is still the same model
