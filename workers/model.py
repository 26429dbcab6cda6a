"""The reward model: a transformers encoder with mean pooling, K projection heads, alpha and weight."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import kernels


class Heads(nn.Module):
    """K heads per side. Untrained: K=1, identity heads, alpha=1, weight=1/K (the seed formula)."""

    def __init__(self, dim: int, n_heads: int = 1, head_dim: int | None = None, identity: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.identity = identity
        self.head_dim = dim if identity else (head_dim or dim)
        if not identity:
            self.prompt = nn.Linear(dim, n_heads * self.head_dim, bias=False)
            self.response = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.alpha = nn.Parameter(torch.ones(n_heads))
        self.weight = nn.Parameter(torch.full((n_heads,), 1.0 / n_heads))

    def project(self, emb: torch.Tensor, side: str) -> torch.Tensor:
        if self.identity:
            return emb.unsqueeze(1).expand(-1, self.n_heads, -1)
        lin = self.prompt if side == "prompt" else self.response
        out: torch.Tensor = lin(emb)
        return out.view(emb.shape[0], self.n_heads, self.head_dim)


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

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled float32 embeddings [N, D]; texts are sorted by length so padding stays small."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty((len(texts), int(self.encoder.config.hidden_size)), dtype=torch.float32)
        for lo in range(0, len(order), self.encode_batch_size):
            idx = order[lo : lo + self.encode_batch_size]
            tok = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)  # fmt: skip
            hidden = self.encoder(**tok).last_hidden_state.float()
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[torch.tensor(idx)] = pooled.cpu()
        return out

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        # Each distinct text is encoded once per batch (RLHF batches repeat the prompt).
        uniq = list(dict.fromkeys([*prompts, *responses]))
        pos = {t: i for i, t in enumerate(uniq)}
        emb = self.embed(uniq).to(self.device)
        a = self.heads.project(emb[[pos[p] for p in prompts]], "prompt")
        b = self.heads.project(emb[[pos[r] for r in responses]], "response")
        reward, cos = kernels.sim_exp_reward(a, b, self.heads.alpha, self.heads.weight)
        return Scores(reward=reward.cpu().tolist(), cos=cos.cpu().tolist())
