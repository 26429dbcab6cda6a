"""Sequence-classification reward models (what TRL's RewardTrainer and OpenRLHF save): raw ``logits[:, 0]``.

The input is the tokenizer's chat template over [user: prompt, assistant: response] when it has one
(tokenized without adding special tokens again, as TRL does), else the tokenizer's text-pair encoding. A pair
whose text went through the template already (it begins as every rendering of the template begins: OpenRLHF's
``--apply_chat_template`` prompts), or that is one text (prompt ``TEXT_ONLY``: OpenRLHF's query alone), is scored
as its text as it is, without special tokens, as OpenRLHF's serve_rm tokenizes a query.
Batches are right-padded with the model config's ``pad_token_id``, so the model's own pooling (the
last non-pad token for decoder models, [CLS] for BERT-style ones) sees exactly what it would see alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from rewardq import conversations
from rewardq.workers.models import TEXT_ONLY
from rewardq.workers.models.base import (
    RewardModel,
    Scores,
    half_precision,
    length_groups,
    no_cudnn_attention,
    pad_rows,
    texts_per_pass,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def chat_messages(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def template_start(tokenizer: Any) -> str:
    """What every rendering of the tokenizer's chat template begins with (a BOS, a start-of-turn marker): the common
    start of a user turn alone and of a system turn then a user turn, without whitespace-only starts. Empty when the
    template begins with the content itself: then no text is taken as templated already."""
    probes = [[{"role": "user", "content": "\x01a"}], [{"role": "system", "content": "\x01b"},
              {"role": "user", "content": "\x01c"}]]  # fmt: skip
    rendered = []
    for messages in probes:
        try:
            rendered.append(str(tokenizer.apply_chat_template(messages, tokenize=False)))
        except Exception:  # a template that refuses a system turn (Gemma's): the other rendering alone
            continue
    if not rendered:
        return ""
    start = os.path.commonprefix(rendered).split("\x01", 1)[0]
    return start if start.strip() else ""


class ClassifierModel(RewardModel):
    kind = "classifier"

    def __init__(
        self,
        version: str,
        path: str,
        *,
        max_length: int = 512,
        truncation_side: str = "left",
        dtype: str = "float32",
        encode_batch_size: int = 0,
        token_budget: int = 0,
        device: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        value_head: dict[str, Any] | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        super().__init__()
        self.version = version
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if model is None and value_head is not None:  # OpenRLHF's format (workers.models.value_head)
            from rewardq.workers.models.value_head import ValueHeadModel

            model = ValueHeadModel.from_folder(path, normalize=bool(value_head.get("normalize")), dtype=DTYPES[dtype])
        self.model = (
            (
                model
                or AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True)
            )
            .to(self.device)
            .eval()
        )
        if int(self.model.config.num_labels) != 1:
            raise ValueError(f"a classifier reward model has num_labels=1, this one {self.model.config.num_labels}")
        self.dtype = dtype
        self.pad_id = self.model.config.get_text_config().pad_token_id
        self.fill_id = self.pad_id if self.pad_id is not None else (self.tokenizer.pad_token_id or 0)
        if value_head is not None:  # it pools by the attention mask: any filler pads a batch
            self.pad_id = self.fill_id = next(
                (t for t in (self.pad_id, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0
            )
        self.value_head = value_head
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, int(limit))
        self.truncation_side = truncation_side
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.chat_start = template_start(self.tokenizer) if self.chat else ""
        self.encode_batch_size = texts_per_pass(encode_batch_size, self.device.type)
        self.token_budget = token_budget or (16384 if self.device.type == "cuda" else 2048)
        self.train_autocast = "off"  # "bf16": fine-tuning's forward passes in bf16 autocast; scoring runs in ``dtype``

    def settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "max_length": self.max_length,
            "truncation_side": self.truncation_side,
            "input": "chat_template" if self.chat else "text_pair",
            **({"format": "openrlhf", "normalize": bool(self.value_head.get("normalize"))} if self.value_head else {}),
        }

    def text(self, prompt: str, response: str) -> str | tuple[str, str]:
        """The model's input for a pair: the chat-template text, or (prompt, response) for a text-pair encoding; for a
        chat model the text as it is when it was templated already; a conversation through the template; a pair that
        is one text (TEXT_ONLY) as that text (see the module's doc)."""
        if prompt == TEXT_ONLY:
            return response
        messages = conversations.decode(prompt)  # a conversation's turns before the answer, or None
        if self.chat:
            if messages is not None:
                turns = [*messages, {"role": "assistant", "content": response}]
                return str(self.tokenizer.apply_chat_template(turns, tokenize=False))
            if self.chat_start and prompt.startswith(self.chat_start):
                return prompt + response
            return str(self.tokenizer.apply_chat_template(chat_messages(prompt, response), tokenize=False))
        return conversations.text(prompt), response

    def encode(self, prompt: str, response: str) -> tuple[dict[str, list[int]], bool]:
        """Token ids (and token type ids) for one pair, cut to max_length on the version's side; and whether cut."""
        text = self.text(prompt, response)
        if isinstance(text, str):
            enc = self.tokenizer(text, add_special_tokens=False)
            full = {k: list(v) for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
            if len(full["input_ids"]) <= self.max_length:
                return full, False
            keep = slice(-self.max_length, None) if self.truncation_side == "left" else slice(0, self.max_length)
            return {k: v[keep] for k, v in full.items()}, True
        self.tokenizer.truncation_side = self.truncation_side
        enc = self.tokenizer(*text, truncation="longest_first", max_length=self.max_length)
        ids = {k: list(v) for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
        cut = len(ids["input_ids"]) >= self.max_length and len(self.tokenizer(*text)["input_ids"]) > self.max_length
        return ids, cut

    def _inputs(self, encoded: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """One right-padded batch (pad: the config's pad_token_id, which the model's pooling looks for)."""
        ids, mask = pad_rows([e["input_ids"] for e in encoded], self.fill_id)
        inputs = {
            "input_ids": torch.tensor(ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }
        if "token_type_ids" in encoded[0]:
            types = pad_rows([e["token_type_ids"] for e in encoded], 0)[0]
            inputs["token_type_ids"] = torch.tensor(types, device=self.device)
        return inputs

    def forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """R for the pairs as one padded batch, autograd-aware (fine-tuning)."""
        encoded = [self.encode(p, r)[0] for p, r in zip(prompts, responses, strict=True)]
        # bf16 only: fp16 would need loss scaling to train (a GPU without bf16 trains in float32).
        lowered = self.train_autocast == "bf16" and torch.is_grad_enabled()
        with half_precision(self.device.type, torch.bfloat16, enabled=lowered):
            logits: torch.Tensor = self.model(**self._inputs(encoded)).logits
        return logits[:, 0].float()

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        t0 = time.perf_counter()
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        lengths = [len(e["input_ids"]) for e, _ in encoded]
        # Without a pad token the model cannot pool a padded row: each pair goes alone, as transformers requires.
        per_group = self.encode_batch_size if self.pad_id is not None else 1
        reward = [0.0] * len(prompts)
        for group in length_groups(lengths, per_group, self.token_budget):
            inputs = self._inputs([encoded[i][0] for i in group])
            with no_cudnn_attention(self.device.type, self.dtype != "float32"):
                logits = self.model(**inputs).logits[:, 0].float().cpu().tolist()
            for i, value in zip(group, logits, strict=True):
                reward[i] = value
            self._count(
                tokens=float(sum(lengths[i] for i in group)),
                padded_tokens=float(inputs["input_ids"].numel()),
                encoder_batches=1.0,
            )
        cut = [c for _, c in encoded]
        self._count(encode_seconds=time.perf_counter() - t0, truncated_texts=float(sum(cut)))
        return Scores(reward=reward, cos=[[] for _ in reward], truncated=cut)
