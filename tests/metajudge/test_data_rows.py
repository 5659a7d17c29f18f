"""Sharding a dataset by rows of the global batch (how multi-process training feeds its devices)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metajudge.data import make_dataset

EXAMPLES = [{"x": np.array([i], np.int32)} for i in range(40)]


def _take(it, n):
    return [next(it)["x"][:, 0].tolist() for _ in range(n)]


def test_row_blocks_of_all_processes_make_up_the_single_process_batches():
    whole = _take(make_dataset(EXAMPLES, batch_size=8, seed=5, num_epochs=2), 10)
    blocks = [_take(make_dataset(EXAMPLES, batch_size=8, seed=5, num_epochs=2, rows=r), 10) for r in ((0, 4), (4, 8))]
    assert [a + b for a, b in zip(*blocks)] == whole
    assert sorted(sum(whole[:5], [])) == list(range(40))  # still a shuffled pass over every example


def test_row_blocks_resume_from_a_stored_state():
    it = make_dataset(EXAMPLES, batch_size=8, seed=2, num_epochs=3, rows=(2, 6))
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    fresh = make_dataset(EXAMPLES, batch_size=8, seed=2, num_epochs=3, rows=(2, 6))
    fresh.set_state(state)
    assert _take(fresh, 4) == expected and all(len(b) == 4 for b in expected)


def test_rows_and_process_shards_do_not_mix():
    with pytest.raises(ValueError, match="not both"):
        make_dataset(EXAMPLES, batch_size=8, seed=0, rows=(0, 4), shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="not a non-empty part"):
        make_dataset(EXAMPLES, batch_size=8, seed=0, rows=(4, 12))
