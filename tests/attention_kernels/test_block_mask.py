"""Tile states from block statistics: hand-worked examples and a random check against the dense mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention_kernels.block_mask import FULL, PARTIAL, SKIP, block_states, fetch_indices, row_ranges
from attention_kernels.reference import attention_mask


def _idx(b, n):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))


def test_causal_states_skip_above_the_diagonal_and_mask_only_on_it():
    # 8 tokens in blocks of 2: tile (i, j) is FULL below the diagonal, PARTIAL on it, SKIP above.
    states = np.asarray(block_states(_idx(1, 8), _idx(1, 8), None, None, causal=True, block_q=2, block_kv=2))[0]
    want = np.array([[PARTIAL, SKIP, SKIP, SKIP], [FULL, PARTIAL, SKIP, SKIP],
                     [FULL, FULL, PARTIAL, SKIP], [FULL, FULL, FULL, PARTIAL]])
    np.testing.assert_array_equal(states, want)


def test_packed_segments_skip_tiles_between_different_sequences_and_padding():
    # segments 1 1 1 1 | 2 2 2 0, blocks of 4, not causal: only the diagonal tiles are live;
    # tile (1, 1) mixes segment 2 with padding, so it needs the element mask.
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]], jnp.int32)
    states = np.asarray(block_states(_idx(1, 8), _idx(1, 8), seg, seg, causal=False, block_q=4, block_kv=4))[0]
    np.testing.assert_array_equal(states, [[FULL, SKIP], [SKIP, PARTIAL]])


def test_keys_at_negative_positions_are_skipped():
    kv_pos = jnp.asarray([[0, 1, -1, -1, -1, -1, 2, 3]], jnp.int32)
    q_pos = jnp.asarray([[4, 5]], jnp.int32)
    states = np.asarray(block_states(q_pos, kv_pos, None, None, causal=True, block_q=2, block_kv=2))[0]
    np.testing.assert_array_equal(states, [[FULL, SKIP, SKIP, FULL]])


def test_states_agree_with_the_dense_mask_on_random_packed_batches():
    rng = np.random.default_rng(0)
    b, n, blk = 4, 48, 8
    for causal in (True, False):
        # segment ids grow along the row with random lengths, then a padding tail
        lengths = rng.integers(1, 12, size=(b, 10))
        seg = np.zeros((b, n), np.int32)
        for r in range(b):
            ids = np.repeat(np.arange(1, 11), lengths[r])[: n - rng.integers(0, 10)]
            seg[r, : ids.size] = ids
        states = np.asarray(block_states(_idx(b, n), _idx(b, n), jnp.asarray(seg), jnp.asarray(seg),
                                         causal=causal, block_q=blk, block_kv=blk))
        dense = np.asarray(attention_mask(b, n, n, causal=causal, segment_ids=jnp.asarray(seg)))
        tiles = dense.reshape(b, n // blk, blk, n // blk, blk).transpose(0, 1, 3, 2, 4)
        assert not np.any(tiles[states == SKIP]), "a skipped tile holds a visible pair"
        assert np.all(tiles[states == FULL]), "a FULL tile holds a masked pair"
        assert np.mean(states == SKIP) > 0.5  # packing is where skipping pays


def test_fetch_indices_keep_the_resident_block_and_ranges_bound_the_live_tiles():
    states = jnp.asarray([[SKIP, FULL, SKIP, PARTIAL, SKIP], [SKIP, SKIP, SKIP, SKIP, SKIP]], jnp.int32)
    np.testing.assert_array_equal(fetch_indices(states), [[1, 1, 1, 3, 3], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(row_ranges(states), [[1, 4], [0, 0]])
