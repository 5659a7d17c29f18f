"""The Llama forward pass against Hugging Face transformers (PyTorch, fp32) as the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.llama import KVCache
from tests.models.oracle import hf_logits, make_hf_checkpoint, max_rel_err

LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_ratio4_llama3_rope": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING, max_position_embeddings=256,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_within_1e4_relative(tmp_path, case):
    hf = make_hf_checkpoint(str(tmp_path), **CASES[case])
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 150))  # long enough for llama3 bands
    _, model = models.load_model(str(tmp_path))
    err = max_rel_err(model(jnp.asarray(tokens)), hf_logits(hf, tokens))
    print(f"{case}: max relative logit error vs HF = {err:.2e}")
    assert err < 1e-4


def test_llama3_rope_scaling_changes_logits_past_the_original_context(tmp_path):
    # Guards the test above: without the scaling, HF and we must disagree, so the case is live.
    hf = make_hf_checkpoint(str(tmp_path), **CASES["gqa_ratio4_llama3_rope"])
    tokens = np.random.default_rng(0).integers(0, 128, size=(1, 150))
    config, model = models.load_model(str(tmp_path))
    unscaled = models.loading.build_model(
        config.replace(rope_scaling=None), models.checkpoint_formats.open_safetensors_dir(str(tmp_path))
    )
    assert max_rel_err(unscaled(jnp.asarray(tokens)), hf_logits(hf, tokens)) > 1e-3


def test_right_padded_batch_matches_hf_on_real_tokens(tmp_path):
    hf = make_hf_checkpoint(str(tmp_path))
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 128, size=(3, 20))
    lengths = np.array([20, 13, 5])
    mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int64)
    tokens = np.where(mask, tokens, 0)
    _, model = models.load_model(str(tmp_path))
    ours = np.asarray(model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask, jnp.int32)))
    ref = hf_logits(hf, tokens, mask)
    for b, n in enumerate(lengths):
        assert max_rel_err(ours[b, :n], ref[b, :n]) < 1e-4


def test_packed_row_equals_its_sequences_alone():
    config = models.get_config("tiny")
    model = models.create_model(config, seed=3)
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, 256, 7), rng.integers(3, 256, 5)
    row = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32)
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]], np.int32)
    packed = np.asarray(model(jnp.asarray(row), segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)))
    alone_a = np.asarray(model(jnp.asarray(a[None])))
    alone_b = np.asarray(model(jnp.asarray(b[None])))
    np.testing.assert_allclose(packed[0, :7], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 7:12], alone_b[0], rtol=1e-5, atol=1e-5)


def test_incremental_decoding_with_kv_cache_equals_full_forward():
    config = models.get_config("tiny-llama3")
    model = models.create_model(config, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 256, size=(2, 12)))
    full = np.asarray(model(tokens))
    cache = KVCache.create(config, batch=2, capacity=16)
    chunks = []
    for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 12)]:
        logits, cache = model(tokens[:, lo:hi], cache=cache)
        chunks.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-5, atol=1e-5)
    assert int(cache.end) == 12


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
    hf = make_hf_checkpoint(str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 16))
    _, model = models.load_model(str(tmp_path), dtype="bfloat16")
    logits = model(jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    assert model.embedding_vd.value.dtype == jnp.bfloat16
    assert max_rel_err(logits, hf_logits(hf, tokens)) < 5e-2


def test_remat_gives_the_same_loss_and_gradients():
    config = models.get_config("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 256, size=(2, 10)))
    from flax import nnx

    def loss_and_grad(cfg):
        model = models.create_model(cfg, seed=0)
        loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 5])
        return nnx.value_and_grad(loss)(model)

    l0, g0 = loss_and_grad(config)
    l1, g1 = loss_and_grad(config.replace(remat=True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
