"""Llama-3 in Flax NNX: config, modules, KV cache.

Shapes are spelled in names: ``B`` batch, ``T`` query length, ``S`` key/cache length, ``D`` model
width, ``N`` query heads, ``K`` key/value heads, ``G = N // K`` query heads per KV head, ``H`` head
dim, ``F`` MLP width, ``V`` vocabulary.

The forward pass is driven by positions and segment ids, never by a dense mask from the caller:
a query attends to a key when both are in the same segment (segment id 0 is padding and attends to
nothing) and the key's position is not after the query's. The KV cache stores the position of
every slot (``-1`` for empty or padding slots), so a batch of prompts of different lengths shares
one write index and decode is a single jitted step. Without a cache a row attends to itself in
index order as well: a token never sees a later token of its row, so the XLA path can skip the
upper triangle block by block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_kernels import dispatch
from attention_kernels.xla_attention import xla_attention
from models.sharding import ShardingContext, constrain, logical_to_spec, state_shardings

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``llama3`` (Llama-3.1 and later) or ``linear``."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-family model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "xla"  # "xla", "pallas" or "auto" (Pallas on TPU/GPU, XLA on CPU)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.attention_impl not in dispatch.IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {dispatch.IMPLS}")

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    def flops_per_token(self, context: int = 0) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add), attention over ``context`` keys."""
        d = self.hidden_size
        attn_proj = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * self.intermediate_size
        attn = 2 * self.num_heads * self.head_dim * context
        return 2.0 * (self.num_layers * (attn_proj + mlp + attn) + d * self.vocab_size)


_LLAMA3_VOCAB = 128256
_LLAMA3_EOS = (128001, 128008, 128009)

PRESETS: dict[str, LlamaConfig] = {
    "llama3-8b": LlamaConfig(
        vocab_size=_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama3-70b": LlamaConfig(
        vocab_size=_LLAMA3_VOCAB, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama3.1-8b": LlamaConfig(
        vocab_size=_LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=_LLAMA3_EOS,
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
    ),
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
    "tiny-llama3": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=8,
        num_kv_heads=2, head_dim=8, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), max_position_embeddings=1024,
        bos_token_id=1, eos_token_ids=(2, 3), pad_token_id=0,
    ),
}


def get_config(name: str, **overrides: Any) -> LlamaConfig:
    """A preset by name (see ``PRESETS``), with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` of the rotary embedding, with the checkpoint's scaling."""
    h = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
    sc = config.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    if sc.rope_type == "linear":
        return (inv / sc.factor).astype(np.float32)
    if sc.rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {sc.rope_type!r} (supported: llama3, linear)")
    # Llama-3.1: long wavelengths are divided by `factor`, short ones kept, and the band between
    # the two wavelength limits is interpolated linearly in (context / wavelength).
    old_ctx = sc.original_max_position_embeddings
    low_wavelen = old_ctx / sc.low_freq_factor
    high_wavelen = old_ctx / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (old_ctx / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(positions_bt: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """``(cos, sin)``, each ``[B, T, 1, 2, H/2]`` float32, for :func:`rotate_halves`: ``cos`` is
    ``[c, c]`` and ``sin`` is ``[-s, s]`` over the two halves of a head."""
    angles = positions_bt.astype(jnp.float32)[:, :, None, None, None] * jnp.asarray(inv_freq)  # [B, T, 1, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([cos, cos], axis=3), jnp.concatenate([-sin, sin], axis=3)


def rotate_halves(x_btnh: Array, cos: Array, sin: Array) -> Array:
    """RoPE on the two halves of each head (the Hugging Face Llama layout), tables from
    :func:`rope_tables`: ``[x1, x2] -> [x1 c - x2 s, x2 c + x1 s]``, written as
    ``x * [c, c] + swap_halves(x) * [-s, s]`` (one fused elementwise pass: XLA:CPU runs the
    split-and-concatenate form as a slow single-threaded loop, forward and backward)."""
    b, t, n, h = x_btnh.shape
    x = x_btnh.astype(jnp.float32).reshape(b, t, n, 2, h // 2)
    return (x * cos + x[:, :, :, ::-1, :] * sin).reshape(b, t, n, h).astype(x_btnh.dtype)


# -------------------------------------------------------------------------------------- KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated per-layer keys and values plus the position held by each slot.

    ``k[i]``/``v[i]``: ``[B, K, S, H]`` for layer ``i``; ``pos``: ``[B, S]`` int32, ``-1`` for empty
    or padding slots; ``end``: int32 scalar, the next slot to write (shared by all rows).
    """

    k: list[Array]
    v: list[Array]
    pos: Array
    end: Array

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, capacity: int, dtype: Any = None) -> "KVCache":
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        return cls(
            k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
            v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
            pos=jnp.full((batch, capacity), -1, jnp.int32),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    @property
    def batch(self) -> int:
        return self.pos.shape[0]


# ------------------------------------------------------------------------------------- attention


def attention_mask(q_pos: Array, k_pos: Array, q_seg: Optional[Array], k_seg: Optional[Array]) -> Array:
    """``[B, T, S]`` boolean: same segment (0 = padding), key position valid and not in the future.

    Keys without segment ids (the KV cache) only need a live query (``q_seg != 0``). The rule is
    the one the attention kernels implement (`attention_kernels.dispatch.attention_mask`)."""
    return dispatch.attention_mask(q_pos, k_pos, q_seg, k_seg)


# Queries per block when a row attends to itself (no cache): see `attention_kernels.xla_attention.xla_attention`.
SELF_ATTENTION_QUERY_BLOCK = 128


def dot_product_attention(q_btnh: Array, k_bksh: Array, v_bksh: Array, mask_bts: Array, query_block: int = 0) -> Array:
    """Grouped-query attention without repeating K/V. Fully masked query rows return zeros.

    ``query_block > 0``: self-attention in index order (no key after its query is visible), run in
    query blocks that skip the masked upper triangle (`attention_kernels.xla_attention.xla_attention`)."""
    return xla_attention(q_btnh, k_bksh, v_bksh, mask_bts, query_block=query_block)


# --------------------------------------------------------------------------------------- modules


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype: Any, axes: tuple) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def dense(x: Array, w: Array, n_in: int = 1) -> Array:
    """``x [..., *in] @ w [*in, *out]`` over the last ``n_in`` axes of ``x``, as one 2-D matmul.

    Rows are flattened first: XLA:CPU lays out the weight gradients of batched 3-D einsums with
    slow transposing copies (SmolLM2 MLP forward + backward on 4 x 512 tokens: 300 -> 220 ms).
    """
    lead, k_in = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
    out = x.reshape(-1, k_in) @ w.reshape(k_in, -1)
    return out.reshape(*lead, *w.shape[n_in:])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: Any):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: Array, axis: int = -1) -> Array:
        """Normalizes over ``axis``: the last (rows of features) or 0 (feature-major ``[D, ...]``)."""
        if axis not in (-1, 0):
            raise ValueError(f"RMSNorm normalizes over axis -1 or 0, not {axis}")
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axis, keepdims=True) + self.eps)
        scale = self.scale.value.astype(x.dtype)
        return (scale if axis == -1 else scale.reshape((-1,) + (1,) * (x.ndim - 1))) * xf.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, shard: Optional[ShardingContext]):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.q_proj_dnh = _param(rngs, (c.hidden_size, c.num_heads, c.head_dim), c.hidden_size, pd, ("embed", "heads", "head_dim"))
        self.k_proj_dkh = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), c.hidden_size, pd, ("embed", "kv_heads", "head_dim"))
        self.v_proj_dkh = _param(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), c.hidden_size, pd, ("embed", "kv_heads", "head_dim"))
        self.o_proj_nhd = _param(rngs, (c.num_heads, c.head_dim, c.hidden_size), c.num_heads * c.head_dim, pd, ("heads", "head_dim", "embed"))
        self.config = c
        self.dtype = jnp.dtype(c.dtype)
        self.shard = shard

    def __call__(self, x_btd: Array, pos_bt: Array, seg_bt: Optional[Array], layer_cache: Optional[tuple]) -> tuple[Array, Optional[tuple]]:
        dt = self.dtype
        q = dense(x_btd, self.q_proj_dnh.value.astype(dt))  # [B, T, N, H]
        k = dense(x_btd, self.k_proj_dkh.value.astype(dt))  # [B, T, K, H]
        v = dense(x_btd, self.v_proj_dkh.value.astype(dt)).transpose(0, 2, 1, 3)  # [B, K, T, H]
        q = constrain(self.shard, q, ("batch", "length", "act_heads", None))
        cos, sin = rope_tables(pos_bt, rope_inv_freq(self.config))
        q = rotate_halves(q, cos, sin)
        k = rotate_halves(k, cos, sin).transpose(0, 2, 1, 3)
        if layer_cache is None:
            kv_pos, kv_seg, new_cache = pos_bt, seg_bt, None
        else:
            k_cache, v_cache, slot_pos, end = layer_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, end, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, end, 0))
            kv_pos, kv_seg, new_cache = slot_pos, None, (k, v)
        if dispatch.resolve_impl(self.config.attention_impl, self.shard.mesh if self.shard else None) == "pallas":
            out = self.pallas_attention(q, k.astype(dt), v.astype(dt), pos_bt, kv_pos, seg_bt, kv_seg)
        else:
            mask, block = attention_mask(pos_bt, kv_pos, seg_bt, kv_seg), 0
            if layer_cache is None:  # a row attending to itself: never to a later token (as in Hugging Face)
                t = pos_bt.shape[1]
                mask, block = mask & jnp.tril(jnp.ones((t, t), bool))[None], SELF_ATTENTION_QUERY_BLOCK
            out = dot_product_attention(q, k.astype(dt), v.astype(dt), mask, query_block=block)
        out = dense(out, self.o_proj_nhd.value.astype(dt), n_in=2)
        return out, new_cache


    def pallas_attention(self, q: Array, k: Array, v: Array, pos_bt: Array, kv_pos: Array, seg_bt: Optional[Array],
                         kv_seg: Optional[Array], return_lse: bool = False):
        """The Pallas kernels; on a mesh, once per device through ``shard_map`` (batch rows over
        ``data``/``fsdp`` and heads over ``tensor`` where they divide, as the activations are).
        ``return_lse``: also the log-sum-exp ``[B, T, N]`` (see `attention_kernels.dispatch.attention`)."""
        kw = dict(q_positions=pos_bt, kv_positions=kv_pos, q_segment_ids=seg_bt, kv_segment_ids=kv_seg, return_lse=return_lse)
        if self.shard is None:
            return dispatch.attention(q, k, v, impl="pallas", **kw)
        mesh, rules = self.shard.mesh, self.shard.rule_map
        batch = logical_to_spec(("batch",), q.shape[:1], mesh, rules)
        heads = logical_to_spec(("act_kv_heads",), k.shape[1:2], mesh, rules)
        q_heads = logical_to_spec(("act_heads",), q.shape[2:3], mesh, rules)
        head_axis = heads[0] if len(heads) and len(q_heads) and heads[0] == q_heads[0] else None
        return dispatch.sharded_attention(
            q, k, v, mesh=mesh, batch_axes=batch[0] if len(batch) else None, head_axis=head_axis, **kw)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, shard: Optional[ShardingContext]):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.gate_proj_df = _param(rngs, (c.hidden_size, c.intermediate_size), c.hidden_size, pd, ("embed", "mlp"))
        self.up_proj_df = _param(rngs, (c.hidden_size, c.intermediate_size), c.hidden_size, pd, ("embed", "mlp"))
        self.down_proj_fd = _param(rngs, (c.intermediate_size, c.hidden_size), c.intermediate_size, pd, ("mlp", "embed"))
        self.dtype = jnp.dtype(c.dtype)
        self.shard = shard

    def __call__(self, x_btd: Array) -> Array:
        dt = self.dtype
        gate = dense(x_btd, self.gate_proj_df.value.astype(dt))
        up = dense(x_btd, self.up_proj_df.value.astype(dt))
        hidden = constrain(self.shard, jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense(hidden, self.down_proj_fd.value.astype(dt))


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, shard: Optional[ShardingContext]):
        pd = jnp.dtype(config.param_dtype)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
        self.attn = Attention(config, rngs, shard)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd)
        self.mlp = MLP(config, rngs, shard)

    def __call__(self, x, pos, seg, layer_cache):
        with jax.named_scope("attention"):
            a, new_cache = self.attn(self.input_norm(x), pos, seg, layer_cache)
        x = x + a
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attn_norm(x))
        return x, new_cache


class Llama(nnx.Module):
    """The Llama decoder. ``model(tokens)`` returns float32 logits ``[B, T, V]``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, shard: Optional[ShardingContext] = None):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.shard = shard
        self.embedding_vd = nnx.Param(
            jax.nn.initializers.normal(stddev=1.0)(rngs.params(), (c.vocab_size, c.hidden_size), pd),
            logical_axes=("vocab", "embed"),
        )
        self.layers = nnx.List([Block(c, rngs, shard) for _ in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, pd)
        if not c.tie_word_embeddings:
            self.lm_head_dv = _param(rngs, (c.hidden_size, c.vocab_size), c.hidden_size, pd, ("embed", "vocab"))

    # The forward pass is split so that callers (sampler, scorer) can compute logits only where needed.
    def hidden_states(
        self,
        tokens_bt: Array,
        *,
        positions: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        cache: Optional[KVCache] = None,
    ) -> tuple[Array, Optional[KVCache]]:
        """Final-norm hidden states ``[B, T, D]`` (compute dtype) and the updated cache."""
        c = self.config
        b, t = tokens_bt.shape
        dt = jnp.dtype(c.dtype)
        if positions is None:
            start = 0 if cache is None else cache.end
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = positions.astype(jnp.int32)
        x = jnp.take(self.embedding_vd.value, tokens_bt, axis=0).astype(dt)
        x = constrain(self.shard, x, ("batch", "residual_length", "act_embed"))
        new_cache = None
        if cache is not None:
            slot_pos = positions if segment_ids is None else jnp.where(segment_ids != 0, positions, -1)
            pos_all = jax.lax.dynamic_update_slice(cache.pos, slot_pos, (0, cache.end))
            new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            if self.shard is not None and self.shard.weights_layer_by_layer and i + 1 < len(self.layers):
                # The next layer's weights become available (to be gathered) with this layer's input.
                x, ahead = jax.lax.optimization_barrier((x, nnx.state(self.layers[i + 1])))
                nnx.update(self.layers[i + 1], ahead)
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], pos_all, cache.end)
            with jax.named_scope(f"layer_{i}"):
                if c.remat and cache is None:
                    x, _ = nnx.remat(lambda blk, x_, p_, s_: blk(x_, p_, s_, None))(block, x, positions, segment_ids)
                else:
                    x, lc = block(x, positions, segment_ids, layer_cache)
            if cache is not None:
                new_k.append(lc[0])
                new_v.append(lc[1])
            x = constrain(self.shard, x, ("batch", "residual_length", "act_embed"))
        x = self.final_norm(x)
        if cache is not None:
            new_cache = KVCache(k=new_k, v=new_v, pos=pos_all, end=cache.end + t)
        return x, new_cache

    def logits(self, h_btd: Array) -> Array:
        """Projects hidden states to float32 logits."""
        dt = h_btd.dtype
        if self.config.tie_word_embeddings:
            out = dense(h_btd, self.embedding_vd.value.astype(dt).T)
        else:
            out = dense(h_btd, self.lm_head_dv.value.astype(dt))
        out = out.astype(jnp.float32)
        return constrain(self.shard, out, ("batch", "length", "act_vocab"))

    def __call__(
        self,
        tokens_bt: Array,
        *,
        positions: Optional[Array] = None,
        segment_ids: Optional[Array] = None,
        cache: Optional[KVCache] = None,
    ):
        """Logits ``[B, T, V]`` float32; with ``cache`` also returns the updated cache."""
        h, new_cache = self.hidden_states(tokens_bt, positions=positions, segment_ids=segment_ids, cache=cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


def create_model(config: LlamaConfig, *, seed: int = 0, mesh: Any = None) -> Llama:
    """A randomly initialised model; with a mesh, every parameter is created already sharded."""
    shard = ShardingContext(mesh) if mesh is not None else None
    if shard is None:
        return Llama(config, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed), shard=shard))
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, shard)

    @jax.jit
    def init():
        state = nnx.state(Llama(config, rngs=nnx.Rngs(seed), shard=shard))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, init())


def with_sharding(model: nnx.Module, shard: Optional[ShardingContext]) -> nnx.Module:
    """``model`` with every activation constraint pointed at ``shard`` (another mesh or other
    rules; None: none). New module objects sharing the same arrays: ``model`` is left as it is."""
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(clone):
        if isinstance(node, nnx.Module) and hasattr(node, "shard"):
            node.shard = shard
    return clone


def compute_copy(model: Llama) -> Llama:
    """``model`` itself when its parameters are in the compute dtype; else a copy with every
    parameter cast to ``config.dtype`` once (same sharding), so sampling and scoring read
    bfloat16 weights rather than casting float32 master weights at every step. Training keeps
    the master weights (the forward casts them; `metajudge.train`)."""
    c = model.config
    if jnp.dtype(c.param_dtype) == jnp.dtype(c.dtype):
        return model
    graphdef, state = nnx.split(model)
    dt = jnp.dtype(c.dtype)
    cast = lambda x: (jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding) if isinstance(x, jax.ShapeDtypeStruct)
                      else x.astype(dt))  # abstract parameters: an ahead-of-time compile (`models.executables`)
    state = jax.tree.map(lambda x: cast(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    copy = nnx.merge(graphdef, state)
    copy.config = c.replace(param_dtype=c.dtype)
    return copy
