"""Oracle helpers: random Hugging Face Llama checkpoints written to disk, and HF logits."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def make_hf_checkpoint(directory: str, *, seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    """A randomly initialised HF ``LlamaForCausalLM`` saved as safetensors in ``directory``."""
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # default init is tiny; widen it so errors are visible in the logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def max_rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
