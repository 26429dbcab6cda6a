"""Generative reward: the mean (or sum) of log p(response token | prompt, earlier response tokens) under a causal LM.

The prompt is the tokenizer's chat template over [user: prompt] with the generation prompt when it has
one, else the prompt's own encoding; the response is tokenized on its own (no special tokens), so the
tokens scored are exactly the response's. Only the hidden states at response positions reach the LM
head, through ``kernels.token_logprobs``, which works in vocabulary chunks: the [tokens x vocab] logits
are never materialised.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from rewardq import conversations, kernels
from rewardq.workers.models.base import RewardModel, Scores, length_groups, no_cudnn_attention, pad_rows, texts_per_pass
from rewardq.workers.models.classifier import DTYPES


class LikelihoodModel(RewardModel):
    kind = "likelihood"

    def __init__(
        self,
        version: str,
        path: str,
        *,
        max_length: int = 1024,
        truncation_side: str = "left",
        reduction: str = "mean",
        dtype: str = "float32",
        encode_batch_size: int = 0,
        token_budget: int = 0,
        device: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.version = version
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        self.model = (
            (model or AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True))
            .to(self.device)
            .eval()
        )
        text_config = self.model.config.get_text_config()
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(text_config, attr, None) not in (None, 1.0):
                # The log-prob kernel computes plain hidden @ W.T (+ b); a model that reshapes its logits is not that.
                raise ValueError(f"models with {attr} are not supported by the likelihood kind")
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        self.dtype = dtype
        self.reduction = reduction
        limit = getattr(text_config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, int(limit))
        self.truncation_side = truncation_side
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.fill_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.encode_batch_size = texts_per_pass(encode_batch_size, self.device.type)
        self.token_budget = token_budget or (16384 if self.device.type == "cuda" else 4096)

    def settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "max_length": self.max_length,
            "reduction": self.reduction,
            "truncation_side": self.truncation_side,
            "input": "chat_template" if self.chat else "plain",
            "kernel": kernels.path("logprob", self.device.type),
        }

    def prompt_ids(self, prompt: str) -> list[int]:
        messages = conversations.decode(prompt)  # a conversation's turns (system, earlier turns), or None
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                messages or [{"role": "user", "content": prompt}],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        else:
            ids = self.tokenizer(conversations.text(prompt))["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]  # the first response token needs something to be predicted from
        return list(ids)

    def encode(self, prompt: str, response: str) -> tuple[list[int], int, bool]:
        """(ids, index of the first scored token, whether cut). Tokens from that index on are the response's."""
        p = self.prompt_ids(prompt)
        r = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        cut = len(p) + len(r) > self.max_length
        if cut:
            if (
                self.truncation_side == "left"
            ):  # drop the prompt's beginning first, keep one token of it to condition on
                keep_p = max(min(len(p), 1), self.max_length - len(r))
                p = p[len(p) - keep_p :] if keep_p else []
                r = r[: self.max_length - len(p)]
            else:
                r = r[: max(0, self.max_length - len(p))]
                p = p[: self.max_length - len(r)]
        start = max(len(p), 1)  # with no prompt at all the first response token has no context and is not scored
        return p + r, start, cut

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        t0 = time.perf_counter()
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        lengths = [len(ids) for ids, _, _ in encoded]
        total = [0.0] * len(prompts)
        counts = [max(0, n - start) for n, (_, start, _) in zip(lengths, encoded, strict=True)]
        errors = {i: ("empty_response", "the response has no tokens to score") for i, n in enumerate(counts) if n == 0}
        todo = [i for i in range(len(prompts)) if i not in errors]
        kernel_s = 0.0
        for group in length_groups([lengths[i] for i in todo], self.encode_batch_size, self.token_budget):
            rows = [todo[j] for j in group]
            ids, mask = pad_rows([encoded[i][0] for i in rows], self.fill_id)
            ids_t = torch.tensor(ids, device=self.device)
            with no_cudnn_attention(self.device.type, self.dtype != "float32"):
                mask_t = torch.tensor(mask, device=self.device)
                hidden = self.body(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            # Position t predicts token t + 1: the hidden states before each response token, and those tokens.
            pos = [(b, t) for b, i in enumerate(rows) for t in range(encoded[i][1] - 1, lengths[i] - 1)]
            at_b = torch.tensor([b for b, _ in pos], device=self.device)
            at_t = torch.tensor([t for _, t in pos], device=self.device)
            t1 = time.perf_counter()
            logp = kernels.token_logprobs(
                hidden[at_b, at_t], self.head.weight, ids_t[at_b, at_t + 1], getattr(self.head, "bias", None)
            )
            kernel_s += time.perf_counter() - t1
            sums = torch.zeros(len(rows), dtype=torch.float64, device=self.device).index_add_(0, at_b, logp.double())
            for b, i in enumerate(rows):
                total[i] = float(sums[b])
            self._count(
                tokens=float(sum(lengths[i] for i in rows)),
                padded_tokens=float(len(ids) * len(ids[0])),
                encoder_batches=1.0,
            )
        reward = [t / n if self.reduction == "mean" and n else t for t, n in zip(total, counts, strict=True)]
        cut = [c for _, _, c in encoded]
        self._count(
            encode_seconds=time.perf_counter() - t0 - kernel_s, kernel_seconds=kernel_s, truncated_texts=float(sum(cut))
        )
        return Scores(
            reward=reward,
            cos=[[] for _ in reward],
            truncated=cut,
            n_tokens=[None if i in errors else n for i, n in enumerate(counts)],
            errors=errors,
        )
