"""The one small interface every reward model family implements, and what they share (length grouping, counters)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@contextlib.contextmanager
def no_cudnn_attention(device_type: str, enabled: bool = True) -> Iterator[None]:
    """On CUDA, attention runs flash or memory-efficient kernels, never cuDNN's SDPA backend. torch sends masked
    bf16/fp16 attention to cuDNN first on Hopper and newer, and cuDNN builds an execution plan for every new (batch,
    padded length): a reward model's batches are padded to their longest text, so nearly every batch would pay for
    plans (on an H200 bf16 batches of new shapes took 153-423 ms in process against 48-349 ms in fp32, whose
    attention ran the memory-efficient kernel; benchmarks/results/probe_precision_h200.json). The backend flags are
    process-wide while the block runs (a worker process runs one task at a time: there is no threads pool)."""
    if not (enabled and device_type == "cuda"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def half_precision(device_type: str, dtype: Any, enabled: bool = True) -> Iterator[None]:
    """Autocast to ``dtype``, with attention kept off cuDNN on CUDA (``no_cudnn_attention``)."""
    import torch

    with torch.autocast(device_type, dtype=dtype, enabled=enabled), no_cudnn_attention(device_type, enabled):
        yield


@dataclass
class Scores:
    """One batch's outcome, in the order of its pairs."""

    reward: list[float]
    cos: list[list[float]]  # sim_exp: the K head similarities; other kinds: []
    truncated: list[bool]  # the text was cut to the version's token limit
    n_tokens: list[int | None] | None = None  # likelihood: response tokens the reward averages (or sums) over
    # Offsets of pairs that cannot be scored, with a reason code and a message (their reward is a placeholder).
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    # An ensemble's: each pair's member scores, in the order of its members (reward is their weighted sum).
    components: list[list[float]] | None = None


class Preempted(Exception):
    """A model stopped a batch between encoder passes because interactive work is waiting. What it finished is
    kept (the embedding cache), so the batch resumes from there when it comes back."""


class RewardModel(ABC):
    """Loaded once per worker process (engine.get_model) and reused for every batch of its version."""

    kind: ClassVar[str]
    version: str
    device: Any  # torch.device
    token_budget: int
    autocast: str = "off"
    # Set by the engine around a bulk batch: asked between encoder passes; True stops the batch (Preempted). Only a
    # model that keeps its finished passes looks at it (sim_exp with its embedding cache); the others finish.
    preempt: Callable[[], bool] | None = None
    # Set by the engine around each batch: whose texts these are. Cached embeddings are kept per scope, so a cache
    # hit never tells one tenant what another scored (workers.engine.cache_scope).
    cache_scope: str = ""
    n_models: int = 1  # models held in memory (an ensemble: one per encoder it runs), as the engine LRU counts them

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Scores:
        """Rewards for the pairs; independent of what else is in the batch (padding, size, order)."""

    def settings(self) -> dict[str, Any]:
        """What a result row needs to say how its score was computed (kind, precision, limits)."""
        return {"kind": self.kind}

    def _count(self, **values: float) -> None:
        for k, v in values.items():
            self.stats[k] = self.stats.get(k, 0.0) + v

    def take_stats(self) -> dict[str, float]:
        """Counters since the last call (tokens, padded tokens, encoder batches, encode and kernel seconds)."""
        out, self.stats = self.stats, {}
        return out


def length_groups(lengths: Sequence[int], max_items: int, token_budget: int) -> list[list[int]]:
    """Indices sorted by length and cut into groups of at most ``max_items`` whose padded size
    (items x longest) stays within ``token_budget`` (a single longer item still gets a group of its own)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and hi - lo < max_items and (hi - lo + 1) * lengths[order[hi]] <= token_budget:
            hi += 1
        groups.append(order[lo:hi])
        lo = hi
    return groups


def texts_per_pass(setting: int, device_type: str) -> int:
    """The most texts in one encoder pass: REWARDQ_ENCODE_BATCH_SIZE when set; else 64 on a CPU, and on a GPU no count
    at all (the token budget alone bounds a pass: 64 texts would leave most of a GPU's 16,384 tokens unused)."""
    return setting or (64 if device_type == "cpu" else 1 << 30)


def bucket(n: int, floor: int = 1) -> int:
    """The smallest size of the set floor x {1, 1.5, 2, 3, 4, 6, 8, ...} that holds ``n`` (each power of two and 1.5
    times it): a pass padded to these sizes has one of few shapes, and wastes at most a third of its rows."""
    size = floor
    while True:
        if n <= size:
            return size
        if size >= 2 and n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


BUCKET_WIDTH = 16  # the smallest padded width of a bucketed pass; widths then go 24, 32, 48, 64, 96, ...


def bucket_width(longest: int, cap: int) -> int:
    """A bucketed pass's padded width for its longest text: its bucket, at most ``cap`` (the token limit)."""
    return max(longest, min(bucket(longest, BUCKET_WIDTH), cap))


def bucket_groups(lengths: Sequence[int], max_items: int, token_budget: int, cap: int) -> list[tuple[list[int], int]]:
    """A GPU's passes: indices sorted by length and cut into groups whose padded shape (rows, width) comes from the
    bucket sets, rows x width within ``token_budget``; each group with the row count it is padded to. Every group but
    the last holds exactly a bucket's count of texts, so only the last gets pad rows (copies of a text, dropped after).
    A process then sees a few dozen shapes, where padding to each group's longest text made a new one almost every
    pass (what cuBLAS, the attention kernels and the allocator pay for). A single text past the budget has its own."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[tuple[list[int], int]] = []
    lo = 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and hi - lo < max_items:
            width = bucket_width(lengths[order[hi]], cap)
            if (hi - lo + 1) * width > token_budget:
                break
            hi += 1
        count = hi - lo
        width = bucket_width(lengths[order[hi - 1]], cap)
        rows = bucket(count)
        if rows != count and (hi < len(order) or rows * width > token_budget or rows > max_items):
            # Not the last group, or its padding would pass the budget: the largest bucket's count, the rest later.
            rows = count = bucket_below(count)
        groups.append((order[lo : lo + count], rows))
        lo += count
    return groups


def bucket_below(n: int) -> int:
    """The largest size of ``bucket``'s set (floor 1) that is at most ``n`` (n >= 1)."""
    power = 1 << (n.bit_length() - 1)
    return power * 3 // 2 if power >= 2 and power * 3 // 2 <= n else power


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-padded copies of ``rows`` and their attention masks."""
    width = max((len(r) for r in rows), default=0)
    return ([list(r) + [value] * (width - len(r)) for r in rows], [[1] * len(r) + [0] * (width - len(r)) for r in rows])
