"""Grouped-query attention in plain XLA: the one jnp implementation of the project.

The model uses it for training and scoring (`xla_attention`, in query blocks for self-attention),
the sampler for decoding against its cache (keys feature-major, with a shared prompt prefix), and
the kernels' reference (`attention_kernels.reference`) in float32 at ``HIGHEST`` precision. Shapes:
``B`` rows, ``T`` queries, ``S`` keys, ``N`` query heads, ``K`` KV heads (``G = N // K`` query
heads share one), ``H`` head dim.

K/V are never repeated: each KV head's ``G * T`` queries are the rows of one batched
``[G*T, H] x [H, S]`` matmul. 4-D batched matmuls stay on XLA:CPU's fast path, where a 5-D
``btkgh`` einsum falls off it (about 10x slower).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)  # finite: a fully masked row has no NaN in values or gradients


def grouped_attention(
    q_btnh: Array,
    k: Optional[Array],
    v_bksh: Optional[Array],
    mask_bts: Optional[Array],
    *,
    keys_last: bool = False,
    prefix: Optional[tuple[Array, Array, Array]] = None,
    return_lse: bool = False,
    sm_scale: Optional[float] = None,
    precision: Any = None,
):
    """Attention of ``q [B, T, N, H]`` over each row's own keys and an optional shared prefix.

    ``k`` is ``[B, K, S, H]``, or ``[B, K, H, S]`` with ``keys_last`` (the sampler's cache layout);
    ``v_bksh [B, K, S, H]``; ``mask_bts [B, T, S]`` says which key each query sees. ``prefix``:
    ``(keys, values [K, P, H], visible [P])`` shared by every row (keys ``[K, H, P]`` with
    ``keys_last``), attended in the same softmax as the row's own keys; its products are one
    ``[B*G*T, H] x [H, P]`` matmul per KV head, so the prefix is read once, not once per row.
    ``k``, ``v_bksh`` and ``mask_bts`` may all be None with a prefix: attention over the prefix alone.

    Scores are ``q . k * sm_scale`` (default ``1 / sqrt(H)``) accumulated in float32. Returns the
    output ``[B, T, N, H]`` in ``q``'s dtype; with ``return_lse``, ``(out, lse)`` with both in
    float32 and ``lse [B, T, N]`` the log-sum-exp of each query's visible scores, which merges this
    result with attention over other keys (`attention_kernels.dispatch.merge_attention`). A query
    that sees no key returns zeros and log-sum-exp ``-inf``.
    """
    own = k is not None
    if not own and prefix is None:
        raise ValueError("grouped_attention needs keys, a prefix, or both")
    b, t, n, h = q_btnh.shape
    kh = k.shape[1] if own else prefix[0].shape[0]
    g = n // kh
    dt = v_bksh.dtype if own else prefix[1].dtype
    scale = 1.0 / math.sqrt(h) if sm_scale is None else sm_scale
    f32 = jnp.float32
    q = q_btnh.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)  # rows in (g, t) order
    seen = None  # [B, 1, 1, T]: the query sees at least one key
    if own:
        scores = jnp.einsum("bkmh,bkhs->bkms" if keys_last else "bkmh,bksh->bkms", q, k,
                            preferred_element_type=f32, precision=precision) * scale
        scores = jnp.where(mask_bts[:, None, None], scores.reshape(b, kh, g, t, -1), _NEG).reshape(b, kh, g * t, -1)
        seen = jnp.any(mask_bts, axis=-1)[:, None, None, :]
    if prefix is None and not return_lse:
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkms,bksh->bkmh", probs, v_bksh, preferred_element_type=f32, precision=precision)
    else:  # one softmax over both parts, each computed in its own layout (no concatenation)
        top = jnp.max(scores, axis=-1) if own else None  # [B, K, M]
        if prefix is not None:
            pk, pv, visible = prefix
            by_head = lambda x: x.transpose(1, 0, 2).reshape(kh, -1)  # [B, K, M] -> [K, B*M]
            by_row = lambda x: x.reshape(kh, b, g * t).transpose(1, 0, 2)  # [K, B*M] -> [B, K, M]
            qk = q.transpose(1, 0, 2, 3).reshape(kh, b * g * t, h)
            shared = jnp.einsum("kmh,khp->kmp" if keys_last else "kmh,kph->kmp", qk, pk,
                                preferred_element_type=f32, precision=precision) * scale  # [K, B*M, P]
            shared = jnp.where(visible, shared, _NEG)
            shared_top = by_row(jnp.max(shared, axis=-1))
            top = shared_top if top is None else jnp.maximum(top, shared_top)
            seen = jnp.any(visible) if seen is None else seen | jnp.any(visible)
        out = total = None
        if own:
            own_p = jnp.exp(scores - top[..., None])
            total = jnp.sum(own_p, axis=-1)
            out = jnp.einsum("bkms,bksh->bkmh", own_p.astype(dt), v_bksh, preferred_element_type=f32, precision=precision)
        if prefix is not None:
            shared = jnp.exp(shared - by_head(top)[..., None])
            shared_total = by_row(jnp.sum(shared, axis=-1))
            total = shared_total if total is None else total + shared_total
            from_prefix = jnp.einsum("kmp,kph->kmh", shared.astype(dt), pv, preferred_element_type=f32, precision=precision)
            from_prefix = from_prefix.reshape(kh, b, g * t, h).transpose(1, 0, 2, 3)
            out = from_prefix if out is None else out + from_prefix
        out = out / total[..., None]
    seen_rows = jnp.broadcast_to(seen, (b, 1, 1, t))
    out = jnp.where(seen_rows[..., None], out.reshape(b, kh, g, t, h), 0.0)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    if not return_lse:
        return out.astype(q_btnh.dtype)
    lse = (top + jnp.log(total)).reshape(b, kh, g, t).transpose(0, 3, 1, 2).reshape(b, t, n)
    return out.astype(f32), jnp.where(seen_rows.reshape(b, t, 1), lse, -jnp.inf)


def xla_attention(q_btnh: Array, k_bksh: Array, v_bksh: Array, mask_bts: Array, *, query_block: int = 0) -> Array:
    """`grouped_attention` of the model: ``k_bksh``/``v_bksh [B, K, S, H]``, output in ``q``'s dtype.

    ``query_block > 0`` is for self-attention over a row in index order (``S == T`` and
    ``mask[b, i, j]`` false for every ``j > i``): queries go in blocks of that many, and a block
    reads only the keys up to its last query, so the ``[T, S]`` scores are never materialized
    whole and the masked upper triangle is skipped (measured on the 2-core CPU, SmolLM2 shapes,
    4 x 512 tokens, forward + backward of one layer: 327 ms whole, 134 ms in blocks of 128).
    Fully masked query rows return zeros.
    """
    t = q_btnh.shape[1]
    if query_block <= 0 or t <= query_block:
        return grouped_attention(q_btnh, k_bksh, v_bksh, mask_bts)
    if k_bksh.shape[2] != t:
        raise ValueError(f"query_block needs self-attention (S == T), got T={t}, S={k_bksh.shape[2]}")
    outs = []
    for i in range(0, t, query_block):
        e = min(t, i + query_block)
        outs.append(grouped_attention(q_btnh[:, i:e], k_bksh[:, :, :e], v_bksh[:, :, :e], mask_bts[:, i:e, :e]))
    return jnp.concatenate(outs, axis=1)
