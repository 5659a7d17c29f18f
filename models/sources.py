"""A model with its tokenizer, by source name: any ``load_model`` source, or ``"tiny"``.

``"tiny"`` (:data:`TINY_MODEL`) is a random 2-layer, width-64 Llama sized for a real tokenizer
(tests and smoke runs: it learns nothing useful); its tokenizer defaults to the embedded SmolLM2's.
"""

from __future__ import annotations

from typing import Any, Optional

from models.llama import Llama, LlamaConfig, create_model, get_config
from models.loading import EMBEDDED_NAME, load_model
from models.tokenizer import Tokenizer, load_tokenizer

TINY_MODEL = "tiny"


def tiny_config(tok: Any, dtype: str, param_dtype: Optional[str] = None, **options: Any) -> LlamaConfig:
    """The `tiny` test model sized for a real tokenizer (its vocabulary and special ids);
    ``param_dtype`` defaults to ``dtype``; ``options`` set other config fields (``attention_impl``, ``remat``)."""
    return get_config(
        "tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids,
        pad_token_id=tok.pad_token_id, max_position_embeddings=4096, dtype=dtype, param_dtype=param_dtype or dtype,
        **options,
    )


def default_tokenizer(model: str, tokenizer: Optional[str] = None) -> str:
    """The tokenizer source of a run that starts from ``model``: ``tokenizer`` when given, else the
    model's own (the embedded SmolLM2's for ``"tiny"``)."""
    return tokenizer or (EMBEDDED_NAME if model == TINY_MODEL else model)


def load_model_and_tokenizer(source: str, tokenizer: str, *, dtype: str = "float32", param_dtype: Optional[str] = None,
                             mesh: Any = None, seed: int = 0, attention_impl: Optional[str] = None,
                             remat: Optional[bool] = None) -> tuple[LlamaConfig, Llama, Tokenizer]:
    """``(config, model, tokenizer)``: the tokenizer of source ``tokenizer``, then the weights of
    ``source`` (``load_model``), or for ``"tiny"`` a random tiny model from ``seed`` sized for it.
    ``dtype`` computes, ``param_dtype`` (default ``dtype``) holds the parameters.
    ``attention_impl`` / ``remat``: None keeps the checkpoint's own (saved by ``save_hf``, else the defaults)."""
    tok = load_tokenizer(tokenizer)
    options = {k: v for k, v in (("attention_impl", attention_impl), ("remat", remat)) if v is not None}
    if source == TINY_MODEL:
        config = tiny_config(tok, dtype, param_dtype, **options)
        return config, create_model(config, seed=seed, mesh=mesh), tok
    config, model = load_model(source, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **options)
    return config, model, tok
