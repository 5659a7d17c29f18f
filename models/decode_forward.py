"""The forward pass of prefill and decode steps on the decode cache: `_forward` (``Llama.hidden_states``
on 2-D weights, keys cached transposed), its attention against the cache with a shared prefix stored
once (`attention_kernels.xla_attention.grouped_attention` on the XLA path; on the Pallas path the
kernels' output merged with the same XLA attention over the prefix alone),
the decode weights in the layout a step runs in (`_DecodeWeights`: row-major views, or feature-major
transposed copies on CPU), and the LM head (`_logits`).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_kernels.dispatch import merge_attention
from attention_kernels.xla_attention import grouped_attention
from models.decode_cache import _DecodeCache
from models.executables import _run, compiling_only
from models.llama import Llama, rope_inv_freq, rope_tables, rotate_halves
from models.placement import _shard_ctx
from models.sharding import constrain

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _DecodeWeights:
    """The weights a decode step multiplies by, in the layout it runs in.

    Row-major (accelerators): activations are ``[B*T, D]`` rows and every projection is ``x @ W``
    on a 2-D view of the model's ``[in, out]`` parameter (``layers`` is empty: views need no copy);
    ``head`` is ``[D, V]`` (a tied embedding's transposed copy).

    Feature-major (CPU): activations are ``[D, B]`` columns and every projection is ``W^T @ x``
    with ``W^T`` a transposed ``[out, in]`` copy in ``layers`` (keys ``q k v o gate up down``);
    ``head`` is ``[V, D]`` (a tied embedding itself). XLA:CPU's matmul is faster with the big
    weight as the left operand: on a 2-core AVX2 machine, SmolLM2's ``[576, 1536]`` projections ran
    at 148 vs 135 GFLOP/s for 64 rows and 99 vs 57 for 16, and the whole decode step went from 190 to
    178 ms at batch 64 (with the logits' reductions, see `models.sampling._sample`). The cost is one
    extra copy of the weights while the model lives, which is why accelerators keep the row-major
    views.
    """

    head: Array
    layers: list[dict[str, Array]]
    feature_major: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def vocab_axis(self) -> int:
        """The vocabulary axis of the logits `_logits` makes with these weights."""
        return 0 if self.feature_major else 1


def _feature_major(model: Llama) -> bool:
    """Whether decoding runs feature-major: on CPU, unless ``_FEATURE_MAJOR`` says otherwise. The
    devices the parameters are placed on decide (abstract ones too: a compile for a TPU topology)."""
    if _FEATURE_MAJOR is not None:
        return _FEATURE_MAJOR
    sharding = getattr(model.embedding_vd.get_value(), "sharding", None)
    if sharding is None:
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in sharding.device_set)


_FEATURE_MAJOR: Optional[bool] = None  # None: by platform; tests set it to run both layouts


def _views(model: Llama, blk) -> dict[str, Array]:
    """A layer's projections as 2-D ``[in, out]`` views of its parameters (no copy)."""
    c, a, m = model.config, blk.attn, blk.mlp
    d, nh = c.hidden_size, c.num_heads * c.head_dim
    w2 = lambda p, rows: p[...].reshape(rows, -1)
    return dict(q=w2(a.q_proj_dnh, d), k=w2(a.k_proj_dkh, d), v=w2(a.v_proj_dkh, d), o=w2(a.o_proj_nhd, nh),
                gate=w2(m.gate_proj_df, d), up=w2(m.up_proj_df, d), down=w2(m.down_proj_fd, c.intermediate_size))


def _decode_weights_fn(graphdef, feature_major: bool, state) -> _DecodeWeights:
    """The copies `_DecodeWeights` needs (a tied embedding's own ``[V, D]`` is added by the caller)."""
    model = nnx.merge(graphdef, state)
    if not feature_major:  # only a tied head needs a copy
        return _DecodeWeights(head=model.embedding_vd[...].T, layers=[], feature_major=False)
    layers = [{name: w.T for name, w in _views(model, blk).items()} for blk in model.layers]
    head = None if model.config.tie_word_embeddings else model.lm_head_dv[...].T
    return _DecodeWeights(head=head, layers=layers, feature_major=True)


_WEIGHTS_CACHE: list = []  # [(weakrefs to the state's arrays, their _DecodeWeights)]: the last model's only


def _decode_weights(model: Llama, graphdef, state) -> _DecodeWeights:
    """The decode weights of ``model``; copies are made once and kept while its parameters live."""
    fm = _feature_major(model)
    leaves = jax.tree.leaves(state)
    if _WEIGHTS_CACHE:
        refs, weights = _WEIGHTS_CACHE[0]
        if weights.feature_major == fm and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
            return weights
    _WEIGHTS_CACHE.clear()  # frees the previous copies before making new ones
    tied = model.config.tie_word_embeddings
    if not fm and not tied:
        weights = _DecodeWeights(head=model.lm_head_dv.get_value(), layers=[], feature_major=False)
    else:
        weights = _run("decode_weights", _decode_weights_fn, (graphdef, fm), (state,),
                       desc="transposed weights" if fm else "transposed tied embedding")
        if fm and tied:
            weights = dataclasses.replace(weights, head=model.embedding_vd.get_value())
    if not compiling_only():  # abstract parameters are not kept
        _WEIGHTS_CACHE[:] = [([weakref.ref(x) for x in leaves], weights)]
    return weights


def _forward(model: Llama, cache: _DecodeCache, tokens_bt: Array, pos_bt: Array, seg_bt: Array,
             layers: Optional[list[dict[str, Array]]] = None) -> tuple[Array, _DecodeCache]:
    """Final-norm hidden states ``[B, T, D]`` of ``T`` new tokens per row, cached from slot ``cache.end``.

    The computation of ``Llama.hidden_states`` on the decode cache (`models.decode_cache`: keys
    transposed, an optional shared prefix; padding: ``seg == 0``, slot position ``-1``), with every
    projection one 2-D matmul: row-major on views of the parameters (as `models.llama.dense`), or feature-major on
    ``layers``, the transposed copies of `_DecodeWeights`; the two differ only in the order of
    floating-point sums.
    """
    c, ctx = model.config, _shard_ctx(model)
    dt = jnp.dtype(c.dtype)
    b, t = tokens_bt.shape
    d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    fm = layers is not None
    axis, act = (0, ("act_embed", "batch")) if fm else (-1, ("batch", "act_embed"))
    mm = (lambda w, y: w.astype(dt) @ y) if fm else (lambda w, y: y @ w.astype(dt))
    # A projection's output as [B, T, heads, H]. The barrier keeps XLA from folding the transpose into
    # the matmul, which would make the weight the right operand again.
    split = lambda z, heads: (jax.lax.optimization_barrier(z).T if fm else z).reshape(b, t, heads, h)
    cos, sin = rope_tables(pos_bt, rope_inv_freq(c))  # once per call, not per layer
    slot_pos = jax.lax.dynamic_update_slice(cache.pos, jnp.where(seg_bt != 0, pos_bt, -1), (0, cache.end))
    mask = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= pos_bt[:, :, None]) & (seg_bt != 0)[:, :, None]
    x = jnp.take(model.embedding_vd[...], tokens_bt.reshape(b * t), axis=0).astype(dt)  # [B*T, D]
    x = constrain(ctx, x.T if fm else x, act)
    new_k, new_v = [], []
    for i, blk in enumerate(model.layers):
        with jax.named_scope(f"layer_{i}"):
            a, w = blk.attn, layers[i] if fm else _views(model, blk)
            y = blk.input_norm(x, axis)
            q = rotate_halves(split(mm(w["q"], y), n), cos, sin)
            kk = rotate_halves(split(mm(w["k"], y), k), cos, sin)
            kk = kk.transpose(0, 2, 3, 1) if cache.keys_last else kk.transpose(0, 2, 1, 3)  # [B, K, H, T] or [B, K, T, H]
            vv = split(mm(w["v"], y), k).transpose(0, 2, 1, 3)  # [B, K, T, H]
            at = (0, 0, 0, cache.end) if cache.keys_last else (0, 0, cache.end, 0)
            k_cache = jax.lax.dynamic_update_slice(cache.k[i], kk.astype(cache.k[i].dtype), at)
            v_cache = jax.lax.dynamic_update_slice(cache.v_bksh[i], vv.astype(cache.v_bksh[i].dtype), (0, 0, cache.end, 0))
            prefix = None
            if cache.prefix_k:
                prefix = (cache.prefix_k[i].astype(dt), cache.prefix_v[i].astype(dt), cache.prefix_pos >= 0)
            if cache.keys_last:
                o = grouped_attention(q, k_cache.astype(dt), v_cache.astype(dt), mask, keys_last=True, prefix=prefix)
            elif prefix is None:  # the Pallas kernels (decode kernel for one token), per device on a mesh
                o = a.pallas_attention(q, k_cache.astype(dt), v_cache.astype(dt), pos_bt, slot_pos, seg_bt, None)
            else:  # the kernels over the rows' slots, merged with XLA attention over the shared prefix
                o, lse = a.pallas_attention(q, k_cache.astype(dt), v_cache.astype(dt), pos_bt, slot_pos, seg_bt, None, return_lse=True)
                o = merge_attention(o, lse, *grouped_attention(q, None, None, None, prefix=prefix, return_lse=True))
            o = o.reshape(b * t, n * h)
            x = x + mm(w["o"], o.T if fm else o)
            y = blk.post_attn_norm(x, axis)
            x = x + mm(w["down"], jax.nn.silu(mm(w["gate"], y)) * mm(w["up"], y))
            x = constrain(ctx, x, act)
            new_k.append(k_cache)
            new_v.append(v_cache)
    x = model.final_norm(x, axis)
    x = (x.T if fm else x).reshape(b, t, d)
    return x, dataclasses.replace(cache, k=new_k, v_bksh=new_v, pos=slot_pos, end=cache.end + t)


def _logits(model: Llama, weights: _DecodeWeights, h_bd: Array) -> Array:
    """Float32 logits of final hidden states ``[B, D]``: ``[B, V]``, or ``[V, B]`` feature-major."""
    dt = h_bd.dtype
    if weights.feature_major:
        out, axes = jnp.dot(weights.head.astype(dt), h_bd.T, preferred_element_type=jnp.float32), ("act_vocab", "batch")
    else:
        out, axes = jnp.dot(h_bd, weights.head.astype(dt), preferred_element_type=jnp.float32), ("batch", "act_vocab")
    return constrain(_shard_ctx(model), out, axes)
