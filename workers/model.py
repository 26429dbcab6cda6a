"""The reward model: a transformers encoder with mean pooling, K projection heads, alpha and weight."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import kernels


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


@dataclass
class Scores:
    reward: list[float]
    cos: list[list[float]]


class RewardModel:
    """Encoder + heads, loaded once per worker process and reused for every batch."""

    def __init__(self, version: str, encoder_path: str, heads: Heads | None = None, max_length: int = 256,
                 encode_batch_size: int = 64, device: str | None = None):  # fmt: skip
        from transformers import AutoModel, AutoTokenizer

        self.version = version
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        self.encoder = AutoModel.from_pretrained(encoder_path).to(self.device).eval()
        dim = int(self.encoder.config.hidden_size)
        self.heads = (heads or Heads(dim)).to(self.device).eval()
        self.max_length = min(max_length, int(getattr(self.tokenizer, "model_max_length", max_length) or max_length))
        self.encode_batch_size = encode_batch_size
        self.stats: dict[str, float] = {}

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean pooling over the attention mask, float32 [N, D], on the model's device; autograd-aware."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)  # fmt: skip
        hidden: torch.Tensor = self.encoder(**tok).last_hidden_state.float()
        mask: torch.Tensor = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        self._count(tokens=float(tok["attention_mask"].sum()), padded_tokens=float(tok["attention_mask"].numel()),
                    encoder_batches=1.0)  # fmt: skip
        return pooled

    def _count(self, **values: float) -> None:
        for k, v in values.items():
            self.stats[k] = self.stats.get(k, 0.0) + v

    def take_stats(self) -> dict[str, float]:
        """Counters since the last call (tokens, padded tokens, encoder batches, encode and kernel seconds)."""
        out, self.stats = self.stats, {}
        return out

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings [N, D] on the CPU; texts are sorted by length so padding stays small."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        for lo in range(0, len(order), self.encode_batch_size):
            idx = order[lo : lo + self.encode_batch_size]
            out[torch.tensor(idx)] = self.encode([texts[i] for i in idx]).cpu()
        return out

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        # Each distinct text is encoded once per batch (RLHF batches repeat the prompt).
        uniq = list(dict.fromkeys([*prompts, *responses]))
        pos = {t: i for i, t in enumerate(uniq)}
        t0 = time.perf_counter()
        emb = self.embed(uniq).to(self.device)
        t1 = time.perf_counter()
        reward, cos = self.heads.reward(emb[[pos[p] for p in prompts]], emb[[pos[r] for r in responses]])
        out = Scores(reward=reward.cpu().tolist(), cos=cos.cpu().tolist())
        self._count(encode_seconds=t1 - t0, kernel_seconds=time.perf_counter() - t1)
        return out
