"""Static shapes of the sampler and scorer: how sizes round up to buckets (`Buckets`, `bucket`), and
the checks on token sequences before they are bucketed (`_check_prompts`).

Every shape a compiled call sees is rounded up to a bucket (batch, prompt length, capacity, output
length, stop-id count), so compilations stay bounded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from models.llama import Llama


@dataclasses.dataclass(frozen=True)
class Buckets:
    """How sizes round up to static shapes. ``*_steps``: bucket values per doubling (1 = powers of 2)."""

    batch_steps: int = 2  # 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, ...
    min_prompt: int = 16
    prompt_steps: int = 4  # 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...
    prefill_chunk: int = 512  # longer prompts are prefilled in chunks of this many tokens
    min_capacity: int = 32
    capacity_steps: int = 2  # KV-cache capacities: 32, 48, 64, 96, 128, 192, 256, ...
    min_new: int = 16
    min_stop_ids: int = 4
    min_shared_prefix: int = 16  # a prefix common to all prompts of at least this many tokens is prefilled once
    prefill_group_tokens: int = 256  # prefill rows in length groups; a call costs at least this many token slots
    max_prefill_groups: int = 8


DEFAULT_BUCKETS = Buckets()


def bucket(n: int, minimum: int = 1, steps: int = 1) -> int:
    """Smallest ``m * 2**e >= max(n, minimum)`` with ``steps <= m < 2 * steps``."""
    n = max(int(n), int(minimum), 1)
    if n <= steps:
        return n
    e = max(0, math.ceil(math.log2(n / steps)) - 1)
    while True:
        for m in range(steps, 2 * steps):
            if m << e >= n:
                return m << e
        e += 1


def _check_prompts(model: Llama, prompts: Sequence[Sequence[int]], extra: int, what: str = "prompt") -> list[list[int]]:
    c = model.config
    out = [[int(t) for t in p] for p in prompts]
    if not out:
        raise ValueError(f"no {what}s given")
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"{what} {i} is empty: give at least one token (e.g. BOS id {c.bos_token_id})")
        if min(p) < 0 or max(p) >= c.vocab_size:
            raise ValueError(f"{what} {i} has token ids outside [0, {c.vocab_size})")
        if len(p) + extra > c.max_position_embeddings:
            raise ValueError(
                f"{what} {i} has {len(p)} tokens; with {extra} more it exceeds the model's context of "
                f"{c.max_position_embeddings} positions: truncate it or ask for fewer tokens"
            )
    return out


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _prompt_bucket(n: int, buckets: Buckets) -> int:
    if n > buckets.prefill_chunk:
        return _round_up(n, buckets.prefill_chunk)
    return bucket(n, buckets.min_prompt, buckets.prompt_steps)
