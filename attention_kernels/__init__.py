"""Attention kernels in Pallas (TPU: Mosaic, GPU: Triton) with plain-``jnp`` references.

- ``flash_attention``: training/prefill attention, GQA, packed segments, block skipping, custom VJP;
- ``decode_attention``: one query token per sequence against the KV cache, split-K;
- ``attention`` (``attention_kernels.dispatch``): the model's entry point, XLA or Pallas per backend;
- ``attention_kernels.reference``: the jnp references both are tested against.
"""

from attention_kernels.decode_attention import decode_attention
from attention_kernels.dispatch import attention, resolve_impl
from attention_kernels.flash_attention import BlockSizes, flash_attention
from attention_kernels.reference import attention_reference, decode_reference

__all__ = [
    "BlockSizes",
    "attention",
    "attention_reference",
    "decode_attention",
    "decode_reference",
    "flash_attention",
    "resolve_impl",
]
