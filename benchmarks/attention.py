"""Attention speed: our Pallas kernels against XLA, cuDNN and JAX's shipped Pallas kernels.

``python -m benchmarks.attention`` on a TPU or NVIDIA GPU measures forward and forward+backward
TFLOP/s of causal GQA attention (bf16, ``Hq=32, Hkv=8, D=128`` by default, the Llama-3-8B shape)
over sequence lengths 1k..16k at a fixed token count per step, then a packed batch (many short
documents in one row, as DPO/SFT packing produces) where our segment-aware block skipping is set
against the same packed batch under a dense mask.

Peers (each skipped with a note when unavailable or failing):

- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` (GQA native);
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only);
- ``jax_pallas``: JAX's shipped kernels, ``pallas.ops.gpu.attention.mha`` (Triton) on GPU,
  ``pallas.ops.tpu.flash_attention`` and splash attention on TPU; they take no GQA, so K/V are
  repeated to all query heads (as a user of those kernels would have to).

FLOPs count only visible (query, key) pairs: ``4 * D * pairs * Hq`` forward, 2.5x that for the
backward pass, so a kernel that computes masked tiles gets no credit for them. Times are medians of
``--iters`` runs after a warm-up. On a machine without an accelerator the script says so and exits
0; ``--interpret`` runs a tiny smoke configuration in the Pallas interpreter instead.

The last line holds ``name=value`` ratios (ours over a peer, geometric mean over lengths; > 1 is
faster): ``fwd_vs_xla``, ``bwd_vs_xla``, ``fwd_vs_cudnn``, ``bwd_vs_cudnn``, ``fwd_vs_jax_pallas``,
``bwd_vs_jax_pallas``, ``packed_fwd_vs_dense_mask``, ``packed_bwd_vs_dense_mask``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import emit
from benchmarks.timing import timings
from attention_kernels import compat
from attention_kernels.flash_attention import flash_attention


def _time(fn: Callable, args, iters: int) -> float:
    """Median seconds of ``fn(*args)`` (compiled once, one warm-up call)."""
    return statistics.median(timings(fn, *args, n=iters))


def _fwd_bwd(attn: Callable) -> Callable:
    """Forward + backward (all three input gradients) as one jitted function."""
    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _visible_pairs(seg: Optional[np.ndarray], t: int, causal: bool) -> float:
    """Number of (query, key) pairs the mask lets through, summed over the batch."""
    if seg is None:
        return t * (t + 1) / 2 if causal else float(t * t)
    total = 0.0
    for row in seg:
        ids, counts = np.unique(row[row != 0], return_counts=True)
        total += float(np.sum(counts * (counts + 1) / 2 if causal else counts ** 2))
    return total


# ------------------------------------------------------------------------------------- contenders


def _ours(seg, interpret):
    return lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=seg, interpret=interpret)


def _xla(mask, implementation="xla"):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation=implementation)


def _repeat_kv(x, group):
    return jnp.repeat(x, group, axis=2)


def _jax_pallas_gpu(seg, group):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    def attn(q, k, v):
        return gpu_attention.mha(q, _repeat_kv(k, group), _repeat_kv(v, group), seg, sm_scale=1.0 / math.sqrt(q.shape[-1]),
                                 causal=True, block_sizes=gpu_attention.BlockSizes.get_default())
    return attn


def _jax_pallas_tpu(seg, group):
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    def attn(q, k, v):
        heads = lambda x: x.transpose(0, 2, 1, 3)
        ids = None if seg is None else tpu_flash.SegmentIds(q=seg, kv=seg)
        out = tpu_flash.flash_attention(heads(q), heads(_repeat_kv(k, group)), heads(_repeat_kv(v, group)), segment_ids=ids,
                                        causal=True, sm_scale=1.0 / math.sqrt(q.shape[-1]))
        return heads(out)
    return attn


def _splash_tpu(t, hq, group):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(hq)])
    blk = min(512, t)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                              block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)

    def attn(q, k, v):
        heads = lambda x: x.transpose(0, 2, 1, 3)
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = jax.vmap(kernel)(heads(q) * scale, heads(_repeat_kv(k, group)), heads(_repeat_kv(v, group)))
        return heads(out)
    return attn


def _peers(platform: str, t: int, hq: int, group: int, seg, dense_mask):
    """name -> attention function on [B, T, H, D] inputs (built lazily; failures become notes)."""
    peers: dict[str, Callable[[], Callable]] = {"xla": lambda: _xla(dense_mask)}
    if platform == "gpu":
        peers["cudnn"] = lambda: _xla(dense_mask, "cudnn")
        peers["jax_pallas"] = lambda: _jax_pallas_gpu(seg, group)
    elif platform == "tpu":
        peers["jax_pallas"] = lambda: _jax_pallas_tpu(seg, group)
        if seg is None:
            peers["jax_splash"] = lambda: _splash_tpu(t, hq, group)
    return peers


# ------------------------------------------------------------------------------------------ runs


def _measure(name, build, q, k, v, flops_fwd, iters, rows, results, key):
    try:
        attn = build()
        fwd = _time(jax.jit(attn), (q, k, v), iters)
        bwd = _time(_fwd_bwd(attn), (q, k, v), iters)
    except Exception as e:  # a peer that does not support this shape/device: note it and go on
        rows.append(f"  {name:<12} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return
    tf_fwd, tf_bwd = flops_fwd / fwd / 1e12, 3.5 * flops_fwd / bwd / 1e12
    rows.append(f"  {name:<12} fwd {fwd * 1e3:9.3f} ms {tf_fwd:7.1f} TFLOP/s   fwd+bwd {bwd * 1e3:9.3f} ms {tf_bwd:7.1f} TFLOP/s")
    results[(name, key)] = (fwd, bwd)


def _packed_segments(b: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of documents with lengths 64..1024 (log-uniform), ids growing along the row, padded tail."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, doc = 0, 1
        while pos < t - 64:
            n = int(min(t - pos, np.exp(rng.uniform(np.log(64), np.log(1024)))))
            seg[r, pos:pos + n] = doc
            pos, doc = pos + n, doc + 1
    return seg


def run(args) -> dict:
    platform = compat.platform()
    interpret = args.interpret
    dt = jnp.bfloat16 if not interpret else jnp.float32
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    group = hq // hkv
    rng = np.random.default_rng(0)
    results: dict = {}
    print(f"device: {jax.devices()[0].device_kind} ({platform}), dtype {jnp.dtype(dt).name}, Hq={hq} Hkv={hkv} D={d}")

    def inputs(b, t):
        q = jnp.asarray(rng.standard_normal((b, t, hq, d)), dt)
        k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dt)
        v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dt)
        return q, k, v

    for t in args.lengths:
        b = max(1, args.tokens // t)
        q, k, v = inputs(b, t)
        flops = 4 * d * hq * b * _visible_pairs(None, t, True)
        rows = [f"causal T={t} B={b}"]
        _measure("ours", lambda: _ours(None, interpret), q, k, v, flops, args.iters, rows, results, t)
        if not interpret:
            for name, build in _peers(platform, t, hq, group, None, None).items():
                _measure(name, build, q, k, v, flops, args.iters, rows, results, t)
        print("\n".join(rows), flush=True)

    t = args.packed_length
    b = max(1, args.tokens // t)
    q, k, v = inputs(b, t)
    seg_np = _packed_segments(b, t, rng)
    seg = jnp.asarray(seg_np)
    flops = 4 * d * hq * _visible_pairs(seg_np, t, True)
    dense = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] != 0)
    dense &= jnp.tril(jnp.ones((t, t), bool))[None, None]
    rows = [f"packed T={t} B={b}: {int(seg_np.max())} documents per row, {100 * _visible_pairs(seg_np, t, True) / (b * _visible_pairs(None, t, True)):.1f}% of the causal pairs visible"]
    _measure("ours", lambda: _ours(seg, interpret), q, k, v, flops, args.iters, rows, results, "packed")
    _measure("dense_mask", lambda: _xla(dense), q, k, v, flops, args.iters, rows, results, "packed")
    if not interpret:
        for name, build in _peers(platform, t, hq, group, seg, dense).items():
            if name != "xla":
                _measure(name, build, q, k, v, flops, args.iters, rows, results, "packed")
    print("\n".join(rows), flush=True)
    return results


def ratios(results: dict, lengths) -> dict[str, float]:
    out: dict[str, float] = {}
    for peer in ("xla", "cudnn", "jax_pallas"):
        for i, which in enumerate(("fwd", "bwd")):
            r = [results[(peer, t)][i] / results[("ours", t)][i]
                 for t in lengths if (peer, t) in results and ("ours", t) in results]
            if r:
                out[f"{which}_vs_{peer}"] = float(np.exp(np.mean(np.log(r))))
    for i, which in enumerate(("fwd", "bwd")):
        if ("ours", "packed") in results and ("dense_mask", "packed") in results:
            out[f"packed_{which}_vs_dense_mask"] = results[("dense_mask", "packed")][i] / results[("ours", "packed")][i]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step: batch = tokens // length")
    p.add_argument("--packed-length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--interpret", action="store_true", help="smoke-run tiny shapes in the Pallas interpreter (CPU)")
    args = p.parse_args(argv)
    if args.interpret:
        args.lengths, args.tokens, args.packed_length, args.iters = [64, 128], 128, 128, 1
        args.heads, args.kv_heads, args.head_dim = 4, 2, 32
    elif compat.platform() not in compat.BACKENDS:
        print(f"no accelerator (default backend {jax.default_backend()!r}): attention benchmarks need a TPU or GPU; "
              "run with --interpret for a CPU smoke test")
        emit("attention", {"accelerator": "none"})
        return 0
    results = run(args)
    found = ratios(results, args.lengths)
    emit("attention", found or {"ratios": "none"}, digits=dict.fromkeys(found, 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
