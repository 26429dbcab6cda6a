"""A GPU's encoder passes (issue #36, item 2), run here on the CPU: bounded by the token budget and not by a text
count, padded to bucketed shapes so a process sees few of them, and scoring as unbucketed passes do (1e-5 in fp32).
Which device runs them is the only thing the GPU adds; the CPU runs the same code path with ``bucketed`` set."""

from __future__ import annotations

import random

import pytest
import torch

from rewardq.storage.settings import Settings
from rewardq.workers.kernel_check import dtypes_in_use
from rewardq.workers.models.base import bucket, bucket_groups, bucket_width, texts_per_pass
from rewardq.workers.models.sim_exp import SimExpModel
from rewardq.workers.precision import resolve_autocast
from rewardq.workers.registry import default_encoder_path

ROWS = {bucket(n) for n in range(1, 5000)}
WIDTHS = {bucket(n, 16) for n in range(1, 600)}


def test_bucket_sets_are_small_and_waste_at_most_a_third() -> None:
    assert sorted(ROWS)[:10] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32] and len(ROWS) == 25  # 1 to 6,144
    assert sorted(WIDTHS)[:8] == [16, 24, 32, 48, 64, 96, 128, 192]
    assert all(n <= bucket(n) <= max(1, n * 3 // 2) or bucket(n) - n <= n // 2 for n in range(1, 5000))
    assert all(bucket(n, 16) < 1.5 * n + 16 for n in range(1, 600))
    assert bucket_width(200, 256) == 256 and bucket_width(290, 300) == 300  # never past the token limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_groups_cover_each_text_once_within_the_budget_in_few_shapes(seed: int) -> None:
    rng = random.Random(seed)
    shapes: set[tuple[int, int]] = set()
    for _ in range(200):  # 200 messages of a mix of lengths: a job's worth of passes
        lengths = [rng.choice([rng.randint(3, 40), rng.randint(3, 256)]) for _ in range(rng.randint(1, 700))]
        groups = bucket_groups(lengths, texts_per_pass(0, "cuda"), 16384, 256)
        assert sorted(i for g, _ in groups for i in g) == list(range(len(lengths)))
        for n, (group, rows) in enumerate(groups):
            width = bucket_width(max(lengths[i] for i in group), 256)
            assert rows in ROWS and width in WIDTHS and rows >= len(group)
            assert rows * width <= 16384 or rows == 1
            if n + 1 < len(groups):
                assert rows == len(group)  # pad rows only in a message's last pass
            shapes.add((rows, width))
    # 200 messages: 25 row counts x 6 widths at most, where padding to the longest made a new shape almost every pass.
    assert len(shapes) <= 25 * 6
    # And with a text count set, no pass holds more.
    assert all(len(g) <= 64 for g, _ in bucket_groups([30] * 700, 64, 16384, 256))


def test_without_a_set_count_a_gpu_pass_is_bounded_by_tokens_a_cpu_pass_by_64_texts() -> None:
    assert texts_per_pass(0, "cpu") == 64 and texts_per_pass(0, "cuda") > 16384 and texts_per_pass(8, "cuda") == 8
    # 512 short texts (16 tokens with padding) fill a 16,384-token pass: one pass, where 64 texts made eight.
    assert [len(g) for g, _ in bucket_groups([12] * 512, texts_per_pass(0, "cuda"), 16384, 256)] == [512]


def test_precision_auto_is_fast_on_a_gpu_and_exact_on_a_cpu() -> None:
    auto = Settings(precision="auto")
    assert Settings().precision == "auto"
    assert resolve_autocast(auto, "cpu") == "off"  # a CPU: fp32 unless asked (the fast profile is one setting away)
    assert resolve_autocast(Settings(precision="exact"), "cuda") == "off"  # exact stays one setting away on a GPU
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # False here: no CUDA in this torch
    assert resolve_autocast(auto, "cuda") == expected
    assert dtypes_in_use(auto, "cuda") == ["float32", "bfloat16"] and dtypes_in_use(auto, "cpu") == ["float32"]


@pytest.fixture(scope="module")
def model() -> SimExpModel:
    return SimExpModel("test", default_encoder_path(), token_budget=16384)


def test_bucketed_passes_score_as_padding_to_the_longest_does_in_few_shapes(model: SimExpModel) -> None:
    assert model.passes == "dynamic" and model.encode_batch_size == 64 and not model.bucketed  # this CPU's default
    rng = random.Random(0)
    words = "the a reward model scores each response against its prompt quickly and well".split()
    messages = [[" ".join(rng.choices(words, k=rng.randint(1, 30))) + f" {m}.{i}" for i in range(rng.randint(20, 100))]
                for m in range(4)]  # fmt: skip
    seen: list[tuple[int, int]] = []
    hook = model.encoder.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        dynamic = [model.embed(texts) for texts in messages]
        dynamic_shapes, seen[:] = list(seen), []
        model.take_stats()
        model.bucketed, model.encode_batch_size = True, texts_per_pass(0, "cuda")  # what a GPU's model does
        assert model.passes == "bucketed"
        bucketed = [model.embed(texts) for texts in messages]
        stats = model.take_stats()
    finally:
        hook.remove()
        model.bucketed, model.encode_batch_size = False, 64
    for a, b in zip(dynamic, bucketed, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    assert all(rows in ROWS and width in WIDTHS and rows * width <= 16384 for rows, width in seen), seen
    # One or two passes per message here (a message's last pass is padded to a bucket, within the budget), where a
    # 64-text cap made more, each of a new shape.
    assert len(seen) <= 2 * len(messages) and len(set(seen)) < len(set(dynamic_shapes))
    assert stats["padded_tokens"] == sum(r * w for r, w in seen)
