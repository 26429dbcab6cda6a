"""The sim-exp reward model: a transformers encoder with mean (or CLS) pooling, K projection heads, alpha and weight."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rewardq import conversations, kernels
from rewardq.workers.models import packed
from rewardq.workers.models.base import (
    Preempted,
    RewardModel,
    Scores,
    bucket_groups,
    bucket_width,
    half_precision,
    length_groups,
    texts_per_pass,
)
from rewardq.workers.precision import resolve_autocast

if TYPE_CHECKING:
    from rewardq.storage.settings import Settings

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


_MIN_ROWS = 512  # token rows per encoder pass in fixed shapes (below it oneDNN's bf16 kernel choice varies)
_WIDTH = 16  # fixed shapes: sequences padded to a multiple of this (8 is faster, and breaks batch invariance)


class Heads(nn.Module):
    """K heads per side, alpha[K] and weight[K].

    Untrained (``trained=False``): K=1, identity heads, alpha=1, weight=1/K: the seed formula.
    Trained: each head rescales the D embedding dimensions separately for prompt and
    response (a learned diagonal metric; full D x D heads overfit the few thousand pairs a
    feedback set usually has).
    """

    def __init__(self, dim: int, n_heads: int = 1, trained: bool = False, init_noise: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.trained = trained
        if trained:
            scale = torch.ones(n_heads, dim) + init_noise * torch.randn(n_heads, dim)
            self.prompt_scale = nn.Parameter(scale.clone())
            self.response_scale = nn.Parameter(scale.clone())
        self.alpha = nn.Parameter(torch.ones(n_heads))
        self.weight = nn.Parameter(torch.full((n_heads,), 1.0 / n_heads))

    def project(self, emb: torch.Tensor, side: str) -> torch.Tensor:
        if not self.trained:
            return emb.unsqueeze(1).expand(-1, self.n_heads, -1)
        scale = self.prompt_scale if side == "prompt" else self.response_scale
        return emb.unsqueeze(1) * scale.unsqueeze(0)

    def reward(self, emb_p: torch.Tensor, emb_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.sim_exp_reward(self.project(emb_p, "prompt"), self.project(emb_r, "response"),
                                      self.alpha, self.weight)  # fmt: skip


# While an ensemble loads its members (one_encoder_per_folder): (encoder folder, device) -> (tokenizer, encoder).
_loading: ContextVar[dict[tuple[str, str], tuple[Any, Any]] | None] = ContextVar("_loading", default=None)


@contextmanager
def one_encoder_per_folder() -> Iterator[None]:
    """Models made inside share the encoder of each folder (and device) the first of them loaded: an ensemble of
    versions trained on one encoder holds it once, and reads its files once. Serving only: nothing trains them."""
    token = _loading.set({})
    try:
        yield
    finally:
        _loading.reset(token)


class SimExpModel(RewardModel):
    """Encoder + heads, loaded once per worker process and reused for every batch."""

    kind = "sim_exp"

    def __init__(self, version: str, encoder_path: str, heads: Heads | None = None, max_length: int = 256,
                 encode_batch_size: int = 0, device: str | None = None, token_budget: int = 0,
                 cache_size: int = 0, pooling: str = "mean"):  # fmt: skip
        from transformers import AutoModel, AutoTokenizer

        super().__init__()
        self.version = version
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder_path = encoder_path  # versions on one encoder folder share its embeddings (an ensemble's)
        loaded = _loading.get()
        if loaded is not None and (encoder_path, str(self.device)) in loaded:
            # Another member of the ensemble being loaded has this encoder's files: its modules, not a second copy.
            self.tokenizer, self.encoder = loaded[(encoder_path, str(self.device))]
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(encoder_path)
            # safetensors only: a pickle checkpoint can run code when loaded (a sim-exp version's own encoder folder,
            # or an operator's REWARDQ_MODEL, is refused rather than unpickled).
            self.encoder = AutoModel.from_pretrained(encoder_path, use_safetensors=True).to(self.device).eval()
            if loaded is not None:
                loaded[(encoder_path, str(self.device))] = (self.tokenizer, self.encoder)
        dim = int(self.encoder.config.hidden_size)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.pooling = pooling  # over the attention mask, or the first token's state (a sentence-transformers folder's)
        self.heads = (heads or Heads(dim)).to(self.device).eval()
        self.max_length = min(max_length, int(getattr(self.tokenizer, "model_max_length", max_length) or max_length))
        self.encode_batch_size = texts_per_pass(encode_batch_size, self.device.type)
        # Padded tokens per encoder pass: small on a CPU (padding costs as much as text there), large on a GPU.
        self.token_budget = token_budget or (16384 if self.device.type == "cuda" else 1024)
        # Embeddings of recent texts (a prompt scored against many responses, a pair seen in an earlier
        # job): only for serving, where the encoder never changes under the cache.
        self.cache_size = cache_size
        self.autocast = "off"  # or "fp16" / "bf16" (REWARDQ_AUTOCAST, REWARDQ_PRECISION=fast)
        self._low_precision: tuple[torch.dtype, nn.Module] | None = None
        self.fixed_shapes = False  # pad every encoder pass to fixed shapes (bf16 on a CPU: batch invariance)
        # In fixed shapes, a BERT encoder's real tokens packed into one matrix, no pad rows (workers.models.packed).
        self.packed = False
        # On a GPU, passes padded to bucketed shapes (base.bucket_groups), in either precision: few shapes per process.
        self.bucketed = self.device.type == "cuda"
        self._cache: OrderedDict[bytes, tuple[torch.Tensor, bool]] = OrderedDict()
        # Second level, shared by every worker (workers.embed_store.RedisEmbeddingStore), or None.
        self.shared: Any = None

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """The pooled embeddings (mean over the attention mask, or the first token's), float32 [N, D], on the model's
        device; autograd-aware."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)  # fmt: skip
        return self._pool(tok)

    def weights_changed(self) -> None:
        """The encoder's weights were set in place (a run restoring its best epoch): drop the low-precision copy,
        which holds the old ones."""
        self._low_precision = None

    @property
    def passes(self) -> str:
        """How the encoder's passes are shaped: "packed" (fast profile, BERT on a CPU: no pad rows), "fixed" (fast
        profile, other encoders on a CPU: padded to fixed shapes) or "dynamic" (padded to the longest text, as
        transformers does: exact on a CPU) or "bucketed" (a GPU's, either precision: rows and width from small fixed
        sets, base.bucket_groups). Embeddings made in different ways differ in the last bits, so the shared cache keeps
        them apart and each batch records it."""
        if self.bucketed:
            return "bucketed"
        return "packed" if self.packed else "fixed" if self.fixed_shapes else "dynamic"

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "autocast": self.autocast, "max_length": self.max_length, "passes": self.passes,
                "pooling": self.pooling, "kernel": kernels.path("sim_exp", self.device.type)}  # fmt: skip

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings [N, D] on the CPU (see embed_flagged)."""
        return self.embed_flagged(texts)[0]

    @torch.inference_mode()
    def embed_flagged(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Embeddings [N, D] on the CPU, and which texts were cut to ``max_length`` tokens.

        Texts are tokenized once, sorted by token count and grouped so that each encoder pass holds at
        most ``token_budget`` padded tokens (and ``encode_batch_size`` texts): padding stays small
        whatever the mix of lengths. A pair's embedding does not depend on its neighbours (the
        attention mask hides padding), so grouping never changes a score beyond float rounding.
        """
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        cut = [False] * len(texts)
        scope = self.cache_scope.encode() + b"\0"
        keys = [hashlib.blake2b(scope + t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]
        todo = [i for i, k in enumerate(keys) if not self._from_cache(k, out, cut, i)]
        if todo and self.shared is not None:
            # What another worker (or this one, before its LRU dropped it) already encoded.
            found = self.shared.get_many([keys[i] for i in todo])
            left = []
            for i, hit in zip(todo, found, strict=True):
                if hit is None:
                    left.append(i)
                    continue
                out[i] = torch.from_numpy(hit[0].copy())
                cut[i] = hit[1]
                self._to_cache(keys[i], out[i], cut[i])
            self._count(embed_cache_hits=float(len(todo) - len(left)), embed_cache_misses=float(len(left) - len(todo)),
                        embed_shared_hits=float(len(todo) - len(left)))  # fmt: skip
            todo = left
        if todo:
            enc = self.tokenizer([texts[i] for i in todo], truncation=True, max_length=self.max_length)
            ids: list[list[int]] = enc["input_ids"]
            lengths = [len(x) for x in ids]
            for j, n in enumerate(lengths):
                # At the limit: cut, unless the text is exactly that long (rare; tokenize it whole to tell).
                if n >= self.max_length:
                    cut[todo[j]] = len(self.tokenizer(texts[todo[j]], truncation=False)["input_ids"]) > n
            if self.bucketed:
                shaped = bucket_groups(lengths, self.encode_batch_size, self.token_budget, self.max_length)
            else:
                shaped = [(g, len(g)) for g in length_groups(lengths, self.encode_batch_size, self.token_budget)]
            groups = [g for g, _ in shaped]

            def collate(group: list[int], padded_rows: int, width: int) -> Any:
                rows = [ids[j] for j in group]
                masks = [[1] * lengths[j] for j in group]
                pad: dict[str, Any] = {"pad_to_multiple_of": _WIDTH if self.fixed_shapes else None}
                if self.bucketed:
                    # A bucketed shape: pad rows (copies of the last text, dropped after) and the bucket's width.
                    extra = padded_rows - len(rows)
                    pad = {"padding": "max_length", "max_length": width}
                elif self.fixed_shapes:
                    # bf16 on a CPU: the matrix kernel oneDNN picks (and so the rounding) depends on the shapes.
                    # Sequences padded to a multiple of _WIDTH and at least _MIN_ROWS token rows in all (copies of the
                    # last text, dropped after) keep every pass on one kernel: a text's embedding is then the same
                    # in any batch (tests/test_precision.py).
                    width = packed.round_up(max(len(r) for r in rows), _WIDTH, _WIDTH)
                    extra = max(0, -(-_MIN_ROWS // width) - len(rows))
                else:
                    extra = 0
                rows, masks = rows + [rows[-1]] * extra, masks + [masks[-1]] * extra
                batch = self.tokenizer.pad({"input_ids": rows, "attention_mask": masks}, return_tensors="pt", **pad)
                if self.device.type == "cuda":  # pinned host memory: the copy to the GPU does not block
                    return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
                return batch.to(self.device)

            # On a GPU nothing here waits for the device: each forward pass is queued, so the next group
            # is padded and copied while the current one runs, and the results come back once, at the end.
            pooled_groups = []
            for g, (group, padded_rows) in enumerate(shaped):
                longest = max(lengths[j] for j in group)
                width = bucket_width(longest, self.max_length) if self.bucketed else longest
                sizes = (float(sum(lengths[j] for j in group)), float(padded_rows * width))
                if self.packed:
                    pooled_groups.append(self._pool_packed([ids[j] for j in group], sizes[0]))
                else:
                    pooled_groups.append(self._pool(collate(group, padded_rows, width), sizes))
                if g + 1 < len(groups) and self.preempt and self.cache_size >= len(todo) and self.preempt():
                    # Interactive work waits: keep the passes done (the batch resumes from the cache) and stop.
                    for done, pooled_dev in zip(groups, pooled_groups, strict=False):
                        pooled = pooled_dev.cpu()
                        for row, j in enumerate(done):
                            self._to_cache(keys[todo[j]], pooled[row], cut[todo[j]])
                    encoded = sum(len(x) for x in groups[: g + 1])
                    raise Preempted(f"stopped after {encoded} of {len(todo)} texts, interactive work waits")
            for group, pooled_dev in zip(groups, pooled_groups, strict=True):
                pooled = pooled_dev.cpu()
                for row, j in enumerate(group):
                    out[todo[j]] = pooled[row]
                    self._to_cache(keys[todo[j]], pooled[row], cut[todo[j]])
            if self.shared is not None:
                self.shared.set_many([(keys[i], out[i].numpy(), cut[i]) for i in todo])
            self._count(truncated_texts=float(sum(cut[i] for i in todo)))
        return out, cut

    def _low_precision_encoder(self) -> nn.Module:
        """For inference under autocast: a copy of the encoder whose linear layers hold their weights in the autocast
        dtype already. Autocast would cast them on every pass (its cast cache is off under inference mode), about 10 %
        of a bf16 pass on a CPU; the rounding is the same, so the scores are identical. Made once per dtype; training
        (grad enabled) uses the fp32 encoder and drops the copy, which would go stale."""
        if torch.is_grad_enabled():
            self._low_precision = None
            encoder: nn.Module = self.encoder
            return encoder
        dtype = _AUTOCAST[self.autocast]
        if self._low_precision is None or self._low_precision[0] != dtype:
            copy = deepcopy(self.encoder)
            for module in copy.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
            self._low_precision = (dtype, copy)
        return self._low_precision[1]

    def _pool(self, tok: Any, counts: tuple[float, float] | None = None) -> torch.Tensor:
        # Autocast (REWARDQ_PRECISION=fast, REWARDQ_AUTOCAST) runs the encoder's matrix products in bf16/fp16;
        # pooling and the reward stay fp32.
        if self.autocast == "off":
            out = self.encoder(**tok).last_hidden_state
        else:
            with half_precision(self.device.type, _AUTOCAST[self.autocast]):
                out = self._low_precision_encoder()(**tok).last_hidden_state
        hidden: torch.Tensor = out.float()
        if self.pooling == "cls":
            pooled: torch.Tensor = hidden[:, 0]
        else:
            mask: torch.Tensor = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        # (tokens, padded tokens) from the host when given: reading the mask on a GPU would wait for it.
        tokens, padded = counts or (float(tok["attention_mask"].sum()), float(tok["attention_mask"].numel()))
        self._count(tokens=tokens, padded_tokens=padded, encoder_batches=1.0)
        return pooled

    def _pool_packed(self, ids: list[list[int]], tokens: float) -> torch.Tensor:
        # The fast profile's pass without pad tokens in the linear layers; the same autocast and weight copy as _pool.
        with half_precision(self.device.type, _AUTOCAST[self.autocast]):
            pooled = packed.packed_mean_pool(self._low_precision_encoder(), ids, _WIDTH, _MIN_ROWS)
        rows = packed.round_up(int(tokens), _WIDTH, _MIN_ROWS)  # the pass's rows, pad rows included
        self._count(tokens=tokens, padded_tokens=float(rows), encoder_batches=1.0)
        return pooled

    def _from_cache(self, key: bytes, out: torch.Tensor, cut: list[bool], i: int) -> bool:
        if not self.cache_size and self.shared is None:
            return False
        hit = self._cache.get(key) if self.cache_size else None
        self._count(**({"embed_cache_hits": 1.0} if hit is not None else {"embed_cache_misses": 1.0}))
        if hit is None:
            return False
        self._cache.move_to_end(key)
        out[i], cut[i] = hit
        return True

    def _to_cache(self, key: bytes, emb: torch.Tensor, truncated: bool) -> None:
        if self.cache_size:
            self._cache[key] = (emb.clone(), truncated)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        return self.score_heads(prompts, responses, [self.heads])[0]

    @property
    def shares_with(self) -> tuple[str, str, int, str]:
        """What two versions must have in common to share embeddings: the encoder's files, pooling, token limit and
        precision (an ensemble's members with the same key are encoded once, for all their heads)."""
        return (self.encoder_path, self.pooling, self.max_length, f"{self.autocast}:{self.passes}")

    @torch.inference_mode()
    def score_heads(self, prompts: Sequence[str], responses: Sequence[str], heads: Sequence[Heads]) -> list[Scores]:
        """The pairs' scores under each of ``heads`` (this model's own, or other versions' on the same encoder): every
        distinct text is encoded once, whatever the number of heads."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        prompts = [conversations.text(p) for p in prompts]  # a conversation is embedded as one text
        # Each distinct text is encoded once per batch (RLHF batches repeat the prompt).
        uniq = list(dict.fromkeys([*prompts, *responses]))
        pos = {t: i for i, t in enumerate(uniq)}
        t0 = time.perf_counter()
        emb, cut = self.embed_flagged(uniq)
        emb = emb.to(self.device)
        t1 = time.perf_counter()
        # An identical (prompt, response) pair repeated in the batch goes through the kernel once.
        pairs = list(zip(prompts, responses, strict=True))
        distinct = list(dict.fromkeys(pairs))
        at = {pr: i for i, pr in enumerate(distinct)}
        rows = [at[pr] for pr in pairs]
        emb_p, emb_r = emb[[pos[p] for p, _ in distinct]], emb[[pos[r] for _, r in distinct]]
        truncated = [cut[pos[p]] or cut[pos[r]] for p, r in pairs]
        out = []
        for h in heads:
            reward, cos = h.reward(emb_p, emb_r)
            rewards, coss = reward.cpu().tolist(), cos.cpu().tolist()
            out.append(Scores([rewards[i] for i in rows], [coss[i] for i in rows], list(truncated)))
        self._count(encode_seconds=t1 - t0, kernel_seconds=time.perf_counter() - t1)
        return out


def load_sim_exp(version: str, path: Path | None, settings: Settings) -> SimExpModel:
    """The untrained model on the configured encoder (``path`` None), or a fine-tuned version's files."""
    from rewardq.workers.registry import resolve_encoder

    encoder_path, _ = resolve_encoder(settings.model)
    if path is None:
        model = SimExpModel(version, encoder_path, max_length=settings.max_length,
                            encode_batch_size=settings.encode_batch_size)  # fmt: skip
    else:
        from rewardq.workers.artifacts import load_version

        if not path.is_dir():
            raise FileNotFoundError(f"{version}: artifacts not found (is REWARDQ_ARTIFACTS_DIR shared?)")
        model = load_version(path, encoder_path, max_length=settings.max_length,
                             encode_batch_size=settings.encode_batch_size)  # fmt: skip
    model.token_budget = settings.token_budget or model.token_budget
    model.cache_size = settings.embed_cache_size
    set_precision(model, resolve_autocast(settings, model.device.type))
    if settings.embed_shared_ttl_s:
        from rewardq.workers.embed_store import RedisEmbeddingStore

        # How the encoder runs is part of the key: fp32 and bf16 workers never share embeddings, nor bf16 workers whose
        # passes are shaped differently (a CPU's packed or fixed shapes, a GPU's bucketed ones: the last bits differ).
        how = model.autocast if model.autocast == "off" else f"{model.autocast}:{model.passes}"
        model.shared = RedisEmbeddingStore(settings.embed_cache_url(), namespace=f"{version}:{model.max_length}:{how}",
                                           dim=model.dim, ttl_s=settings.embed_shared_ttl_s)  # fmt: skip
    return model


def set_precision(model: SimExpModel, autocast: str) -> None:
    """The encoder's autocast dtype ("off", "bf16", "fp16"); bf16 on a CPU runs in fixed shapes (batch invariance)."""
    model.autocast = autocast
    model.fixed_shapes = autocast != "off" and model.device.type == "cpu"
    model.packed = model.fixed_shapes and model.pooling == "mean" and packed.supports(model.encoder)
