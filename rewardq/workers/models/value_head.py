"""OpenRLHF's reward-model format: a transformers base model (``AutoModel``) and a one-output linear value head
named by ``value_head_prefix`` ("score" unless the config says otherwise), saved as one checkpoint by OpenRLHF's
``train_rm``. The reward is the head's value at the last attended position, with positions counted over the
attention mask, as OpenRLHF's ``RewardModel.forward`` (and so ``serve_rm``) computes it; with ``normalize`` it is
``(r - mean) / std``, the mean and std that OpenRLHF's evaluation wrote into config.json.

Wrapped so that the classifier kind scores and fine-tunes it as a sequence classifier: ``forward`` returns
``logits`` [B, 1], and ``save_pretrained`` writes the same format back (base weights under the config's
base-model prefix, the head under its own name)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

DEFAULT_PREFIX = "score"


class ValueHeadModel(nn.Module):
    def __init__(self, base: Any, prefix: str, *, mean: float, std: float, normalize: bool, raw_config: dict[str, Any]):
        super().__init__()
        self.base = base
        self.prefix = prefix
        self.value_head = nn.Linear(int(base.config.hidden_size), 1, bias=False)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor([float(mean)]), persistent=False)
        self.register_buffer("std", torch.tensor([float(std)]), persistent=False)
        self.raw_config = raw_config
        self.config = base.config
        self.config.num_labels = 1

    @classmethod
    def from_folder(cls, path: str, *, normalize: bool, dtype: torch.dtype = torch.float32) -> ValueHeadModel:
        from safetensors import safe_open
        from transformers import AutoModel

        raw = json.loads((Path(path) / "config.json").read_text())
        prefix = str(raw.get("value_head_prefix") or DEFAULT_PREFIX)
        base = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        model = cls(base, prefix, mean=raw.get("mean", 0.0), std=raw.get("std", 1.0), normalize=normalize,
                    raw_config=raw)  # fmt: skip
        key = f"{prefix}.weight"
        for shard in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as fh:
                if key in fh.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    model.value_head.weight.data.copy_(fh.get_tensor(key).to(dtype).reshape(1, -1))
                    break
        else:
            raise ValueError(f"{path}: no value head {key!r} in its safetensors files")
        return model.to(dtype)

    def get_input_embeddings(self) -> nn.Module:
        embeddings: nn.Module = self.base.get_input_embeddings()
        return embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        mask = attention_mask.long()
        last = mask.size(1) - 1 - mask.fliplr().argmax(dim=1, keepdim=True)
        positions = mask.cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)
        hidden = self.base(input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
        values = self.value_head(hidden).squeeze(-1)
        reward = values.gather(dim=1, index=last)
        if self.normalize and not self.training:
            reward = (reward - self.mean) / self.std
        return SimpleNamespace(logits=reward)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        """OpenRLHF's layout: one safetensors file, the base model's weights under its prefix, and config.json."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        prefix = getattr(self.base, "base_model_prefix", "model")
        state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in self.base.state_dict().items()}
        state[f"{self.prefix}.weight"] = self.value_head.weight.detach().contiguous()
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.raw_config, indent=2))
