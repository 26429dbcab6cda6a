"""A padding-free pass of a BERT encoder, for the fast CPU profile.

A padded pass spends its linear layers (about 70 % of a pass on a CPU) on pad tokens as well: up to 15 of every 16
rows for the short texts of a length group padded to a multiple of 16. Here the group's real tokens are packed into
one [rows, hidden] matrix that every linear layer, GELU and layer norm runs on; only attention sees the sequences
padded, and its output is packed again. The number of rows is fixed the way the padded fixed shapes fix it (a
multiple of ``width``, at least ``min_rows``): oneDNN's bf16 kernel, and so a row's rounding, is then the same in any
pass, so a text's embedding does not depend on the batch (tests/test_precision.py).

Only plain BERT encoders are packed (absolute positions, no decoder, the bundled MiniLM); anything else runs padded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def supports(encoder: nn.Module) -> bool:
    """Whether ``encoder`` is a BERT encoder this module computes exactly as transformers does."""
    from transformers import BertModel

    config: Any = encoder.config
    return (
        isinstance(encoder, BertModel)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "add_cross_attention", False)
        and not getattr(config, "pruned_heads", None)  # transformers 4 prunes heads at load: fewer than the config's
    )


def round_up(n: int, multiple: int, least: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``, at least ``least``: the fixed shapes' one rule (a padded
    sequence's length, a packed pass's rows, attention's span)."""
    return max(least, -(-n // multiple) * multiple)


def packed_mean_pool(encoder: Any, ids: list[list[int]], width: int, min_rows: int) -> torch.Tensor:
    """Mean-pooled last hidden states [len(ids), hidden] of the token id lists ``ids`` (no padding in them)."""
    lengths = [len(x) for x in ids]
    n, total = len(ids), sum(lengths)
    span = round_up(max(lengths), width, width)  # attention's padded length, as in the padded pass
    rows = round_up(total, width, min_rows)
    flat = torch.zeros(rows, dtype=torch.long)
    flat[:total] = torch.tensor([t for x in ids for t in x])
    positions = torch.zeros(rows, dtype=torch.long)
    positions[:total] = torch.cat([torch.arange(k) for k in lengths])
    mask = torch.arange(span)[None, :] < torch.tensor(lengths)[:, None]  # [n, span]
    at = mask.reshape(-1).nonzero().squeeze(1)  # each real token's place in the padded [n * span] layout
    emb = encoder.embeddings
    h = emb.word_embeddings(flat) + emb.token_type_embeddings.weight[0] + emb.position_embeddings(positions)
    h = emb.LayerNorm(h)
    heads = int(encoder.config.num_attention_heads)
    attend = mask[:, None, None, :]

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(n * span, x.shape[-1]).index_copy_(0, at, x[:total])
        return out.view(n, span, heads, -1).transpose(1, 2)

    for layer in encoder.encoder.layer:
        att = layer.attention.self
        q, k, v = padded(att.query(h)), padded(att.key(h)), padded(att.value(h))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        a = a.transpose(1, 2).reshape(n * span, -1).index_select(0, at)
        a = torch.cat([a, a.new_zeros(rows - total, a.shape[-1])])
        out = layer.attention.output
        h = out.LayerNorm(out.dense(a) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
    hidden = h[:total].float()
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
    sums = torch.zeros(n, hidden.shape[-1]).index_add_(0, owner, hidden)
    return sums / torch.tensor(lengths, dtype=torch.float32)[:, None]
