"""A pair's score does not depend on what shares its batch (padding, batch size, order): 1e-5 in fp32."""

from __future__ import annotations

import pytest

from workers.model import RewardModel
from workers.registry import default_encoder_path


@pytest.fixture(scope="module")
def model() -> RewardModel:
    return RewardModel("test", default_encoder_path(), encode_batch_size=16)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_pair_alone_equals_pair_in_a_batch_of_longer_texts(model: RewardModel, kernel: str, monkeypatch):
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


def test_repeated_prompt_is_encoded_once_and_scores_alike(model: RewardModel):
    prompts = ["Tell me a joke."] * 5
    responses = ["Why did the chicken cross the road?", "No.", "Knock knock.", "No.", "Ha."]
    s = model.score(prompts, responses)
    assert s.reward[1] == s.reward[3]
    assert len(set(s.reward)) == 4
